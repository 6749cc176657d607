#include "kvstore/chunk_index.h"

#include <rocksdb/db.h>
#include <rocksdb/options.h>
#include <rocksdb/write_batch.h>

#include <cstdint>
#include <cstring>

#include "absl/strings/str_cat.h"

namespace kvcache::kvstore {
namespace {

constexpr uint8_t kRecordVersion = 2;
constexpr uint8_t kTierNvme = 3;  // kvcache.v1.TIER_NVME
// Version 1 is exactly these fields; version 2 starts with them.
constexpr size_t kFixedBytes = 42;
constexpr uint8_t kHasCodecSummary = 1;
constexpr uint8_t kHasOwner = 2;
constexpr size_t kCodecSummaryBytes = 18;

template <typename T>
void Append(std::string& out, T value) {
  // Every supported target is little-endian, which is the record's order.
  out.append(reinterpret_cast<const char*>(&value), sizeof(value));
}

void AppendLengthPrefixed(std::string& out, absl::string_view value) {
  uint64_t length = value.size();
  for (; length >= 0x80; length >>= 7) {
    Append<uint8_t>(out, static_cast<uint8_t>(length | 0x80));
  }
  Append<uint8_t>(out, static_cast<uint8_t>(length));
  out.append(value.data(), value.size());
}

// Reads fields off the front of a record; a read past its end fails
// instead of reading out of bounds.
class RecordReader {
 public:
  explicit RecordReader(absl::string_view bytes) : rest_(bytes) {}

  template <typename T>
  bool Take(T& value) {
    if (rest_.size() < sizeof(T)) return false;
    std::memcpy(&value, rest_.data(), sizeof(T));
    rest_.remove_prefix(sizeof(T));
    return true;
  }
  // A LEB128 varint, then that many bytes.
  bool TakeLengthPrefixed(std::string& value) {
    uint64_t length = 0;
    for (int shift = 0;; shift += 7) {
      uint8_t byte = 0;
      // Ten bytes at most, with no bits shifted out of 64.
      if (shift > 63 || !Take(byte) || (shift == 63 && byte > 1)) {
        return false;
      }
      length |= uint64_t{byte & 0x7Fu} << shift;
      if ((byte & 0x80) == 0) break;
    }
    if (length > rest_.size()) return false;
    value = std::string(rest_.substr(0, length));
    rest_.remove_prefix(length);
    return true;
  }
  absl::string_view rest() const { return rest_; }

