// Bitstream format v1 layout: fixed header, sections, and the arithmetic
// both the encoder and decoder derive from them. FORMAT.md is the normative
// description; this file mirrors it.
#ifndef KVCACHE_CODEC_FORMAT_H_
#define KVCACHE_CODEC_FORMAT_H_

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "codec/byte_io.h"
#include "codec/codec.h"
#include "codec/group_layout.h"
#include "codec/hd.h"
#include "codec/profile.h"
#include "codec/rans_math.h"

namespace kvcache::codec::internal {

inline constexpr char kMagic[4] = {'K', 'V', 'C', 'G'};
inline constexpr uint32_t kMagicLE = 0x4743564B;  // kMagic as a LE u32.
// Decoders read every version from kOldestVersion to kNewestVersion.
// Version 2 added stored tables, which version 1 streams simply never use;
// version 3 added the transform section. Encoders write version 3 only for
// streams with a transform, so readers of version 2 keep reading every
// other stream.
inline constexpr uint8_t kOldestVersion = 1;
inline constexpr uint8_t kPlainVersion = 2;
inline constexpr uint8_t kTransformVersion = 3;
inline constexpr uint8_t kNewestVersion = 3;

// What the header's transform_id names.
inline constexpr uint8_t kNoTransform = 0;
inline constexpr uint8_t kProfileTransform = 1;  // FORMAT.md, "Transform"
// The transform section: the profile's 16-byte id, the position of the
// chunk's first token (u32), the number of leading tokens stored exactly
// (u32), then those tokens' values.
inline constexpr size_t kTransformSectionBytes = 24;
inline constexpr size_t kFixedHeaderBytes = 52;
inline constexpr size_t kChecksumBytes = 4;
inline constexpr uint32_t kMaxBlockSymbols = 1u << 20;

// How quantized integers map back to values, per (layer, K/V) plane.
enum class ScaleMode : uint8_t {
  kIdentity = 0,    // Integers are the 16-bit patterns (lossless).
  kPerChannel = 1,  // One (offset, step) per channel over all tokens.
  kPerGroup = 2,    // One (offset, step) per (token group, channel group).
};

struct PlaneSpec {
  uint8_t bits = 16;  // Width of the quantized integers, 1..16.
  ScaleMode mode = ScaleMode::kIdentity;
};

struct Header {
  ChunkShape shape;
  uint8_t level = 0;
  uint8_t transform_id = 0;  // 0: no transform before quantization.
  uint32_t transform_fingerprint = 0;
  uint32_t token_group = 16;
  uint32_t channel_group = 0;
  uint32_t block_symbols = 16384;
  uint32_t tables_bytes = 0;
  uint32_t num_blocks = 0;
  uint32_t payload_bytes = 0;

