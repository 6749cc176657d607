// The in-memory CPU tier: chunk bytes in host memory under a byte budget,
// evicting the least recently used unpinned chunk to make room.
//
// Chunks are immutable once stored and handed out as shared references, so a
// Get can stream a chunk without holding the tier's lock while a concurrent
// Put evicts it. Pins (a chat session's history) keep a chunk from eviction
// until they lapse; an expired pin is treated as no pin.
//
// Thread-safe: all methods may be called concurrently.
#ifndef KVCACHE_KVSTORE_MEMORY_TIER_H_
#define KVCACHE_KVSTORE_MEMORY_TIER_H_

#include <cstdint>
#include <functional>
#include <list>
#include <memory>
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
#include "kvstore/chunk_ref.h"

namespace kvcache::kvstore {

class MemoryTier {
 public:
  using Clock = std::function<absl::Time()>;

  // `clock` defaults to absl::Now; tests pass their own to age pins.
  explicit MemoryTier(uint64_t capacity_bytes, Clock clock = nullptr);

  MemoryTier(const MemoryTier&) = delete;
  MemoryTier& operator=(const MemoryTier&) = delete;

  // Stores `bytes` under `key`, replacing any chunk already there, and makes
  // it the most recently used. Evicts least recently used unpinned chunks as
  // needed. If `pin_ttl` is positive the chunk is stored pinned for that long.
  // RESOURCE_EXHAUSTED if the chunk cannot fit even after evicting every
  // unpinned chunk; the tier is then unchanged. If `evicted` is given, the
  // chunks evicted for room are appended to it (with their pins) so the
  // caller can move them to a slower tier.
  absl::Status Put(absl::string_view key, std::string bytes, uint32_t crc32c,
                   absl::Duration pin_ttl = absl::ZeroDuration(),
                   std::vector<EvictedChunk>* evicted = nullptr);

  // Like Put with a pin that lapses at `pin_expiry` (InfinitePast: none);
  // for chunks coming back from a slower tier with their pin.
  // The bytes are shared, not copied, with whoever else holds them.
  absl::Status PutUntil(absl::string_view key,
                        std::shared_ptr<const std::string> bytes,
                        uint32_t crc32c, absl::Time pin_expiry,
                        std::vector<EvictedChunk>* evicted = nullptr);

  // The chunk under `key`, now the most recently used; NOT_FOUND if absent.
  absl::StatusOr<ChunkRef> Get(absl::string_view key);

  // The chunk without touching its recency; NOT_FOUND if absent. Lookups use
  // it: finding out what is cached must not reorder eviction.
  absl::StatusOr<ChunkRef> Peek(absl::string_view key) const;

  // How many leading keys are present (all of keys[0, n) are).
  size_t LongestPrefix(absl::Span<const std::string> keys) const;

  // Every key held, least recently used first.
  std::vector<std::string> Keys() const;

  // Removes the chunk; false if it was not there.
  bool Delete(absl::string_view key);

  // Pins the chunk until now + ttl (extending, never shortening, an existing
  // pin). NOT_FOUND if absent. Returns the pin's expiry.
  absl::StatusOr<absl::Time> Pin(absl::string_view key, absl::Duration ttl);

  // Clears the chunk's pin; NOT_FOUND if absent.
  absl::Status Unpin(absl::string_view key);

  TierUsage Usage() const;

 private:
  struct Entry {
    ChunkRef chunk;
    std::list<std::string>::iterator recency;  // position in lru_
  };

  bool IsPinned(const Entry& entry) const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Bytes that eviction could free for a chunk replacing `replaced_key`.
  uint64_t ReclaimableBytes(absl::string_view replaced_key) const
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void Erase(absl::flat_hash_map<std::string, Entry>::iterator it)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  const uint64_t capacity_bytes_;
  const Clock clock_;

  mutable absl::Mutex mu_;
  absl::flat_hash_map<std::string, Entry> entries_ ABSL_GUARDED_BY(mu_);
  // Keys from least (front) to most (back) recently used.
  std::list<std::string> lru_ ABSL_GUARDED_BY(mu_);
  uint64_t used_bytes_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t evictions_ ABSL_GUARDED_BY(mu_) = 0;
};

}  // namespace kvcache::kvstore

#endif  // KVCACHE_KVSTORE_MEMORY_TIER_H_
