// KV-cache chunk codec: compresses one chunk of an LLM KV cache
// ([layers][K,V][tokens][kv_heads * head_dim] of fp16 or bf16) into a
// self-describing bitstream (codec/FORMAT.md: version 2, or 3 for the
// transform levels) and back.
//
// Lossless level: bit-exact for every input, NaN payloads included.
// Lossy levels: quantize (keys per channel, values per token group), then
// entropy-code; error bounds per level are listed in codec/README.md. Lossy
// levels assume finite inputs; non-finite values decode to finite garbage.
//
// Thread-safety: all functions are reentrant and keep no shared state; any
// number of threads may encode and decode concurrently.
#ifndef KVCACHE_CODEC_CODEC_H_
#define KVCACHE_CODEC_CODEC_H_

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/types/span.h"
#include "codec/profile.h"

namespace kvcache::codec {

// Element type of a chunk; values travel as raw 16-bit patterns.
enum class DType : uint8_t { kFloat16 = 0, kBFloat16 = 1 };

// Layout of one chunk. Values are ordered [layer][k_or_v][token][channel],
// channel = kv_head * head_dim + dim, K before V.
struct ChunkShape {
  uint32_t layers = 0;
  uint32_t tokens = 0;
  uint32_t kv_heads = 0;
  uint32_t head_dim = 0;
  DType dtype = DType::kFloat16;

  // Number of 16-bit values: layers * 2 * tokens * kv_heads * head_dim.
  size_t NumValues() const;
  // Size of the uncompressed chunk in bytes (2 * NumValues()).
  size_t RawBytes() const;

  bool operator==(const ChunkShape& o) const {
    return layers == o.layers && tokens == o.tokens && kv_heads == o.kv_heads &&
           head_dim == o.head_dim && dtype == o.dtype;
  }
};

// Limits EncodeChunk accepts and decoders trust; anything beyond is rejected
// before memory is allocated.
inline constexpr uint32_t kMaxLayers = 4096;
inline constexpr uint32_t kMaxTokens = 1u << 24;
inline constexpr uint32_t kMaxChannels = 1u << 20;  // kv_heads * head_dim
inline constexpr uint64_t kMaxValues = uint64_t{1} << 36;

// Whether a codec stream can have `shape`: no empty dimension, a known
// dtype, within the limits above.
bool ShapeWithinLimits(const ChunkShape& shape);

// "float16" or "bfloat16".
absl::string_view DTypeName(DType dtype);

// Compression levels, from exact to smallest. Measured ratio and error per
// level on real caches: codec/README.md.
enum class Level : uint8_t {
  kLossless = 0,      // "lossless": bit-exact.
  kNearLossless = 1,  // "near-lossless": 10-bit quantization.
  kHigh = 2,          // "high": 7-bit.
  kDefault = 3,       // "default": 4-bit, more for early layers.
  kCompact = 4,       // "compact": 3-bit.
  kTiny = 5,          // "tiny": 2-bit.
  // Transform levels (format v3): a model profile's principal components,
  // each quantized with one step per plane, the quietest left out. They
  // need the model's profile to encode and to decode.
  kProfileFine = 6,      // "profile-fine"
  kProfileBalanced = 7,  // "profile-balanced"
  kProfileSmall = 8,     // "profile-small"
};
// The level used where none is named: the smallest that keeps a real model's
// answers (on SmolLM2-135M-Instruct: perplexity within 0.01%, top-1
// agreement 0.996; codec/README.md, "Levels on SmolLM2"). The level named
// "default" moves that model's perplexity by 13% and is no longer it.
inline constexpr Level kDefaultLevel = Level::kNearLossless;

// Returns the lowercase name above ("lossless", "default", ...).
absl::string_view LevelName(Level level);
// Inverse of LevelName; InvalidArgument for unknown names.
absl::StatusOr<Level> ParseLevel(absl::string_view name);

// Whether a level is a transform level (needs a ModelProfile).
bool LevelNeedsProfile(Level level);

// What a transform level needs beyond the values.
struct EncodeOptions {
  // The model's profile; must outlive the call and match the shape (layers,
  // KV heads, head_dim).
  const ModelProfile* profile = nullptr;
  // Position of the chunk's first token in its sequence (keys carry RoPE
  // of their positions).
  uint32_t first_position = 0;
};

// Compresses `values` (shape.NumValues() 16-bit patterns in the layout
// above). Returns the bitstream, or InvalidArgument if the shape is empty,
// exceeds the limits above, or does not match values.size(), or if a
// transform level has no profile or one of another shape.
absl::StatusOr<std::string> EncodeChunk(const ChunkShape& shape,
                                        absl::Span<const uint16_t> values,
                                        Level level,
                                        const EncodeOptions& options = {});

// Returns the shape recorded in `bitstream` after validating its header
// (magic, version, field ranges, section sizes against the stream length).
// Does not verify the checksum or decode. DataLoss / Unimplemented on error.
absl::StatusOr<ChunkShape> PeekShape(absl::string_view bitstream);

// What a stream's header records: its shape and the level it was encoded
// at. Checked and failing as PeekShape.
struct StreamSummary {
  ChunkShape shape;
  Level level = kDefaultLevel;
  // Transform streams: the profile a decoder needs, and the chunk's first
  // token position.
  std::optional<ProfileId> profile_id;
  uint32_t first_position = 0;

  bool operator==(const StreamSummary& o) const {
    return shape == o.shape && level == o.level && profile_id == o.profile_id &&
           first_position == o.first_position;
  }
};
absl::StatusOr<StreamSummary> PeekSummary(absl::string_view bitstream);

// Where each layer's coded data ends in `bitstream`, as offsets from its
// start, for restoring a chunk layer by layer: a stream's headers, tables
// and block directory come first, then its blocks in layer order, so
// decoding layers [0, l] reads its bytes before ends[l] and its last 4 (the
// checksum). Checks the header and directory, not the checksum; DataLoss or
// Unimplemented as PeekShape.
absl::StatusOr<std::vector<uint64_t>> LayerEnds(absl::string_view bitstream);

// Decodes `bitstream` into `out`, which must hold exactly NumValues() of the
// recorded shape (InvalidArgument otherwise). Verifies the CRC32C before
// decoding and every count and offset against the buffer; on any corruption
// returns DataLoss (contents of `out` are then unspecified) and never reads
// or writes out of bounds. A transform stream needs `profile` to be the
// profile it names (PeekSummary's profile_id): FailedPrecondition, naming
// the id, if it is missing or another one.
absl::Status DecodeChunk(absl::string_view bitstream, absl::Span<uint16_t> out,
                         const ModelProfile* profile = nullptr);

}  // namespace kvcache::codec

#endif  // KVCACHE_CODEC_CODEC_H_
