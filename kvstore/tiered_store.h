// The storage engine of a node: the tiers a chunk can live in and the policy
// that moves chunks between them. The gRPC service calls only this class.
//
// Tiers, fastest first: GPU (MemoryTier over device memory, present when
// gpu_capacity_bytes is set and the device can be used), CPU (MemoryTier
// over host memory, always present) and NVMe (NvmeTier, present when
// nvme_tier.data_dir is set).
//
// Policy:
//  - Puts land in the fastest tier that admits them. A newer copy of a key
//    in a faster tier replaces any in the slower memory tiers, so a slower
//    tier holds either the same bytes or nothing.
//  - LRU per tier; a chunk evicted from GPU is demoted to CPU, and one
//    evicted from CPU to NVMe, instead of dropped (free when the slower tier
//    already holds the same bytes; dropped only if another write holds its
//    key at that moment); NVMe, the last tier, drops its LRU chunks.
//  - A Get that hits CPU promotes the chunk to GPU, one that hits NVMe
//    promotes it to CPU; the slower copy stays, so the next demotion of it
//    costs nothing.
//  - Pins and TTLs hold in every tier and travel with a chunk when it moves;
//    an expired pin is no pin.
//  - Admission: a chunk over gpu_max_admit_percent of the GPU tier skips
//    it; one over cpu_max_admit_percent of the CPU tier goes straight to
//    NVMe (or is refused without NVMe).
//  - Quotas: every chunk has an owner (the tenant that stored it; empty on
//    an open node), which it keeps through demotion, promotion, restarts
//    and copies to peers. An owner with a quota in a tier makes room for
//    its chunk there by evicting its own least recently used chunks, and
//    never takes room from another owner within its quota
//    (eviction_order.h has the order and the exact guarantee). A tier whose
//    quota the owner's pinned chunks fill refuses the chunk like a tier full
//    of pins, so the next tier down takes it.
//  - write_through: every Put is durable on NVMe before it is acknowledged.
//    Without it, chunks reach NVMe on demotion and at Flush (clean shutdown);
//    a Put replacing a key drops the key's older NVMe copy so a restart
//    never brings back stale bytes.
//
// Thread-safe. Writes to one key (Put, Delete, demotion, promotion) are
// serialised by a striped per-key lock, so tiers never disagree on a key's
// bytes; different keys proceed in parallel.
#ifndef KVCACHE_KVSTORE_TIERED_STORE_H_
#define KVCACHE_KVSTORE_TIERED_STORE_H_

#include <array>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "absl/types/span.h"
#include "kvstore/chunk_ref.h"
#include "kvstore/gpu_arena.h"
#include "kvstore/host_arena.h"
#include "kvstore/memory_tier.h"
#include "kvstore/nvme_tier.h"
#include "kvstore/tier_metrics.h"

namespace kvcache::kvstore {

enum class TierId { kGpu, kCpu, kNvme };

// What a Put does with a key the store already holds: keep the first copy
// (a later writer must not replace cached KV it did not compute), or
// replace it.
enum class PutMode { kKeepExisting, kReplace };
enum class PutOutcome { kStored, kKeptExisting };

// Bytes of one owner's chunks each tier may hold (0: no quota there).
struct TierQuotas {
  uint64_t gpu_bytes = 0;
  uint64_t cpu_bytes = 0;
  uint64_t nvme_bytes = 0;
};

struct TieredStoreOptions {
  uint64_t cpu_capacity_bytes = 1 << 30;
  // A chunk over this percentage of cpu_capacity_bytes skips the CPU tier.
  uint32_t cpu_max_admit_percent = 100;
  // No NVMe tier when absent.
  std::optional<NvmeTierOptions> nvme;
  bool write_through = false;
  // Page-lock the CPU tier for fast copies to a GPU, where one is present.
  bool pin_cpu_memory = true;
  // The GPU tier's device memory on CUDA device `gpu_device`; 0: none. The
  // store opens without it (saying why on stderr) if the device is unusable.
  uint64_t gpu_capacity_bytes = 0;
  int gpu_device = 0;
  // A chunk over this percentage of gpu_capacity_bytes skips the GPU tier.
  uint32_t gpu_max_admit_percent = 25;
  // Quotas by owner; owners not listed have none.
  absl::flat_hash_map<std::string, TierQuotas> quotas;
};

// A chunk and the tier it was found in. Only GetInMemory hands out chunks
// whose data is in the GPU tier (chunk.on_device); elsewhere GPU-tier
// chunks come as host copies, or without data (Peek).
struct LocatedChunk {
  ChunkRef chunk;
  TierId tier = TierId::kCpu;
};

// One tier's state for status output and metrics.
struct TierReport {
  TierId tier;
  TierUsage usage;
  const TierCounters* counters;  // lives as long as the store
};

class TieredStore {
 public:
  using Clock = std::function<absl::Time()>;

