#include "kvstore/chunk_index.h"

#include <rocksdb/db.h>
#include <rocksdb/options.h>
#include <rocksdb/write_batch.h>

#include <cstring>

#include "absl/strings/str_cat.h"

namespace kvcache::kvstore {
namespace {

constexpr uint8_t kRecordVersion = 1;
constexpr uint8_t kTierNvme = 3;  // kvcache.v1.TIER_NVME
constexpr size_t kRecordBytes = 42;

template <typename T>
void Append(std::string& out, T value) {
  // Every supported target is little-endian, which is the record's order.
  out.append(reinterpret_cast<const char*>(&value), sizeof(value));
}

template <typename T>
T Take(const char*& in) {
  T value;
  std::memcpy(&value, in, sizeof(value));
  in += sizeof(value);
  return value;
}

absl::Status FromRocks(const rocksdb::Status& s, absl::string_view what) {
  if (s.ok()) return absl::OkStatus();
  const std::string message =
      absl::StrCat("RocksDB index ", what, ": ", s.ToString());
  if (s.IsNoSpace()) {
    return absl::ResourceExhaustedError(
        absl::StrCat(message, "; free space in nvme_tier.data_dir"));
  }
  return absl::InternalError(message);
}

}  // namespace

std::string EncodeIndexRecord(const IndexRecord& record) {
  std::string out;
  out.reserve(kRecordBytes);
  Append<uint8_t>(out, kRecordVersion);
  Append<uint8_t>(out, kTierNvme);
  Append<uint32_t>(out, record.extent.slab);
  Append<uint64_t>(out, record.extent.offset);
  Append<uint64_t>(out, record.size_bytes);
  Append<uint32_t>(out, record.crc32c);
  Append<int64_t>(out, record.last_access_unix_ms);
  Append<int64_t>(out, record.pin_expiry_unix_ms);
  return out;
}

absl::StatusOr<IndexRecord> DecodeIndexRecord(absl::string_view bytes) {
  if (bytes.size() != kRecordBytes || bytes[0] != kRecordVersion ||
      bytes[1] != kTierNvme) {
    return absl::InvalidArgumentError(
        absl::StrCat("index record of ", bytes.size(),
                     " bytes is not a version-1 NVMe record"));
  }
  const char* in = bytes.data() + 2;
  IndexRecord record;
  record.extent.slab = Take<uint32_t>(in);
  record.extent.offset = Take<uint64_t>(in);
  record.size_bytes = Take<uint64_t>(in);
  record.crc32c = Take<uint32_t>(in);
  record.last_access_unix_ms = Take<int64_t>(in);
  record.pin_expiry_unix_ms = Take<int64_t>(in);
  record.extent.length = RoundUpToBlock(record.size_bytes);
  return record;
}

absl::StatusOr<std::unique_ptr<ChunkIndex>> ChunkIndex::Open(
    const std::string& path) {
  rocksdb::Options options;
  options.create_if_missing = true;
  // The index is small (42 bytes a chunk); keep its memory modest.
  options.write_buffer_size = 8 << 20;
  options.max_background_jobs = 2;
  rocksdb::DB* db = nullptr;
  rocksdb::Status s = rocksdb::DB::Open(options, path, &db);
  if (!s.ok()) {
    return absl::FailedPreconditionError(absl::StrCat(
        "cannot open the chunk index at ", path, ": ", s.ToString(),
        " (is another kvcached using this data_dir?)"));
  }
  return std::unique_ptr<ChunkIndex>(
      new ChunkIndex(std::unique_ptr<rocksdb::DB>(db)));
}

ChunkIndex::ChunkIndex(std::unique_ptr<rocksdb::DB> db) : db_(std::move(db)) {}

ChunkIndex::~ChunkIndex() {
  if (db_) db_->Close().PermitUncheckedError();
}

absl::Status ChunkIndex::Put(absl::string_view key, const IndexRecord& record,
                             bool sync) {
  rocksdb::WriteOptions options;
  options.sync = sync;
  return FromRocks(db_->Put(options, rocksdb::Slice(key.data(), key.size()),
                            EncodeIndexRecord(record)),
                   "write");
}

absl::Status ChunkIndex::Delete(absl::Span<const std::string> keys) {
  if (keys.empty()) return absl::OkStatus();
  rocksdb::WriteBatch batch;
  for (const std::string& key : keys) {
    if (rocksdb::Status s = batch.Delete(key); !s.ok()) {
      return FromRocks(s, "delete");
    }
  }
  rocksdb::WriteOptions options;
  options.sync = true;
  return FromRocks(db_->Write(options, &batch), "delete");
}

absl::Status ChunkIndex::ForEach(
    const std::function<void(
        absl::string_view, const absl::StatusOr<IndexRecord>&)>& visit) const {
  std::unique_ptr<rocksdb::Iterator> it(
      db_->NewIterator(rocksdb::ReadOptions()));
  for (it->SeekToFirst(); it->Valid(); it->Next()) {
    const rocksdb::Slice key = it->key();
    const rocksdb::Slice value = it->value();
    visit(absl::string_view(key.data(), key.size()),
          DecodeIndexRecord(absl::string_view(value.data(), value.size())));
  }
  return FromRocks(it->status(), "scan");
}

}  // namespace kvcache::kvstore
