// A reference implementation of CacheGen's KV encoder (Liu et al., "CacheGen:
// KV Cache Compression and Streaming for Fast Large Language Model Serving",
// SIGCOMM 2024), written from the paper so that kvcache's codec can be
// measured beside it on the same caches. Not a storage format: nothing in the
// service reads these streams.
//
// The method, per (layer, K/V) plane of a chunk:
//  - Tokens are cut into groups of `group_tokens` (10 in the paper). The
//    first token of a group is its anchor and is quantized by itself; every
//    other token is coded as its difference from the anchor, so a token
//    depends on its group's anchor and nothing else.
//  - Quantization is vector-wise (as in LLM.int8(), which the paper follows,
//    and as in CacheGen's released encoder): each token's vector over all
//    kv_heads * head_dim channels gets one scale, its largest magnitude, and
//    integers in [-C, C] with C = bins / 2 - 1.
//    Deltas get fewer bins in later layers: the layers are split in thirds,
//    each with its own bin count.
//  - The integers are entropy-coded with one probability distribution per
//    (layer, K/V, channel), separately for anchors and deltas. The paper
//    profiles these once per model, offline; here they are counted from the
//    chunk being encoded and stored in its stream, so that streams are
//    self-contained and their sizes include them (about a tenth of a
//    256-token SmolLM2-135M chunk).
//
// The paper uses arithmetic coding; this uses kvcache's interleaved rANS
// coder (codec/rans.h), which codes each symbol at the cost its table gives
// it, as arithmetic coding does, to within the 12-bit table precision and a
// 4-byte final state per stream.
//
// Where the paper leaves a choice open this implementation takes the one
// that favours CacheGen; each is noted where it is made (cachegen_ref.cc).
//
// Thread-safety: the functions keep no state; any number of threads may
// encode and decode concurrently.
#ifndef KVCACHE_CODEC_CACHEGEN_REF_H_
#define KVCACHE_CODEC_CACHEGEN_REF_H_

#include <array>
#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/types/span.h"
#include "codec/codec.h"

namespace kvcache::codec {

// How CacheGenEncode quantizes. Bin counts follow CacheGen's configuration
// files: `bins` allows integers in [-(bins/2 - 1), bins/2 - 1], so bins - 1
// levels. Every bin count must be even and in [4, 256].
struct CacheGenConfig {
  // Tokens per group; the first is the group's anchor. 1..65535.
  uint32_t group_tokens = 10;
  // Bins for anchor tokens, in every layer.
  uint32_t anchor_bins = 256;
  // Bins for deltas in the first, middle and last third of the layers.
  std::array<uint32_t, 3> delta_bins = {32, 16, 16};
};

// The settings compared in the benchmark, from least to most compressed. The
// second is the bin split CacheGen ships for 7B models (32 / 16 / 16).
std::vector<CacheGenConfig> CacheGenSettings();

// "bins 32/16/16": the delta bins per layer third, and the anchor bins when
// they are not 256.
std::string CacheGenSettingName(const CacheGenConfig& config);

// Compresses `values` (shape.NumValues() 16-bit patterns in the chunk layout
// of codec.h). Returns the stream: header with shape and config, per-token
// scales, per-(layer, K/V, channel) frequency tables, entropy-coded payload
// and a CRC32C. InvalidArgument if the shape is empty or beyond codec.h's
// limits, does not match values.size(), or the config is out of range.
// Inputs are assumed finite; non-finite values decode to finite garbage.
absl::StatusOr<std::string> CacheGenEncode(const ChunkShape& shape,
                                           absl::Span<const uint16_t> values,
                                           const CacheGenConfig& config);

// Returns the shape recorded in `stream`, after checking its header and
// checksum. DataLoss if the stream is not a well-formed CacheGen stream.
absl::StatusOr<ChunkShape> CacheGenPeekShape(absl::string_view stream);

// Decodes `stream` into `out`, which must hold exactly NumValues() of the
// recorded shape (InvalidArgument otherwise). DataLoss if the stream is
// truncated, corrupt or malformed, in which case `out` is unspecified; never
// reads or writes out of bounds.
absl::Status CacheGenDecode(absl::string_view stream, absl::Span<uint16_t> out);

}  // namespace kvcache::codec

#endif  // KVCACHE_CODEC_CACHEGEN_REF_H_
