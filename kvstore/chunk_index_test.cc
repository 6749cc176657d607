#include "kvstore/chunk_index.h"

#include <gtest/gtest.h>

#include <cstdlib>
#include <map>
#include <random>
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

// The fields every record version has.
void ExpectSameVersionOneFields(const IndexRecord& got,
                                const IndexRecord& want) {
  EXPECT_EQ(got.extent, want.extent);
  EXPECT_EQ(got.size_bytes, want.size_bytes);
  EXPECT_EQ(got.crc32c, want.crc32c);
  EXPECT_EQ(got.last_access_unix_ms, want.last_access_unix_ms);
  EXPECT_EQ(got.pin_expiry_unix_ms, want.pin_expiry_unix_ms);
}

TEST(ChunkIndexTest, RecordRoundTripsAndRejectsGarbage) {
  const IndexRecord r = Record(3, 8192, 5000);
  absl::StatusOr<IndexRecord> back = DecodeIndexRecord(EncodeIndexRecord(r));
  ASSERT_TRUE(back.ok()) << back.status();
  ExpectSameVersionOneFields(*back, r);
  EXPECT_FALSE(DecodeIndexRecord("short").ok());
  std::string wrong_version = EncodeIndexRecord(r);
  wrong_version[0] = 9;
  EXPECT_FALSE(DecodeIndexRecord(wrong_version).ok());
}

TEST(ChunkIndexTest, VersionTwoRoundTripsParentAndCodecSummary) {
  IndexRecord r = Record(1, 4096, 70000);
  r.parent_key = std::string(32, '\xab');
  r.codec = CodecSummary{{32, 256, 8, 128, codec::DType::kBFloat16},
                         codec::Level::kCompact};
  const std::string bytes = EncodeIndexRecord(r);
  EXPECT_EQ(bytes.size(), 94u) << "the layout in chunk_index.h";
  EXPECT_EQ(bytes[0], 2) << "version";
  absl::StatusOr<IndexRecord> back = DecodeIndexRecord(bytes);
  ASSERT_TRUE(back.ok()) << back.status();
  ExpectSameVersionOneFields(*back, r);
  EXPECT_EQ(back->parent_key, r.parent_key);
  EXPECT_EQ(back->codec, r.codec);

  // Neither parent nor summary: both stay absent.
  back = DecodeIndexRecord(EncodeIndexRecord(Record(0, 0, 1)));
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_EQ(back->parent_key, "");
  EXPECT_FALSE(back->codec.has_value());
  // A parent key long enough for a multi-byte length.
  r.parent_key = std::string(300, 'p');
  back = DecodeIndexRecord(EncodeIndexRecord(r));
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_EQ(back->parent_key, r.parent_key);
}

TEST(ChunkIndexTest, OwnerEndsTheRecordOnlyWhenThereIsOne) {
  IndexRecord r = Record(1, 4096, 70000);
  r.parent_key = std::string(32, '\xab');
  const std::string unowned = EncodeIndexRecord(r);
  EXPECT_EQ(unowned[42], 0) << "no flag: as written before owners were kept";
  absl::StatusOr<IndexRecord> back = DecodeIndexRecord(unowned);
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_EQ(back->owner, "");

  r.owner = "alice";
  const std::string owned = EncodeIndexRecord(r);
  EXPECT_EQ(owned,
            unowned.substr(0, 42) + '\2' + unowned.substr(43) + '\5' + "alice")
      << "the layout in chunk_index.h";
  back = DecodeIndexRecord(owned);
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_EQ(back->owner, "alice");
  EXPECT_EQ(back->parent_key, r.parent_key);
  for (size_t n = unowned.size(); n < owned.size(); ++n) {
    EXPECT_FALSE(DecodeIndexRecord(owned.substr(0, n)).ok()) << n;
  }
  EXPECT_FALSE(DecodeIndexRecord(unowned.substr(0, 42) + '\2' +
                                 unowned.substr(43) + '\0')
                   .ok())
      << "a flagged owner is never empty";
}

