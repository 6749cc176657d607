// DequantizeGroup, whichever instructions it uses, must produce exactly the
// values the format's reconstruction rule (Dequantize) gives: the GPU decoder
// and any other decoder are held to the same bits.
#include "codec/quantize.h"

#include <gtest/gtest.h>

#include <random>
#include <string>
#include <vector>

#include "codec/half.h"

namespace kvcache::codec::internal {
namespace {

// A plane of `tokens` x `width` channels in one channel group, per-channel
// maps from `maps` (offset, step as fp16 bit patterns).
void ExpectExactDequantization(
    const std::vector<std::pair<uint16_t, uint16_t>>& maps, uint32_t tokens,
    uint32_t seed) {
  const uint32_t width = static_cast<uint32_t>(maps.size());
  Header h;
  h.shape = {1, tokens, 1, width, DType::kFloat16};
  h.channel_group = width;
  const PlaneSpec spec{16, ScaleMode::kPerChannel};
  std::string scales;
  for (const auto& [offset, step] : maps) {
    for (uint16_t v : {offset, step}) {
      scales.push_back(static_cast<char>(v & 0xFF));
      scales.push_back(static_cast<char>(v >> 8));
    }
  }
  std::mt19937 rng(seed);
  std::vector<uint16_t> q(size_t{tokens} * width);
  for (uint16_t& v : q) v = static_cast<uint16_t>(rng());
  std::vector<uint16_t> out(q.size());
  DequantizeGroup(h, spec, scales, 0, q.data(), out.data());
  for (uint32_t t = 0; t < tokens; ++t) {
    for (uint32_t c = 0; c < width; ++c) {
      const Affine a{HalfToFloat(maps[c].first), HalfToFloat(maps[c].second)};
      const uint16_t want = Dequantize(a, q[t * width + c], DType::kFloat16);
      ASSERT_EQ(out[t * width + c], want)
          << "token " << t << " channel " << c << " offset 0x" << std::hex
          << maps[c].first << " step 0x" << maps[c].second;
    }
  }
}

TEST(QuantizeTest, DequantizationIsExactForOrdinaryMaps) {
  std::mt19937 rng(1);
  std::vector<std::pair<uint16_t, uint16_t>> maps(67);  // not a multiple of 8
  for (auto& [offset, step] : maps) {
    offset = FloatToHalf(std::uniform_real_distribution<float>(-8, 8)(rng));
    step = FloatToHalf(std::uniform_real_distribution<float>(1e-4f, 0.5f)(rng));
  }
  ExpectExactDequantization(maps, 33, 2);
}

TEST(QuantizeTest, DequantizationIsExactAtTheEdgesOfFp16) {
  std::mt19937 rng(3);
  const uint16_t edges[] = {
      0x0000, 0x8000,  // zeros
      0x0001, 0x03FF,  // subnormals
      0x0400, 0x7BFF,  // smallest normal, largest finite
      0xFBFF, 0x7C00,  // -largest finite, +inf
      0xFC00, 0x7E00,  // -inf, NaN
      0x7C01, 0xFE37,  // signalling NaN, negative NaN with payload
      0x3C00, 0x1400,  // 1, a small step
  };
  std::vector<std::pair<uint16_t, uint16_t>> maps;
  for (int i = 0; i < 96; ++i) {
    maps.emplace_back(edges[rng() % std::size(edges)],
                      edges[rng() % std::size(edges)]);
  }
  ExpectExactDequantization(maps, 20, 4);
}

}  // namespace
}  // namespace kvcache::codec::internal
