#include "codec/format.h"

#include <cstring>

#include "absl/strings/str_cat.h"
#include "codec/byte_io.h"
#include "codec/rans.h"

namespace kvcache::codec::internal {

absl::Status ValidateHeader(const Header& h) {
  switch (CheckHeader(h)) {
    case HeaderCheck::kOk:
      return absl::OkStatus();
    case HeaderCheck::kEmptyShape:
      return absl::InvalidArgumentError("empty chunk shape");
    case HeaderCheck::kBadDtype:
      return absl::InvalidArgumentError("unknown dtype");
    case HeaderCheck::kTooLarge:
      return absl::InvalidArgumentError("chunk shape exceeds codec limits");
    case HeaderCheck::kTransform:
      return absl::UnimplementedError("unknown transform");
    case HeaderCheck::kBadGroups:
      return absl::InvalidArgumentError("bad token or channel group");
    case HeaderCheck::kBadBlockSize:
      return absl::InvalidArgumentError("bad block size");
    default:
      return absl::InvalidArgumentError("bad header");
  }
}

uint32_t ProfileFingerprint(const ProfileId& id) { return LoadU32(id.data()); }

void WriteHeader(const Header& h, const std::vector<PlaneSpec>& planes,
                 const TransformSection& transform, std::string* out) {
  const size_t at = out->size();
  out->resize(at + kFixedHeaderBytes);
  WriteFixedHeader(h, reinterpret_cast<uint8_t*>(&(*out)[at]));
  ByteWriter w(out);
  for (const PlaneSpec& p : planes) {
    w.U8(p.bits);
    w.U8(static_cast<uint8_t>(p.mode));
  }
  if (h.transform_id == kProfileTransform) {
    w.Bytes(absl::string_view(
        reinterpret_cast<const char*>(transform.profile_id.data()),
        transform.profile_id.size()));
    w.U32(transform.first_position);
    w.U32(transform.exact_tokens);
    for (uint16_t v : transform.exact_values) w.U16(v);
  }
}

uint32_t PickChannelGroup(const ChunkShape& shape) {
  const uint32_t row = shape.kv_heads * shape.head_dim;
  for (uint32_t heads = 1; heads <= shape.kv_heads; ++heads) {
    const uint32_t width = heads * shape.head_dim;
    if (width > 0xFFFF) break;
    if (width >= 64 && shape.kv_heads % heads == 0) return width;
  }
  return row <= 0xFFFF ? row : shape.head_dim;
}

absl::StatusOr<Sections> ParseSections(absl::string_view stream) {
  if (stream.size() < 4) {
    return absl::DataLossError("stream shorter than the header");
  }
  const auto* bytes = reinterpret_cast<const uint8_t*>(stream.data());
  if (std::memcmp(bytes, kMagic, 4) != 0) {
    return absl::DataLossError("not a kvcache codec stream (bad magic)");
  }
  if (stream.size() < kFixedHeaderBytes) {
    return absl::DataLossError("stream shorter than the header");
  }
  Sections s;
  Header& h = s.header;
  uint8_t version = 0;
  switch (const HeaderCheck check = ReadFixedHeader(bytes, &h, &version)) {
    case HeaderCheck::kOk:
      break;
    case HeaderCheck::kBadVersion:
      return absl::UnimplementedError(
          absl::StrCat("unsupported codec format version ", version));
    case HeaderCheck::kBadDtype:
      return absl::DataLossError("unknown dtype");
    case HeaderCheck::kBadEntropyParameters:
      return absl::DataLossError("unsupported entropy parameters");
    default:
      if (absl::Status st = ValidateHeader(h); !st.ok()) {
        if (absl::IsUnimplemented(st)) return st;
        return absl::DataLossError(st.message());
      }
      return absl::DataLossError(
          absl::StrCat("bad header (", static_cast<int>(check), ")"));
  }
  ByteReader r(stream.substr(kFixedHeaderBytes));
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
    if (!ValidPlane(p.bits, mode)) {
      return absl::DataLossError("bad plane descriptor");
    }
    p.mode = static_cast<ScaleMode>(mode);
    if (h.transform_id == kProfileTransform &&
        p.mode != ScaleMode::kPerChannel) {
      return absl::DataLossError("a transform stream's planes are per channel");
    }
    scale_bytes += ScaleBytes(h, p);
  }
  if (h.transform_id == kProfileTransform) {
    absl::string_view fixed;
    if (!r.Bytes(kTransformSectionBytes, &fixed)) {
      return absl::DataLossError("truncated transform section");
    }
    const auto* p = reinterpret_cast<const uint8_t*>(fixed.data());
    TransformFields f;
    if (!ReadTransformFields(p, h, &f)) {
      return absl::DataLossError(
          "bad transform section: its id is not the header's fingerprint, or "
          "its exact tokens or positions are out of range");
    }
    std::memcpy(s.profile_id.data(), p, s.profile_id.size());
    s.first_position = f.first_position;
    s.exact_tokens = f.exact_tokens;
    if (!r.Bytes(uint64_t{2} * s.exact_tokens * planes * h.Channels(),
                 &s.exact)) {
      return absl::DataLossError("truncated transform section");
    }
  }
  const uint64_t choice_bits = h.ChoiceBits();
  const uint64_t choice_bytes = (choice_bits + 7) / 8;
  const uint64_t rest = scale_bytes + choice_bytes + h.tables_bytes +
                        uint64_t{4} * h.num_blocks + h.payload_bytes +
                        kChecksumBytes;
  if (rest != r.remaining()) {
    return absl::DataLossError(absl::StrCat(
        "stream is ", stream.size(), " bytes but its header implies ",
        kFixedHeaderBytes + r.position() + rest));
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
