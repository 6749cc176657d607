#include "kvstore/nvme_tier.h"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <rocksdb/db.h>
#include <rocksdb/options.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <memory>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "codec/codec.h"
#include "codec/crc32c.h"
#include "codec/test_data.h"

namespace kvcache::kvstore {
namespace {

constexpr uint64_t kB = kBlockBytes;

std::string Bytes(size_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::string s(n, '\0');
  for (char& c : s) c = static_cast<char>(rng());
  return s;
}

class NvmeTierTest : public ::testing::Test {
 protected:
  void SetUp() override {
    const char* tmp = std::getenv("TEST_TMPDIR");
    options_.data_dir =
        std::string(tmp ? tmp : "/tmp") + "/nvme-" +
        ::testing::UnitTest::GetInstance()->current_test_info()->name();
    std::filesystem::remove_all(options_.data_dir);
    options_.slab_bytes = 8 << 20;
    options_.slab_count = 2;
    Reopen();
  }

  void Reopen() {
    tier_.reset();
    auto tier = NvmeTier::Open(options_, [this] { return now_; });
    ASSERT_TRUE(tier.ok()) << tier.status();
    tier_ = std::move(*tier);
  }

  absl::Status Put(const std::string& key, const std::string& bytes,
                   absl::Time pin_expiry = absl::InfinitePast()) {
    return tier_->Put(key, bytes, codec::Crc32c(bytes), pin_expiry);
  }

  std::string GetBytes(const std::string& key) {
    auto chunk = tier_->Get(key);
    EXPECT_TRUE(chunk.ok()) << chunk.status();
    return chunk.ok() ? std::string(chunk->bytes()) : "";
  }

