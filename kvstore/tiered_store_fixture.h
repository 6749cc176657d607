// A TieredStore over a small CPU tier and a small NVMe tier in the test's
// temporary directory, with a clock the test moves. Shared by the CPU tests
// and the GPU tier's tests (which add a GPU tier and reopen).
#ifndef KVCACHE_KVSTORE_TIERED_STORE_FIXTURE_H_
#define KVCACHE_KVSTORE_TIERED_STORE_FIXTURE_H_

#include <gtest/gtest.h>

#include <cstdlib>
#include <filesystem>
#include <memory>
#include <random>
#include <string>

#include "codec/crc32c.h"
#include "kvstore/tiered_store.h"

namespace kvcache::kvstore {

inline constexpr uint64_t kChunk = 64 << 10;

inline std::string Bytes(size_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::string s(n, '\0');
  for (char& c : s) c = static_cast<char>(rng());
  return s;
}

class TieredStoreTest : public ::testing::Test {
 protected:
  void SetUp() override {
    const char* tmp = std::getenv("TEST_TMPDIR");
    data_dir_ = std::string(tmp ? tmp : "/tmp") + "/tiered-" +
                ::testing::UnitTest::GetInstance()->current_test_info()->name();
    std::filesystem::remove_all(data_dir_);
    options_.cpu_capacity_bytes = 4 * kChunk;
    NvmeTierOptions nvme;
    nvme.data_dir = data_dir_;
    nvme.slab_bytes = 4 << 20;
    nvme.slab_count = 1;
    options_.nvme = nvme;
    Reopen();
  }

  void Reopen() {
    store_.reset();
    auto store = TieredStore::Open(options_, [this] { return now_; });
    ASSERT_TRUE(store.ok()) << store.status();
    store_ = std::move(*store);
  }

  absl::Status Put(const std::string& key, const std::string& bytes,
                   absl::Duration pin = absl::ZeroDuration(),
                   PutMode mode = PutMode::kKeepExisting) {
    return store_->Put(key, bytes, codec::Crc32c(bytes), pin, {}, mode)
        .status();
  }

  // The tier a Get finds the chunk in, after checking its bytes.
  TierId GetTier(const std::string& key, const std::string& want) {
    auto chunk = store_->Get(key);
    EXPECT_TRUE(chunk.ok()) << key << ": " << chunk.status();
    if (!chunk.ok()) return TierId::kCpu;
    EXPECT_EQ(chunk->chunk.bytes(), want) << key;
    return chunk->tier;
  }

  const TierCounters& Counters(TierId tier) {
    for (const TierReport& report : store_->Report()) {
      if (report.tier == tier) return *report.counters;
    }
    ADD_FAILURE() << "no such tier";
    return *store_->Report().front().counters;
  }

  std::string data_dir_;
  TieredStoreOptions options_;
  absl::Time now_ = absl::FromUnixSeconds(1700000000);
  std::unique_ptr<TieredStore> store_;
};

}  // namespace kvcache::kvstore

#endif  // KVCACHE_KVSTORE_TIERED_STORE_FIXTURE_H_
