// An in-memory tier (the CPU tier, or the GPU tier): chunk bytes in a
// ChunkArena (one region reserved at start-up, no allocation per chunk),
// evicting the least recently used unpinned chunk to make room.
//
// Chunks are immutable once stored and handed out as shared references, so a
// Get can stream a chunk without holding the tier's lock while a concurrent
// Put evicts it; the arena space of such a chunk is reused once the reader
// lets go. Pins (a chat session's history) keep a chunk from eviction until
// they lapse; an expired pin is treated as no pin.
//
// Chunks have owners (tenants), and an owner may have a quota of bytes in
// the tier: a chunk of an owner at its quota first evicts that owner's own
// least recently used chunks, and room for one owner's chunk is never taken
// from another owner within its quota (the order is in eviction_order.h).
//
// Thread-safe: all methods may be called concurrently.
#ifndef KVCACHE_KVSTORE_MEMORY_TIER_H_
#define KVCACHE_KVSTORE_MEMORY_TIER_H_

#include <cstdint>
#include <functional>
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
#include "kvstore/chunk_arena.h"
#include "kvstore/chunk_ref.h"
#include "kvstore/eviction_order.h"
#include "kvstore/prefix_links.h"

namespace kvcache::kvstore {

class MemoryTier {
 public:
  using Clock = std::function<absl::Time()>;
  // Receives chunks evicted to make room, to move them to a slower tier.
  // Called without the tier's lock; the chunks' arena space is reused once
  // it returns and drops them.
  using EvictionSink = std::function<void(std::vector<EvictedChunk>)>;

  // Holds chunks in `arena`, whose capacity is the tier's. `clock` defaults
  // to absl::Now; tests pass their own to age pins. `quotas`: the bytes each
  // owner's chunks may hold here.
  explicit MemoryTier(std::shared_ptr<ChunkArena> arena, Clock clock = nullptr,
                      const OwnerQuotas& quotas = {});

  MemoryTier(const MemoryTier&) = delete;
  MemoryTier& operator=(const MemoryTier&) = delete;

  // Copies `bytes` (host memory) into the arena under `key`, replacing any
  // chunk already there, and makes it the most recently used. Evicts least
  // recently used unpinned chunks as needed, handing them to `sink` (if any).
  // If `pin_ttl` is positive the chunk is stored pinned for that long.
  // RESOURCE_EXHAUSTED if the chunk cannot fit even after evicting every
  // unpinned chunk; if that is clear up front, nothing is evicted, and the
  // key keeps its previous bytes in any case.
  // `parent_key` names the chunk this one extends in its prompt (empty if
  // none): eviction takes chunks no other held chunk extends first, least
  // recently used among them, so a prefix shrinks from its end.
  // If `bytes` are a codec stream, the chunk keeps its codec summary.
  // `owner` (empty: none) owns the chunk. If it has a quota here, its own
  // least recently used unpinned chunks are evicted first until the chunk
  // fits the quota; RESOURCE_EXHAUSTED naming the quota, with nothing
  // evicted, if the chunk is larger than the quota or the owner's pinned
  // chunks leave it no room.
  absl::Status Put(absl::string_view key, absl::string_view bytes,
                   uint32_t crc32c,
                   absl::Duration pin_ttl = absl::ZeroDuration(),
                   const EvictionSink& sink = nullptr,
                   absl::string_view parent_key = {},
                   absl::string_view owner = {});

  // Like Put with a pin that lapses at `pin_expiry` (InfinitePast: none);
  // for chunks coming back from a slower tier with their pin.
  absl::Status PutUntil(absl::string_view key, absl::string_view bytes,
                        uint32_t crc32c, absl::Time pin_expiry,
                        const EvictionSink& sink = nullptr,
                        absl::string_view parent_key = {},
                        absl::string_view owner = {});

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
    EvictionOrder::Place place;
  };

  bool IsPinned(const Entry& entry) const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Arena bytes that eviction could free for a chunk of `owner` replacing
  // `replaced_key`.
  uint64_t ReclaimableBytes(absl::string_view replaced_key,
                            absl::string_view owner) const
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Bytes `owner` would hold with a chunk of `size` bytes in place of
  // `replaced_key`'s, minus its quota; 0 if that fits or it has no quota.
  uint64_t OverQuota(absl::string_view owner, uint64_t size,
                     absl::string_view replaced_key) const
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Bytes of `owner`'s pinned chunks, but `replaced_key`'s.
  uint64_t PinnedBytes(absl::string_view owner, absl::string_view replaced_key)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Unlinks `owner`'s own unpinned chunks (never `keep`) until a chunk of
  // `size` bytes replacing `keep` fits its quota, or none is left, and
  // appends them to `victims`.
  void EvictToQuota(absl::string_view owner, uint64_t size,
                    absl::string_view keep, std::vector<EvictedChunk>* victims)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Unlinks unpinned chunks (never `keep`) holding at least `bytes` of
  // arena, at least one if any, that room for a chunk of `owner` may take
  // (EvictionOrder), and appends them to `victims`: least recently used
  // first among chunks no held chunk extends, then among the rest.
  void EvictFor(uint64_t bytes, absl::string_view keep, absl::string_view owner,
                std::vector<EvictedChunk>* victims)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Unlinks the chunk if it may go now, appending it to `victims`, and
  // returns its arena bytes (0 if it stays).
  uint64_t TakeVictim(const std::string& key, bool leaves_only,
                      absl::string_view keep,
                      std::vector<EvictedChunk>* victims)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void Erase(absl::flat_hash_map<std::string, Entry>::iterator it)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  // Names the tier and its config section in errors.
  absl::string_view tier_name() const;
  absl::string_view config_section() const;
  absl::string_view quota_field() const;

  const std::shared_ptr<ChunkArena> arena_;
  const Clock clock_;

  mutable absl::Mutex mu_;
  absl::flat_hash_map<std::string, Entry> entries_ ABSL_GUARDED_BY(mu_);
  EvictionOrder order_ ABSL_GUARDED_BY(mu_);
  // Bytes of the chunks held (their arena extents are rounded up to blocks).
  uint64_t used_bytes_ ABSL_GUARDED_BY(mu_) = 0;
  PrefixLinks links_ ABSL_GUARDED_BY(mu_);
  uint64_t evictions_ ABSL_GUARDED_BY(mu_) = 0;
};

}  // namespace kvcache::kvstore

#endif  // KVCACHE_KVSTORE_MEMORY_TIER_H_
