// The NVMe tier: chunks in preallocated slab files on a local disk, durable
// across restarts and crashes.
//
// Layout of nvme_tier.data_dir:
//   slab-000 ... slab-NNN   slab files of slab_bytes each, opened O_DIRECT
//                           and read/written through io_uring
//   index/                  RocksDB: key -> extent, size, CRC32C, access
//                           time, pin, parent key, codec summary (format
//                           in chunk_index.h)
//
// Durability order: a chunk's bytes are written and synced (fdatasync)
// before its index record is written (synced), and the chunk is visible only
// after that. A crash therefore leaves either no record (the extent is free
// again on restart, since the allocator is rebuilt from the index alone) or a
// record over complete bytes. Removal runs the other way: the record is
// deleted (synced) before the extent may be reused, and an extent stays
// allocated while a reader is still reading it.
//
// Every read is checked against the recorded CRC32C; a mismatch drops the
// chunk, logs it, counts it in corrupt_chunks and answers DATA_LOSS. The
// in-memory map answers Peek/Contains, so lookups never touch RocksDB.
// Reads update access times in memory; those reach the index in unsynced
// batches, written while reads go on (once 1024 chunks were read, at the
// first read a second after the last batch, and at clean shutdown), so
// after a crash recency is rebuilt from access times about that stale.
//
// kvstore/nvme_tier_power_loss_test.cc checks that order by losing every
// unsynced slab write at random points; tests/integration/crash_loop_test.cc
// kill -9s a daemon mid-write hundreds of times.
//
// Eviction is LRU over unpinned chunks (a pin whose expiry passed is no pin),
// taking chunks that no held chunk extends first (the parent links that
// puts carry; each chunk's record keeps its parent, and opening the tier
// rebuilds the links from the records, so a restarted node still shrinks
// cached prompts from their end); this is the last tier, so evicted chunks
// are dropped. Chunks have owners, kept in their records, and owners may
// have quotas here, enforced as in the memory tiers (eviction_order.h); a
// restart with a lower quota trims an owner down to it at the next eviction.
//
// Thread-safe. Concurrent writes (Put, Delete) of the same key are
// serialised by the caller (TieredStore); everything else may run
// concurrently. Destroy only when no call is in flight.
#ifndef KVCACHE_KVSTORE_NVME_TIER_H_
#define KVCACHE_KVSTORE_NVME_TIER_H_

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "absl/types/span.h"
#include "kvstore/chunk_index.h"
#include "kvstore/chunk_ref.h"
#include "kvstore/codec_summary.h"
#include "kvstore/eviction_order.h"
#include "kvstore/extent_allocator.h"
#include "kvstore/file_io.h"
#include "kvstore/prefix_links.h"
#include "kvstore/uring_file_io.h"

namespace kvcache::kvstore {

struct NvmeTierOptions {
  std::string data_dir;
  uint64_t slab_bytes = 1 << 30;
  uint32_t slab_count = 4;
  uint32_t queue_depth = 32;
  // The slab I/O, not owned; it must outlive the tier. Null: the tier's own
  // UringFileIo with `queue_depth`. Tests pass one that can lose power.
  FileIo* file_io = nullptr;
  // Bytes of chunk data each owner may hold in the tier.
  OwnerQuotas quotas;
};

class NvmeTier {
 public:
  using Clock = std::function<absl::Time()>;

  // Creates or reopens the tier in options.data_dir and rebuilds the
  // in-memory map, recency and parent links from the index; records that
  // are damaged, out of bounds or overlapping are dropped and logged.
  // FAILED_PRECONDITION naming the directory if it cannot be used (no O_DIRECT
  // support, e.g. tmpfs; index locked by another process); RESOURCE_EXHAUSTED
  // if the slabs cannot be preallocated.
  static absl::StatusOr<std::unique_ptr<NvmeTier>> Open(
      const NvmeTierOptions& options, Clock clock = nullptr);
  ~NvmeTier();

  NvmeTier(const NvmeTier&) = delete;
  NvmeTier& operator=(const NvmeTier&) = delete;

  // Stores `bytes` durably under `key`, replacing any chunk there, pinned
  // until `pin_expiry` (InfinitePast: not pinned). Evicts least recently
  // used unpinned chunks for room. RESOURCE_EXHAUSTED if it cannot fit even
  // then, or the disk is full; the tier is then unchanged except for what was
  // evicted.
  // `parent_key`: the chunk this one extends in its prompt, if known. The
  // codec summary, if `bytes` are a codec stream, is read here and indexed.
  // `owner` (empty: none) owns the chunk: if it has a quota here, its own
  // least recently used unpinned chunks go first until the chunk fits it;
  // RESOURCE_EXHAUSTED naming the quota, with nothing evicted, if its
  // pinned chunks leave no room in the quota. Puts of one owner running at
  // once may each make room for themselves only, leaving it over its quota
  // by the chunks that were in flight until its next put trims it back.
  absl::Status Put(absl::string_view key, absl::string_view bytes,
                   uint32_t crc32c, absl::Time pin_expiry,
                   absl::string_view parent_key = {},
                   absl::string_view owner = {});

  // Reads and verifies the chunk, making it the most recently used.
  // NOT_FOUND if absent; DATA_LOSS if its bytes on disk are damaged (the
  // chunk is then dropped).
  absl::StatusOr<ChunkRef> Get(absl::string_view key);

  // The chunk's description without its bytes and without touching recency;
  // NOT_FOUND if absent. In-memory only.
  absl::StatusOr<ChunkRef> Peek(absl::string_view key) const;
  bool Contains(absl::string_view key) const;

