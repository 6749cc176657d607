// Synthetic KV chunks with the statistics of large models (token locality,
// a few outlier key channels) for tests that need shapes the real dumps do
// not have.
#ifndef KVCACHE_CODEC_TEST_DATA_H_
#define KVCACHE_CODEC_TEST_DATA_H_

#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

#include "codec/codec.h"
#include "codec/quantize.h"

namespace kvcache::codec {

inline std::vector<uint16_t> SyntheticChunk(const ChunkShape& s,
                                            uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  const uint32_t row = s.kv_heads * s.head_dim;
  std::vector<uint16_t> out;
  out.reserve(s.NumValues());
  for (uint32_t plane = 0; plane < 2 * s.layers; ++plane) {
    const bool key = plane % 2 == 0;
    std::vector<float> level(row), gain(row);
    for (uint32_t c = 0; c < row; ++c) {
      gain[c] = key && c % 37 == 5 ? 12.0f : 1.0f;  // Outlier key channels.
      level[c] = normal(rng) * gain[c];
    }
    for (uint32_t t = 0; t < s.tokens; ++t) {
      for (uint32_t c = 0; c < row; ++c) {
        level[c] = 0.9f * level[c] + 0.3f * gain[c] * normal(rng);
        out.push_back(internal::FromFloat(level[c], s.dtype));
      }
    }
  }
  return out;
}

}  // namespace kvcache::codec

#endif  // KVCACHE_CODEC_TEST_DATA_H_
