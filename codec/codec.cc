#include "codec/codec.h"

#include <algorithm>
#include <limits>
#include <vector>

#include "absl/strings/str_cat.h"
#include "codec/byte_io.h"
#include "codec/crc32c.h"
#include "codec/format.h"
#include "codec/group_coder.h"
#include "codec/levels.h"
#include "codec/quantize.h"
#include "codec/transform.h"

namespace kvcache::codec {
namespace {

using internal::Header;
using internal::PlaneSpec;

// Plane p (2 * layer + kv) of a transform stream; only keys carry RoPE.
internal::TransformPlane PlaneOf(const ModelProfile* profile, uint32_t p,
                                 absl::Span<const internal::SinCos> rope) {
  const bool is_value = p % 2 == 1;
  return {profile, p / 2, is_value,
          is_value ? absl::Span<const internal::SinCos>() : rope};
}

absl::Status CheckProfileFits(const EncodeOptions& options,
                              const ChunkShape& shape) {
  const ModelProfile* p = options.profile;
  if (p == nullptr) {
    return absl::InvalidArgumentError(
        "a transform level needs a model profile");
  }
  if (p->layers != shape.layers || p->kv_heads != shape.kv_heads ||
      p->head_dim != shape.head_dim) {
    return absl::InvalidArgumentError(absl::StrCat(
        "profile ", ProfileIdHex(p->id), " is for ", p->layers, " layers x ",
        p->kv_heads, " KV heads x ", p->head_dim, ", not this chunk's ",
        shape.layers, " x ", shape.kv_heads, " x ", shape.head_dim));
  }
  if (uint64_t{options.first_position} + shape.tokens > (uint64_t{1} << 32)) {
    return absl::InvalidArgumentError("token positions past 2^32");
  }
  return absl::OkStatus();
}

}  // namespace

size_t ChunkShape::NumValues() const {
  return size_t{layers} * 2 * tokens * kv_heads * head_dim;
}
size_t ChunkShape::RawBytes() const { return 2 * NumValues(); }

absl::StatusOr<std::string> EncodeChunk(const ChunkShape& shape,
                                        absl::Span<const uint16_t> values,
                                        Level level,
                                        const EncodeOptions& options) {
  if (LevelName(level) == "unknown") {
    return absl::InvalidArgumentError("unknown level");
  }
  const ModelProfile* profile =
      LevelNeedsProfile(level) ? options.profile : nullptr;
  Header h;
  h.shape = shape;
  h.level = static_cast<uint8_t>(level);
  h.channel_group = internal::PickChannelGroup(shape);
  if (profile != nullptr) {
    h.transform_id = internal::kProfileTransform;
    h.transform_fingerprint = internal::ProfileFingerprint(profile->id);
    // Whole heads per channel group: the transform works on heads.
    if (h.channel_group % shape.head_dim != 0) h.channel_group = shape.head_dim;
  }
  if (absl::Status st = internal::ValidateHeader(h); !st.ok()) return st;
  if (values.size() != shape.NumValues()) {
    return absl::InvalidArgumentError("values.size() != shape.NumValues()");
  }
  if (LevelNeedsProfile(level)) {
    if (absl::Status st = CheckProfileFits(options, shape); !st.ok()) return st;
  }
  std::vector<internal::SinCos> rope;
  if (profile != nullptr && profile->rope != RopeLayout::kNone) {
    rope = internal::RopeTable(*profile, options.first_position, shape.tokens);
  }
  std::vector<float> coeff(profile ? size_t{shape.tokens} * h.Channels() : 0);
  internal::TransformSection transform;
  if (profile != nullptr) {
    transform.profile_id = profile->id;
    transform.first_position = options.first_position;
    transform.exact_tokens =
        internal::ExactTokens(options.first_position, shape.tokens);
    const size_t row = h.Channels();
    for (uint32_t p = 0; p < h.Planes(); ++p) {
      const uint16_t* first = values.data() + p * size_t{shape.tokens} * row;
      transform.exact_values.insert(transform.exact_values.end(), first,
                                    first + transform.exact_tokens * row);
    }
  }
  const std::vector<internal::PlanePolicy> policies =
      internal::PlanePoliciesFor(level, shape.layers, profile);
  std::vector<PlaneSpec> specs(policies.size());
  const size_t plane_values = size_t{shape.tokens} * h.Channels();
  const uint64_t choice_bits =
      uint64_t{h.Planes()} * h.ChannelGroups() * h.TokenGroups();
  std::vector<uint8_t> choices((choice_bits + 7) / 8);
  std::string scales, tables, payload;
  std::vector<uint32_t> block_ends;
  std::vector<uint16_t> q(plane_values);
  internal::GroupEncoder coder;
  for (uint32_t p = 0; p < h.Planes(); ++p) {
    specs[p].mode = policies[p].mode;
    const uint16_t* plane = values.data() + p * plane_values;
    if (profile != nullptr) {
      internal::ForwardPlane(h, PlaneOf(profile, p, rope), plane, coeff.data());
      internal::QuantizeFloats(h, policies[p].relative_step,
                               policies[p].channel_steps,
                               /*drop_quiet_channels=*/true, &specs[p],
                               coeff.data(), q.data(), &scales);
    } else {
      internal::QuantizePlane(h, policies[p].relative_step, &specs[p], plane,
                              q.data(), &scales);
    }
    for (uint32_t cg = 0; cg < h.ChannelGroups(); ++cg) {
      const internal::GroupView view{
          &h, specs[p].bits, cg,
          (uint64_t{p} * h.ChannelGroups() + cg) * h.TokenGroups()};
      coder.Encode(view, q.data(), &choices, &tables, &payload, &block_ends);
    }
    if (payload.size() > std::numeric_limits<uint32_t>::max()) {
      return absl::InvalidArgumentError("chunk too large for one stream");
    }
  }
  h.tables_bytes = static_cast<uint32_t>(tables.size());
  h.num_blocks = static_cast<uint32_t>(block_ends.size());
  h.payload_bytes = static_cast<uint32_t>(payload.size());
  std::string out;
  out.reserve(internal::kFixedHeaderBytes + 2 * specs.size() + scales.size() +
              choices.size() + tables.size() + 4 * block_ends.size() +
              payload.size() + internal::kChecksumBytes);
  internal::WriteHeader(h, specs, transform, &out);
  internal::ByteWriter w(&out);
  w.Bytes(scales);
  w.Bytes(absl::string_view(reinterpret_cast<const char*>(choices.data()),
                            choices.size()));
  w.Bytes(tables);
  for (uint32_t end : block_ends) w.U32(end);
  w.Bytes(payload);
  w.U32(Crc32c(out));
  return out;
}

bool ShapeWithinLimits(const ChunkShape& shape) {
  return internal::CheckShape(shape) == internal::HeaderCheck::kOk;
}

absl::string_view DTypeName(DType dtype) {
  return dtype == DType::kBFloat16 ? "bfloat16" : "float16";
}

absl::StatusOr<ChunkShape> PeekShape(absl::string_view bitstream) {
  absl::StatusOr<StreamSummary> s = PeekSummary(bitstream);
  if (!s.ok()) return s.status();
  return s->shape;
}

absl::StatusOr<StreamSummary> PeekSummary(absl::string_view bitstream) {
  absl::StatusOr<internal::Sections> s = internal::ParseSections(bitstream);
  if (!s.ok()) return s.status();
  StreamSummary summary{s->header.shape, static_cast<Level>(s->header.level)};
  if (s->header.transform_id == internal::kProfileTransform) {
    summary.profile_id = s->profile_id;
    summary.first_position = s->first_position;
  }
  return summary;
}

absl::StatusOr<std::vector<uint64_t>> LayerEnds(absl::string_view bitstream) {
  absl::StatusOr<internal::Sections> parsed =
      internal::ParseSections(bitstream);
  if (!parsed.ok()) return parsed.status();
  const internal::Sections& s = *parsed;
  const Header& h = s.header;
  const uint32_t groups = h.ChannelGroups();
  const uint32_t token_groups = h.TokenGroups();
  const uint64_t payload_at =
      bitstream.size() - internal::kChecksumBytes - s.payload.size();
  // Blocks per stream follow from the symbol counts, which follow from the
  // choice bits (FORMAT.md sections 4 to 6), a stream per byte plane.
  auto blocks_of = [&](uint64_t symbols) {
    return (symbols + h.block_symbols - 1) / h.block_symbols;
  };
  std::vector<uint64_t> ends(h.shape.layers);
  uint64_t blocks = 0;
  for (uint32_t p = 0; p < h.Planes(); ++p) {
    const int byte_planes = internal::BytePlanes(s.planes[p].bits);
    for (uint32_t cg = 0; cg < groups; ++cg) {
      const std::array<size_t, 2> symbols =
          internal::StreamSizes({&h, s.planes[p].bits, cg,
                                 (uint64_t{p} * groups + cg) * token_groups},
                                s.choices);
      blocks += byte_planes * (blocks_of(symbols[0]) + blocks_of(symbols[1]));
    }
    if (p % 2 == 0) continue;
    if (blocks > h.num_blocks) {
      return absl::DataLossError("block directory shorter than the streams");
    }
    const uint64_t end =
        blocks == 0 ? 0
                    : internal::LoadU32(
                          reinterpret_cast<const uint8_t*>(s.directory.data()) +
                          4 * (blocks - 1));
    if (end > s.payload.size() ||
        (p > 1 && end < ends[p / 2 - 1] - payload_at)) {
      return absl::DataLossError("block directory out of range or order");
    }
    ends[p / 2] = payload_at + end;
  }
  return ends;
}

absl::Status DecodeChunk(absl::string_view bitstream, absl::Span<uint16_t> out,
                         const ModelProfile* profile) {
  absl::StatusOr<internal::Sections> parsed =
      internal::ParseSections(bitstream);
  if (!parsed.ok()) return parsed.status();
  const internal::Sections& s = *parsed;
  const Header& h = s.header;
  if (out.size() != h.shape.NumValues()) {
    return absl::InvalidArgumentError(
        "output size does not match the stream's shape");
  }
  const size_t body = bitstream.size() - internal::kChecksumBytes;
  const uint32_t stored = internal::LoadU32(
      reinterpret_cast<const uint8_t*>(bitstream.data()) + body);
  if (Crc32c(bitstream.substr(0, body)) != stored) {
    return absl::DataLossError("checksum mismatch");
  }
  const bool transform = h.transform_id == internal::kProfileTransform;
  std::vector<internal::SinCos> rope;
  if (transform) {
    if (profile == nullptr || profile->id != s.profile_id) {
      return absl::FailedPreconditionError(absl::StrCat(
          "the stream needs model profile ", ProfileIdHex(s.profile_id),
          profile == nullptr
              ? ", and none was given"
              : absl::StrCat(", not ", ProfileIdHex(profile->id))));
    }
    if (profile->layers != h.shape.layers ||
        profile->kv_heads != h.shape.kv_heads ||
        profile->head_dim != h.shape.head_dim ||
        h.channel_group % h.shape.head_dim != 0) {
      return absl::DataLossError("the stream's shape does not fit its profile");
    }
    if (profile->rope != RopeLayout::kNone) {
      rope = internal::RopeTable(*profile, s.first_position, h.shape.tokens);
    }
  }
  const size_t plane_values = size_t{h.shape.tokens} * h.Channels();
  std::vector<absl::string_view> plane_scales(h.Planes());
  absl::string_view scales = s.scales;
  for (uint32_t p = 0; p < h.Planes(); ++p) {
    plane_scales[p] = scales.substr(0, internal::ScaleBytes(h, s.planes[p]));
    scales.remove_prefix(plane_scales[p].size());
  }
  // Channel groups in stream order (plane by plane), a batch at a time.
  constexpr size_t kBatch = internal::GroupDecoder::kMaxGroups;
  std::vector<uint16_t> q[kBatch];
  uint16_t* batch_q[kBatch];
  for (size_t j = 0; j < kBatch; ++j) {
    q[j].resize(size_t{h.shape.tokens} * h.channel_group);
    batch_q[j] = q[j].data();
  }
  internal::ByteReader tables(s.tables);
  internal::BlockCursor blocks(s.directory, s.payload);
  // Kept per thread: its buffers and tables are reused from chunk to chunk.
  thread_local internal::GroupDecoder coder;
  const uint32_t groups = h.ChannelGroups();
  const uint32_t units = h.Planes() * groups;
  for (uint32_t first = 0; first < units; first += kBatch) {
    const size_t k = std::min<size_t>(kBatch, units - first);
    internal::GroupView views[kBatch] = {};
    for (size_t j = 0; j < k; ++j) {
      const uint32_t u = first + static_cast<uint32_t>(j);
      views[j] = {&h, s.planes[u / groups].bits, u % groups,
                  uint64_t{u} * h.TokenGroups()};
    }
    if (absl::Status st =
            coder.Decode(absl::MakeConstSpan(views, k), s.choices, &tables,
                         &blocks, absl::MakeConstSpan(batch_q, k));
        !st.ok()) {
      return st;
    }
    for (size_t j = 0; j < k; ++j) {
      const uint32_t p = (first + static_cast<uint32_t>(j)) / groups;
      uint16_t* plane_out = out.data() + p * plane_values;
      if (transform) {
        internal::ReconstructGroup(h, PlaneOf(profile, p, rope),
                                   plane_scales[p], views[j].cg, batch_q[j],
                                   plane_out);
      } else {
        internal::DequantizeGroup(h, s.planes[p], plane_scales[p], views[j].cg,
                                  batch_q[j], plane_out);
      }
    }
  }
  if (tables.remaining() != 0 || !blocks.AtEnd() ||
      blocks.last_end() != s.payload.size()) {
    return absl::DataLossError("stream has unused tables or blocks");
  }
  // Leading tokens stored exactly replace what the transform gave them.
  const size_t exact_values = size_t{s.exact_tokens} * h.Channels();
  for (uint32_t p = 0; p < h.Planes() && exact_values != 0; ++p) {
    const auto* src =
        reinterpret_cast<const uint8_t*>(s.exact.data()) + 2 * p * exact_values;
    uint16_t* dst = out.data() + p * plane_values;
    for (size_t i = 0; i < exact_values; ++i) {
      dst[i] = internal::LoadU16(src + 2 * i);
    }
  }
  return absl::OkStatus();
}

}  // namespace kvcache::codec