  NvmeTierOptions options_;
  absl::Time now_ = absl::FromUnixSeconds(1700000000);
  std::unique_ptr<NvmeTier> tier_;
};

TEST_F(NvmeTierTest, RoundTripThroughIoUringIsByteExact) {
  // Sizes around block boundaries, and one spread over several I/O ops.
  for (size_t size : {size_t{1}, kB - 1, kB, kB + 1, size_t{3 << 20} + 17}) {
    const std::string key = "k" + std::to_string(size);
    const std::string bytes = Bytes(size, size);
    ASSERT_TRUE(Put(key, bytes).ok());
    EXPECT_EQ(GetBytes(key), bytes) << size;
    auto peek = tier_->Peek(key);
    ASSERT_TRUE(peek.ok());
    EXPECT_EQ(peek->size_bytes, size);
    EXPECT_EQ(peek->data, nullptr);
  }
}

TEST_F(NvmeTierTest, ChunksAndPinsSurviveReopen) {
  const std::string a = Bytes(10000, 1), b = Bytes(50000, 2);
  ASSERT_TRUE(Put("a", a).ok());
  ASSERT_TRUE(Put("b", b, now_ + absl::Hours(1)).ok());
  ASSERT_TRUE(Put("a", b).ok()) << "replacement";
  ASSERT_TRUE(Put("gone", a).ok());
  ASSERT_TRUE(tier_->Delete("gone").ok());
  const uint64_t used = tier_->Usage().used_bytes;
  Reopen();
  EXPECT_EQ(GetBytes("a"), b);
  EXPECT_EQ(GetBytes("b"), b);
  EXPECT_FALSE(tier_->Contains("gone"));
  EXPECT_TRUE(tier_->Peek("b")->pinned);
  EXPECT_EQ(tier_->Usage().chunks, 2u);
  EXPECT_EQ(tier_->Usage().used_bytes, used)
      << "extents of replaced and deleted chunks are free after reopen";
}

TEST_F(NvmeTierTest, RecencyOfReadsSurvivesReopen) {
  for (const std::string key : {"a", "b", "c"}) {
    ASSERT_TRUE(Put(key, Bytes(kB, key[0])).ok());
    now_ += absl::Milliseconds(10);
  }
  // Read in reverse, within a second: these access times reach the index
  // at shutdown, not one write per read.
  for (const std::string key : {"c", "b", "a"}) {
    GetBytes(key);
    now_ += absl::Milliseconds(10);
  }
  Reopen();
  EXPECT_EQ(tier_->Keys(), (std::vector<std::string>{"c", "b", "a"}));
}

TEST_F(NvmeTierTest, IndexOfAVersionOneNodeStillLoads) {
  const std::string bytes = Bytes(10000, 7);
  ASSERT_TRUE(tier_
                  ->Put("old", bytes, codec::Crc32c(bytes),
                        absl::InfinitePast(), "parent")
                  .ok());
  tier_.reset();
  {
    // Rewrite the record as a node before version 2 wrote it: the same
    // first 42 bytes, marked version 1.
    rocksdb::DB* raw = nullptr;
    ASSERT_TRUE(rocksdb::DB::Open(rocksdb::Options(),
                                  options_.data_dir + "/index", &raw)
                    .ok());
    std::unique_ptr<rocksdb::DB> db(raw);
    std::string record;
    ASSERT_TRUE(db->Get(rocksdb::ReadOptions(), "old", &record).ok());
    std::string v1 = record.substr(0, 42);
    v1[0] = 1;
    ASSERT_TRUE(db->Put(rocksdb::WriteOptions(), "old", v1).ok());
    ASSERT_TRUE(db->Close().ok());
  }
  Reopen();
  EXPECT_EQ(GetBytes("old"), bytes);
  EXPECT_EQ(tier_->Peek("old")->parent_key, "") << "version 1 had none";
  EXPECT_EQ(tier_->Usage().corrupt_chunks, 0u);
}

TEST_F(NvmeTierTest, DamagedBytesAreDataLossAndDropped) {
  const std::string bytes = Bytes(20000, 3);
  ASSERT_TRUE(Put("x", bytes).ok());
  ASSERT_TRUE(Put("y", bytes).ok());
  tier_.reset();
  // Flip a byte in the first chunk, which the allocator put at offset 0.
  const std::string slab = options_.data_dir + "/slab-000";
  const int fd = open(slab.c_str(), O_RDWR);
  ASSERT_GE(fd, 0);
  char c = 0;
  ASSERT_EQ(pread(fd, &c, 1, 100), 1);
  c ^= 0x5a;
  ASSERT_EQ(pwrite(fd, &c, 1, 100), 1);
  close(fd);
  Reopen();
  int damaged = 0;
  for (const char* key : {"x", "y"}) {
    auto chunk = tier_->Get(key);
    if (chunk.ok()) {
      EXPECT_EQ(chunk->bytes(), bytes);
      continue;
    }
    ++damaged;
    EXPECT_EQ(chunk.status().code(), absl::StatusCode::kDataLoss);
    EXPECT_EQ(tier_->Get(key).status().code(), absl::StatusCode::kNotFound);
  }
  EXPECT_EQ(damaged, 1);
  EXPECT_EQ(tier_->Usage().corrupt_chunks, 1u);
  Reopen();
  EXPECT_EQ(tier_->Usage().chunks, 1u) << "the drop is durable";
}

TEST_F(NvmeTierTest, EvictsLeastRecentlyUsedUnpinnedAndNeverExceedsCapacity) {
  options_.slab_bytes = 4 * kB;
  options_.slab_count = 1;
  Reopen();
  ASSERT_TRUE(Put("a", Bytes(kB, 1)).ok());
  ASSERT_TRUE(Put("b", Bytes(kB, 2)).ok());
  ASSERT_TRUE(Put("c", Bytes(kB, 3), now_ + absl::Minutes(1)).ok());
  ASSERT_TRUE(Put("d", Bytes(kB, 4)).ok());
  GetBytes("a");  // b is now the least recently used
  ASSERT_TRUE(Put("e", Bytes(kB, 5)).ok());
  EXPECT_FALSE(tier_->Contains("b"));
  ASSERT_TRUE(Put("f", Bytes(2 * kB, 6)).ok());
  EXPECT_TRUE(tier_->Contains("c")) << "pinned";
  EXPECT_TRUE(tier_->Contains("f"));
  EXPECT_LE(tier_->Usage().used_bytes, tier_->Usage().capacity_bytes);
  // b, then at least d and a for f; more if the blocks freed were not
  // contiguous.
  EXPECT_GE(tier_->Usage().evictions, 3u);

  // Fill the tier and pin everything in it: no room, and reads go on.
  while (tier_->Usage().used_bytes < tier_->Usage().capacity_bytes) {
    ASSERT_TRUE(
        Put("fill" + std::to_string(tier_->Usage().chunks), Bytes(kB, 9)).ok());
  }
  for (const std::string key :
       {"a", "c", "d", "e", "f", "fill0", "fill1", "fill2", "fill3"}) {
    if (tier_->Contains(key)) {
      ASSERT_TRUE(tier_->Pin(key, absl::Minutes(1)).ok());
    }
  }
  const uint64_t evictions = tier_->Usage().evictions;
  EXPECT_EQ(Put("g", Bytes(kB, 7)).code(),
            absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(tier_->Usage().evictions, evictions) << "nothing pinned evicted";
  EXPECT_EQ(GetBytes("c"), Bytes(kB, 3));
  // An expired pin is no pin.
  now_ += absl::Minutes(2);
  EXPECT_TRUE(Put("g", Bytes(kB, 7)).ok());
  EXPECT_EQ(Put("huge", Bytes(5 * kB, 8)).code(),
            absl::StatusCode::kResourceExhausted);
}

TEST_F(NvmeTierTest, EvictsAPromptFromItsEnd) {
  options_.slab_bytes = 4 * kB;
  options_.slab_count = 1;
  Reopen();
  // p0 <- p1 <- p2, written in order: p0 is the least recently used.
  ASSERT_TRUE(tier_->Put("p0", Bytes(kB, 1), 0, absl::InfinitePast()).ok());
  ASSERT_TRUE(
      tier_->Put("p1", Bytes(kB, 2), 0, absl::InfinitePast(), "p0").ok());
  ASSERT_TRUE(
      tier_->Put("p2", Bytes(kB, 3), 0, absl::InfinitePast(), "p1").ok());
  ASSERT_TRUE(Put("other", Bytes(kB, 4)).ok());
  ASSERT_TRUE(Put("x", Bytes(kB, 5)).ok());
  EXPECT_FALSE(tier_->Contains("p2"));
  EXPECT_TRUE(tier_->Contains("p0"));
  EXPECT_TRUE(tier_->Contains("p1"));
  EXPECT_EQ(tier_->Peek("p1")->parent_key, "p0");
}

TEST_F(NvmeTierTest, PromptLinksSurviveReopen) {
  options_.slab_bytes = 4 * kB;
  options_.slab_count = 1;
  Reopen();
  // p0 <- p1 <- p2, each written a minute after the last: p0 is the least
  // recently used, and would go first by plain LRU.
  const std::pair<const char*, const char*> prompt[] = {
      {"p0", ""}, {"p1", "p0"}, {"p2", "p1"}};
  for (const auto& [key, parent] : prompt) {
    const std::string bytes = Bytes(kB, key[1]);
    ASSERT_TRUE(tier_
                    ->Put(key, bytes, codec::Crc32c(bytes),
                          absl::InfinitePast(), parent)
                    .ok());
    now_ += absl::Minutes(1);
  }
  Reopen();
  EXPECT_EQ(tier_->Peek("p2")->parent_key, "p1");
  now_ += absl::Minutes(1);
  ASSERT_TRUE(Put("other", Bytes(kB, 4)).ok());
  ASSERT_TRUE(Put("x", Bytes(kB, 5)).ok());
  EXPECT_FALSE(tier_->Contains("p2")) << "the prompt's end goes first";
  EXPECT_TRUE(tier_->Contains("p0"));
  EXPECT_TRUE(tier_->Contains("p1"));
  // p1 is a leaf now: next to go, still before p0.
  ASSERT_TRUE(Put("y", Bytes(kB, 6)).ok());
  EXPECT_FALSE(tier_->Contains("p1"));
  EXPECT_TRUE(tier_->Contains("p0"));
}

TEST_F(NvmeTierTest, CodecSummaryIsIndexedForCodecChunksOnly) {
  const codec::ChunkShape shape{2, 40, 2, 8, codec::DType::kBFloat16};
  absl::StatusOr<std::string> stream = codec::EncodeChunk(
      shape, codec::SyntheticChunk(shape, 1), codec::Level::kHigh);
  ASSERT_TRUE(stream.ok()) << stream.status();
  ASSERT_TRUE(Put("codec", *stream).ok());
  ASSERT_TRUE(Put("opaque", Bytes(5000, 2)).ok());
  for (int reopened = 0; reopened < 2; ++reopened) {
    absl::StatusOr<ChunkRef> chunk = tier_->Peek("codec");
    ASSERT_TRUE(chunk.ok()) << chunk.status();
    ASSERT_TRUE(chunk->codec.has_value()) << reopened;
    EXPECT_EQ(chunk->codec->shape, shape);
    EXPECT_EQ(chunk->codec->level, codec::Level::kHigh);
    EXPECT_FALSE(tier_->Peek("opaque")->codec.has_value());
    Reopen();
  }
}

TEST_F(NvmeTierTest, DirectoryThatCannotBeCreatedIsNamed) {
  options_.data_dir = "/proc/kvcache-no-such-dir";
  auto tier = NvmeTier::Open(options_);
  ASSERT_FALSE(tier.ok());
  EXPECT_NE(tier.status().message().find(options_.data_dir), std::string::npos);
}

TEST_F(NvmeTierTest, OwnersAndTheirQuotasSurviveReopen) {
  const std::string bytes = Bytes(kB, 1);
  auto put = [&](const std::string& key, const std::string& owner) {
    return tier_->Put(key, bytes, codec::Crc32c(bytes), absl::InfinitePast(),
                      {}, owner);
  };
  for (int i = 0; i < 6; ++i) {
    ASSERT_TRUE(put("a" + std::to_string(i), "a").ok());
  }
  ASSERT_TRUE(put("b0", "b").ok());
  ASSERT_TRUE(put("none", "").ok());
  // Reopened with a quota of 4 blocks for "a": its chunks and their owners
  // come back from the index, and its next chunk trims it to the quota,
  // oldest first, without touching b's.
  options_.quotas = {{"a", 4 * kB}};
  Reopen();
  EXPECT_EQ(tier_->Peek("a5")->owner, "a");
  EXPECT_EQ(tier_->Peek("none")->owner, "");
  ASSERT_TRUE(put("a6", "a").ok());
  for (int i = 0; i < 3; ++i) {
    EXPECT_FALSE(tier_->Contains("a" + std::to_string(i))) << i;
  }
  for (int i = 3; i < 7; ++i) {
    EXPECT_TRUE(tier_->Contains("a" + std::to_string(i))) << i;
  }
  EXPECT_TRUE(tier_->Contains("b0"));
  const TierUsage usage = tier_->Usage();
  ASSERT_EQ(usage.owners.size(), 2u);
  EXPECT_EQ(usage.owners[0].owner, "a");
  EXPECT_EQ(usage.owners[0].used_bytes, 4 * kB);
  EXPECT_EQ(usage.owners[0].quota_bytes, 4 * kB);
  EXPECT_EQ(usage.owners[1].owner, "b");
  EXPECT_EQ(usage.owners[1].chunks, 1u);
}

TEST_F(NvmeTierTest, PinnedChunksFillingAQuotaAreRefused) {
  options_.quotas = {{"a", 2 * kB}};
  Reopen();
  const std::string bytes = Bytes(kB, 2);
  const absl::Time pin = now_ + absl::Minutes(1);
  ASSERT_TRUE(tier_->Put("a0", bytes, codec::Crc32c(bytes), pin, {}, "a").ok());
  ASSERT_TRUE(tier_->Put("a1", bytes, codec::Crc32c(bytes), pin, {}, "a").ok());
  const absl::Status refused = tier_->Put("a2", bytes, codec::Crc32c(bytes),
                                          absl::InfinitePast(), {}, "a");
  EXPECT_EQ(refused.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_NE(refused.message().find("nvme_quota_bytes"), std::string::npos)
      << refused;
  EXPECT_TRUE(tier_->Contains("a0"));
  EXPECT_TRUE(tier_->Contains("a1"));
}

}  // namespace
}  // namespace kvcache::kvstore
