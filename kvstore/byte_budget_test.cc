#include "kvstore/byte_budget.h"

#include <thread>
#include <vector>

#include "gtest/gtest.h"

namespace kvcache::kvstore {
namespace {

TEST(ByteBudgetTest, RefusesWhatDoesNotFitAndTakesItBackOnRelease) {
  ByteBudget budget(100);
  ByteBudget::Reservation a = budget.TryReserve(60);
  ASSERT_TRUE(a);
  EXPECT_FALSE(budget.TryReserve(41));
  ByteBudget::Reservation b = budget.TryReserve(40);
  ASSERT_TRUE(b);
  EXPECT_EQ(budget.used(), 100u);
  a.Reset();
  EXPECT_EQ(budget.used(), 40u);
  EXPECT_TRUE(budget.TryReserve(60));  // released again at once
  EXPECT_EQ(budget.used(), 40u);
}

TEST(ByteBudgetTest, MovedReservationIsReleasedOnce) {
  ByteBudget budget(10);
  ByteBudget::Reservation moved;
  {
    ByteBudget::Reservation r = budget.TryReserve(10);
    moved = std::move(r);
  }
  EXPECT_EQ(budget.used(), 10u);
  moved = budget.TryReserve(0);  // the old one goes back first
  EXPECT_EQ(budget.used(), 0u);
}

TEST(ByteBudgetTest, ConcurrentHoldersNeverPassTheCapacity) {
  ByteBudget budget(1000);
  std::atomic<uint64_t> peak{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 8; ++t) {
    threads.emplace_back([&] {
      for (int i = 0; i < 20000; ++i) {
        ByteBudget::Reservation r = budget.TryReserve(300);
        if (!r) continue;
        uint64_t used = budget.used();
        uint64_t seen = peak.load();
        while (used > seen && !peak.compare_exchange_weak(seen, used)) {
        }
      }
    });
  }
  for (std::thread& t : threads) t.join();
  EXPECT_LE(peak.load(), 1000u);
  EXPECT_EQ(budget.used(), 0u);
}

}  // namespace
}  // namespace kvcache::kvstore