 private:
  absl::string_view rest_;
};

absl::Status BadRecord(absl::string_view bytes, absl::string_view why) {
  return absl::InvalidArgumentError(
      absl::StrCat("index record of ", bytes.size(),
                   " bytes is not a valid NVMe record: ", why));
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
  out.reserve(kFixedBytes + 1 + kCodecSummaryBytes + 1 +
              record.parent_key.size() + 1 + record.owner.size());
  Append<uint8_t>(out, kRecordVersion);
  Append<uint8_t>(out, kTierNvme);
  Append<uint32_t>(out, record.extent.slab);
  Append<uint64_t>(out, record.extent.offset);
  Append<uint64_t>(out, record.size_bytes);
  Append<uint32_t>(out, record.crc32c);
  Append<int64_t>(out, record.last_access_unix_ms);
  Append<int64_t>(out, record.pin_expiry_unix_ms);
  Append<uint8_t>(out, (record.codec.has_value() ? kHasCodecSummary : 0) |
                           (record.owner.empty() ? 0 : kHasOwner));
  if (record.codec.has_value()) {
    const codec::ChunkShape& shape = record.codec->shape;
    Append<uint32_t>(out, shape.layers);
    Append<uint32_t>(out, shape.tokens);
    Append<uint32_t>(out, shape.kv_heads);
    Append<uint32_t>(out, shape.head_dim);
    Append<uint8_t>(out, static_cast<uint8_t>(shape.dtype));
    Append<uint8_t>(out, static_cast<uint8_t>(record.codec->level));
  }
  AppendLengthPrefixed(out, record.parent_key);
  if (!record.owner.empty()) AppendLengthPrefixed(out, record.owner);
  return out;
}

absl::StatusOr<IndexRecord> DecodeIndexRecord(absl::string_view bytes) {
  RecordReader in(bytes);
  uint8_t version = 0, tier = 0;
  IndexRecord record;
  if (!in.Take(version) || !in.Take(tier) || !in.Take(record.extent.slab) ||
      !in.Take(record.extent.offset) || !in.Take(record.size_bytes) ||
      !in.Take(record.crc32c) || !in.Take(record.last_access_unix_ms) ||
      !in.Take(record.pin_expiry_unix_ms)) {
    return BadRecord(bytes, "truncated");
  }
  if (version != 1 && version != kRecordVersion) {
    return BadRecord(bytes, absl::StrCat("unknown version ", int{version}));
  }
  if (tier != kTierNvme) {
    return BadRecord(bytes, absl::StrCat("tier ", int{tier}, " is not NVMe"));
  }
  // Rounding up to a block must not wrap around.
  if (record.size_bytes > UINT64_MAX - (kBlockBytes - 1)) {
    return BadRecord(bytes, "impossible size");
  }
  record.extent.length = RoundUpToBlock(record.size_bytes);
  if (version == 1) {
    if (!in.rest().empty()) return BadRecord(bytes, "version 1 is 42 bytes");
    return record;
  }
  uint8_t flags = 0;
  if (!in.Take(flags)) return BadRecord(bytes, "truncated");
  if ((flags & ~(kHasCodecSummary | kHasOwner)) != 0) {
    return BadRecord(bytes, absl::StrCat("unknown flags ", int{flags}));
  }
  if (flags & kHasCodecSummary) {
    CodecSummary summary;
    codec::ChunkShape& shape = summary.shape;
    uint8_t dtype = 0, level = 0;
    if (!in.Take(shape.layers) || !in.Take(shape.tokens) ||
        !in.Take(shape.kv_heads) || !in.Take(shape.head_dim) ||
        !in.Take(dtype) || !in.Take(level)) {
      return BadRecord(bytes, "truncated codec summary");
    }
    // A summary only ever describes a shape a codec stream can have.
    shape.dtype = static_cast<codec::DType>(dtype);
    if (!codec::ShapeWithinLimits(shape)) {
      return BadRecord(bytes, "impossible codec summary");
    }
    summary.level = static_cast<codec::Level>(level);
    // An unknown level would be reported to clients as "unknown".
    if (codec::LevelName(summary.level) == "unknown") {
      return BadRecord(bytes, absl::StrCat("unknown codec level ", int{level}));
    }
    record.codec = summary;
  }
  if (!in.TakeLengthPrefixed(record.parent_key)) {
    return BadRecord(bytes, "truncated parent key");
  }
  if (flags & kHasOwner) {
    if (!in.TakeLengthPrefixed(record.owner)) {
      return BadRecord(bytes, "truncated owner");
    }
    // Flagged only when there is one, so each record has one encoding.
    if (record.owner.empty()) return BadRecord(bytes, "empty owner");
  }
  if (!in.rest().empty()) return BadRecord(bytes, "trailing bytes");
  return record;
}

absl::StatusOr<std::unique_ptr<ChunkIndex>> ChunkIndex::Open(
    const std::string& path) {
  rocksdb::Options options;
  options.create_if_missing = true;
  // The index is small (under 100 bytes a chunk); keep its memory modest.
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

absl::Status ChunkIndex::PutAll(
    const absl::flat_hash_map<std::string, IndexRecord>& records, bool sync) {
  if (records.empty()) return absl::OkStatus();
  rocksdb::WriteBatch batch;
  for (const auto& [key, record] : records) {
    if (rocksdb::Status s = batch.Put(key, EncodeIndexRecord(record));
        !s.ok()) {
      return FromRocks(s, "write");
    }
  }
  rocksdb::WriteOptions options;
  options.sync = sync;
  return FromRocks(db_->Write(options, &batch), "write");
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
