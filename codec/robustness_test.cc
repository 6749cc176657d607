// Hostile and damaged streams must fail with a status, never crash, hang or
// touch memory outside the buffers (run under ASan by the fuzz script).
#include <cstring>
#include <string>
#include <vector>

#include "codec/byte_io.h"
#include "codec/codec.h"
#include "codec/crc32c.h"
#include "codec/format.h"
#include "codec/test_data.h"
#include "gtest/gtest.h"

namespace kvcache::codec {
namespace {

constexpr ChunkShape kShape{2, 40, 2, 8, DType::kFloat16};

std::string Encode(Level level, ChunkShape shape = kShape) {
  absl::StatusOr<std::string> s =
      EncodeChunk(shape, SyntheticChunk(shape, 11), level);
  EXPECT_TRUE(s.ok()) << s.status();
  return s.ok() ? *s : std::string();
}

absl::Status Decode(absl::string_view stream,
                    size_t values = kShape.NumValues()) {
  std::vector<uint16_t> out(values);
  return DecodeChunk(stream, absl::MakeSpan(out));
}

// Rewrites the trailing CRC so a test reaches the checks behind it.
void FixCrc(std::string* s) {
  const uint32_t crc = Crc32c(absl::string_view(*s).substr(0, s->size() - 4));
  for (int i = 0; i < 4; ++i)
    (*s)[s->size() - 4 + i] = static_cast<char>(crc >> 8 * i);
}

void PutU32(std::string* s, size_t at, uint32_t v) {
  for (int i = 0; i < 4; ++i) (*s)[at + i] = static_cast<char>(v >> 8 * i);
}

size_t OffsetOf(const std::string& s, absl::string_view section) {
  return section.data() - s.data();
}

TEST(RobustnessTest, ValidStreamsDecode) {
  for (Level level : {Level::kLossless, Level::kNearLossless, Level::kTiny}) {
    EXPECT_TRUE(Decode(Encode(level)).ok()) << LevelName(level);
  }
}

TEST(RobustnessTest, EveryTruncationFails) {
  for (Level level : {Level::kLossless, Level::kDefault}) {
    const std::string s = Encode(level);
    for (size_t len = 0; len < s.size(); ++len) {
      EXPECT_FALSE(Decode(s.substr(0, len)).ok()) << len;
      EXPECT_FALSE(PeekShape(s.substr(0, len)).ok()) << len;
    }
    EXPECT_FALSE(Decode(s + "x").ok());
  }
}

TEST(RobustnessTest, EveryBitFlipFails) {
  const std::string s = Encode(Level::kTiny);
  for (size_t bit = 0; bit < 8 * s.size(); ++bit) {
    std::string bad = s;
    bad[bit / 8] ^= static_cast<char>(1 << (bit % 8));
    EXPECT_FALSE(Decode(bad).ok()) << bit;
  }
}

TEST(RobustnessTest, WrongMagicAndVersion) {
  std::string s = Encode(Level::kDefault);
  std::string bad = s;
  bad[0] = 'X';
  EXPECT_TRUE(absl::IsDataLoss(PeekShape(bad).status()));
  bad = s;
  bad[4] = internal::kNewestVersion + 1;  // A version from the future.
  FixCrc(&bad);
  EXPECT_TRUE(absl::IsUnimplemented(PeekShape(bad).status()));
  bad[4] = 0;
  FixCrc(&bad);
  EXPECT_TRUE(absl::IsUnimplemented(PeekShape(bad).status()));
  bad = s;
  bad[7] = 2;  // A transform this decoder does not know.
  FixCrc(&bad);
  EXPECT_TRUE(absl::IsUnimplemented(Decode(bad)));
  bad[7] = internal::kProfileTransform;  // Known, but not in version 2.
  FixCrc(&bad);
  EXPECT_TRUE(absl::IsDataLoss(Decode(bad)));
}

TEST(RobustnessTest, VersionOneStreamsStillDecode) {
  // Version 2 only added a table kind, so a stream that says version 1 is
  // read the same way.
  for (Level level : {Level::kLossless, Level::kDefault}) {
    std::string s = Encode(level);
    std::vector<uint16_t> want(kShape.NumValues()), got(kShape.NumValues());
    ASSERT_TRUE(DecodeChunk(s, absl::MakeSpan(want)).ok());
    s[4] = 1;
    FixCrc(&s);
    ASSERT_TRUE(DecodeChunk(s, absl::MakeSpan(got)).ok());
    EXPECT_EQ(got, want);
  }
}

TEST(RobustnessTest, LyingHeaderFieldsFailEvenWithValidCrc) {
  const std::string s = Encode(Level::kDefault);
  // tables_bytes, num_blocks, payload_bytes, layers, tokens, kv_heads,
  // head_dim, group sizes, block size: shrink, grow, and extreme values.
  for (size_t at : {40, 44, 48, 12, 16, 20, 24, 32}) {
    for (uint32_t v : {0u, 1u, 7u, 0xFFFFu, 0x7FFFFFFFu, 0xFFFFFFFFu}) {
      std::string bad = s;
      uint32_t old;
      std::memcpy(&old, &bad[at], 4);
      if (old == v) continue;
      PutU32(&bad, at, v);
      FixCrc(&bad);
      EXPECT_FALSE(Decode(bad).ok()) << at << "=" << v;
    }
  }
  for (size_t at : {28, 30, 36, 37, 38, 5}) {
    std::string bad = s;
    bad[at] = static_cast<char>(bad[at] + 3);
    FixCrc(&bad);
    EXPECT_FALSE(Decode(bad).ok()) << at;
  }
}

TEST(RobustnessTest, HugeClaimedShapeIsRejectedBeforeAllocating) {
  std::string s = Encode(Level::kLossless);
  PutU32(&s, 12, kMaxLayers);
  PutU32(&s, 16, kMaxTokens);
  FixCrc(&s);
  EXPECT_FALSE(PeekShape(s).ok());
  EXPECT_FALSE(Decode(s).ok());
}

TEST(RobustnessTest, LyingBlockOffsetsFail) {
  const std::string s = Encode(Level::kLossless);
  absl::StatusOr<internal::Sections> sec = internal::ParseSections(s);
  ASSERT_TRUE(sec.ok());
  const size_t dir = OffsetOf(s, sec->directory);
  const uint32_t blocks = sec->header.num_blocks;
  ASSERT_GE(blocks, 2u);
  for (uint32_t b = 0; b < blocks; ++b) {
    for (uint32_t v :
         {0u, 1u, 2u, sec->header.payload_bytes + 2, 0xFFFFFFFEu}) {
      std::string bad = s;
      PutU32(&bad, dir + 4 * b, v);
      FixCrc(&bad);
      EXPECT_FALSE(Decode(bad).ok()) << b << "=" << v;
    }
  }
}

TEST(RobustnessTest, BadTablesFail) {
  const std::string s = Encode(Level::kHigh);
  absl::StatusOr<internal::Sections> sec = internal::ParseSections(s);
  ASSERT_TRUE(sec.ok());
  const size_t tables = OffsetOf(s, sec->tables);
  // Any change to a table byte changes a kind, range or frequency: the sum
  // no longer matches, the stream size no longer matches, or rANS final
  // states disagree. None may decode.
  for (size_t i = 0; i < sec->tables.size(); ++i) {
    for (int delta : {1, -1, 0x40}) {
      std::string bad = s;
      bad[tables + i] = static_cast<char>(bad[tables + i] + delta);
      FixCrc(&bad);
      EXPECT_FALSE(Decode(bad).ok()) << i << " " << delta;
    }
  }
  // Choice bits decide how many symbols each stream has.
  const size_t choices = OffsetOf(s, sec->choices);
  for (size_t i = 0; i < sec->choices.size(); ++i) {
    std::string bad = s;
    bad[choices + i] ^= 0x01;
    FixCrc(&bad);
    EXPECT_FALSE(Decode(bad).ok()) << i;
  }
}

TEST(RobustnessTest, PlaneDescriptorsAreChecked) {
  const std::string s = Encode(Level::kDefault);
  const size_t first = internal::kFixedHeaderBytes;
  for (uint8_t bits : {0, 17, 255}) {
    std::string bad = s;
    bad[first] = static_cast<char>(bits);
    FixCrc(&bad);
    EXPECT_FALSE(Decode(bad).ok()) << int{bits};
  }
  std::string bad = s;
  bad[first + 1] = 7;  // Unknown scale mode.
  FixCrc(&bad);
  EXPECT_FALSE(Decode(bad).ok());
}

TEST(RobustnessTest, OutputSizeMustMatch) {
  const std::string s = Encode(Level::kDefault);
  EXPECT_TRUE(absl::IsInvalidArgument(Decode(s, kShape.NumValues() - 1)));
  EXPECT_TRUE(absl::IsInvalidArgument(Decode(s, kShape.NumValues() + 1)));
  EXPECT_TRUE(absl::IsInvalidArgument(Decode(s, 0)));
}

TEST(RobustnessTest, GarbageWithValidCrcNeverCrashes) {
  const std::string s = Encode(Level::kDefault);
  uint32_t seed = 1;
  for (int trial = 0; trial < 2000; ++trial) {
    std::string bad = s;
    // Keep the header so the garbage reaches the tables and blocks.
    for (int k = 0; k < 4; ++k) {
      seed = seed * 1103515245u + 12345u;
      const size_t at =
          internal::kFixedHeaderBytes +
          (seed >> 8) % (bad.size() - internal::kFixedHeaderBytes - 4);
      bad[at] = static_cast<char>(seed >> 24);
    }
    FixCrc(&bad);
    (void)Decode(bad);  // Any status is fine; ASan checks memory.
  }
}

}  // namespace
}  // namespace kvcache::codec
