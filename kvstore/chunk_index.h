// The NVMe tier's durable index: chunk key -> where its bytes lie on disk,
// kept in RocksDB so the tier comes back after a restart or a crash.
//
// Record format, version 1 (little-endian, 42 bytes):
//   u8  version (1)        u8  tier (kvcache.v1.Tier, 3 = NVMe)
//   u32 slab               u64 offset in the slab (block aligned)
//   u64 size_bytes         u32 crc32c of the chunk bytes
//   i64 last access, Unix ms   i64 pin expiry, Unix ms (0: not pinned)
// The extent's length is size_bytes rounded up to kBlockBytes. A record that
// does not parse is reported at load time and its key dropped.
//
// Thread-safe: RocksDB serialises writers itself.
#ifndef KVCACHE_KVSTORE_CHUNK_INDEX_H_
#define KVCACHE_KVSTORE_CHUNK_INDEX_H_

#include <cstdint>
#include <functional>
#include <memory>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/types/span.h"
#include "kvstore/extent_allocator.h"

namespace rocksdb {
class DB;
}

namespace kvcache::kvstore {

struct IndexRecord {
  Extent extent;
  uint64_t size_bytes = 0;
  uint32_t crc32c = 0;
  int64_t last_access_unix_ms = 0;
  int64_t pin_expiry_unix_ms = 0;
};

std::string EncodeIndexRecord(const IndexRecord& record);
// INVALID_ARGUMENT if `bytes` is not a version-1 record.
absl::StatusOr<IndexRecord> DecodeIndexRecord(absl::string_view bytes);

class ChunkIndex {
 public:
  // Opens (creating if missing) the RocksDB database in directory `path`.
  // FAILED_PRECONDITION naming the path if RocksDB refuses, e.g. another
  // kvcached holds its lock.
  static absl::StatusOr<std::unique_ptr<ChunkIndex>> Open(
      const std::string& path);
  ~ChunkIndex();

  ChunkIndex(const ChunkIndex&) = delete;
  ChunkIndex& operator=(const ChunkIndex&) = delete;

  // Stores the record. With `sync` it is on disk (WAL fsynced) when this
  // returns; without, a crash may lose it (used for access times only).
  // RESOURCE_EXHAUSTED when the disk is full.
  absl::Status Put(absl::string_view key, const IndexRecord& record, bool sync);

  // Removes the keys in one synced batch; absent keys are ignored.
  absl::Status Delete(absl::Span<const std::string> keys);

  // Calls `visit` for every stored key with its decoded record, or the decode
  // error for a damaged one.
  absl::Status ForEach(
      const std::function<void(absl::string_view key,
                               const absl::StatusOr<IndexRecord>& record)>&
          visit) const;

 private:
  explicit ChunkIndex(std::unique_ptr<rocksdb::DB> db);

  std::unique_ptr<rocksdb::DB> db_;
};

}  // namespace kvcache::kvstore

#endif  // KVCACHE_KVSTORE_CHUNK_INDEX_H_
