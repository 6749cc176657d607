#include "kvstore/tiered_store.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <random>
#include <string>
#include <utility>

#include "codec/codec.h"
#include "codec/crc32c.h"
#include "codec/test_data.h"
#include "kvstore/tiered_store_fixture.h"

namespace kvcache::kvstore {
namespace {

TEST_F(TieredStoreTest, EvictionFromMemoryDemotesToNvmeAndHitsPromote) {
  for (int i = 0; i < 6; ++i) {
    ASSERT_TRUE(Put("k" + std::to_string(i), Bytes(kChunk, i)).ok());
  }
  // Memory holds four chunks; the two oldest went down to NVMe.
  EXPECT_EQ(store_->Peek("k0")->tier, TierId::kNvme);
  EXPECT_EQ(store_->Peek("k1")->tier, TierId::kNvme);
  EXPECT_EQ(store_->Peek("k5")->tier, TierId::kCpu);
  EXPECT_EQ(store_->chunks(), 6u);
  EXPECT_EQ(Counters(TierId::kCpu).demotions.load(), 2u);

  EXPECT_EQ(GetTier("k0", Bytes(kChunk, 0)), TierId::kNvme);
  // The hit promoted it: the next read is served from memory.
  EXPECT_EQ(GetTier("k0", Bytes(kChunk, 0)), TierId::kCpu);
  EXPECT_EQ(Counters(TierId::kCpu).promotions.load(), 1u);
  EXPECT_EQ(Counters(TierId::kNvme).hits.load(), 1u);
  // Every chunk is still readable, byte-exact, from some tier.
  for (int i = 0; i < 6; ++i)
    GetTier("k" + std::to_string(i), Bytes(kChunk, i));
  EXPECT_EQ(store_->chunks(), 6u);
}

TEST_F(TieredStoreTest, KeysListsEveryChunkOnceWhateverItsTier) {
  for (int i = 0; i < 6; ++i) {
    ASSERT_TRUE(Put("k" + std::to_string(i), Bytes(kChunk, i)).ok());
  }
  GetTier("k0", Bytes(kChunk, 0));  // now in memory and on NVMe
  std::vector<std::string> keys = store_->Keys();
  std::sort(keys.begin(), keys.end());
  EXPECT_EQ(keys,
            (std::vector<std::string>{"k0", "k1", "k2", "k3", "k4", "k5"}));
}

TEST_F(TieredStoreTest, CleanRestartKeepsEveryChunkAfterFlush) {
  for (int i = 0; i < 3; ++i) {
    ASSERT_TRUE(Put("k" + std::to_string(i), Bytes(kChunk, i)).ok());
  }
  ASSERT_TRUE(store_->Flush().ok());
  Reopen();
  for (int i = 0; i < 3; ++i) {
    EXPECT_EQ(GetTier("k" + std::to_string(i), Bytes(kChunk, i)),
              TierId::kNvme);
  }
}

TEST_F(TieredStoreTest, WriteThroughIsDurableWithoutFlush) {
  options_.write_through = true;
  Reopen();
  ASSERT_TRUE(Put("a", Bytes(kChunk, 1)).ok());
  // No Flush: a crash right after the Put must still find it.
  Reopen();
  EXPECT_EQ(GetTier("a", Bytes(kChunk, 1)), TierId::kNvme);
}

TEST_F(TieredStoreTest, ReplacedChunkNeverComesBackStaleAfterRestart) {
  ASSERT_TRUE(Put("a", Bytes(kChunk, 1)).ok());
  ASSERT_TRUE(store_->Flush().ok());
  ASSERT_TRUE(
      Put("a", Bytes(kChunk, 2), absl::ZeroDuration(), PutMode::kReplace).ok());
  Reopen();  // without Flush: the new bytes were only in memory
  EXPECT_TRUE(absl::IsNotFound(store_->Get("a").status()));
}

TEST_F(TieredStoreTest, KeyKeepsItsFirstCopyUnlessReplaceIsAsked) {
  const std::string first = Bytes(kChunk, 1), second = Bytes(kChunk, 2);
  absl::StatusOr<PutOutcome> put =
      store_->Put("a", first, codec::Crc32c(first), absl::ZeroDuration());
  ASSERT_TRUE(put.ok()) << put.status();
  EXPECT_EQ(*put, PutOutcome::kStored);
  put = store_->Put("a", second, codec::Crc32c(second), absl::ZeroDuration());
  ASSERT_TRUE(put.ok()) << put.status();
  EXPECT_EQ(*put, PutOutcome::kKeptExisting);
  GetTier("a", first);

  // Also when the first copy has gone down to NVMe only.
  for (int i = 0; i < 8; ++i) {
    ASSERT_TRUE(Put("k" + std::to_string(i), Bytes(kChunk, i)).ok());
  }
  ASSERT_EQ(store_->Peek("a")->tier, TierId::kNvme);
  put = store_->Put("a", second, codec::Crc32c(second), absl::ZeroDuration());
  ASSERT_TRUE(put.ok()) << put.status();
  EXPECT_EQ(*put, PutOutcome::kKeptExisting);
  GetTier("a", first);

  put = store_->Put("a", second, codec::Crc32c(second), absl::ZeroDuration(),
                    {}, PutMode::kReplace);
  ASSERT_TRUE(put.ok()) << put.status();
  EXPECT_EQ(*put, PutOutcome::kStored);
  GetTier("a", second);
}

TEST_F(TieredStoreTest, KeptCopyStillTakesTheNewPin) {
  ASSERT_TRUE(Put("session", Bytes(kChunk, 1)).ok());
  ASSERT_TRUE(Put("session", Bytes(kChunk, 2), absl::Minutes(5)).ok());
  absl::StatusOr<LocatedChunk> peek = store_->Peek("session");
  ASSERT_TRUE(peek.ok()) << peek.status();
  EXPECT_TRUE(peek->chunk.pinned);
  EXPECT_EQ(peek->chunk.pin_expiry, now_ + absl::Minutes(5));
  GetTier("session", Bytes(kChunk, 1));
}

TEST_F(TieredStoreTest, PinsHoldAcrossTiersAndExpire) {
  ASSERT_TRUE(Put("pinned", Bytes(kChunk, 9), absl::Minutes(5)).ok());
  for (int i = 0; i < 8; ++i) {
    ASSERT_TRUE(Put("k" + std::to_string(i), Bytes(kChunk, i)).ok());
  }
  // Never evicted from memory while pinned.
  EXPECT_EQ(store_->Peek("pinned")->tier, TierId::kCpu);
  EXPECT_TRUE(store_->Peek("pinned")->chunk.pinned);

  now_ += absl::Minutes(6);
  for (int i = 8; i < 16; ++i) {
    ASSERT_TRUE(Put("k" + std::to_string(i), Bytes(kChunk, i)).ok());
  }
  // Expired: it was demoted like any other chunk, and is still readable.
  EXPECT_EQ(store_->Peek("pinned")->tier, TierId::kNvme);
  GetTier("pinned", Bytes(kChunk, 9));
}

TEST_F(TieredStoreTest, PinSurvivesRestartOnNvme) {
  ASSERT_TRUE(Put("session", Bytes(kChunk, 3), absl::Hours(1)).ok());
  ASSERT_TRUE(store_->Flush().ok());
  Reopen();
  auto peek = store_->Peek("session");
  ASSERT_TRUE(peek.ok()) << peek.status();
  EXPECT_TRUE(peek->chunk.pinned);
  EXPECT_EQ(peek->chunk.pin_expiry, now_ + absl::Hours(1));
}

TEST_F(TieredStoreTest, PromptsShrinkFromTheirEndOnNvmeAfterRestart) {
  options_.write_through = true;
  options_.nvme->slab_bytes = 4 * kChunk;  // four chunks
  Reopen();
  // p0 <- p1 <- p2, each written a minute after the last: p0 is the least
  // recently used, and would go first by plain LRU.
  const std::pair<const char*, const char*> prompt[] = {
      {"p0", ""}, {"p1", "p0"}, {"p2", "p1"}};
  for (const auto& [key, parent] : prompt) {
    const std::string bytes = Bytes(kChunk, key[1]);
    ASSERT_TRUE(store_
                    ->Put(key, bytes, codec::Crc32c(bytes),
                          absl::ZeroDuration(), parent)
                    .ok());
    now_ += absl::Minutes(1);
  }
  Reopen();  // memory starts empty; NVMe holds the prompt
  ASSERT_TRUE(Put("other", Bytes(kChunk, 4)).ok());
  ASSERT_TRUE(Put("x", Bytes(kChunk, 5)).ok());  // NVMe evicts one chunk
  EXPECT_TRUE(absl::IsNotFound(store_->Peek("p2").status()));
  EXPECT_EQ(store_->Peek("p0")->tier, TierId::kNvme);
  EXPECT_EQ(store_->Peek("p1")->tier, TierId::kNvme);
  // A hit brings the link up to memory with the chunk.
  EXPECT_EQ(GetTier("p1", Bytes(kChunk, '1')), TierId::kNvme);
  EXPECT_EQ(store_->Peek("p1")->tier, TierId::kCpu);
  EXPECT_EQ(store_->Peek("p1")->chunk.parent_key, "p0");
}

TEST_F(TieredStoreTest, PeekReportsTheCodecSummaryInEveryTier) {
  const codec::ChunkShape shape{4, 64, 2, 16, codec::DType::kFloat16};
  absl::StatusOr<std::string> stream = codec::EncodeChunk(
      shape, codec::SyntheticChunk(shape, 3), codec::Level::kDefault);
  ASSERT_TRUE(stream.ok()) << stream.status();
  ASSERT_TRUE(Put("codec", *stream).ok());
  ASSERT_TRUE(Put("opaque", Bytes(kChunk, 1)).ok());
  auto expect_summary = [&](TierId tier) {
    absl::StatusOr<LocatedChunk> chunk = store_->Peek("codec");
    ASSERT_TRUE(chunk.ok()) << chunk.status();
    EXPECT_EQ(chunk->tier, tier);
    ASSERT_TRUE(chunk->chunk.codec.has_value());
    EXPECT_EQ(chunk->chunk.codec->shape, shape);
    EXPECT_EQ(chunk->chunk.codec->level, codec::Level::kDefault);
    EXPECT_FALSE(store_->Peek("opaque")->chunk.codec.has_value());
  };
  expect_summary(TierId::kCpu);
  ASSERT_TRUE(store_->Flush().ok());
  Reopen();
  expect_summary(TierId::kNvme);
  EXPECT_EQ(GetTier("codec", *stream), TierId::kNvme);  // promotes it
  expect_summary(TierId::kCpu);
}

TEST_F(TieredStoreTest, OversizedChunkSkipsMemoryUnderTheAdmissionLimit) {
  options_.cpu_max_admit_percent = 50;
  Reopen();
  for (int i = 0; i < 4; ++i) {
    ASSERT_TRUE(Put("small" + std::to_string(i), Bytes(kChunk, i)).ok());
  }
  // Three chunks are 75% of memory: admitted to NVMe only, so the working
  // set in memory is not flushed out by one big put.
  ASSERT_TRUE(Put("big", Bytes(3 * kChunk, 7)).ok());
  EXPECT_EQ(store_->Peek("big")->tier, TierId::kNvme);
  for (int i = 0; i < 4; ++i) {
    EXPECT_EQ(store_->Peek("small" + std::to_string(i))->tier, TierId::kCpu);
  }
  EXPECT_EQ(GetTier("big", Bytes(3 * kChunk, 7)), TierId::kNvme);
}

TEST_F(TieredStoreTest, AdmissionLimitWithoutNvmeIsAClearError) {
  options_.nvme.reset();
  options_.cpu_max_admit_percent = 50;
  Reopen();
  absl::Status s = Put("big", Bytes(3 * kChunk, 7));
  EXPECT_TRUE(absl::IsResourceExhausted(s)) << s;
  EXPECT_NE(s.message().find("nvme_tier.data_dir"), std::string::npos) << s;
}

TEST_F(TieredStoreTest, DamagedChunkOnDiskIsDroppedNotServed) {
  options_.write_through = true;
  Reopen();
  const std::string bytes = Bytes(kChunk, 5);
  ASSERT_TRUE(Put("a", bytes).ok());
  store_.reset();
  // Flip every copy of the chunk's first 64 bytes in the slab files.
  for (const auto& entry : std::filesystem::directory_iterator(data_dir_)) {
    if (entry.path().filename().string().rfind("slab-", 0) != 0) continue;
    std::fstream slab(entry.path(),
                      std::ios::in | std::ios::out | std::ios::binary);
    std::string contents((std::istreambuf_iterator<char>(slab)), {});
    for (size_t at = contents.find(bytes.substr(0, 64));
         at != std::string::npos;
         at = contents.find(bytes.substr(0, 64), at + 1)) {
      slab.seekp(at);
      slab.put(static_cast<char>(contents[at] ^ 0xFF));
    }
  }
  Reopen();
  absl::StatusOr<LocatedChunk> got = store_->Get("a");
  EXPECT_TRUE(absl::IsDataLoss(got.status())) << got.status();
  // Dropped: it answers NOT_FOUND from now on, and the tier reports it.
  EXPECT_TRUE(absl::IsNotFound(store_->Get("a").status()));
  EXPECT_EQ(store_->Report().back().usage.corrupt_chunks, 1u);
}

TEST_F(TieredStoreTest, DeleteRemovesEveryCopy) {
  options_.write_through = true;
  Reopen();
  ASSERT_TRUE(Put("a", Bytes(kChunk, 1)).ok());
  EXPECT_TRUE(*store_->Delete("a"));
  EXPECT_FALSE(*store_->Delete("a"));
  Reopen();
  EXPECT_TRUE(absl::IsNotFound(store_->Get("a").status()));
}

TEST_F(TieredStoreTest, OpensWithoutTheGpuTierWhenTheDeviceIsUnusable) {
  // No machine has device 4096; without a GPU at all the reason differs,
  // but the store must open either way, without the tier.
  options_.gpu_capacity_bytes = 4 * kChunk;
  options_.gpu_device = 4096;
  Reopen();
  EXPECT_EQ(store_->gpu_arena(), nullptr);
  for (const TierReport& report : store_->Report()) {
    EXPECT_NE(report.tier, TierId::kGpu);
  }
  ASSERT_TRUE(Put("k", Bytes(kChunk, 1)).ok());
  EXPECT_EQ(GetTier("k", Bytes(kChunk, 1)), TierId::kCpu);
}

TEST_F(TieredStoreTest, DiskFullWithEverythingPinnedRefusesAndKeepsOldBytes) {
  options_.cpu_capacity_bytes = kChunk;
  Reopen();
  // The 4 MiB slab holds at most 64 pinned chunks of 64 KiB.
  int stored = 0;
  absl::Status s;
  for (; stored < 100; ++stored) {
    s = Put("p" + std::to_string(stored), Bytes(kChunk, stored),
            absl::Hours(1));
    if (!s.ok()) break;
  }
  EXPECT_TRUE(absl::IsResourceExhausted(s)) << s;
  EXPECT_GE(stored, 60);
  EXPECT_LE(stored, 66);
  // Nothing pinned was lost to make room.
  for (int i = 0; i < stored; ++i) {
    GetTier("p" + std::to_string(i), Bytes(kChunk, i));
  }
}

// The fixture's store (4 chunks of CPU tier over 64 of NVMe) with quotas:
// "a" and "b" may each hold 2 chunks in memory and 8 on NVMe.
class TenantQuotaTest : public TieredStoreTest {
 protected:
  void SetUp() override {
    TieredStoreTest::SetUp();
    options_.quotas["a"] = TierQuotas{0, 2 * kChunk, 8 * kChunk};
    options_.quotas["b"] = TierQuotas{0, 2 * kChunk, 8 * kChunk};
    Reopen();
  }