// A record as a version-1 node wrote it, byte by byte.
std::string VersionOneRecord() {
  std::string v1 = {1, 3};  // version, tier (NVMe)
  auto put = [&](auto value) {
    v1.append(reinterpret_cast<const char*>(&value), sizeof(value));
  };
  put(uint32_t{2});             // slab
  put(uint64_t{12288});         // offset
  put(uint64_t{5000});          // size_bytes
  put(uint32_t{0xdeadbeef});    // crc32c
  put(int64_t{1700000000123});  // last access
  put(int64_t{0});              // not pinned
  return v1;
}

TEST(ChunkIndexTest, VersionOneRecordsStillDecode) {
  const std::string v1 = VersionOneRecord();
  ASSERT_EQ(v1.size(), 42u);
  absl::StatusOr<IndexRecord> r = DecodeIndexRecord(v1);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->extent, (Extent{2, 12288, 2 * kBlockBytes}));
  EXPECT_EQ(r->size_bytes, 5000u);
  EXPECT_EQ(r->crc32c, 0xdeadbeef);
  EXPECT_EQ(r->last_access_unix_ms, 1700000000123);
  EXPECT_EQ(r->pin_expiry_unix_ms, 0);
  EXPECT_EQ(r->parent_key, "");
  EXPECT_FALSE(r->codec.has_value());
  EXPECT_FALSE(DecodeIndexRecord(v1 + "x").ok()) << "v1 with a tail";
}

TEST(ChunkIndexTest, TruncatedAndHostileRecordsAreInvalidArgument) {
  IndexRecord r = Record(0, 0, 100);
  r.parent_key = "parent";
  r.codec = CodecSummary{{2, 40, 2, 8, codec::DType::kFloat16},
                         codec::Level::kDefault};
  const std::string good = EncodeIndexRecord(r);
  auto rejected = [](const std::string& bytes) {
    return DecodeIndexRecord(bytes).status().code() ==
           absl::StatusCode::kInvalidArgument;
  };
  // Every cut is caught, wherever it falls; so is anything appended.
  for (size_t n = 0; n < good.size(); ++n) {
    EXPECT_TRUE(rejected(good.substr(0, n))) << n << " bytes";
  }
  EXPECT_TRUE(rejected(good + '\0'));
  for (size_t n = 0; n < 42; ++n) {
    EXPECT_TRUE(rejected(VersionOneRecord().substr(0, n))) << n << " bytes";
  }
  // Single fields with values no writer produces.
  auto with = [&](size_t at, char value) {
    std::string bad = good;
    bad[at] = value;
    return bad;
  };
  EXPECT_TRUE(rejected(with(0, 3))) << "version";
  EXPECT_TRUE(rejected(with(1, 2))) << "tier";
  EXPECT_TRUE(rejected(with(42, 5))) << "unknown flag";
  EXPECT_TRUE(rejected(with(42, 0))) << "summary bytes taken as the parent";
  EXPECT_TRUE(rejected(with(43, 0))) << "zero layers";
  EXPECT_TRUE(rejected(with(59, 7))) << "dtype";
  EXPECT_TRUE(rejected(with(60, 9))) << "level";
  EXPECT_TRUE(rejected(with(60, '\x8b'))) << "level";
  EXPECT_TRUE(rejected(with(61, 100))) << "parent longer than the record";
  std::string huge = good;
  huge.replace(14, 8, std::string(8, '\xff'));
  EXPECT_TRUE(rejected(huge)) << "size that wraps when rounded up to a block";
  // An overlong length varint.
  std::string overlong = good.substr(0, 61) + std::string(10, '\x80') + '\2';
  EXPECT_TRUE(rejected(overlong));
  // Random bytes never crash the decoder.
  std::mt19937 rng(7);
  for (int i = 0; i < 20000; ++i) {
    std::string noise = good;
    for (int flips = 1 + rng() % 4; flips > 0; --flips) {
      noise[rng() % noise.size()] = static_cast<char>(rng());
    }
    noise.resize(rng() % (noise.size() + 8), '\x80');
    DecodeIndexRecord(noise).status().IgnoreError();
  }
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
