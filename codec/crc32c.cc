#include "codec/crc32c.h"

#include <array>
#include <cstring>

#if defined(__x86_64__)
#include <nmmintrin.h>
#endif

namespace kvcache::codec {
namespace {

constexpr uint32_t kPoly = 0x82F63B78u;  // Castagnoli, bit-reversed.

// Slicing-by-8 tables: table[k][b] is the CRC of byte b followed by k zero
// bytes, so eight input bytes fold in with eight independent lookups.
struct Tables {
  std::array<std::array<uint32_t, 256>, 8> t;
  Tables() {
    for (uint32_t b = 0; b < 256; ++b) {
      uint32_t c = b;
      for (int i = 0; i < 8; ++i) c = (c >> 1) ^ ((c & 1) ? kPoly : 0);
      t[0][b] = c;
    }
    for (uint32_t b = 0; b < 256; ++b) {
      for (int k = 1; k < 8; ++k) {
        t[k][b] = (t[k - 1][b] >> 8) ^ t[0][t[k - 1][b] & 0xFF];
      }
    }
  }
};

const Tables& GetTables() {
  static const Tables* tables = new Tables();
  return *tables;
}

#if defined(__x86_64__)
// The hardware path runs three independent crc32 streams over consecutive
// blocks of kStreamBytes: one stream stalls on its own result every step,
// three keep the instruction's pipeline full (about 3x the throughput). The
// streams are joined by "appending zeros" to the earlier ones: register r
// followed by n zero bytes is a linear map of r, kept as four byte tables.
constexpr size_t kStreamBytes = 4096;

using ZerosTable = std::array<std::array<uint32_t, 256>, 4>;

__attribute__((target("sse4.2"))) uint32_t AppendZeros(uint32_t reg, size_t n) {
  uint64_t c = reg;
  for (size_t i = 0; i < n; i += 8) c = _mm_crc32_u64(c, 0);
  return static_cast<uint32_t>(c);
}

ZerosTable MakeZerosTable(size_t n) {
  uint32_t bit_image[32];
  for (int bit = 0; bit < 32; ++bit) bit_image[bit] = AppendZeros(1u << bit, n);
  ZerosTable table;
  for (int byte = 0; byte < 4; ++byte) {
    for (uint32_t b = 0; b < 256; ++b) {
      uint32_t image = 0;
      for (int k = 0; k < 8; ++k) {
        if (b & (1u << k)) image ^= bit_image[8 * byte + k];
      }
      table[byte][b] = image;
    }
  }
  return table;
}

uint32_t ApplyZeros(const ZerosTable& table, uint32_t reg) {
  return table[0][reg & 0xFF] ^ table[1][(reg >> 8) & 0xFF] ^
         table[2][(reg >> 16) & 0xFF] ^ table[3][reg >> 24];
}

struct StreamJoinTables {
  ZerosTable one_block = MakeZerosTable(kStreamBytes);
  ZerosTable two_blocks = MakeZerosTable(2 * kStreamBytes);
};

const StreamJoinTables& GetStreamJoinTables() {
  static const StreamJoinTables* tables = new StreamJoinTables();
  return *tables;
}

uint64_t Load64(const uint8_t* p) {
  uint64_t word;
  std::memcpy(&word, p, 8);
  return word;
}

__attribute__((target("sse4.2"))) uint32_t Crc32cHardware(uint32_t crc,
                                                          const uint8_t* p,
                                                          size_t n) {
  uint64_t c = ~crc;
  if (n >= 3 * kStreamBytes) {
    const StreamJoinTables& join = GetStreamJoinTables();
    for (; n >= 3 * kStreamBytes;
         n -= 3 * kStreamBytes, p += 3 * kStreamBytes) {
      uint64_t a = c, b = 0, d = 0;
      for (size_t i = 0; i < kStreamBytes; i += 8) {
        a = _mm_crc32_u64(a, Load64(p + i));
        b = _mm_crc32_u64(b, Load64(p + kStreamBytes + i));
        d = _mm_crc32_u64(d, Load64(p + 2 * kStreamBytes + i));
      }
      c = ApplyZeros(join.two_blocks, static_cast<uint32_t>(a)) ^
          ApplyZeros(join.one_block, static_cast<uint32_t>(b)) ^ d;
    }
  }
  for (; n >= 8; n -= 8, p += 8) c = _mm_crc32_u64(c, Load64(p));
  uint32_t c32 = static_cast<uint32_t>(c);
  for (; n > 0; --n, ++p) c32 = _mm_crc32_u8(c32, *p);
  return ~c32;
}

bool HasSse42() {
  static const bool has = __builtin_cpu_supports("sse4.2");
  return has;
}
#endif

}  // namespace

uint32_t Crc32cExtendPortable(uint32_t crc, const void* data, size_t n) {
  const auto& t = GetTables().t;
  const auto* p = static_cast<const uint8_t*>(data);
  uint32_t c = ~crc;
  for (; n >= 8; n -= 8, p += 8) {
    // Little-endian assembly keeps the result independent of host order.
    const uint32_t lo = c ^ (uint32_t{p[0]} | uint32_t{p[1]} << 8 |
                             uint32_t{p[2]} << 16 | uint32_t{p[3]} << 24);
    c = t[7][lo & 0xFF] ^ t[6][(lo >> 8) & 0xFF] ^ t[5][(lo >> 16) & 0xFF] ^
        t[4][lo >> 24] ^ t[3][p[4]] ^ t[2][p[5]] ^ t[1][p[6]] ^ t[0][p[7]];
  }
  for (; n > 0; --n, ++p) c = (c >> 8) ^ t[0][(c ^ *p) & 0xFF];
  return ~c;
}

uint32_t Crc32cExtend(uint32_t crc, const void* data, size_t n) {
#if defined(__x86_64__)
  if (HasSse42()) {
    return Crc32cHardware(crc, static_cast<const uint8_t*>(data), n);
  }
#endif
  return Crc32cExtendPortable(crc, data, n);
}

}  // namespace kvcache::codec
