// Conversions between float and the two 16-bit formats a chunk may hold,
// for the codec and for workers that keep their KV in fp16 or bf16.
// Both round to nearest-even. CUDA code runs these same functions, which
// use the hardware conversions (same rounding) for everything but NaN, so
// CPU and GPU agree bit for bit, NaN payloads included.
#ifndef KVCACHE_CODEC_HALF_H_
#define KVCACHE_CODEC_HALF_H_

#include <cstdint>
#include <cstring>

#include "codec/hd.h"

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif

namespace kvcache::codec {

KVCACHE_HD inline uint32_t FloatBits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
#endif
}
KVCACHE_HD inline float BitsFloat(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, 4);
  return f;
#endif
}

KVCACHE_HD inline float HalfToFloat(uint16_t h) {
  const uint32_t sign = uint32_t{h & 0x8000u} << 16;
  const uint32_t rest = h & 0x7FFFu;
  if (rest >= 0x7C00u) {  // Inf / NaN: keep the payload.
    return BitsFloat(sign | 0x7F800000u | (rest & 0x3FFu) << 13);
  }
  // Shifting exponent+mantissa into float position and rescaling by 2^112
  // handles normals, subnormals and zero with one multiply.
  return BitsFloat(sign |
                   FloatBits(BitsFloat(rest << 13) * BitsFloat(0x77800000u)));
}

KVCACHE_HD inline uint16_t FloatToHalf(float f) {
  const uint32_t u = FloatBits(f);
#if defined(__CUDA_ARCH__)
  // The hardware rounds the same way; only NaNs are made quiet differently.
  if ((u & 0x7FFFFFFFu) <= 0x7F800000u) {
    return __half_as_ushort(__float2half_rn(f));
  }
#endif
  const uint32_t sign = (u >> 16) & 0x8000u;
  uint32_t a = u & 0x7FFFFFFFu;
  if (a >= 0x47800000u) {  // Overflow to Inf, or NaN (quieted).
    return static_cast<uint16_t>(sign | (a > 0x7F800000u ? 0x7E00u : 0x7C00u));
  }
  if (a < 0x38800000u) {  // Result is subnormal or zero.
    // Adding 0.5 aligns the half's subnormal ulp with the float's ulp, so
    // the FPU does the round-to-nearest-even for us.
    const float r = BitsFloat(a) + 0.5f;
    return static_cast<uint16_t>(sign | (FloatBits(r) - 0x3F000000u));
  }
  const uint32_t odd = (a >> 13) & 1u;
  a += 0xC8000FFFu + odd;  // Rebias exponent (-112 << 23) and round.
  return static_cast<uint16_t>(sign | (a >> 13));
}

KVCACHE_HD inline float BFloat16ToFloat(uint16_t b) {
  return BitsFloat(uint32_t{b} << 16);
}

KVCACHE_HD inline uint16_t FloatToBFloat16(float f) {
  const uint32_t u = FloatBits(f);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) {
    return static_cast<uint16_t>((u >> 16) | 0x40u);  // Quiet NaN.
  }
#if defined(__CUDA_ARCH__)
  return __bfloat16_as_ushort(__float2bfloat16_rn(f));
#else
  return static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
#endif
}

}  // namespace kvcache::codec

#endif  // KVCACHE_CODEC_HALF_H_
