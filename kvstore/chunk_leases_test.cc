#include "kvstore/chunk_leases.h"

#include <algorithm>
#include <memory>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "kvstore/host_arena.h"
#include "kvstore/memory_tier.h"

namespace kvcache::kvstore {
namespace {

const std::string kWorker = "ipv4:127.0.0.1:40000";
const std::string kOtherWorker = "ipv4:127.0.0.1:40001";

ChunkRef ChunkOf(uint64_t bytes) {
  ChunkRef chunk;
  chunk.data = std::shared_ptr<const char>(new char[bytes],
                                           std::default_delete<char[]>());
  chunk.size_bytes = bytes;
  return chunk;
}

class FakeClock {
 public:
  absl::Time Now() const { return now_; }
  void Advance(absl::Duration d) { now_ += d; }
  ChunkLeases::Clock AsClock() {
    return [this] { return now_; };
  }

 private:
  absl::Time now_ = absl::FromUnixSeconds(1000);
};

TEST(ChunkLeasesTest, LeasedBytesStayInPlaceAfterEvictionUntilRelease) {
  absl::StatusOr<std::shared_ptr<HostArena>> arena =
      HostArena::Create(2 * 4096, /*pin_for_gpu=*/false);
  ASSERT_TRUE(arena.ok()) << arena.status();
  MemoryTier tier(*arena);
  const std::string a(4096, 'a'), b(4096, 'b'), c(4096, 'c');
  ASSERT_TRUE(tier.Put("a", a, 1).ok());
  ChunkLeases leases(1 << 20, 1 << 20);
  absl::StatusOr<ChunkRef> held = tier.Get("a");
  ASSERT_TRUE(held.ok());
  const ChunkLeases::Lease lease =
      leases.Grant(kWorker, {*held}, absl::Minutes(1));
  ASSERT_EQ(lease.chunks, 1u);
  const char* where = held->data.get();
  held = absl::NotFoundError("dropped");  // only the lease holds it now

  // Fill the tier twice over: "a" is evicted, yet its extent is not reused.
  ASSERT_TRUE(tier.Put("b", b, 2).ok());
  ASSERT_TRUE(tier.Put("c", c, 3).ok());
  EXPECT_FALSE(tier.Peek("a").ok());
  EXPECT_EQ(std::string(where, 4096), a);
  EXPECT_EQ((*arena)->used_bytes(), 2 * 4096u);  // "c" and the leased "a"

  EXPECT_TRUE(leases.Release(kWorker, lease.id));
  EXPECT_EQ((*arena)->used_bytes(), 4096u);
  EXPECT_FALSE(leases.Release(kWorker, lease.id));
}

TEST(ChunkLeasesTest, CapLeasesTheLeadingChunksThatFit) {
  ChunkLeases leases(10'000, 10'000);
  ChunkLeases::Lease first = leases.Grant(
      kWorker, {ChunkOf(4000), ChunkOf(4000), ChunkOf(4000)}, absl::Minutes(1));
  EXPECT_EQ(first.chunks, 2u);
  EXPECT_EQ(leases.held_bytes(), 8000u);
  EXPECT_EQ(leases.room_bytes(kWorker), 2000u);
  // The next chunk no longer fits, so nothing is leased.
  ChunkLeases::Lease second =
      leases.Grant(kWorker, {ChunkOf(4000)}, absl::Minutes(1));
  EXPECT_EQ(second.chunks, 0u);
  EXPECT_EQ(second.id, 0u);
  ASSERT_TRUE(leases.Release(kWorker, first.id));
  EXPECT_EQ(leases.held_bytes(), 0u);
  EXPECT_EQ(leases.Grant(kWorker, {ChunkOf(4000)}, absl::Minutes(1)).chunks,
            1u);
}

// A worker that knows its own lease id must not be able to name, and
// release, another's: ids are random, not a sequence.
TEST(ChunkLeasesTest, LeaseIdsCannotBeGuessedFromOneAnother) {
  ChunkLeases leases(1 << 30, 1 << 30);
  std::vector<uint64_t> ids;
  for (int i = 0; i < 64; ++i) {
    ids.push_back(leases.Grant(kWorker, {ChunkOf(100)}, absl::Minutes(1)).id);
  }
  int sequential = 0;
  for (size_t i = 0; i < ids.size(); ++i) {
    EXPECT_NE(ids[i], 0u);
    if (i > 0 && ids[i] - ids[i - 1] < 1024) ++sequential;
    // A guess near one's own id finds nothing to release.
    EXPECT_FALSE(leases.Release(kWorker, ids[i] + 1));
  }
  EXPECT_EQ(sequential, 0);
  std::sort(ids.begin(), ids.end());
  EXPECT_EQ(std::unique(ids.begin(), ids.end()), ids.end());
  EXPECT_EQ(leases.live_leases(), 64u);
}

TEST(ChunkLeasesTest, ExpiredLeasesLetGo) {
  FakeClock clock;
  ChunkLeases leases(10'000, 10'000, clock.AsClock());
  ChunkLeases::Lease lease =
      leases.Grant(kWorker, {ChunkOf(9000)}, absl::Seconds(5));
  EXPECT_EQ(lease.expiry, clock.Now() + absl::Seconds(5));
  clock.Advance(absl::Seconds(4));
  EXPECT_EQ(leases.Grant(kWorker, {ChunkOf(2000)}, absl::Seconds(5)).chunks,
            0u);
  EXPECT_EQ(leases.room_bytes(kWorker), 1000u);
  clock.Advance(absl::Seconds(1));
  EXPECT_EQ(leases.room_bytes(kWorker), 10'000u);
  // Expired: its bytes are free for the next lease, and it cannot be
  // released any more.
  EXPECT_EQ(leases.Grant(kWorker, {ChunkOf(2000)}, absl::Seconds(5)).chunks,
            1u);
  EXPECT_FALSE(leases.Release(kWorker, lease.id));
  EXPECT_EQ(leases.live_leases(), 1u);
  EXPECT_EQ(leases.held_bytes(), 2000u);
}

TEST(ChunkLeasesTest, OnlyTheOwnerReleasesALease) {
  ChunkLeases leases(10'000, 10'000);
  const ChunkLeases::Lease lease =
      leases.Grant(kWorker, {ChunkOf(1000)}, absl::Minutes(1));
  ASSERT_EQ(lease.chunks, 1u);
  EXPECT_FALSE(leases.Release(kOtherWorker, lease.id));
  EXPECT_EQ(leases.held_bytes(), 1000u);  // still held for its owner
  EXPECT_TRUE(leases.Release(kWorker, lease.id));
  EXPECT_EQ(leases.held_bytes(), 0u);
}

TEST(ChunkLeasesTest, OneOwnerCannotTakeTheWholeAllowance) {
  ChunkLeases leases(10'000, 4'000);
  // Asking again and again, one worker gets no more than its share...
  EXPECT_EQ(leases.Grant(kWorker, {ChunkOf(3000)}, absl::Minutes(1)).chunks,
            1u);
  EXPECT_EQ(leases.Grant(kWorker, {ChunkOf(3000)}, absl::Minutes(1)).chunks,
            0u);
  EXPECT_EQ(leases.room_bytes(kWorker), 1000u);
  EXPECT_EQ(leases.held_bytes(kWorker), 3000u);
  // ...and another still gets its own.
  EXPECT_EQ(
      leases.Grant(kOtherWorker, {ChunkOf(3000)}, absl::Minutes(1)).chunks, 1u);
  EXPECT_EQ(leases.held_bytes(), 6000u);
}

}  // namespace
}  // namespace kvcache::kvstore
