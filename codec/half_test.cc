// Tests of the fp16 <-> float conversion (codec/half.h): exhaustive over all
// fp16 values, and rounding checked at every tie point between neighbouring
// fp16 values.
#include "codec/half.h"

#include <cmath>
#include <cstring>
#include <limits>

#include "gtest/gtest.h"

namespace kvcache::codec {
namespace {

bool IsNan(uint16_t h) { return (h & 0x7c00u) == 0x7c00u && (h & 0x3ffu); }

float NextFloatUp(float f) {
  return std::nextafter(f, std::numeric_limits<float>::infinity());
}
float NextFloatDown(float f) {
  return std::nextafter(f, -std::numeric_limits<float>::infinity());
}

TEST(Fp16Test, EveryHalfSurvivesARoundTrip) {
  for (uint32_t bits = 0; bits <= 0xffffu; ++bits) {
    const uint16_t h = static_cast<uint16_t>(bits);
    const float f = HalfToFloat(h);
    if (IsNan(h)) {
      EXPECT_TRUE(std::isnan(f)) << bits;
      EXPECT_TRUE(IsNan(FloatToHalf(f))) << bits;
      EXPECT_EQ(FloatToHalf(f) & 0x8000u, h & 0x8000u) << bits;
    } else {
      EXPECT_EQ(FloatToHalf(f), h) << bits;
    }
  }
}

TEST(Fp16Test, DecodesKnownValues) {
  EXPECT_EQ(HalfToFloat(0x3c00), 1.0f);
  EXPECT_EQ(HalfToFloat(0xc000), -2.0f);
  EXPECT_EQ(HalfToFloat(0x7bff), 65504.0f);
  EXPECT_EQ(HalfToFloat(0x0400), std::ldexp(1.0f, -14));  // smallest normal
  EXPECT_EQ(HalfToFloat(0x0001), std::ldexp(1.0f, -24));  // smallest subnormal
  EXPECT_EQ(HalfToFloat(0x7c00), std::numeric_limits<float>::infinity());
  EXPECT_TRUE(std::signbit(HalfToFloat(0x8000)));
}

// Between each pair of neighbouring finite fp16 values (subnormals included),
// a float just below the midpoint rounds down, just above rounds up, and the
// midpoint itself rounds to the one with an even mantissa.
TEST(Fp16Test, RoundsToNearestEvenAtEveryMidpoint) {
  for (uint16_t h = 0; h < 0x7bff; ++h) {
    for (uint16_t sign : {0x0000, 0x8000}) {
      const uint16_t lo = sign | h, hi = sign | (h + 1);
      const float mid = (HalfToFloat(lo) + HalfToFloat(hi)) / 2;  // exact
      const float toward_lo = sign ? NextFloatUp(mid) : NextFloatDown(mid);
      const float toward_hi = sign ? NextFloatDown(mid) : NextFloatUp(mid);
      EXPECT_EQ(FloatToHalf(toward_lo), lo) << h;
      EXPECT_EQ(FloatToHalf(toward_hi), hi) << h;
      EXPECT_EQ(FloatToHalf(mid), (lo & 1) ? hi : lo) << h;
    }
  }
}

TEST(Fp16Test, OverflowsToInfinity) {
  const float inf = std::numeric_limits<float>::infinity();
  EXPECT_EQ(FloatToHalf(65519.996f), 0x7bff);  // below the max's upper tie
  EXPECT_EQ(FloatToHalf(65520.0f), 0x7c00);    // the tie rounds to "even" inf
  EXPECT_EQ(FloatToHalf(1e10f), 0x7c00);
  EXPECT_EQ(FloatToHalf(-1e10f), 0xfc00);
  EXPECT_EQ(FloatToHalf(inf), 0x7c00);
  EXPECT_EQ(FloatToHalf(-inf), 0xfc00);
}

TEST(Fp16Test, UnderflowsToSignedZero) {
  const float half_smallest = std::ldexp(1.0f, -25);
  EXPECT_EQ(FloatToHalf(half_smallest), 0x0000);  // tie, to even zero
  EXPECT_EQ(FloatToHalf(NextFloatUp(half_smallest)), 0x0001);
  EXPECT_EQ(FloatToHalf(-half_smallest), 0x8000);
  EXPECT_EQ(FloatToHalf(std::numeric_limits<float>::denorm_min()), 0x0000);
  EXPECT_EQ(FloatToHalf(-0.0f), 0x8000);
}

TEST(Fp16Test, KeepsNanQuietAndSigned) {
  EXPECT_TRUE(IsNan(FloatToHalf(std::numeric_limits<float>::quiet_NaN())));
  EXPECT_TRUE(IsNan(FloatToHalf(-std::numeric_limits<float>::quiet_NaN())));
  // A signalling NaN whose payload sits only in bits fp16 drops must not
  // become infinity.
  uint32_t snan_bits = 0x7f800001u;
  float snan;
  std::memcpy(&snan, &snan_bits, sizeof(snan));
  EXPECT_TRUE(IsNan(FloatToHalf(snan)));
}

}  // namespace
}  // namespace kvcache::codec
