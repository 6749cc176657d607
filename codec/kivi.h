// KIVI-style uniform group quantization, the baseline the lossy levels are
// measured against: keys per channel over groups of 32 tokens, values per
// token over groups of 32 channels, min/max affine with fp16 scale and zero
// per group, packed bits, no entropy coding.
#ifndef KVCACHE_CODEC_KIVI_H_
#define KVCACHE_CODEC_KIVI_H_

#include <cstdint>
#include <vector>

#include "absl/types/span.h"
#include "codec/codec.h"

namespace kvcache::codec {

struct KiviResult {
  std::vector<uint16_t> decoded;  // fp16, chunk layout.
  size_t bytes = 0;               // Packed integers + 4 bytes per group.
};

// Quantizes an fp16 chunk to `bits` (1..8) and back.
KiviResult KiviRoundTrip(const ChunkShape& shape,
                         absl::Span<const uint16_t> values, int bits);

}  // namespace kvcache::codec

#endif  // KVCACHE_CODEC_KIVI_H_
