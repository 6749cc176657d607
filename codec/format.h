// Bitstream format v1 layout: fixed header, sections, and the arithmetic
// both the encoder and decoder derive from them. FORMAT.md is the normative
// description; this file mirrors it.
#ifndef KVCACHE_CODEC_FORMAT_H_
#define KVCACHE_CODEC_FORMAT_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "codec/codec.h"

namespace kvcache::codec::internal {

inline constexpr char kMagic[4] = {'K', 'V', 'C', 'G'};
inline constexpr uint8_t kVersion = 1;
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

  uint32_t Channels() const { return shape.kv_heads * shape.head_dim; }
  uint32_t ChannelGroups() const { return Channels() / channel_group; }
  uint32_t TokenGroups() const {
    return (shape.tokens + token_group - 1) / token_group;
  }
  uint32_t Planes() const { return shape.layers * 2; }
};

// Number of byte planes a `bits`-wide integer is split into.
inline int BytePlanes(int bits) { return bits > 8 ? 2 : 1; }
// Alphabet size of byte plane `k` (0 = high byte when there are two).
inline uint32_t Alphabet(int bits, int k) {
  if (bits <= 8) return 1u << bits;
  return k == 0 ? 1u << (bits - 8) : 256u;
}
// Bytes of scale parameters one plane carries.
uint64_t ScaleBytes(const Header& h, const PlaneSpec& spec);

// A stream split into its sections; views point into the caller's buffer.
struct Sections {
  Header header;
  std::vector<PlaneSpec> planes;  // layers * 2, K then V per layer.
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

// Appends the fixed header and plane descriptors.
void WriteHeader(const Header& h, const std::vector<PlaneSpec>& planes,
                 std::string* out);

// Splits `stream` into sections after validating every header field and
// that the section sizes add up to exactly the stream length. Does not check
// the CRC, tables or blocks.
absl::StatusOr<Sections> ParseSections(absl::string_view stream);

// Bit i of the choice section: 1 = token group coded as deltas from its
// anchor, 0 = coded as is.
inline bool ChoiceBit(absl::string_view choices, uint64_t i) {
  return (static_cast<uint8_t>(choices[i >> 3]) >> (i & 7)) & 1;
}

}  // namespace kvcache::codec::internal

#endif  // KVCACHE_CODEC_FORMAT_H_
