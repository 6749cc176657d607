#include "kvstore/memory_tier.h"

#include <gtest/gtest.h>

#include <string>
#include <utility>
#include <vector>

#include "kvstore/host_arena.h"

namespace kvcache::kvstore {
namespace {

// The arena hands out whole blocks, so sizes here are in blocks.
constexpr size_t kB = kBlockBytes;

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

std::shared_ptr<HostArena> Arena(uint64_t bytes) {
  auto arena = HostArena::Create(bytes, /*pin_for_gpu=*/false);
  EXPECT_TRUE(arena.ok()) << arena.status();
  return *arena;
}

std::string Bytes(size_t n, char fill = 'x') { return std::string(n, fill); }

TEST(MemoryTierTest, StoresAndReturnsBytes) {
  MemoryTier tier(Arena(10 * kB));
  ASSERT_TRUE(tier.Put("a", "hello", 42).ok());
  auto chunk = tier.Get("a");
  ASSERT_TRUE(chunk.ok()) << chunk.status();
  EXPECT_EQ(chunk->bytes(), "hello");
  EXPECT_EQ(chunk->crc32c, 42u);
  EXPECT_EQ(tier.Get("missing").status().code(), absl::StatusCode::kNotFound);
}

TEST(MemoryTierTest, NeverExceedsCapacity) {
  MemoryTier tier(Arena(10 * kB));
  for (int i = 0; i < 50; ++i) {
    ASSERT_TRUE(tier.Put(std::to_string(i), Bytes(kB - i % 7), 0).ok());
    EXPECT_LE(tier.Usage().used_bytes, 10 * kB);
  }
  EXPECT_GT(tier.Usage().evictions, 0u);
}

TEST(MemoryTierTest, EvictsLeastRecentlyUsedFirst) {
  MemoryTier tier(Arena(3 * kB));
  ASSERT_TRUE(tier.Put("a", Bytes(kB), 0).ok());
  ASSERT_TRUE(tier.Put("b", Bytes(kB), 0).ok());
  ASSERT_TRUE(tier.Put("c", Bytes(kB), 0).ok());
  ASSERT_TRUE(tier.Get("a").ok());  // a is now the most recent
  ASSERT_TRUE(tier.Put("d", Bytes(kB), 0).ok());
  EXPECT_TRUE(tier.Peek("a").ok());
  EXPECT_FALSE(tier.Peek("b").ok());  // the least recently used went
  EXPECT_TRUE(tier.Peek("c").ok());
  EXPECT_TRUE(tier.Peek("d").ok());
  EXPECT_EQ(tier.Usage().evictions, 1u);
}

TEST(MemoryTierTest, EvictsAPrefixFromItsEnd) {
  MemoryTier tier(Arena(4 * kB));
  // A prompt's chunks p0 <- p1 <- p2, stored in order: p0 is the least
  // recently used, yet the last to go.
  ASSERT_TRUE(tier.Put("p0", Bytes(kB), 0).ok());
  ASSERT_TRUE(tier.Put("p1", Bytes(kB), 0, {}, nullptr, "p0").ok());
  ASSERT_TRUE(tier.Put("p2", Bytes(kB), 0, {}, nullptr, "p1").ok());
  ASSERT_TRUE(tier.Put("other", Bytes(kB), 0).ok());
  ASSERT_TRUE(tier.Put("x", Bytes(kB), 0).ok());
  EXPECT_FALSE(tier.Peek("p2").ok());
  EXPECT_EQ(tier.LongestPrefix({"p0", "p1", "p2"}), 2u);
  ASSERT_TRUE(tier.Put("y", Bytes(kB), 0).ok());
  EXPECT_FALSE(tier.Peek("p1").ok());
  EXPECT_TRUE(tier.Peek("p0").ok());
  // Nothing extends p0 any more: it is now simply the oldest chunk.
  ASSERT_TRUE(tier.Put("z", Bytes(kB), 0).ok());
  EXPECT_FALSE(tier.Peek("p0").ok());
  EXPECT_TRUE(tier.Peek("other").ok());
}

TEST(MemoryTierTest, AncestorsGoWhenNothingElseCan) {
  MemoryTier tier(Arena(2 * kB));
  ASSERT_TRUE(tier.Put("p0", Bytes(kB), 0).ok());
  ASSERT_TRUE(tier.Put("p1", Bytes(kB), 0, absl::Hours(1), nullptr, "p0").ok());
  ASSERT_TRUE(tier.Put("x", Bytes(kB), 0).ok());
  EXPECT_FALSE(tier.Peek("p0").ok());
  EXPECT_TRUE(tier.Peek("p1").ok());  // pinned
}

TEST(MemoryTierTest, PeekDoesNotChangeRecency) {
  MemoryTier tier(Arena(2 * kB));
  ASSERT_TRUE(tier.Put("a", Bytes(kB), 0).ok());
  ASSERT_TRUE(tier.Put("b", Bytes(kB), 0).ok());
  ASSERT_TRUE(tier.Peek("a").ok());
  EXPECT_EQ(tier.LongestPrefix({"a", "b"}), 2u);
  ASSERT_TRUE(tier.Put("c", Bytes(kB), 0).ok());
  EXPECT_FALSE(tier.Peek("a").ok());
}

TEST(MemoryTierTest, EvictsSeveralToFitALargeChunk) {
  MemoryTier tier(Arena(3 * kB));
  for (const char* key : {"a", "b", "c"}) {
    ASSERT_TRUE(tier.Put(key, Bytes(kB), 0).ok());
  }
  ASSERT_TRUE(tier.Put("big", Bytes(5 * kB / 2), 0).ok());
  EXPECT_EQ(tier.Usage().chunks, 1u);
  EXPECT_EQ(tier.Usage().used_bytes, 5 * kB / 2);
}

TEST(MemoryTierTest, ReplacingAKeyAccountsOnce) {
  MemoryTier tier(Arena(3 * kB));
  ASSERT_TRUE(tier.Put("a", Bytes(2 * kB), 0).ok());
  ASSERT_TRUE(tier.Put("a", Bytes(5 * kB / 2, 'y'), 0).ok());
  EXPECT_EQ(tier.Usage().used_bytes, 5 * kB / 2);
  EXPECT_EQ(tier.Get("a")->bytes(), Bytes(5 * kB / 2, 'y'));
}

TEST(MemoryTierTest, PinnedChunkSurvivesEviction) {
  FakeClock clock;
  MemoryTier tier(Arena(3 * kB), clock.AsClock());
  ASSERT_TRUE(tier.Put("session", Bytes(kB), 0).ok());
  ASSERT_TRUE(tier.Pin("session", absl::Minutes(10)).ok());
  for (int i = 0; i < 10; ++i) {
    ASSERT_TRUE(tier.Put(std::to_string(i), Bytes(kB), 0).ok());
  }
  EXPECT_TRUE(tier.Peek("session").ok());
  EXPECT_TRUE(tier.Peek("session")->pinned);
  EXPECT_EQ(tier.Usage().pinned_chunks, 1u);
}

TEST(MemoryTierTest, ExpiredPinNoLongerProtects) {
  FakeClock clock;
  MemoryTier tier(Arena(2 * kB), clock.AsClock());
  ASSERT_TRUE(tier.Put("session", Bytes(kB), 0, absl::Seconds(30)).ok());
  ASSERT_TRUE(tier.Put("x", Bytes(kB), 0).ok());
  clock.Advance(absl::Seconds(31));
  EXPECT_FALSE(tier.Peek("session")->pinned);
  ASSERT_TRUE(tier.Put("y", Bytes(kB), 0).ok());
  EXPECT_FALSE(tier.Peek("session").ok());
}

TEST(MemoryTierTest, PinExtendsButNeverShortens) {
  FakeClock clock;
  MemoryTier tier(Arena(2 * kB), clock.AsClock());
  ASSERT_TRUE(tier.Put("a", Bytes(10), 0).ok());
  auto long_pin = tier.Pin("a", absl::Hours(1));
  auto short_pin = tier.Pin("a", absl::Minutes(1));
  ASSERT_TRUE(long_pin.ok() && short_pin.ok());
  EXPECT_EQ(*short_pin, *long_pin);
  EXPECT_EQ(tier.Pin("missing", absl::Minutes(1)).status().code(),
            absl::StatusCode::kNotFound);
}

TEST(MemoryTierTest, UnpinMakesChunkEvictable) {
  MemoryTier tier(Arena(2 * kB));
  ASSERT_TRUE(tier.Put("a", Bytes(kB), 0, absl::Hours(1)).ok());
  ASSERT_TRUE(tier.Unpin("a").ok());
  ASSERT_TRUE(tier.Put("b", Bytes(kB), 0).ok());
  ASSERT_TRUE(tier.Put("c", Bytes(kB), 0).ok());
  EXPECT_FALSE(tier.Peek("a").ok());
}

TEST(MemoryTierTest, FullOfPinsRefusesAndChangesNothing) {
  MemoryTier tier(Arena(2 * kB));
  ASSERT_TRUE(tier.Put("a", Bytes(kB), 0, absl::Hours(1)).ok());
  ASSERT_TRUE(tier.Put("b", Bytes(kB / 2), 0).ok());
  const absl::Status status = tier.Put("c", Bytes(3 * kB / 2), 0);
  EXPECT_EQ(status.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_TRUE(tier.Peek("b").ok());  // nothing was evicted for a failed put
  EXPECT_EQ(tier.Usage().used_bytes, kB + kB / 2);
}

TEST(MemoryTierTest, ChunkLargerThanTierIsRefused) {
  MemoryTier tier(Arena(kB));
  EXPECT_EQ(tier.Put("a", Bytes(kB + 1), 0).code(),
            absl::StatusCode::kResourceExhausted);
}

TEST(MemoryTierTest, ReaderKeepsBytesAfterEviction) {
  MemoryTier tier(Arena(2 * kB));
  ASSERT_TRUE(tier.Put("a", Bytes(kB, 'a'), 0).ok());
  auto held = tier.Get("a");
  ASSERT_TRUE(held.ok());
  ASSERT_TRUE(tier.Put("b", Bytes(kB, 'b'), 0).ok());
  // a is evicted, but its block is still being read: b goes too, and c
  // takes b's block.
  ASSERT_TRUE(tier.Put("c", Bytes(kB, 'c'), 0).ok());
  EXPECT_FALSE(tier.Peek("a").ok());
  EXPECT_FALSE(tier.Peek("b").ok());
  EXPECT_EQ(held->bytes(), Bytes(kB, 'a'));
  EXPECT_EQ(tier.Get("c")->bytes(), Bytes(kB, 'c'));
}

TEST(MemoryTierTest, SpaceHeldByAReaderIsReusedOnceReleased) {
  MemoryTier tier(Arena(kB));
  ASSERT_TRUE(tier.Put("a", Bytes(kB, 'a'), 0).ok());
  auto held = tier.Get("a");
  ASSERT_TRUE(held.ok());
  EXPECT_EQ(tier.Put("b", Bytes(kB, 'b'), 0).code(),
            absl::StatusCode::kResourceExhausted);
  held = absl::NotFoundError("released");
  ASSERT_TRUE(tier.Put("b", Bytes(kB, 'b'), 0).ok());
  EXPECT_EQ(tier.Get("b")->bytes(), Bytes(kB, 'b'));
}

TEST(MemoryTierTest, EvictedChunksReachTheSinkWithTheirBytes) {
  FakeClock clock;
  MemoryTier tier(Arena(2 * kB), clock.AsClock());
  ASSERT_TRUE(tier.Put("a", Bytes(kB, 'a'), 7, absl::Seconds(5)).ok());
  ASSERT_TRUE(tier.Put("b", Bytes(kB, 'b'), 8).ok());
  clock.Advance(absl::Seconds(10));  // a's pin lapsed
  // Copies: a sink that kept the chunks would keep their space too.
  struct Seen {
    std::string key, bytes;
    uint32_t crc32c;
  };
  std::vector<Seen> seen;
  ASSERT_TRUE(tier.Put("c", Bytes(2 * kB, 'c'), 9, absl::ZeroDuration(),
                       [&](std::vector<EvictedChunk> evicted) {
                         for (const EvictedChunk& e : evicted) {
                           seen.push_back({e.key, std::string(e.chunk.bytes()),
                                           e.chunk.crc32c});
                         }
                       })
                  .ok());
  ASSERT_EQ(seen.size(), 2u);
  EXPECT_EQ(seen[0].key, "a");
  EXPECT_EQ(seen[0].bytes, Bytes(kB, 'a'));
  EXPECT_EQ(seen[0].crc32c, 7u);
  EXPECT_EQ(seen[1].key, "b");
  EXPECT_EQ(tier.Usage().evictions, 2u);
}

TEST(MemoryTierTest, LongestPrefixStopsAtFirstGap) {
  MemoryTier tier(Arena(10 * kB));
  for (const char* key : {"k0", "k1", "k3"}) {
    ASSERT_TRUE(tier.Put(key, Bytes(10), 0).ok());
  }
  EXPECT_EQ(tier.LongestPrefix({"k0", "k1", "k2", "k3"}), 2u);
  EXPECT_EQ(tier.LongestPrefix({"k2", "k0"}), 0u);
  EXPECT_EQ(tier.LongestPrefix({}), 0u);
}

TEST(MemoryTierTest, DeleteFreesSpace) {
  MemoryTier tier(Arena(kB));
  ASSERT_TRUE(tier.Put("a", Bytes(kB), 0).ok());
  EXPECT_TRUE(tier.Delete("a"));
  EXPECT_FALSE(tier.Delete("a"));
  EXPECT_EQ(tier.Usage().used_bytes, 0u);
}

// A tier of 16 blocks where tenants "a" and "b" may hold 4 each.
class QuotaTest : public ::testing::Test {
 protected:
  QuotaTest()
      : tier_(Arena(16 * kB), clock_.AsClock(),
              {{"a", 4 * kB}, {"b", 4 * kB}}) {}

  absl::Status Put(const std::string& key, const std::string& owner,
                   absl::Duration pin = absl::ZeroDuration(),
                   absl::string_view parent = {}) {
    return tier_.Put(key, Bytes(kB), 0, pin, sink_, parent, owner);
  }
  uint64_t Used(absl::string_view owner) {
    for (const OwnerUsage& usage : tier_.Usage().owners) {
      if (usage.owner == owner) return usage.used_bytes;
    }
    return 0;
  }

  FakeClock clock_;
  MemoryTier tier_;
  // Evicted chunks' keys and owners; their bytes go back to the arena.
  std::vector<std::pair<std::string, std::string>> evicted_;
  MemoryTier::EvictionSink sink_ = [this](std::vector<EvictedChunk> chunks) {
    for (EvictedChunk& chunk : chunks) {
      evicted_.emplace_back(chunk.key, chunk.chunk.owner);
    }
  };
};

TEST_F(QuotaTest, TenantWritingWithoutStoppingEvictsOnlyItsOwnChunks) {
  for (int i = 0; i < 4; ++i) {
    ASSERT_TRUE(Put("b" + std::to_string(i), "b").ok());
  }
  for (int i = 0; i < 200; ++i) {
    const absl::Status s = Put("a" + std::to_string(i), "a");
    ASSERT_TRUE(s.ok()) << i << ": " << s;
    ASSERT_LE(Used("a"), 4 * kB) << i;
  }
  for (int i = 0; i < 4; ++i) {
    EXPECT_TRUE(tier_.Peek("b" + std::to_string(i)).ok()) << i;
  }
  // Its four most recent chunks stay; the rest went, and nothing else.
  for (int i = 196; i < 200; ++i) {
    EXPECT_TRUE(tier_.Peek("a" + std::to_string(i)).ok()) << i;
  }
  ASSERT_EQ(evicted_.size(), 196u);
  for (const auto& [key, owner] : evicted_) EXPECT_EQ(owner, "a") << key;
  EXPECT_EQ(tier_.Peek("a199")->owner, "a");
}

TEST_F(QuotaTest, TenantsWithinTheirQuotasKeepThemWhenTheTierFills) {
  for (int i = 0; i < 4; ++i) {
    ASSERT_TRUE(Put("a" + std::to_string(i), "a").ok());
    ASSERT_TRUE(Put("b" + std::to_string(i), "b").ok());
  }
  // "c" has no quota: it gets what the quotas leave, and loses its own
  // chunks (and unowned ones) when the tier is full, never a's or b's.
  ASSERT_TRUE(Put("unowned", "").ok());
  for (int i = 0; i < 100; ++i) {
    ASSERT_TRUE(Put("c" + std::to_string(i), "c").ok());
  }
  for (int i = 0; i < 4; ++i) {
    EXPECT_TRUE(tier_.Peek("a" + std::to_string(i)).ok()) << i;
    EXPECT_TRUE(tier_.Peek("b" + std::to_string(i)).ok()) << i;
  }
  EXPECT_FALSE(tier_.Peek("unowned").ok());
  EXPECT_EQ(Used("c"), 8 * kB);
}

TEST_F(QuotaTest, PinnedChunksFillingAQuotaRefuseTheNextAndEvictNothing) {
  for (int i = 0; i < 4; ++i) {
    ASSERT_TRUE(Put("a" + std::to_string(i), "a", absl::Minutes(5)).ok());
  }
  const absl::Status refused = Put("a4", "a");
  EXPECT_EQ(refused.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_NE(refused.message().find("cpu_quota_bytes"), std::string::npos)
      << refused;
  EXPECT_TRUE(evicted_.empty());
  EXPECT_EQ(Used("a"), 4 * kB);
  // Other tenants are not held back by a's pins.
  EXPECT_TRUE(Put("b0", "b").ok());
  // Replacing one of its own pinned chunks needs no more room.
  EXPECT_TRUE(Put("a0", "a").ok());
  // Once the pins lapse, a's oldest chunk makes room.
  clock_.Advance(absl::Minutes(6));
  EXPECT_TRUE(Put("a4", "a").ok());
  EXPECT_FALSE(tier_.Peek("a1").ok());
  // A chunk larger than the quota never fits.
  EXPECT_EQ(tier_.Put("big", Bytes(5 * kB), 0, {}, sink_, {}, "a").code(),
            absl::StatusCode::kResourceExhausted);
}

TEST_F(QuotaTest, TenantsPromptShrinksFromItsEndWithinItsQuota) {
  ASSERT_TRUE(Put("p0", "a").ok());
  ASSERT_TRUE(Put("p1", "a", absl::ZeroDuration(), "p0").ok());
  ASSERT_TRUE(Put("p2", "a", absl::ZeroDuration(), "p1").ok());
  ASSERT_TRUE(Put("x", "a").ok());
  ASSERT_TRUE(Put("y", "a").ok());
  EXPECT_EQ(tier_.LongestPrefix({"p0", "p1", "p2"}), 2u);
  EXPECT_TRUE(tier_.Peek("x").ok());
}

}  // namespace
}  // namespace kvcache::kvstore
