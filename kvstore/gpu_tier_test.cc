// The GPU tier inside TieredStore, on a real GPU: where Puts land, demotion
// to CPU and NVMe with bytes intact, promotion back, pins, admission, chunks
// handed out in device memory, Flush and restart. Run by tests/gpu/run.sh.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <string>

#include "kvstore/tiered_store_fixture.h"

namespace kvcache::kvstore {
namespace {

class GpuTierTest : public TieredStoreTest {
 protected:
  void SetUp() override {
    TieredStoreTest::SetUp();
    options_.gpu_capacity_bytes = 2 * kChunk;
    options_.gpu_max_admit_percent = 100;
    Reopen();
    ASSERT_NE(store_->gpu_arena(), nullptr) << "no usable GPU";
  }

  std::string Key(int i) { return "k" + std::to_string(i); }

  uint64_t GpuUsed() {
    for (const TierReport& report : store_->Report()) {
      if (report.tier == TierId::kGpu) return report.usage.used_bytes;
    }
    return 0;
  }
};

TEST_F(GpuTierTest, PutsLandInTheGpuAndEvictionsMoveDownTierByTier) {
  for (int i = 0; i < 8; ++i) {
    ASSERT_TRUE(Put(Key(i), Bytes(kChunk, i)).ok());
    EXPECT_LE(GpuUsed(), options_.gpu_capacity_bytes);
  }
  // GPU holds the newest two, CPU the four before, NVMe the rest.
  EXPECT_EQ(store_->Peek(Key(7))->tier, TierId::kGpu);
  EXPECT_EQ(store_->Peek(Key(6))->tier, TierId::kGpu);
  EXPECT_EQ(store_->Peek(Key(5))->tier, TierId::kCpu);
  EXPECT_EQ(store_->Peek(Key(2))->tier, TierId::kCpu);
  EXPECT_EQ(store_->Peek(Key(1))->tier, TierId::kNvme);
  EXPECT_EQ(store_->Peek(Key(0))->tier, TierId::kNvme);
  EXPECT_EQ(store_->chunks(), 8u);
  EXPECT_EQ(store_->Keys().size(), 8u);
  EXPECT_EQ(Counters(TierId::kGpu).demotions.load(), 6u);
  // Peek hands out no device pointers.
  EXPECT_EQ(store_->Peek(Key(7))->chunk.data, nullptr);
  // Read from the GPU tier: byte-exact host copies.
  EXPECT_EQ(GetTier(Key(7), Bytes(kChunk, 7)), TierId::kGpu);
  EXPECT_EQ(Counters(TierId::kGpu).hits.load(), 1u);
}

TEST_F(GpuTierTest, CpuHitPromotesToGpuAndKeepsTheCpuCopy) {
  for (int i = 0; i < 3; ++i) ASSERT_TRUE(Put(Key(i), Bytes(kChunk, i)).ok());
  ASSERT_EQ(store_->Peek(Key(0))->tier, TierId::kCpu);
  EXPECT_EQ(GetTier(Key(0), Bytes(kChunk, 0)), TierId::kCpu);
  EXPECT_EQ(store_->Peek(Key(0))->tier, TierId::kGpu);
  EXPECT_EQ(Counters(TierId::kGpu).promotions.load(), 1u);
  // k1 made room and went to CPU; k0 going back down later is free, as the
  // CPU tier still has it.
  EXPECT_EQ(store_->Peek(Key(1))->tier, TierId::kCpu);
  const uint64_t demoted = Counters(TierId::kGpu).demotions.load();
  ASSERT_TRUE(Put(Key(3), Bytes(kChunk, 3)).ok());
  ASSERT_TRUE(Put(Key(4), Bytes(kChunk, 4)).ok());
  EXPECT_EQ(store_->Peek(Key(0))->tier, TierId::kCpu);
  EXPECT_GT(Counters(TierId::kGpu).demotions.load(), demoted);
  for (int i = 0; i < 5; ++i) GetTier(Key(i), Bytes(kChunk, i));
}

TEST_F(GpuTierTest, PinnedChunksStayInTheGpuAndNewOnesGoToCpu) {
  ASSERT_TRUE(Put(Key(0), Bytes(kChunk, 0), absl::Hours(1)).ok());
  ASSERT_TRUE(Put(Key(1), Bytes(kChunk, 1), absl::Hours(1)).ok());
  ASSERT_TRUE(Put(Key(2), Bytes(kChunk, 2)).ok());
  EXPECT_EQ(store_->Peek(Key(0))->tier, TierId::kGpu);
  EXPECT_EQ(store_->Peek(Key(1))->tier, TierId::kGpu);
  EXPECT_EQ(store_->Peek(Key(2))->tier, TierId::kCpu);
  // Once the pins lapse the GPU makes room again, and the pin-free chunks
  // move down with their bytes.
  now_ += absl::Hours(2);
  ASSERT_TRUE(Put(Key(3), Bytes(kChunk, 3)).ok());
  EXPECT_EQ(store_->Peek(Key(3))->tier, TierId::kGpu);
  for (int i = 0; i < 4; ++i) GetTier(Key(i), Bytes(kChunk, i));
}

TEST_F(GpuTierTest, PinsAndUnpinsReachTheGpuCopy) {
  ASSERT_TRUE(Put(Key(0), Bytes(kChunk, 0)).ok());
  ASSERT_TRUE(store_->Pin(Key(0), absl::Hours(1)).ok());
  ASSERT_TRUE(store_->Unpin(Key(0)).ok());
  ASSERT_TRUE(store_->Pin(Key(0), absl::Minutes(30)).ok());
  // Fill the GPU with pinned chunks: k0 is pinned too, so nothing moves.
  ASSERT_TRUE(Put(Key(1), Bytes(kChunk, 1), absl::Hours(1)).ok());
  ASSERT_TRUE(Put(Key(2), Bytes(kChunk, 2)).ok());
  EXPECT_EQ(store_->Peek(Key(0))->tier, TierId::kGpu);
  EXPECT_TRUE(store_->Peek(Key(0))->chunk.pinned);
  ASSERT_TRUE(store_->Unpin(Key(0)).ok());
  EXPECT_FALSE(store_->Peek(Key(0))->chunk.pinned);
}

TEST_F(GpuTierTest, ChunksOverTheAdmissionLimitSkipTheGpu) {
  options_.gpu_capacity_bytes = 4 * kChunk;
  options_.gpu_max_admit_percent = 25;
  Reopen();
  ASSERT_TRUE(Put(Key(0), Bytes(kChunk, 0)).ok());
  ASSERT_TRUE(Put(Key(1), Bytes(kChunk + 1, 1)).ok());
  EXPECT_EQ(store_->Peek(Key(0))->tier, TierId::kGpu);
  EXPECT_EQ(store_->Peek(Key(1))->tier, TierId::kCpu);
}

TEST_F(GpuTierTest, GetInMemoryHandsOutDeviceMemoryOnlyToThoseWhoAskForIt) {
  const std::string bytes = Bytes(kChunk, 9);
  ASSERT_TRUE(Put("k", bytes).ok());
  absl::StatusOr<LocatedChunk> on_gpu = store_->GetInMemory("k", true);
  ASSERT_TRUE(on_gpu.ok()) << on_gpu.status();
  EXPECT_EQ(on_gpu->tier, TierId::kGpu);
  ASSERT_TRUE(on_gpu->chunk.on_device);
  ASSERT_TRUE(store_->gpu_arena()->OffsetOf(on_gpu->chunk.data.get()));
  std::string copied(bytes.size(), '\0');
  ASSERT_EQ(cudaMemcpy(copied.data(), on_gpu->chunk.data.get(), bytes.size(),
                       cudaMemcpyDeviceToHost),
            cudaSuccess);
  EXPECT_EQ(copied, bytes);

  absl::StatusOr<LocatedChunk> on_host = store_->GetInMemory("k", false);
  ASSERT_TRUE(on_host.ok()) << on_host.status();
  EXPECT_EQ(on_host->tier, TierId::kCpu);
  EXPECT_FALSE(on_host->chunk.on_device);
  EXPECT_EQ(on_host->chunk.bytes(), bytes);
  ASSERT_TRUE(store_->cpu_arena().OffsetOf(on_host->chunk.data.get()));
  // The GPU copy stays the one Peek reports.
  EXPECT_EQ(store_->Peek("k")->tier, TierId::kGpu);
}

TEST_F(GpuTierTest, ReplacingAChunkLeavesNoStaleCopyBelow) {
  ASSERT_TRUE(Put(Key(0), Bytes(kChunk, 0)).ok());
  ASSERT_TRUE(Put(Key(1), Bytes(kChunk, 1)).ok());
  ASSERT_TRUE(Put(Key(2), Bytes(kChunk, 2)).ok());  // k0 to CPU
  ASSERT_EQ(store_->Peek(Key(0))->tier, TierId::kCpu);
  // New bytes, in GPU.
  ASSERT_TRUE(
      Put(Key(0), Bytes(kChunk, 100), absl::ZeroDuration(), PutMode::kReplace)
          .ok());
  for (int i = 3; i < 9; ++i) ASSERT_TRUE(Put(Key(i), Bytes(kChunk, i)).ok());
  // Wherever k0 went since, it has the new bytes.
  GetTier(Key(0), Bytes(kChunk, 100));
}

TEST_F(GpuTierTest, FlushKeepsGpuChunksAcrossARestart) {
  for (int i = 0; i < 2; ++i) ASSERT_TRUE(Put(Key(i), Bytes(kChunk, i)).ok());
  ASSERT_EQ(store_->Peek(Key(0))->tier, TierId::kGpu);
  ASSERT_TRUE(store_->Flush().ok());
  Reopen();
  EXPECT_EQ(store_->chunks(), 2u);
  for (int i = 0; i < 2; ++i) {
    EXPECT_EQ(GetTier(Key(i), Bytes(kChunk, i)), TierId::kNvme);
  }
}

TEST_F(GpuTierTest, DeleteRemovesTheGpuCopy) {
  ASSERT_TRUE(Put("k", Bytes(kChunk, 1)).ok());
  EXPECT_TRUE(*store_->Delete("k"));
  EXPECT_TRUE(absl::IsNotFound(store_->Get("k").status()));
  EXPECT_EQ(GpuUsed(), 0u);
}

}  // namespace
}  // namespace kvcache::kvstore
