#include "codec/codec.h"

#include <cmath>
#include <map>
#include <random>
#include <vector>

#include "codec/byte_io.h"
#include "codec/kv_dump.h"
#include "codec/quantize.h"
#include "codec/test_data.h"
#include "gtest/gtest.h"

namespace kvcache::codec {
namespace {

constexpr Level kAllLevels[] = {Level::kLossless, Level::kNearLossless,
                                Level::kHigh,     Level::kDefault,
                                Level::kCompact,  Level::kTiny};

// Documented bounds on relative L2 error of K and of V (README.md).
const std::map<Level, double> kErrorBound = {
    {Level::kLossless, 0.0}, {Level::kNearLossless, 0.006},
    {Level::kHigh, 0.08},    {Level::kDefault, 0.35},
    {Level::kCompact, 0.45}, {Level::kTiny, 0.65},
};

double RelativeL2(const ChunkShape& s, const std::vector<uint16_t>& want,
                  const std::vector<uint16_t>& got, int kv) {
  const size_t plane = size_t{s.tokens} * s.kv_heads * s.head_dim;
  double err = 0, ref = 0;
  for (size_t p = kv; p < 2 * size_t{s.layers}; p += 2) {
    for (size_t i = p * plane; i < (p + 1) * plane; ++i) {
      const double a = internal::ToFloat(want[i], s.dtype);
      const double b = internal::ToFloat(got[i], s.dtype);
      err += (a - b) * (a - b);
      ref += a * a;
    }
  }
  return std::sqrt(err / ref);
}

std::vector<uint16_t> RoundTrip(const ChunkShape& s,
                                const std::vector<uint16_t>& values,
                                Level level, size_t* bytes = nullptr) {
  absl::StatusOr<std::string> enc = EncodeChunk(s, values, level);
  EXPECT_TRUE(enc.ok()) << enc.status();
  if (!enc.ok()) return {};
  if (bytes) *bytes = enc->size();
  absl::StatusOr<ChunkShape> peek = PeekShape(*enc);
  EXPECT_TRUE(peek.ok()) << peek.status();
  if (peek.ok()) {
    EXPECT_TRUE(*peek == s);
  }
  std::vector<uint16_t> out(s.NumValues());
  const absl::Status st = DecodeChunk(*enc, absl::MakeSpan(out));
  EXPECT_TRUE(st.ok()) << st;
  return out;
}

void ExpectWithinBound(const ChunkShape& s, const std::vector<uint16_t>& in,
                       const std::vector<uint16_t>& out, Level level) {
  ASSERT_EQ(out.size(), in.size());
  if (level == Level::kLossless) {
    EXPECT_EQ(out, in);
    return;
  }
  for (int kv = 0; kv < 2; ++kv) {
    EXPECT_LE(RelativeL2(s, in, out, kv), kErrorBound.at(level))
        << LevelName(level) << (kv ? " V" : " K");
  }
}

TEST(LevelTest, NamesRoundTrip) {
  for (Level level : kAllLevels) {
    absl::StatusOr<Level> parsed = ParseLevel(LevelName(level));
    ASSERT_TRUE(parsed.ok());
    EXPECT_EQ(*parsed, level);
  }
  EXPECT_FALSE(ParseLevel("fastest").ok());
  EXPECT_EQ(LevelName(kDefaultLevel), "near-lossless");
}

TEST(CodecTest, EveryLevelAndDtypeOnSyntheticData) {
  for (DType dtype : {DType::kFloat16, DType::kBFloat16}) {
    const ChunkShape s{4, 96, 2, 64, dtype};
    const std::vector<uint16_t> in = SyntheticChunk(s, 7);
    size_t previous = 0;
    for (Level level : kAllLevels) {
      size_t bytes = 0;
      ExpectWithinBound(s, in, RoundTrip(s, in, level, &bytes), level);
      // Each level must be smaller than the one before it.
      if (previous != 0) {
        EXPECT_LT(bytes, previous) << LevelName(level);
      }
      previous = bytes;
    }
  }
}

TEST(CodecTest, LayerEndsSplitThePayloadByLayer) {
  const ChunkShape s{5, 300, 2, 64, DType::kFloat16};
  const std::vector<uint16_t> in = SyntheticChunk(s, 11);
  for (Level level : kAllLevels) {
    absl::StatusOr<std::string> enc = EncodeChunk(s, in, level);
    ASSERT_TRUE(enc.ok()) << enc.status();
    absl::StatusOr<std::vector<uint64_t>> ends = LayerEnds(*enc);
    ASSERT_TRUE(ends.ok()) << ends.status();
    ASSERT_EQ(ends->size(), s.layers);
    // The last layer ends where the checksum starts; each layer has bytes.
    EXPECT_EQ(ends->back(), enc->size() - 4) << LevelName(level);
    for (size_t l = 1; l < ends->size(); ++l) {
      EXPECT_LT((*ends)[l - 1], (*ends)[l]) << LevelName(level) << " " << l;
    }
  }
  // A directory whose ends lie past the payload is refused.
  absl::StatusOr<std::string> enc = EncodeChunk(s, in, Level::kDefault);
  ASSERT_TRUE(enc.ok());
  absl::StatusOr<std::vector<uint64_t>> ends = LayerEnds(*enc);
  ASSERT_TRUE(ends.ok());
  const uint64_t payload_bytes =
      internal::LoadU32(reinterpret_cast<const uint8_t*>(enc->data()) + 48);
  const uint32_t num_blocks =
      internal::LoadU32(reinterpret_cast<const uint8_t*>(enc->data()) + 44);
  const uint64_t dir = enc->size() - 4 - payload_bytes - 4 * num_blocks;
  std::string bad = *enc;
  for (uint64_t b = 0; b < 4 * num_blocks; ++b) bad[dir + b] = '\xff';
  EXPECT_EQ(LayerEnds(bad).status().code(), absl::StatusCode::kDataLoss);
  EXPECT_FALSE(LayerEnds(enc->substr(0, 40)).ok());
}

TEST(CodecTest, LosslessKeepsArbitraryBitPatterns) {
  // NaNs, infinities, subnormals and -0 must all survive.
  const ChunkShape s{2, 37, 3, 8, DType::kBFloat16};
  std::mt19937 rng(3);
  std::vector<uint16_t> in(s.NumValues());
  for (auto& v : in) v = static_cast<uint16_t>(rng());
  EXPECT_EQ(RoundTrip(s, in, Level::kLossless), in);
  std::vector<uint16_t> constant(s.NumValues(), 0x7E00);
  EXPECT_EQ(RoundTrip(s, constant, Level::kLossless), constant);
}

TEST(CodecTest, OddShapes) {
  const ChunkShape shapes[] = {
      {1, 1, 1, 8, DType::kFloat16},      // One token.
      {2, 100, 4, 8, DType::kFloat16},    // Partial chunk, partial group.
      {1, 17, 2, 128, DType::kBFloat16},  // Head dim 128.
      {80, 3, 1, 4, DType::kFloat16},     // Many layers.
      {1, 33, 3, 5, DType::kFloat16},     // Odd channel count.
  };
  for (const ChunkShape& s : shapes) {
    const std::vector<uint16_t> in = SyntheticChunk(s, s.tokens);
    for (Level level : {Level::kLossless, Level::kHigh, Level::kTiny}) {
      const std::vector<uint16_t> out = RoundTrip(s, in, level);
      if (level == Level::kLossless) {
        EXPECT_EQ(out, in) << s.layers << "x" << s.tokens;
      } else if (s.tokens > 1) {
        // A single token makes every per-channel range empty: exact, but
        // not worth a ratio bound.
        ExpectWithinBound(s, in, out, Level::kTiny);
      }
    }
  }
}

TEST(CodecTest, ConstantAndEmptyRangeChannelsAreExact) {
  const ChunkShape s{1, 40, 1, 64, DType::kFloat16};
  std::vector<uint16_t> in(s.NumValues(), FloatToHalf(1.5f));
  EXPECT_EQ(RoundTrip(s, in, Level::kTiny), in);
}

TEST(CodecTest, RejectsBadArguments) {
  const ChunkShape s{1, 4, 1, 8, DType::kFloat16};
  std::vector<uint16_t> in(s.NumValues());
  EXPECT_FALSE(
      EncodeChunk(s, absl::MakeSpan(in).subspan(1), kDefaultLevel).ok());
  EXPECT_FALSE(
      EncodeChunk({0, 4, 1, 8, DType::kFloat16}, {}, kDefaultLevel).ok());
  EXPECT_FALSE(EncodeChunk(s, in, static_cast<Level>(99)).ok());
  EXPECT_FALSE(
      EncodeChunk({kMaxLayers + 1, 1, 1, 1, DType::kFloat16}, {}, kDefaultLevel)
          .ok());
  absl::StatusOr<std::string> enc = EncodeChunk(s, in, kDefaultLevel);
  ASSERT_TRUE(enc.ok());
  std::vector<uint16_t> small(s.NumValues() - 1);
  EXPECT_TRUE(
      absl::IsInvalidArgument(DecodeChunk(*enc, absl::MakeSpan(small))));
}

// The real dumps, cut into 256-token chunks as the store does.
TEST(CodecTest, RealDumpsRoundTripWithinBounds) {
  absl::StatusOr<std::string> dir = FindKvDataDir();
  ASSERT_TRUE(dir.ok()) << dir.status();
  absl::StatusOr<std::vector<std::string>> manifests = ListManifests(*dir);
  ASSERT_TRUE(manifests.ok() && !manifests->empty()) << *dir;
  for (const std::string& path : *manifests) {
    absl::StatusOr<KvDump> dump = LoadKvDump(path);
    ASSERT_TRUE(dump.ok()) << dump.status();
    for (uint32_t t0 = 0; t0 < dump->shape.tokens; t0 += 256) {
      ChunkShape s = dump->shape;
      s.tokens = std::min<uint32_t>(256, s.tokens - t0);
      const std::vector<uint16_t> in = SliceTokens(*dump, t0, t0 + s.tokens);
      for (Level level : kAllLevels) {
        size_t bytes = 0;
        ExpectWithinBound(s, in, RoundTrip(s, in, level, &bytes), level);
        if (level == Level::kDefault) {
          EXPECT_GE(static_cast<double>(s.RawBytes()) / bytes, 6.0) << path;
        }
      }
    }
  }
}

}  // namespace
}  // namespace kvcache::codec
