#include "kvstore/memory_tier.h"

#include <gtest/gtest.h>

#include <string>
#include <vector>

namespace kvcache::kvstore {
namespace {

class FakeClock {
 public:
  absl::Time Now() const { return now_; }
  void Advance(absl::Duration d) { now_ += d; }
  MemoryTier::Clock AsClock() {
    return [this] { return Now(); };
  }

 private:
  absl::Time now_ = absl::FromUnixSeconds(1'700'000'000);
};

std::string Bytes(size_t n, char fill = 'x') { return std::string(n, fill); }

TEST(MemoryTierTest, StoresAndReturnsBytes) {
  MemoryTier tier(1000);
  ASSERT_TRUE(tier.Put("a", "hello", 42).ok());
  auto chunk = tier.Get("a");
  ASSERT_TRUE(chunk.ok()) << chunk.status();
  EXPECT_EQ(*chunk->bytes, "hello");
  EXPECT_EQ(chunk->crc32c, 42u);
  EXPECT_EQ(tier.Get("missing").status().code(), absl::StatusCode::kNotFound);
}

TEST(MemoryTierTest, NeverExceedsCapacity) {
  MemoryTier tier(1000);
  for (int i = 0; i < 50; ++i) {
    ASSERT_TRUE(tier.Put(std::to_string(i), Bytes(97 + i % 7), 0).ok());
    EXPECT_LE(tier.Usage().used_bytes, 1000u);
  }
  EXPECT_GT(tier.Usage().evictions, 0u);
}

TEST(MemoryTierTest, EvictsLeastRecentlyUsedFirst) {
  MemoryTier tier(300);
  ASSERT_TRUE(tier.Put("a", Bytes(100), 0).ok());
  ASSERT_TRUE(tier.Put("b", Bytes(100), 0).ok());
  ASSERT_TRUE(tier.Put("c", Bytes(100), 0).ok());
  ASSERT_TRUE(tier.Get("a").ok());  // a is now the most recent
  ASSERT_TRUE(tier.Put("d", Bytes(100), 0).ok());
  EXPECT_TRUE(tier.Peek("a").ok());
  EXPECT_FALSE(tier.Peek("b").ok());  // the least recently used went
  EXPECT_TRUE(tier.Peek("c").ok());
  EXPECT_TRUE(tier.Peek("d").ok());
  EXPECT_EQ(tier.Usage().evictions, 1u);
}

TEST(MemoryTierTest, PeekDoesNotChangeRecency) {
  MemoryTier tier(200);
  ASSERT_TRUE(tier.Put("a", Bytes(100), 0).ok());
  ASSERT_TRUE(tier.Put("b", Bytes(100), 0).ok());
  ASSERT_TRUE(tier.Peek("a").ok());
  EXPECT_EQ(tier.LongestPrefix({"a", "b"}), 2u);
  ASSERT_TRUE(tier.Put("c", Bytes(100), 0).ok());
  EXPECT_FALSE(tier.Peek("a").ok());
}

TEST(MemoryTierTest, EvictsSeveralToFitALargeChunk) {
  MemoryTier tier(300);
  for (const char* key : {"a", "b", "c"}) {
    ASSERT_TRUE(tier.Put(key, Bytes(100), 0).ok());
  }
  ASSERT_TRUE(tier.Put("big", Bytes(250), 0).ok());
  EXPECT_EQ(tier.Usage().chunks, 1u);
  EXPECT_EQ(tier.Usage().used_bytes, 250u);
}

TEST(MemoryTierTest, ReplacingAKeyAccountsOnce) {
  MemoryTier tier(300);
  ASSERT_TRUE(tier.Put("a", Bytes(200), 0).ok());
  ASSERT_TRUE(tier.Put("a", Bytes(250, 'y'), 0).ok());
  EXPECT_EQ(tier.Usage().used_bytes, 250u);
  EXPECT_EQ(*tier.Get("a")->bytes, Bytes(250, 'y'));
}

TEST(MemoryTierTest, PinnedChunkSurvivesEviction) {
  FakeClock clock;
  MemoryTier tier(300, clock.AsClock());
  ASSERT_TRUE(tier.Put("session", Bytes(100), 0).ok());
  ASSERT_TRUE(tier.Pin("session", absl::Minutes(10)).ok());
  for (int i = 0; i < 10; ++i) {
    ASSERT_TRUE(tier.Put(std::to_string(i), Bytes(100), 0).ok());
  }
  EXPECT_TRUE(tier.Peek("session").ok());
  EXPECT_TRUE(tier.Peek("session")->pinned);
  EXPECT_EQ(tier.Usage().pinned_chunks, 1u);
}

TEST(MemoryTierTest, ExpiredPinNoLongerProtects) {
  FakeClock clock;
  MemoryTier tier(200, clock.AsClock());
  ASSERT_TRUE(tier.Put("session", Bytes(100), 0, absl::Seconds(30)).ok());
  ASSERT_TRUE(tier.Put("x", Bytes(100), 0).ok());
  clock.Advance(absl::Seconds(31));
  EXPECT_FALSE(tier.Peek("session")->pinned);
  ASSERT_TRUE(tier.Put("y", Bytes(100), 0).ok());
  EXPECT_FALSE(tier.Peek("session").ok());
}

TEST(MemoryTierTest, PinExtendsButNeverShortens) {
  FakeClock clock;
  MemoryTier tier(200, clock.AsClock());
  ASSERT_TRUE(tier.Put("a", Bytes(10), 0).ok());
  auto long_pin = tier.Pin("a", absl::Hours(1));
  auto short_pin = tier.Pin("a", absl::Minutes(1));
  ASSERT_TRUE(long_pin.ok() && short_pin.ok());
  EXPECT_EQ(*short_pin, *long_pin);
  EXPECT_EQ(tier.Pin("missing", absl::Minutes(1)).status().code(),
            absl::StatusCode::kNotFound);
}

TEST(MemoryTierTest, UnpinMakesChunkEvictable) {
  MemoryTier tier(200);
  ASSERT_TRUE(tier.Put("a", Bytes(100), 0, absl::Hours(1)).ok());
  ASSERT_TRUE(tier.Unpin("a").ok());
  ASSERT_TRUE(tier.Put("b", Bytes(100), 0).ok());
  ASSERT_TRUE(tier.Put("c", Bytes(100), 0).ok());
  EXPECT_FALSE(tier.Peek("a").ok());
}

TEST(MemoryTierTest, FullOfPinsRefusesAndChangesNothing) {
  MemoryTier tier(200);
  ASSERT_TRUE(tier.Put("a", Bytes(100), 0, absl::Hours(1)).ok());
  ASSERT_TRUE(tier.Put("b", Bytes(60), 0).ok());
  const absl::Status status = tier.Put("c", Bytes(150), 0);
  EXPECT_EQ(status.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_TRUE(tier.Peek("b").ok());  // nothing was evicted for a failed put
  EXPECT_EQ(tier.Usage().used_bytes, 160u);
}

TEST(MemoryTierTest, ChunkLargerThanTierIsRefused) {
  MemoryTier tier(100);
  EXPECT_EQ(tier.Put("a", Bytes(101), 0).code(),
            absl::StatusCode::kResourceExhausted);
}

TEST(MemoryTierTest, ReaderKeepsBytesAfterEviction) {
  MemoryTier tier(100);
  ASSERT_TRUE(tier.Put("a", Bytes(100, 'a'), 0).ok());
  auto held = tier.Get("a");
  ASSERT_TRUE(held.ok());
  ASSERT_TRUE(tier.Put("b", Bytes(100, 'b'), 0).ok());
  EXPECT_FALSE(tier.Peek("a").ok());
  EXPECT_EQ(*held->bytes, Bytes(100, 'a'));
}

TEST(MemoryTierTest, LongestPrefixStopsAtFirstGap) {
  MemoryTier tier(1000);
  for (const char* key : {"k0", "k1", "k3"}) {
    ASSERT_TRUE(tier.Put(key, Bytes(10), 0).ok());
  }
  EXPECT_EQ(tier.LongestPrefix({"k0", "k1", "k2", "k3"}), 2u);
  EXPECT_EQ(tier.LongestPrefix({"k2", "k0"}), 0u);
  EXPECT_EQ(tier.LongestPrefix({}), 0u);
}

TEST(MemoryTierTest, DeleteFreesSpace) {
  MemoryTier tier(100);
  ASSERT_TRUE(tier.Put("a", Bytes(100), 0).ok());
  EXPECT_TRUE(tier.Delete("a"));
  EXPECT_FALSE(tier.Delete("a"));
  EXPECT_EQ(tier.Usage().used_bytes, 0u);
}

}  // namespace
}  // namespace kvcache::kvstore
