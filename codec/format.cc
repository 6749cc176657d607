#include "codec/format.h"

#include <cstring>

#include "absl/strings/str_cat.h"
#include "codec/byte_io.h"
#include "codec/rans.h"

namespace kvcache::codec::internal {

uint64_t ScaleBytes(const Header& h, const PlaneSpec& spec) {
  switch (spec.mode) {
    case ScaleMode::kIdentity:
      return 0;
    case ScaleMode::kPerChannel:
      return uint64_t{4} * h.Channels();
    case ScaleMode::kPerGroup:
      return uint64_t{4} * h.TokenGroups() * h.ChannelGroups();
  }
  return 0;
}

absl::Status ValidateHeader(const Header& h) {
  const ChunkShape& s = h.shape;
  if (s.layers == 0 || s.tokens == 0 || s.kv_heads == 0 || s.head_dim == 0) {
    return absl::InvalidArgumentError("empty chunk shape");
  }
  if (s.dtype != DType::kFloat16 && s.dtype != DType::kBFloat16) {
    return absl::InvalidArgumentError("unknown dtype");
  }
  if (s.layers > kMaxLayers || s.tokens > kMaxTokens ||
      uint64_t{s.kv_heads} * s.head_dim > kMaxChannels ||
      uint64_t{s.layers} * 2 * s.tokens * s.kv_heads * s.head_dim >
          kMaxValues) {
    return absl::InvalidArgumentError("chunk shape exceeds codec limits");
  }
  if (h.transform_id != 0 || h.transform_fingerprint != 0) {
    return absl::UnimplementedError("transforms are not supported in v1");
  }
  if (h.token_group == 0 || h.token_group > 0xFFFF || h.channel_group == 0 ||
      h.channel_group > 0xFFFF || h.Channels() % h.channel_group != 0) {
    return absl::InvalidArgumentError("bad token or channel group");
  }
  if (h.block_symbols == 0 || h.block_symbols % rans::kLanes != 0 ||
      h.block_symbols > kMaxBlockSymbols) {
    return absl::InvalidArgumentError("bad block size");
  }
  return absl::OkStatus();
}

void WriteHeader(const Header& h, const std::vector<PlaneSpec>& planes,
                 std::string* out) {
  ByteWriter w(out);
  w.Bytes(absl::string_view(kMagic, 4));
  w.U8(kVersion);
  w.U8(static_cast<uint8_t>(h.shape.dtype));
  w.U8(h.level);
  w.U8(h.transform_id);
  w.U32(h.transform_fingerprint);
  w.U32(h.shape.layers);
  w.U32(h.shape.tokens);
  w.U32(h.shape.kv_heads);
  w.U32(h.shape.head_dim);
  w.U16(static_cast<uint16_t>(h.token_group));
  w.U16(static_cast<uint16_t>(h.channel_group));
  w.U32(h.block_symbols);
  w.U8(rans::kProbBits);
  w.U8(rans::kLanes);
  w.U16(0);
  w.U32(h.tables_bytes);
  w.U32(h.num_blocks);
  w.U32(h.payload_bytes);
  for (const PlaneSpec& p : planes) {
    w.U8(p.bits);
    w.U8(static_cast<uint8_t>(p.mode));
  }
}

absl::StatusOr<Sections> ParseSections(absl::string_view stream) {
  ByteReader r(stream);
  absl::string_view magic;
  if (!r.Bytes(4, &magic) || stream.size() < kFixedHeaderBytes) {
    return absl::DataLossError("stream shorter than the header");
  }
  if (std::memcmp(magic.data(), kMagic, 4) != 0) {
    return absl::DataLossError("not a kvcache codec stream (bad magic)");
  }
  Sections s;
  Header& h = s.header;
  uint8_t version = 0, dtype = 0, prob_bits = 0, lanes = 0;
  uint16_t token_group = 0, channel_group = 0, reserved = 0;
  // The size check above makes every fixed-header read succeed.
  r.U8(&version);
  r.U8(&dtype);
  r.U8(&h.level);
  r.U8(&h.transform_id);
  r.U32(&h.transform_fingerprint);
  r.U32(&h.shape.layers);
  r.U32(&h.shape.tokens);
  r.U32(&h.shape.kv_heads);
  r.U32(&h.shape.head_dim);
  r.U16(&token_group);
  r.U16(&channel_group);
  r.U32(&h.block_symbols);
  r.U8(&prob_bits);
  r.U8(&lanes);
  r.U16(&reserved);
  r.U32(&h.tables_bytes);
  r.U32(&h.num_blocks);
  r.U32(&h.payload_bytes);
  if (version != kVersion) {
    return absl::UnimplementedError(
        absl::StrCat("unsupported codec format version ", version));
  }
  if (dtype > 1) return absl::DataLossError("unknown dtype");
  h.shape.dtype = static_cast<DType>(dtype);
  h.token_group = token_group;
  h.channel_group = channel_group;
  if (prob_bits != rans::kProbBits || lanes != rans::kLanes || reserved != 0) {
    return absl::DataLossError("unsupported entropy parameters");
  }
  if (absl::Status st = ValidateHeader(h); !st.ok()) {
    if (absl::IsUnimplemented(st)) return st;
    return absl::DataLossError(st.message());
  }
  // Everything below is sized from header fields: sum in 64 bits and compare
  // with what is actually there before trusting any of it.
  const uint64_t planes = h.Planes();
  if (r.remaining() < 2 * planes) {
    return absl::DataLossError("truncated plane descriptors");
  }
  s.planes.resize(planes);
  uint64_t scale_bytes = 0;
  for (PlaneSpec& p : s.planes) {
    uint8_t mode = 0;
    r.U8(&p.bits);
    r.U8(&mode);
    if (p.bits < 1 || p.bits > 16 || mode > 2 ||
        (mode == 0) != (p.bits == 16)) {
      return absl::DataLossError("bad plane descriptor");
    }
    p.mode = static_cast<ScaleMode>(mode);
    scale_bytes += ScaleBytes(h, p);
  }
  const uint64_t choice_bits =
      planes * h.ChannelGroups() * uint64_t{h.TokenGroups()};
  const uint64_t choice_bytes = (choice_bits + 7) / 8;
  const uint64_t rest = scale_bytes + choice_bytes + h.tables_bytes +
                        uint64_t{4} * h.num_blocks + h.payload_bytes +
                        kChecksumBytes;
  if (rest != r.remaining()) {
    return absl::DataLossError(absl::StrCat("stream is ", stream.size(),
                                            " bytes but its header implies ",
                                            r.position() + rest));
  }
  r.Bytes(scale_bytes, &s.scales);
  r.Bytes(choice_bytes, &s.choices);
  r.Bytes(h.tables_bytes, &s.tables);
  r.Bytes(uint64_t{4} * h.num_blocks, &s.directory);
  r.Bytes(h.payload_bytes, &s.payload);
  if (choice_bits % 8 != 0 &&
      (static_cast<uint8_t>(s.choices.back()) >> (choice_bits % 8)) != 0) {
    return absl::DataLossError("nonzero padding in choice bits");
  }
  return s;
}

}  // namespace kvcache::codec::internal
