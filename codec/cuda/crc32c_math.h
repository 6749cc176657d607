// CRC32C arithmetic for computing one checksum from many threads: each
// thread takes the raw CRC (no initial value or final xor) of one piece of
// the message, shifts it to the message's end by multiplying with x^(8n)
// mod P, and the shifted values XOR together. Polynomials are in the
// reflected bit order CRC32C uses (bit 31 = x^0).
#ifndef KVCACHE_CODEC_CUDA_CRC32C_MATH_H_
#define KVCACHE_CODEC_CUDA_CRC32C_MATH_H_

#include <cstdint>

#include "codec/hd.h"

namespace kvcache::codec::gpu {

inline constexpr uint32_t kCrc32cPoly = 0x82F63B78u;

// a * b mod P.
KVCACHE_HD constexpr uint32_t MulModP(uint32_t a, uint32_t b) {
  uint32_t p = 0;
  for (int i = 31; i >= 0; --i) {
    if (a >> i & 1) p ^= b;
    b = b & 1 ? (b >> 1) ^ kCrc32cPoly : b >> 1;
  }
  return p;
}

// x^(2^k) mod P for k < kPowers: enough for messages under 2^37 bytes.
inline constexpr int kPowers = 40;
struct PowerTable {
  uint32_t x2n[kPowers];
};
constexpr PowerTable MakePowerTable() {
  PowerTable t{};
  uint32_t p = 1u << 30;  // x^1
  for (int k = 0; k < kPowers; ++k) {
    t.x2n[k] = p;
    p = MulModP(p, p);
  }
  return t;
}

// x^(8 * n) mod P, the factor that appends n < 2^37 zero bytes to a raw
// CRC; x2n is a PowerTable's.
KVCACHE_HD inline uint32_t ZeroBytesFactor(const uint32_t* x2n, uint64_t n) {
  uint32_t p = 1u << 31;  // x^0
  for (int k = 3; n != 0 && k < kPowers; n >>= 1, ++k) {
    if (n & 1) p = MulModP(x2n[k], p);
  }
  return p;
}

// Raw CRC (zero initial value, no final xor) of one byte appended.
KVCACHE_HD inline uint32_t RawCrcByte(uint32_t crc, uint8_t b) {
  crc ^= b;
  for (int i = 0; i < 8; ++i)
    crc = crc & 1 ? (crc >> 1) ^ kCrc32cPoly : crc >> 1;
  return crc;
}

// The standard CRC32C of an n-byte message whose raw CRC is `raw`.
KVCACHE_HD inline uint32_t FinishCrc(const uint32_t* x2n, uint32_t raw,
                                     uint64_t n) {
  return ~(raw ^ MulModP(ZeroBytesFactor(x2n, n), 0xFFFFFFFFu));
}

}  // namespace kvcache::codec::gpu

#endif  // KVCACHE_CODEC_CUDA_CRC32C_MATH_H_
