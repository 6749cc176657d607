// The NVMe tier's durable index: chunk key -> where its bytes lie on disk,
// kept in RocksDB so the tier comes back after a restart or a crash.
//
// Record format, version 2 (little-endian):
//   [0]  u8  version (2)              [1]  u8  tier (kvcache.v1.Tier, 3)
//   [2]  u32 slab                     [6]  u64 offset in the slab
//   [14] u64 size_bytes               [22] u32 crc32c of the chunk bytes
//   [26] i64 last access, Unix ms     [34] i64 pin expiry, Unix ms (0: none)
//   [42] u8  flags: bit 0 = a codec summary follows; bit 1 = an owner
//        ends the record; other bits 0
//   [43] codec summary, 18 bytes, if flagged: u32 layers, u32 tokens,
//        u32 kv_heads, u32 head_dim, u8 dtype, u8 level (codec::DType and
//        codec::Level values)
//   then the parent key: its length as a LEB128 varint (0: none), then
//        its bytes
//   then, if flagged, the owner (the tenant whose chunk it is; never
//        empty): its length as a LEB128 varint, then its bytes
// The record ends there. 44 bytes without summary, parent or owner; 94 with
// a summary and a 32-byte parent. Records of chunks without an owner (all
// those written before owners were kept) have bit 1 clear and read as
// chunks without one.
// Version 1 (written before parent keys and summaries were kept) is the
// first 42 bytes with version 1; it still reads, without either.
// The extent's length is size_bytes rounded up to kBlockBytes. A record that
// does not parse is reported at load time and its key dropped.
//
// Thread-safe: RocksDB serialises writers itself.
#ifndef KVCACHE_KVSTORE_CHUNK_INDEX_H_
#define KVCACHE_KVSTORE_CHUNK_INDEX_H_

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>

#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/types/span.h"
#include "kvstore/codec_summary.h"
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
  // The chunk this one extends in its prompt (empty: none), for
  // prefix-aware eviction after a restart.
  std::string parent_key;
  std::optional<CodecSummary> codec;
  // The tenant whose chunk it is (empty: none), whose NVMe quota it counts
  // against after a restart too.
  std::string owner;
};

// Always writes the current version.
std::string EncodeIndexRecord(const IndexRecord& record);
// INVALID_ARGUMENT if `bytes` is not a well-formed version-1 or version-2
// record (truncated, unknown version or flags, impossible values).
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
  // returns; without, a crash may lose it.
  // RESOURCE_EXHAUSTED when the disk is full.
  absl::Status Put(absl::string_view key, const IndexRecord& record, bool sync);
  // Stores the records, keyed, in one batch; `sync` and errors as for Put.
  absl::Status PutAll(
      const absl::flat_hash_map<std::string, IndexRecord>& records, bool sync);

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