  static std::string ChunkOf(const std::string& key) {
    return Bytes(kChunk, codec::Crc32c(key));
  }

  absl::Status PutAs(const std::string& owner, const std::string& key,
                     absl::Duration pin = absl::ZeroDuration()) {
    const std::string bytes = ChunkOf(key);
    return store_
        ->Put(key, bytes, codec::Crc32c(bytes), pin, {}, PutMode::kKeepExisting,
              owner)
        .status();
  }

  OwnerUsage UsageOf(TierId tier, const std::string& owner) {
    for (const TierReport& report : store_->Report()) {
      if (report.tier != tier) continue;
      for (const OwnerUsage& usage : report.usage.owners) {
        if (usage.owner == owner) return usage;
      }
    }
    return OwnerUsage{owner};
  }
};

TEST_F(TenantQuotaTest, TenantWritingWithoutStoppingStaysWithinItsQuotas) {
  ASSERT_TRUE(PutAs("b", "b0").ok());
  ASSERT_TRUE(PutAs("b", "b1").ok());
  for (int i = 0; i < 200; ++i) {
    ASSERT_TRUE(PutAs("a", "a" + std::to_string(i)).ok()) << i;
    ASSERT_LE(UsageOf(TierId::kCpu, "a").used_bytes, 2 * kChunk) << i;
    ASSERT_LE(UsageOf(TierId::kNvme, "a").used_bytes, 8 * kChunk) << i;
  }
  // b's working set is where b left it: in memory, untouched.
  for (const char* key : {"b0", "b1"}) {
    auto found = store_->Peek(key);
    ASSERT_TRUE(found.ok()) << key;
    EXPECT_EQ(found->tier, TierId::kCpu) << key;
    EXPECT_EQ(found->chunk.owner, "b");
  }
  // a keeps its 10 most recent chunks: 2 in memory, 8 demoted to NVMe.
  EXPECT_EQ(UsageOf(TierId::kCpu, "a").chunks, 2u);
  EXPECT_EQ(UsageOf(TierId::kNvme, "a").chunks, 8u);
  EXPECT_EQ(store_->Peek("a190")->tier, TierId::kNvme);
  EXPECT_EQ(store_->Peek("a190")->chunk.owner, "a");
  EXPECT_FALSE(store_->Peek("a189").ok());
  // A hit on NVMe promotes the chunk into a's memory quota, pushing a's
  // own least recently used chunk down, never b's.
  GetTier("a190", ChunkOf("a190"));
  EXPECT_EQ(store_->Peek("a190")->tier, TierId::kCpu);
  EXPECT_LE(UsageOf(TierId::kCpu, "a").used_bytes, 2 * kChunk);
  EXPECT_EQ(store_->Peek("b0")->tier, TierId::kCpu);
  EXPECT_EQ(store_->Peek("b1")->tier, TierId::kCpu);
}

TEST_F(TenantQuotaTest, OwnerSurvivesDemotionAndRestart) {
  ASSERT_TRUE(PutAs("a", "a0").ok());
  ASSERT_TRUE(store_->Flush().ok());
  Reopen();
  auto found = store_->Peek("a0");
  ASSERT_TRUE(found.ok());
  EXPECT_EQ(found->tier, TierId::kNvme);
  EXPECT_EQ(found->chunk.owner, "a");
  EXPECT_EQ(UsageOf(TierId::kNvme, "a").used_bytes, kChunk);
  // Promoted back into memory, it counts against a's memory quota again.
  GetTier("a0", ChunkOf("a0"));
  EXPECT_EQ(UsageOf(TierId::kCpu, "a").used_bytes, kChunk);
}

TEST_F(TenantQuotaTest, PinnedChunksFillingTheQuotaAreResourceExhausted) {
  options_.nvme.reset();
  Reopen();
  ASSERT_TRUE(PutAs("a", "a0", absl::Minutes(5)).ok());
  ASSERT_TRUE(PutAs("a", "a1", absl::Minutes(5)).ok());
  const absl::Status refused = PutAs("a", "a2");
  EXPECT_EQ(refused.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_NE(refused.message().find("cpu_quota_bytes"), std::string::npos)
      << refused;
  EXPECT_TRUE(PutAs("b", "b0").ok());
}

}  // namespace
}  // namespace kvcache::kvstore
