#include "kvstore/extent_allocator.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <random>
#include <vector>

namespace kvcache::kvstore {
namespace {

constexpr uint64_t kB = kBlockBytes;

TEST(ExtentAllocatorTest, RoundsUpToBlocksAndStaysAligned) {
  ExtentAllocator allocator(1, 16 * kB);
  auto a = allocator.Allocate(1);
  auto b = allocator.Allocate(kB + 1);
  ASSERT_TRUE(a.ok() && b.ok());
  EXPECT_EQ(a->length, kB);
  EXPECT_EQ(b->length, 2 * kB);
  EXPECT_EQ(a->offset % kB, 0u);
  EXPECT_EQ(b->offset % kB, 0u);
  EXPECT_EQ(allocator.used_bytes(), 3 * kB);
}

TEST(ExtentAllocatorTest, BestFitKeepsLargeRunsForLargeChunks) {
  ExtentAllocator allocator(1, 10 * kB);
  auto a = allocator.Allocate(kB);      // [0, 1)
  auto b = allocator.Allocate(kB);      // [1, 2)
  auto c = allocator.Allocate(3 * kB);  // [2, 5)
  auto d = allocator.Allocate(kB);      // [5, 6), free run [6, 10)
  ASSERT_TRUE(a.ok() && b.ok() && c.ok() && d.ok());
  allocator.Free(*b);  // a one-block hole
  auto small = allocator.Allocate(kB);
  ASSERT_TRUE(small.ok());
  EXPECT_EQ(small->offset, b->offset) << "the hole fits exactly";
  EXPECT_EQ(allocator.largest_free_run(), 4 * kB);
}

TEST(ExtentAllocatorTest, ExhaustionIsResourceExhaustedAndFreeCoalesces) {
  ExtentAllocator allocator(2, 4 * kB);
  std::vector<Extent> extents;
  for (int i = 0; i < 8; ++i) {
    auto e = allocator.Allocate(kB);
    ASSERT_TRUE(e.ok());
    extents.push_back(*e);
  }
  EXPECT_EQ(allocator.Allocate(1).status().code(),
            absl::StatusCode::kResourceExhausted);
  // Freeing every block of slab 0 in scrambled order coalesces one run.
  for (int i : {2, 0, 3, 1}) allocator.Free(extents[i]);
  EXPECT_EQ(allocator.largest_free_run(), 4 * kB);
  EXPECT_TRUE(allocator.Allocate(4 * kB).ok());
  EXPECT_EQ(allocator.Allocate(5 * kB).status().code(),
            absl::StatusCode::kResourceExhausted)
      << "an extent never spans slabs";
}

TEST(ExtentAllocatorTest, ClaimRebuildsUsedSpaceAndRejectsBadExtents) {
  ExtentAllocator allocator(2, 8 * kB);
  ASSERT_TRUE(allocator.Claim({1, 2 * kB, 2 * kB}).ok());
  EXPECT_EQ(allocator.used_bytes(), 2 * kB);
  EXPECT_FALSE(allocator.Claim({1, 3 * kB, kB}).ok()) << "overlap";
  EXPECT_FALSE(allocator.Claim({0, 100, kB}).ok()) << "misaligned";
  EXPECT_FALSE(allocator.Claim({0, 7 * kB, 2 * kB}).ok()) << "past the end";
  EXPECT_FALSE(allocator.Claim({2, 0, kB}).ok()) << "no such slab";
  EXPECT_FALSE(allocator.Claim({0, ~uint64_t{0} - kB + 1, 2 * kB}).ok())
      << "offset + length wraps around";
  EXPECT_EQ(allocator.used_bytes(), 2 * kB);
  // Nothing allocated afterwards overlaps the claimed extent.
  while (true) {
    auto e = allocator.Allocate(kB);
    if (!e.ok()) break;
    EXPECT_FALSE(e->slab == 1 && e->offset >= 2 * kB && e->offset < 4 * kB);
  }
  EXPECT_EQ(allocator.used_bytes(), allocator.capacity_bytes());
}

TEST(ExtentAllocatorTest, RandomWorkloadNeverOverlapsOrExceedsCapacity) {
  ExtentAllocator allocator(3, 64 * kB);
  std::mt19937 rng(7);
  std::vector<Extent> live;
  for (int step = 0; step < 5000; ++step) {
    if (!live.empty() && rng() % 3 == 0) {
      const size_t i = rng() % live.size();
      allocator.Free(live[i]);
      live.erase(live.begin() + i);
      continue;
    }
    auto e = allocator.Allocate(1 + rng() % (9 * kB));
    if (e.ok()) live.push_back(*e);
    ASSERT_LE(allocator.used_bytes(), allocator.capacity_bytes());
  }
  std::sort(live.begin(), live.end(), [](const Extent& a, const Extent& b) {
    return std::tie(a.slab, a.offset) < std::tie(b.slab, b.offset);
  });
  uint64_t total = 0;
  for (size_t i = 0; i < live.size(); ++i) {
    total += live[i].length;
    EXPECT_LE(live[i].offset + live[i].length, 64 * kB);
    if (i > 0 && live[i].slab == live[i - 1].slab) {
      EXPECT_GE(live[i].offset, live[i - 1].offset + live[i - 1].length);
    }
  }
  EXPECT_EQ(total, allocator.used_bytes());
}

}  // namespace
}  // namespace kvcache::kvstore
