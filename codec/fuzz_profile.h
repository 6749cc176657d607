// A small fixed model profile that the decoder fuzzer, its seed corpus and
// the corpus replay share, so fuzzed transform streams (format v3) reach the
// transform decoder: 2 layers, 2 KV heads of 8 channels, RoPE on adjacent
// pairs, a Hadamard basis.
#ifndef KVCACHE_CODEC_FUZZ_PROFILE_H_
#define KVCACHE_CODEC_FUZZ_PROFILE_H_

#include <cmath>

#include "codec/profile.h"

namespace kvcache::codec {

inline constexpr ChunkShape kFuzzProfileShape{2, 0, 2, 8, DType::kFloat16};

inline const ModelProfile& FuzzProfile() {
  static const ModelProfile* profile = [] {
    auto* p = new ModelProfile;
    p->layers = kFuzzProfileShape.layers;
    p->kv_heads = kFuzzProfileShape.kv_heads;
    p->head_dim = kFuzzProfileShape.head_dim;
    p->rope = RopeLayout::kAdjacentPairs;
    for (uint32_t j = 0; j < p->head_dim / 2; ++j) {
      p->rope_inv_freq.push_back(std::pow(10000.0, -2.0 * j / p->head_dim));
    }
    const size_t d = p->head_dim;
    for (size_t h = 0; h < p->Heads(); ++h) {
      for (size_t k = 0; k < d; ++k) {
        p->mean.push_back(0.125f * static_cast<float>(h + k));
        p->variance.push_back(static_cast<float>(d - k));
        for (size_t i = 0; i < d; ++i) {
          // Sylvester's Hadamard matrix, rows scaled to unit length.
          const bool odd = __builtin_popcountll(k & i) % 2 == 1;
          p->basis.push_back((odd ? -1.0f : 1.0f) /
                             std::sqrt(static_cast<float>(d)));
        }
      }
    }
    if (!FinishProfile(p).ok()) std::abort();
    return p;
  }();
  return *profile;
}

}  // namespace kvcache::codec

#endif  // KVCACHE_CODEC_FUZZ_PROFILE_H_