  // Opens the tiers; errors are NvmeTier::Open's.
  static absl::StatusOr<std::unique_ptr<TieredStore>> Open(
      const TieredStoreOptions& options, Clock clock = nullptr);

  TieredStore(const TieredStore&) = delete;
  TieredStore& operator=(const TieredStore&) = delete;

  // Stores the chunk (pinned for `pin_ttl` if positive), demoting what the
  // CPU tier evicts for it. With kKeepExisting a key held in any tier keeps
  // its bytes (kKeptExisting; a positive `pin_ttl` still pins it).
  // RESOURCE_EXHAUSTED with the reason if no tier has room (everything
  // pinned, NVMe disk full, the owner's quotas full of its pinned chunks,
  // or over the admission limit without NVMe); the key then keeps its
  // previous bytes, if any. `owner` owns the chunk (a kept chunk keeps its
  // owner).
  absl::StatusOr<PutOutcome> Put(absl::string_view key, std::string bytes,
                                 uint32_t crc32c, absl::Duration pin_ttl,
                                 absl::string_view parent_key = {},
                                 PutMode mode = PutMode::kKeepExisting,
                                 absl::string_view owner = {});

  // The chunk's bytes from the fastest tier holding it (in host memory),
  // promoting it one tier up on a CPU or NVMe hit. NOT_FOUND if absent;
  // DATA_LOSS if the only copy was damaged on disk (it is dropped).
  absl::StatusOr<LocatedChunk> Get(absl::string_view key);
  // Get without promotion to the GPU tier, for background copies to peers
  // (repair, handoff, drain), which must not push out what workers read.
  absl::StatusOr<LocatedChunk> GetForCopy(absl::string_view key) {
    return Find(key, /*promote_to_gpu=*/false);
  }

  // Like Get, but the chunk in place in memory workers on this host map:
  // the GPU tier's if `accept_device` and it is there, else the CPU tier's
  // shared region (copied there from the GPU tier or read up from NVMe
  // first if need be). Unlike Get, a CPU hit is not promoted to the GPU
  // tier. NOT_FOUND if absent; UNAVAILABLE if it cannot be placed in the
  // CPU tier (too large, or memory is full of pinned chunks): Get still
  // serves it.
  absl::StatusOr<LocatedChunk> GetInMemory(absl::string_view key,
                                           bool accept_device);
  // Reads those of `keys` held only on NVMe up into the CPU tier, `parallel`
  // at a time, for a caller about to take each with GetInMemory: reading
  // them one by one leaves the disk idle between chunks. Best effort: a
  // chunk not read up is left to that call, which says why.
  void ReadUpFromNvme(absl::Span<const std::string> keys, int parallel);
  // The CPU tier's memory, which workers on this host may map read-only.
  const HostArena& cpu_arena() const { return *cpu_arena_; }
  // The GPU tier's memory, which workers on this host may open through CUDA
  // IPC; null without a GPU tier.
  const GpuArena* gpu_arena() const { return gpu_arena_.get(); }

  // Where the chunk is, without its bytes and without touching recency.
  // Served from memory only. NOT_FOUND if absent.
  absl::StatusOr<LocatedChunk> Peek(absl::string_view key) const;

  // Removes the chunk from every tier; false if no tier had it.
  absl::StatusOr<bool> Delete(absl::string_view key);

  // Pins the chunk in every tier holding it until now + ttl (extending a
  // live pin); returns the expiry. NOT_FOUND if absent.
  absl::StatusOr<absl::Time> Pin(absl::string_view key, absl::Duration ttl);
  absl::Status Unpin(absl::string_view key);

