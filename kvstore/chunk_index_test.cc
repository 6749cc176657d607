#include "kvstore/chunk_index.h"

#include <gtest/gtest.h>

#include <cstdlib>
#include <map>
#include <string>

namespace kvcache::kvstore {
namespace {

std::string TestDir(const std::string& name) {
  const char* tmp = std::getenv("TEST_TMPDIR");
  return std::string(tmp ? tmp : "/tmp") + "/" + name;
}

IndexRecord Record(uint32_t slab, uint64_t offset, uint64_t size) {
  IndexRecord r;
  r.extent = {slab, offset, RoundUpToBlock(size)};
  r.size_bytes = size;
  r.crc32c = 0xdeadbeef;
  r.last_access_unix_ms = 1700000000123;
  r.pin_expiry_unix_ms = 1700000999000;
  return r;
}

TEST(ChunkIndexTest, RecordRoundTripsAndRejectsGarbage) {
  const IndexRecord r = Record(3, 8192, 5000);
  absl::StatusOr<IndexRecord> back = DecodeIndexRecord(EncodeIndexRecord(r));
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_EQ(back->extent, r.extent);
  EXPECT_EQ(back->size_bytes, r.size_bytes);
  EXPECT_EQ(back->crc32c, r.crc32c);
  EXPECT_EQ(back->last_access_unix_ms, r.last_access_unix_ms);
  EXPECT_EQ(back->pin_expiry_unix_ms, r.pin_expiry_unix_ms);
  EXPECT_FALSE(DecodeIndexRecord("short").ok());
  std::string wrong_version = EncodeIndexRecord(r);
  wrong_version[0] = 9;
  EXPECT_FALSE(DecodeIndexRecord(wrong_version).ok());
}

TEST(ChunkIndexTest, RecordsPersistAcrossReopen) {
  const std::string dir = TestDir("index-persist");
  {
    auto index = ChunkIndex::Open(dir);
    ASSERT_TRUE(index.ok()) << index.status();
    ASSERT_TRUE((*index)->Put("a", Record(0, 0, 10), true).ok());
    ASSERT_TRUE((*index)->Put("b", Record(0, 4096, 10), true).ok());
    ASSERT_TRUE((*index)->Put("c", Record(1, 0, 10), false).ok());
    const std::string gone[] = {"b"};
    ASSERT_TRUE((*index)->Delete(gone).ok());
  }
  auto index = ChunkIndex::Open(dir);
  ASSERT_TRUE(index.ok()) << index.status();
  std::map<std::string, IndexRecord> seen;
  ASSERT_TRUE((*index)
                  ->ForEach([&](absl::string_view key,
                                const absl::StatusOr<IndexRecord>& r) {
                    ASSERT_TRUE(r.ok());
                    seen[std::string(key)] = *r;
                  })
                  .ok());
  ASSERT_EQ(seen.size(), 2u);
  EXPECT_EQ(seen["a"].extent, Record(0, 0, 10).extent);
  EXPECT_EQ(seen["c"].extent.slab, 1u);
}

TEST(ChunkIndexTest, SecondOpenOfTheSameDirectoryIsRefused) {
  const std::string dir = TestDir("index-locked");
  auto first = ChunkIndex::Open(dir);
  ASSERT_TRUE(first.ok());
  auto second = ChunkIndex::Open(dir);
  EXPECT_EQ(second.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(second.status().message().find(dir), std::string::npos);
}

}  // namespace
}  // namespace kvcache::kvstore
