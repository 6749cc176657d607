#include "codec/kivi.h"

#include <algorithm>
#include <cmath>

#include "codec/half.h"

namespace kvcache::codec {
namespace {

constexpr uint32_t kGroup = 32;

}  // namespace

KiviResult KiviRoundTrip(const ChunkShape& shape,
                         absl::Span<const uint16_t> values, int bits) {
  KiviResult r;
  r.decoded.assign(values.begin(), values.end());
  const uint32_t row = shape.kv_heads * shape.head_dim;
  const size_t plane = size_t{shape.tokens} * row;
  const float levels = static_cast<float>((1 << bits) - 1);
  size_t groups = 0;
  // Quantizes the elements at base + i * stride, i < n, as one group.
  auto group = [&](size_t base, size_t stride, uint32_t n) {
    float lo = INFINITY, hi = -INFINITY;
    for (uint32_t i = 0; i < n; ++i) {
      const float x = HalfToFloat(values[base + i * stride]);
      lo = std::min(lo, x);
      hi = std::max(hi, x);
    }
    // Scale and zero are stored in fp16, so use them as stored.
    const float zero = HalfToFloat(FloatToHalf(lo));
    const float scale = HalfToFloat(FloatToHalf((hi - lo) / levels));
    for (uint32_t i = 0; i < n; ++i) {
      const float x = HalfToFloat(values[base + i * stride]);
      const float q =
          scale > 0 ? std::clamp(std::round((x - zero) / scale), 0.0f, levels)
                    : 0.0f;
      r.decoded[base + i * stride] = FloatToHalf(zero + q * scale);
    }
    ++groups;
  };
  for (uint32_t l = 0; l < shape.layers; ++l) {
    const size_t k = 2 * size_t{l} * plane, v = k + plane;
    for (uint32_t t0 = 0; t0 < shape.tokens; t0 += kGroup) {
      const uint32_t n = std::min(kGroup, shape.tokens - t0);
      for (uint32_t c = 0; c < row; ++c)
        group(k + size_t{t0} * row + c, row, n);
    }
    for (uint32_t t = 0; t < shape.tokens; ++t) {
      for (uint32_t c0 = 0; c0 < row; c0 += kGroup) {
        group(v + size_t{t} * row + c0, 1, std::min(kGroup, row - c0));
      }
    }
  }
  r.bytes = (values.size() * bits + 7) / 8 + 4 * groups;
  return r;
}

}  // namespace kvcache::codec
