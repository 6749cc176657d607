// Arithmetic of the transform levels (format v3) that the CPU codec and the
// CUDA kernels share, written so both give the same bits: RoPE angles from
// a sine and cosine built only of IEEE additions, multiplications and fused
// multiply-adds (never a math library, whose results differ between CPU
// and GPU), and every sum in a fixed order (FORMAT.md, "Transform").
#ifndef KVCACHE_CODEC_TRANSFORM_MATH_H_
#define KVCACHE_CODEC_TRANSFORM_MATH_H_

#include <cmath>
#include <cstdint>

#include "codec/hd.h"
#include "codec/quant_math.h"

namespace kvcache::codec::internal {

// a * b + c rounded once.
KVCACHE_HD inline float FmaRn(float a, float b, float c) {
#if defined(__CUDA_ARCH__)
  return __fmaf_rn(a, b, c);
#else
  return std::fma(a, b, c);
#endif
}
KVCACHE_HD inline double FmaRn(double a, double b, double c) {
#if defined(__CUDA_ARCH__)
  return __fma_rn(a, b, c);
#else
  return std::fma(a, b, c);
#endif
}

struct SinCos {
  float sin;
  float cos;
};

// sin and cos of `angle` (radians, |angle| < 2^40), rounded to float: the
// quadrant by rounding angle / (pi/2) to an integer n, angle - n pi/2 in
// three fused steps (Cody and Waite), then fdlibm's kernel polynomials in
// double. Accurate to well under a float ulp.
KVCACHE_HD inline SinCos RopeSinCos(double angle) {
  constexpr double kTwoOverPi = 6.36619772367581382433e-01;
  constexpr double kPiOver2Hi = 1.57079632673412561417e+00;
  constexpr double kPiOver2Mid = 6.07710050630396597660e-11;
  constexpr double kPiOver2Lo = 2.02226624879595063154e-21;
  const double n = ::rint(MulRn(angle, kTwoOverPi));
  double r = FmaRn(-n, kPiOver2Hi, angle);
  r = FmaRn(-n, kPiOver2Mid, r);
  r = FmaRn(-n, kPiOver2Lo, r);
  const double z = MulRn(r, r);
  double s = FmaRn(z, 1.58969099521155010221e-10, -2.50507602534068634195e-08);
  s = FmaRn(z, s, 2.75573137070700676789e-06);
  s = FmaRn(z, s, -1.98412698298579493134e-04);
  s = FmaRn(z, s, 8.33333333332248946124e-03);
  s = FmaRn(z, s, -1.66666666666666324348e-01);
  const double sin_r = FmaRn(MulRn(r, z), s, r);
  double c = FmaRn(z, -1.13596475577881948265e-11, 2.08757232129817482790e-09);
  c = FmaRn(z, c, -2.75573143513906633035e-07);
  c = FmaRn(z, c, 2.48015872894767294178e-05);
  c = FmaRn(z, c, -1.38888888888741095749e-03);
  c = FmaRn(z, c, 4.16666666666666019037e-02);
  const double cos_r = FmaRn(MulRn(z, z), c, FmaRn(-0.5, z, 1.0));
  // n mod 4, for any sign of n.
  const int quadrant = static_cast<int>(n - 4.0 * ::floor(n * 0.25));
  const double sin_a = quadrant == 0   ? sin_r
                       : quadrant == 1 ? cos_r
                       : quadrant == 2 ? -sin_r
                                       : -cos_r;
  const double cos_a = quadrant == 0   ? cos_r
                       : quadrant == 1 ? -sin_r
                       : quadrant == 2 ? -cos_r
                                       : sin_r;
  return {static_cast<float>(sin_a), static_cast<float>(cos_a)};
}

// The angle of pair j at `position`.
KVCACHE_HD inline SinCos RopeAngle(uint32_t position, double inv_freq) {
  return RopeSinCos(MulRn(static_cast<double>(position), inv_freq));
}

// Rotates the pair (a, b) back by the angle (a key's RoPE undone).
KVCACHE_HD inline void RopeUndo(SinCos t, float* a, float* b) {
  const float x = *a, y = *b;
  *a = FmaRn(x, t.cos, MulRn(y, t.sin));
  *b = FmaRn(y, t.cos, -MulRn(x, t.sin));
}

// Rotates the pair (a, b) forward by the angle (RoPE re-applied).
KVCACHE_HD inline void RopeApply(SinCos t, float* a, float* b) {
  const float x = *a, y = *b;
  *a = FmaRn(x, t.cos, -MulRn(y, t.sin));
  *b = FmaRn(x, t.sin, MulRn(y, t.cos));
}

// Channels of pair j in a head: adjacent (2j, 2j+1) or halves (j, j + d/2).
KVCACHE_HD inline uint32_t RopeFirst(bool halves, uint32_t j) {
  return halves ? j : 2 * j;
}
KVCACHE_HD inline uint32_t RopeSecond(bool halves, uint32_t j,
                                      uint32_t head_dim) {
  return halves ? j + head_dim / 2 : 2 * j + 1;
}

// Coefficient of component k: basis row k dotted with the centered head,
// summed over channels in increasing order.
KVCACHE_HD inline float ForwardComponent(const float* basis_row,
                                         const float* centered, uint32_t d) {
  float acc = 0.0f;
  for (uint32_t i = 0; i < d; ++i) acc = FmaRn(basis_row[i], centered[i], acc);
  return acc;
}

// A reconstructed channel rounded to the dtype; NaN (only hostile scales
// make one) as the dtype's canonical quiet NaN, as Dequantize does.
KVCACHE_HD inline uint16_t RoundCoefficientSum(float v, DType dtype) {
  if (v != v) return dtype == DType::kFloat16 ? 0x7E00 : 0x7FC0;
  return FromFloat(v, dtype);
}

}  // namespace kvcache::codec::internal

#endif  // KVCACHE_CODEC_TRANSFORM_MATH_H_
