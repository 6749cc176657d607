// The piecewise CRC32C arithmetic the GPU decoder uses, checked on the CPU
// against the codec's CRC32C.
#include "codec/cuda/crc32c_math.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <random>
#include <string>

#include "codec/crc32c.h"

namespace kvcache::codec::gpu {
namespace {

TEST(CrcMathTest, PiecesCombineToCrc32c) {
  const PowerTable powers = MakePowerTable();
  std::mt19937 rng(3);
  for (int trial = 0; trial < 50; ++trial) {
    std::string msg(rng() % 3000, '\0');
    for (char& ch : msg) ch = static_cast<char>(rng());
    // Split into random pieces; shift each piece's raw CRC to the end.
    uint32_t raw = 0;
    for (size_t at = 0; at < msg.size();) {
      const size_t len = std::min<size_t>(1 + rng() % 700, msg.size() - at);
      uint32_t piece = 0;
      for (size_t i = at; i < at + len; ++i) {
        piece = RawCrcByte(piece, static_cast<uint8_t>(msg[i]));
      }
      raw ^= MulModP(ZeroBytesFactor(powers.x2n, msg.size() - at - len), piece);
      at += len;
    }
    EXPECT_EQ(FinishCrc(powers.x2n, raw, msg.size()), Crc32c(msg))
        << msg.size();
  }
}

}  // namespace
}  // namespace kvcache::codec::gpu