  // Every key held, least recently used first.
  std::vector<std::string> Keys() const;

  // Removes the chunk; false if it was not there.
  absl::StatusOr<bool> Delete(absl::string_view key);

  // Pins until now + ttl (extending, never shortening, a live pin); returns
  // the expiry. NOT_FOUND if absent.
  absl::StatusOr<absl::Time> Pin(absl::string_view key, absl::Duration ttl);
  absl::Status Unpin(absl::string_view key);

  TierUsage Usage() const;

 private:
  // An extent in use; returned to the allocator when the last holder (the
  // map, or a reader mid-read) lets go.
  using ExtentLease = std::shared_ptr<const Extent>;

  struct Entry {
    ExtentLease extent;
    uint64_t size_bytes = 0;
    uint32_t crc32c = 0;
    absl::Time pin_expiry = absl::InfinitePast();
    absl::Time last_access;
    std::string parent_key;
    std::optional<CodecSummary> codec;
    std::string owner;
    EvictionOrder::Place place;
  };
  using EntryMap = absl::flat_hash_map<std::string, Entry>;

  NvmeTier(const NvmeTierOptions& options, Clock clock);
  absl::Status OpenSlabs();
  absl::Status LoadIndex();

  ExtentLease Lease(const Extent& extent);
  // Allocates room for a chunk of `owner` of `bytes`, evicting as needed.
  absl::StatusOr<ExtentLease> MakeRoom(uint64_t bytes, absl::string_view owner);
  // Drops least recently used unpinned chunks that room for a chunk of
  // `owner` may take (EvictionOrder) until at least `bytes` more would be
  // free, at least one. False if nothing can be evicted.
  absl::StatusOr<bool> EvictFor(uint64_t bytes, absl::string_view owner);
  // Drops `owner`'s own least recently used unpinned chunks until a chunk
  // of `size` bytes replacing `key`'s fits its quota. RESOURCE_EXHAUSTED,
  // dropping nothing, if its pinned chunks leave no room.
  absl::Status EvictToQuota(absl::string_view owner, uint64_t size,
                            absl::string_view key);
  // Bytes `owner` would hold with a chunk of `size` bytes in place of
  // `key`'s, minus its quota; 0 if that fits or it has no quota.
  uint64_t OverQuota(absl::string_view owner, uint64_t size,
                     absl::string_view key) const
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Unlinks the chunk unless it is pinned or, in the `leaves_only` pass,
  // extended, adding it to `victims` and its extent to `freed`; returns
  // the extent's length (0 if it stays).
  uint64_t TakeVictim(const std::string& key, bool leaves_only,
                      std::vector<std::string>* victims,
                      std::vector<ExtentLease>* freed)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Deletes the records of unlinked `victims`; false if there are none.
  absl::StatusOr<bool> DropVictims(absl::Span<const std::string> victims)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::Status WriteDurably(const Extent& extent, absl::string_view bytes);
  IndexRecord RecordOf(const Entry& entry) const;
  bool IsPinned(const Entry& entry) const;
  ChunkRef RefOf(const Entry& entry) const;
  // Removes the entry from the map; the caller deletes its index record.
  ExtentLease Unlink(EntryMap::iterator it) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void DropCorrupt(absl::string_view key, const ExtentLease& extent,
                   absl::string_view why);
  // The index writes of every change but access times: synced, and each
  // supersedes the key's unsaved access.
  absl::Status WriteRecord(absl::string_view key, const Entry& entry)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::Status DeleteRecords(absl::Span<const std::string> keys)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Writes the records of the chunks read since the last call to the index
  // in one batch. Releases `lock`, which holds mu_, before writing.
  void SaveAccessTimes(absl::ReleasableMutexLock& lock)
      ABSL_UNLOCK_FUNCTION(mu_);

  const NvmeTierOptions options_;
  const Clock clock_;
  std::vector<int> slab_fds_;
  // The tier's own io_uring, unless options.file_io was given.
  std::unique_ptr<UringFileIo> own_io_;
  FileIo* io_ = nullptr;
  std::unique_ptr<ChunkIndex> index_;
  // Leases refer back to the allocator, so it outlives the map below.
  std::unique_ptr<ExtentAllocator> allocator_;

  // Held across index writes so the index and the map change together.
  mutable absl::Mutex mu_;
  // Taken (after mu_) around every index write, and held past mu_ by a
  // batch of access times, so index writes land in the order the map
  // changed.
  absl::Mutex index_mu_ ABSL_ACQUIRED_AFTER(mu_);
  EntryMap entries_ ABSL_GUARDED_BY(mu_);
  EvictionOrder order_ ABSL_GUARDED_BY(mu_);
  uint64_t stored_bytes_ ABSL_GUARDED_BY(mu_) = 0;
  PrefixLinks links_ ABSL_GUARDED_BY(mu_);
  // The records of chunks read since accesses_saved_at_, with their new
  // access times, waiting to be written in one batch.
  absl::flat_hash_map<std::string, IndexRecord> unsaved_accesses_
      ABSL_GUARDED_BY(mu_);
  absl::Time accesses_saved_at_ ABSL_GUARDED_BY(mu_) = absl::InfinitePast();
  uint64_t evictions_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t corrupt_chunks_ ABSL_GUARDED_BY(mu_) = 0;
};

}  // namespace kvcache::kvstore

#endif  // KVCACHE_KVSTORE_NVME_TIER_H_