  // Writes every chunk held only in memory to NVMe, least recently used
  // first, so a clean restart keeps them. No-op without NVMe. Returns the
  // first error after trying every chunk.
  absl::Status Flush();

  // Distinct chunks held (a chunk in two tiers counts once).
  uint64_t chunks() const;
  // The largest chunk `owner`'s quotas let some tier of this store take
  // (UINT64_MAX where a present tier has no quota for it), so a Put can be
  // refused before its bytes are buffered.
  uint64_t LargestChunkFor(const std::string& owner) const;
  // The keys of those chunks, a snapshot in no particular order.
  std::vector<std::string> Keys() const;
  std::vector<TierReport> Report() const;

 private:
  TieredStore(const TieredStoreOptions& options, Clock clock);

  // Get, promoting a CPU hit to the GPU tier only if `promote_to_gpu`.
  absl::StatusOr<LocatedChunk> Find(absl::string_view key, bool promote_to_gpu);
  absl::Mutex& KeyLock(absl::string_view key) const;
  bool AdmittedToCpu(uint64_t size) const;
  bool AdmittedToGpu(uint64_t size) const;
  // The chunk in one tier, without its bytes' recency; NOT_FOUND if that
  // tier does not hold it or is absent.
  absl::StatusOr<ChunkRef> PeekTier(TierId tier, absl::string_view key) const;
  // Whether any tier holds the key.
  bool Holds(absl::string_view key) const;
  // Put's work for a key to (re)write, with `key_lock` (its key lock) held.
  absl::Status Store(absl::string_view key, std::string bytes, uint32_t crc32c,
                     absl::Duration pin_ttl, absl::string_view parent_key,
                     absl::string_view owner, absl::Mutex& key_lock);
  // Pin with the key's lock held.
  absl::StatusOr<absl::Time> PinLocked(absl::string_view key,
                                       absl::Duration ttl);
  // The latest live pin any tier holds on the key (InfinitePast: none).
  absl::Time HeldPin(absl::string_view key) const;
  // `chunk` with its bytes in host memory (copied out of the GPU tier if
  // they are there).
  absl::StatusOr<ChunkRef> OnHost(ChunkRef chunk) const;
  absl::Status PutInNvme(absl::string_view key, const ChunkRef& chunk);
  // Move chunks evicted from the GPU tier to CPU (or NVMe, or let them go),
  // and chunks evicted from CPU to NVMe, from inside a write holding the
  // key locks `held`.
  void DemoteFromGpu(std::vector<EvictedChunk> evicted,
                     absl::Span<absl::Mutex* const> held);
  void Demote(std::vector<EvictedChunk> evicted,
              absl::Span<absl::Mutex* const> held);
  // Puts `chunk` (host bytes) in memory tier `tier` (kGpu or kCpu), with
  // `held` locked, demoting what it evicts to the next tier down.
  absl::Status PutInMemory(TierId tier, absl::string_view key,
                           const ChunkRef& chunk,
                           absl::Span<absl::Mutex* const> held);
  // Copies a chunk found in tier `from` (host bytes) into memory tier `to`,
  // with the pin it has there, unless `to` already holds the key, `to`
  // does not admit it, or `from`'s copy changed meanwhile. The copy in
  // `from` stays.
  void Promote(absl::string_view key, const ChunkRef& chunk, TierId from,
               TierId to);

  const TieredStoreOptions options_;
  const Clock clock_;
  std::shared_ptr<GpuArena> gpu_arena_;
  std::unique_ptr<MemoryTier> gpu_;
  std::shared_ptr<HostArena> cpu_arena_;
  std::unique_ptr<MemoryTier> cpu_;
  std::unique_ptr<NvmeTier> nvme_;
  // The tiers this store has, fastest first: what per-key loops walk, so
  // that a Lookup's peek at every key of a prompt makes no status for a
  // tier the node lacks.
  std::vector<TierId> tiers_;
  TierCounters gpu_counters_;
  TierCounters cpu_counters_;
  TierCounters nvme_counters_;
  mutable std::array<absl::Mutex, 64> key_locks_;
};

}  // namespace kvcache::kvstore

#endif  // KVCACHE_KVSTORE_TIERED_STORE_H_
