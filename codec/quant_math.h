// Floating-point steps of quantization that CPU and CUDA code share. Every
// multiply-add is written with explicit round-to-nearest operations so no
// compiler fuses it into an FMA: the bitstream depends on these results bit
// for bit (FORMAT.md, "Scales").
#ifndef KVCACHE_CODEC_QUANT_MATH_H_
#define KVCACHE_CODEC_QUANT_MATH_H_

#include <cmath>
#include <cstdint>

#include "codec/codec.h"
#include "codec/half.h"
#include "codec/hd.h"

namespace kvcache::codec::internal {

KVCACHE_HD inline float ToFloat(uint16_t v, DType dtype) {
  return dtype == DType::kFloat16 ? HalfToFloat(v) : BFloat16ToFloat(v);
}
KVCACHE_HD inline uint16_t FromFloat(float f, DType dtype) {
  return dtype == DType::kFloat16 ? FloatToHalf(f) : FloatToBFloat16(f);
}

KVCACHE_HD inline bool IsFinite(float f) {
  return (FloatBits(f) & 0x7F800000u) != 0x7F800000u;
}

// a * b and a + b in binary32 (or binary64), rounded to nearest, never fused.
KVCACHE_HD inline float MulRn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
KVCACHE_HD inline float AddRn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}
KVCACHE_HD inline double MulRn(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dmul_rn(a, b);
#else
  return a * b;
#endif
}
KVCACHE_HD inline double AddRn(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dadd_rn(a, b);
#else
  return a + b;
#endif
}

struct Affine {
  float offset;
  float step;
};

// Reconstruction of integer q (FORMAT.md): one multiply, one add, rounded
// to the dtype. A NaN (only a stream with non-finite scales makes one) is
// stored as the dtype's canonical quiet NaN: which NaN an operation on two
// NaNs returns differs between processors and even instruction choices.
KVCACHE_HD inline uint16_t Dequantize(Affine a, uint32_t q, DType dtype) {
  const float v = AddRn(a.offset, MulRn(static_cast<float>(q), a.step));
  if (v != v) return dtype == DType::kFloat16 ? 0x7E00 : 0x7FC0;
  return FromFloat(v, dtype);
}

// Mean, standard deviation and largest deviation from the mean of a set.
// Sums run in double in the order values are added, which the GPU encoder
// reproduces.
struct Stats {
  double sum = 0, sum_sq = 0;
  float lo = BitsFloat(0x7F800000u);   // +inf
  float hi = -BitsFloat(0x7F800000u);  // -inf
  uint32_t n = 0;
  KVCACHE_HD void Add(float x) {
    sum = AddRn(sum, double{x});
    sum_sq = AddRn(sum_sq, MulRn(double{x}, double{x}));
    lo = x < lo ? x : lo;
    hi = hi < x ? x : hi;
    ++n;
  }
  KVCACHE_HD float Mean() const {
    return n ? static_cast<float>(sum / n) : 0.0f;
  }
  KVCACHE_HD double Variance() const {
    if (!n) return 0.0;
    const double mean = sum / n;
    const double v = AddRn(sum_sq / n, -MulRn(mean, mean));
    return 0.0 < v ? v : 0.0;
  }
  KVCACHE_HD float MaxDev() const {
    const float m = Mean();
    if (!n) return 0.0f;
    const float up = hi - m, down = m - lo;
    return up < down ? down : up;
  }
};

// Relative precision of a stored offset, used to widen the integer range so
// rounding the offset can never push a value out of it.
KVCACHE_HD inline float OffsetPrecision(DType dtype) {
  return dtype == DType::kFloat16 ? 1.0f / 2048 : 1.0f / 256;
}

// Integers needed to cover [center - dev, center + dev] with `step`, plus
// margin for the rounding of the stored offset and step.
KVCACHE_HD inline float LevelsNeeded(float center, float dev, float step,
                                     DType dtype) {
  if (!(step > 0)) return 1;
  const float offset = BitsFloat(FloatBits(center) & 0x7FFFFFFFu) + dev;
  return 2 * dev / step + 2 * offset * OffsetPrecision(dtype) / step + 4;
}

// relative_step times the spread (square root of `variance`).
KVCACHE_HD inline float SpreadStep(float relative_step, double variance) {
  return MulRn(relative_step, static_cast<float>(::sqrt(variance)));
}

// A set's final step and the integer levels it needs, at most 65535: past
// 16 bits the step grows instead, so the widest set still fits.
struct SetFit {
  float step;
  float levels;
};
KVCACHE_HD inline SetFit FitSet(const Stats& st, float step, DType dtype) {
  if (!IsFinite(step)) step = 0;
  const float need = LevelsNeeded(st.Mean(), st.MaxDev(), step, dtype);
  if (need > 65535) step = MulRn(step, need / 65535);
  return {step, 65535.0f < need ? 65535.0f : need};
}

// Smallest integer width whose range holds `levels` integers.
KVCACHE_HD inline uint8_t BitsFor(float levels) {
  uint8_t bits = 1;
  while (bits < 16 && static_cast<float>(1u << bits) < levels) ++bits;
  return bits;
}

// The stored form of an affine map: offset = center - 2^(bits-1) * step (so
// the center maps to the middle integer and raw symbols of every channel
// pool around the same value), both rounded to the dtype.
struct StoredAffine {
  uint16_t offset_bits;
  uint16_t step_bits;
  Affine map;  // The map as stored, back in float.
};
KVCACHE_HD inline StoredAffine FitAffine(float center, float step, int bits,
                                         DType dtype) {
  uint16_t step_bits = 0;
  if (IsFinite(step) && step > 0) step_bits = FromFloat(step, dtype);
  const float s = ToFloat(step_bits, dtype);
  const float half = static_cast<float>(1u << (bits - 1));
  uint16_t offset_bits = FromFloat(AddRn(center, -MulRn(half, s)), dtype);
  if (!IsFinite(ToFloat(offset_bits, dtype))) offset_bits = 0;
  return {offset_bits, step_bits, {ToFloat(offset_bits, dtype), s}};
}

// Maps values to integers in [0, 2^bits) with an affine map.
class Quantizer {
 public:
  KVCACHE_HD Quantizer(Affine a, int bits)
      : offset_(a.offset),
        inv_step_(a.step > 0 && IsFinite(a.step) ? 1.0f / a.step : 0.0f),
        max_q_(static_cast<float>((1u << bits) - 1)) {}

  KVCACHE_HD uint16_t operator()(float x) const {
    float v = AddRn(MulRn(x - offset_, inv_step_), 0.5f);
    // Written so NaN lands on 0: the cast below must see a valid range.
    v = v >= 0.0f ? v : 0.0f;
    v = v <= max_q_ ? v : max_q_;
    return static_cast<uint16_t>(v);
  }

 private:
  float offset_;
  float inv_step_;
  float max_q_;
};

}  // namespace kvcache::codec::internal

#endif  // KVCACHE_CODEC_QUANT_MATH_H_