  KVCACHE_HD uint32_t Channels() const {
    return shape.kv_heads * shape.head_dim;
  }
  KVCACHE_HD uint32_t ChannelGroups() const {
    return Channels() / channel_group;
  }
  KVCACHE_HD uint32_t TokenGroups() const {
    return (shape.tokens + token_group - 1) / token_group;
  }
  KVCACHE_HD uint32_t Planes() const { return shape.layers * 2; }
  // Bits of the choice section.
  KVCACHE_HD uint64_t ChoiceBits() const {
    return uint64_t{Planes()} * ChannelGroups() * TokenGroups();
  }
};

// Bytes of scale parameters one plane carries.
KVCACHE_HD inline uint64_t ScaleBytes(const Header& h, const PlaneSpec& spec) {
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

// Whether a plane descriptor is valid: identity iff 16 bits.
KVCACHE_HD inline bool ValidPlane(uint8_t bits, uint8_t mode) {
  return bits >= 1 && bits <= 16 && mode <= 2 && (mode == 0) == (bits == 16);
}

// What is wrong with a header, if anything; ValidateHeader and ParseSections
// turn these into statuses, the CUDA decoder into per-chunk error codes.
enum class HeaderCheck : uint8_t {
  kOk,
  kTruncated,
  kBadMagic,
  kBadVersion,
  kBadDtype,
  kBadEntropyParameters,
  kEmptyShape,
  kTooLarge,
  kTransform,
  kBadGroups,
  kBadBlockSize,
};

// Checks a shape against the codec's limits (ShapeWithinLimits).
KVCACHE_HD inline HeaderCheck CheckShape(const ChunkShape& s) {
  if (s.layers == 0 || s.tokens == 0 || s.kv_heads == 0 || s.head_dim == 0) {
    return HeaderCheck::kEmptyShape;
  }
  if (s.dtype != DType::kFloat16 && s.dtype != DType::kBFloat16) {
    return HeaderCheck::kBadDtype;
  }
  if (s.layers > kMaxLayers || s.tokens > kMaxTokens ||
      uint64_t{s.kv_heads} * s.head_dim > kMaxChannels ||
      uint64_t{s.layers} * 2 * s.tokens * s.kv_heads * s.head_dim >
          kMaxValues) {
    return HeaderCheck::kTooLarge;
  }
  return HeaderCheck::kOk;
}

// Checks a header's shape and parameters (the fields ValidateHeader covers).
KVCACHE_HD inline HeaderCheck CheckHeader(const Header& h) {
  if (const HeaderCheck c = CheckShape(h.shape); c != HeaderCheck::kOk) {
    return c;
  }
  if (h.transform_id > kProfileTransform ||
      (h.transform_id == kNoTransform && h.transform_fingerprint != 0)) {
    return HeaderCheck::kTransform;
  }
  if (h.token_group == 0 || h.token_group > 0xFFFF || h.channel_group == 0 ||
      h.channel_group > 0xFFFF || h.Channels() % h.channel_group != 0) {
    return HeaderCheck::kBadGroups;
  }
  if (h.block_symbols == 0 || h.block_symbols % rans::kLanes != 0 ||
      h.block_symbols > kMaxBlockSymbols) {
    return HeaderCheck::kBadBlockSize;
  }
  return HeaderCheck::kOk;
}

// Reads and checks the kFixedHeaderBytes bytes at p (the caller has checked
// they exist). Sets *version to the stored version.
KVCACHE_HD inline HeaderCheck ReadFixedHeader(const uint8_t* p, Header* h,
                                              uint8_t* version) {
  if (LoadU32(p) != kMagicLE) return HeaderCheck::kBadMagic;
  *version = p[4];
  const uint8_t dtype = p[5];
  h->level = p[6];
  h->transform_id = p[7];
  h->transform_fingerprint = LoadU32(p + 8);
  h->shape.layers = LoadU32(p + 12);
  h->shape.tokens = LoadU32(p + 16);
  h->shape.kv_heads = LoadU32(p + 20);
  h->shape.head_dim = LoadU32(p + 24);
  h->token_group = LoadU16(p + 28);
  h->channel_group = LoadU16(p + 30);
  h->block_symbols = LoadU32(p + 32);
  const uint8_t prob_bits = p[36];
  const uint8_t lanes = p[37];
  const uint16_t reserved = LoadU16(p + 38);
  h->tables_bytes = LoadU32(p + 40);
  h->num_blocks = LoadU32(p + 44);
  h->payload_bytes = LoadU32(p + 48);
  if (*version < kOldestVersion || *version > kNewestVersion) {
    return HeaderCheck::kBadVersion;
  }
  if (h->transform_id != kNoTransform && *version < kTransformVersion) {
    return HeaderCheck::kTransform;
  }
  if (dtype > 1) return HeaderCheck::kBadDtype;
  h->shape.dtype = static_cast<DType>(dtype);
  if (prob_bits != rans::kProbBits || lanes != rans::kLanes || reserved != 0) {
    return HeaderCheck::kBadEntropyParameters;
  }
  return CheckHeader(*h);
}

// Section 2a's fixed fields after the profile id.
struct TransformFields {
  uint32_t first_position;
  uint32_t exact_tokens;
};

// Reads the kTransformSectionBytes bytes at p (the caller has checked they
// exist) into *f; false unless the id starts with the header's fingerprint,
// the exact tokens are within the chunk and its positions within 2^32.
KVCACHE_HD inline bool ReadTransformFields(const uint8_t* p, const Header& h,
                                           TransformFields* f) {
  f->first_position = LoadU32(p + 16);
  f->exact_tokens = LoadU32(p + 20);
  return LoadU32(p) == h.transform_fingerprint &&
         f->exact_tokens <= h.shape.tokens &&
         uint64_t{f->first_position} + h.shape.tokens <= (uint64_t{1} << 32);
}

// A stream split into its sections; views point into the caller's buffer.
struct Sections {
  Header header;
  std::vector<PlaneSpec> planes;  // layers * 2, K then V per layer.
  // Transform streams: the profile they need and the first token's
  // position.
  ProfileId profile_id{};
  uint32_t first_position = 0;
  uint32_t exact_tokens = 0;
  // exact_tokens rows of every plane, [plane][token][channel], 16-bit LE.
  absl::string_view exact;
  absl::string_view scales;
  absl::string_view
      choices;  // One bit per (plane, channel group, token group).
  absl::string_view tables;
  absl::string_view directory;  // num_blocks little-endian u32 end offsets.
  absl::string_view payload;
};

// Checks a header's shape and parameters. Used by the encoder (so it never
// writes what the decoder would reject) and by ParseSections.
absl::Status ValidateHeader(const Header& h);

// Writes the kFixedHeaderBytes bytes of h's fixed header at p.
KVCACHE_HD inline void WriteFixedHeader(const Header& h, uint8_t* p) {
  auto u16 = [&](int at, uint32_t v) {
    p[at] = static_cast<uint8_t>(v);
    p[at + 1] = static_cast<uint8_t>(v >> 8);
  };
  auto u32 = [&](int at, uint32_t v) {
    u16(at, v & 0xFFFF);
    u16(at + 2, v >> 16);
  };
  u32(0, kMagicLE);
  p[4] = h.transform_id == kNoTransform ? kPlainVersion : kTransformVersion;
  p[5] = static_cast<uint8_t>(h.shape.dtype);
  p[6] = h.level;
  p[7] = h.transform_id;
  u32(8, h.transform_fingerprint);
  u32(12, h.shape.layers);
  u32(16, h.shape.tokens);
  u32(20, h.shape.kv_heads);
  u32(24, h.shape.head_dim);
  u16(28, h.token_group);
  u16(30, h.channel_group);
  u32(32, h.block_symbols);
  p[36] = rans::kProbBits;
  p[37] = rans::kLanes;
  u16(38, 0);
  u32(40, h.tables_bytes);
  u32(44, h.num_blocks);
  u32(48, h.payload_bytes);
}

// Appends the fixed header, plane descriptors and, for transform streams,
// the transform section.
// What a transform stream's section holds; exact_values are the leading
// tokens' values in the section's order.
struct TransformSection {
  ProfileId profile_id{};
  uint32_t first_position = 0;
  uint32_t exact_tokens = 0;
  std::vector<uint16_t> exact_values;
};
void WriteHeader(const Header& h, const std::vector<PlaneSpec>& planes,
                 const TransformSection& transform, std::string* out);

// The header's transform_fingerprint for a profile: its id's first four
// bytes, little-endian.
uint32_t ProfileFingerprint(const ProfileId& id);

// The channel group the encoder uses for a shape: whole heads keep a head's
// statistics together; at least 64 channels amortize the tables on models
// with tiny heads.
uint32_t PickChannelGroup(const ChunkShape& shape);

// Splits `stream` into sections after validating every header field and
// that the section sizes add up to exactly the stream length. Does not check
// the CRC, tables or blocks.
absl::StatusOr<Sections> ParseSections(absl::string_view stream);

// Bit i of the choice section: 1 = token group coded as deltas from its
// anchor, 0 = coded as is.
inline bool ChoiceBit(absl::string_view choices, uint64_t i) {
  return (static_cast<uint8_t>(choices[i >> 3]) >> (i & 7)) & 1;
}

// Set bits among bits [first, first + count) of the choice section, up to
// 56 at a time from one unaligned 8-byte load.
inline uint32_t CountChoiceBits(absl::string_view choices, uint64_t first,
                                uint64_t count) {
  uint32_t set = 0;
  while (count > 0) {
    const uint64_t byte = first >> 3;
    uint64_t word = 0;
    std::memcpy(&word, choices.data() + byte,
                std::min<uint64_t>(8, choices.size() - byte));
    const uint64_t take = std::min<uint64_t>(count, 56);
    set += static_cast<uint32_t>(__builtin_popcountll(
        (word >> (first & 7)) & ((uint64_t{1} << take) - 1)));
    first += take;
    count -= take;
  }
  return set;
}

}  // namespace kvcache::codec::internal

#endif  // KVCACHE_CODEC_FORMAT_H_
