#include "kvstore/tiered_store.h"

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <thread>
#include <utility>

#include "absl/hash/hash.h"
#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"

namespace kvcache::kvstore {
namespace {

std::string KeyPrefix(absl::string_view key) {
  return absl::BytesToHexString(key.substr(0, 8));
}

bool Admitted(uint64_t size, uint64_t capacity, uint32_t percent) {
  // In 128-bit-safe form: size / capacity <= percent / 100.
  return static_cast<unsigned __int128>(size) * 100 <=
         static_cast<unsigned __int128>(capacity) * percent;
}

// Holds a victim's key lock, unless the write demoting it already does.
// Waiting for another key's lock inside a write could deadlock with a write
// demoting the other way, so a busy lock is not waited for.
class VictimLock {
 public:
  VictimLock(absl::Mutex& lock, absl::Span<absl::Mutex* const> held)
      : lock_(lock) {
    for (absl::Mutex* mu : held) already_held_ = already_held_ || mu == &lock;
    owns_ = !already_held_ && lock_.TryLock();
  }
  ~VictimLock() {
    if (owns_) lock_.Unlock();
  }
  bool locked() const { return owns_ || already_held_; }

 private:
  absl::Mutex& lock_;
  bool already_held_ = false;
  bool owns_ = false;
};

}  // namespace

TieredStore::TieredStore(const TieredStoreOptions& options, Clock clock)
    : options_(options),
      clock_(clock ? std::move(clock) : Clock([] { return absl::Now(); })) {}

absl::StatusOr<std::unique_ptr<TieredStore>> TieredStore::Open(
    const TieredStoreOptions& options, Clock clock) {
  std::unique_ptr<TieredStore> store(new TieredStore(options, clock));
  OwnerQuotas gpu_quotas, cpu_quotas, nvme_quotas;
  for (const auto& [owner, quotas] : options.quotas) {
    gpu_quotas[owner] = quotas.gpu_bytes;
    cpu_quotas[owner] = quotas.cpu_bytes;
    nvme_quotas[owner] = quotas.nvme_bytes;
  }
  absl::StatusOr<std::shared_ptr<HostArena>> arena =
      HostArena::Create(options.cpu_capacity_bytes, options.pin_cpu_memory);
  if (!arena.ok()) return arena.status();
  store->cpu_arena_ = *std::move(arena);
  store->cpu_ = std::make_unique<MemoryTier>(store->cpu_arena_, store->clock_,
                                             cpu_quotas);
  if (options.gpu_capacity_bytes > 0) {
    absl::StatusOr<std::shared_ptr<GpuArena>> gpu =
        GpuArena::Create(options.gpu_device, options.gpu_capacity_bytes);
    if (gpu.ok()) {
      store->gpu_arena_ = *std::move(gpu);
      store->gpu_ = std::make_unique<MemoryTier>(store->gpu_arena_,
                                                 store->clock_, gpu_quotas);
    } else {
      std::fprintf(stderr, "kvcached: starting without the GPU tier: %s\n",
                   gpu.status().ToString().c_str());
    }
  }
  if (options.nvme.has_value()) {
    NvmeTierOptions nvme_options = *options.nvme;
    nvme_options.quotas = std::move(nvme_quotas);
    absl::StatusOr<std::unique_ptr<NvmeTier>> nvme =
        NvmeTier::Open(nvme_options, store->clock_);
    if (!nvme.ok()) return nvme.status();
    store->nvme_ = std::move(*nvme);
  }
  if (store->gpu_) store->tiers_.push_back(TierId::kGpu);
  store->tiers_.push_back(TierId::kCpu);
  if (store->nvme_) store->tiers_.push_back(TierId::kNvme);
  return store;
}

absl::Mutex& TieredStore::KeyLock(absl::string_view key) const {
  return key_locks_[absl::Hash<absl::string_view>()(key) % key_locks_.size()];
}

bool TieredStore::AdmittedToCpu(uint64_t size) const {
  return Admitted(size, options_.cpu_capacity_bytes,
                  options_.cpu_max_admit_percent);
}

bool TieredStore::AdmittedToGpu(uint64_t size) const {
  return gpu_ && Admitted(size, gpu_arena_->capacity_bytes(),
                          options_.gpu_max_admit_percent);
}

absl::StatusOr<ChunkRef> TieredStore::PeekTier(TierId tier,
                                               absl::string_view key) const {
  switch (tier) {
    case TierId::kGpu:
      if (gpu_) return gpu_->Peek(key);
      break;
    case TierId::kCpu:
      return cpu_->Peek(key);
    case TierId::kNvme:
      if (nvme_) return nvme_->Peek(key);
      break;
  }
  return absl::NotFoundError("no such tier");
}

absl::Time TieredStore::HeldPin(absl::string_view key) const {
  absl::Time pin = absl::InfinitePast();
  for (TierId tier : tiers_) {
    absl::StatusOr<ChunkRef> chunk = PeekTier(tier, key);
    if (chunk.ok() && chunk->pinned) pin = std::max(pin, chunk->pin_expiry);
  }
  return pin;
}

absl::StatusOr<ChunkRef> TieredStore::OnHost(ChunkRef chunk) const {
  if (!chunk.on_device) return chunk;
  absl::StatusOr<std::shared_ptr<const char>> host =
      gpu_arena_->ReadToHost(chunk.data.get(), chunk.size_bytes);
  if (!host.ok()) return host.status();
  chunk.data = *std::move(host);
  chunk.on_device = false;
  return chunk;
}

absl::Status TieredStore::PutInNvme(absl::string_view key,
                                    const ChunkRef& chunk) {
  const absl::Time start = absl::Now();
  absl::Status s = nvme_->Put(key, chunk.bytes(), chunk.crc32c,
                              chunk.pin_expiry, chunk.parent_key, chunk.owner);
  nvme_counters_.write_latency.Record(absl::Now() - start);
  return s;
}

absl::StatusOr<PutOutcome> TieredStore::Put(absl::string_view key,
                                            std::string bytes, uint32_t crc32c,
                                            absl::Duration pin_ttl,
                                            absl::string_view parent_key,
                                            PutMode mode,
                                            absl::string_view owner) {
  absl::Mutex& key_lock = KeyLock(key);
  absl::MutexLock lock(&key_lock);
  if (mode == PutMode::kKeepExisting && Holds(key)) {
    if (pin_ttl > absl::ZeroDuration()) {
      absl::StatusOr<absl::Time> pinned = PinLocked(key, pin_ttl);
      if (!pinned.ok()) return pinned.status();
    }
    return PutOutcome::kKeptExisting;
  }
  if (absl::Status s = Store(key, std::move(bytes), crc32c, pin_ttl, parent_key,
                             owner, key_lock);
      !s.ok()) {
    return s;
  }
  return PutOutcome::kStored;
}

bool TieredStore::Holds(absl::string_view key) const {
  for (TierId tier : tiers_) {
    if (PeekTier(tier, key).ok()) return true;
  }
  return false;
}

absl::Status TieredStore::Store(absl::string_view key, std::string bytes,
                                uint32_t crc32c, absl::Duration pin_ttl,
                                absl::string_view parent_key,
                                absl::string_view owner,
                                absl::Mutex& key_lock) {
  const uint64_t size = bytes.size();
  absl::Mutex* const held[] = {&key_lock};
  const bool to_gpu = AdmittedToGpu(size);
  if (!to_gpu && !AdmittedToCpu(size) && !nvme_) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "chunk of ", size, " bytes is over ", options_.cpu_max_admit_percent,
        "% of the CPU tier (", options_.cpu_capacity_bytes,
        " bytes) and no NVMe tier is configured; raise "
        "cpu_tier.max_admit_percent or configure nvme_tier.data_dir"));
  }
  // A pin held by an older copy, in any tier, carries over: the session
  // still owns the key.
  ChunkRef chunk;
  chunk.data = std::shared_ptr<const char>(bytes.data(), [](const char*) {});
  chunk.size_bytes = size;
  chunk.crc32c = crc32c;
  chunk.pin_expiry = std::max(HeldPin(key), pin_ttl > absl::ZeroDuration()
                                                ? clock_() + pin_ttl
                                                : absl::InfinitePast());
  chunk.parent_key = std::string(parent_key);
  chunk.owner = std::string(owner);
  if (nvme_ && !to_gpu && !AdmittedToCpu(size)) {
    // Too large for memory: the key keeps its older bytes unless NVMe
    // takes the new ones.
    if (absl::Status s = PutInNvme(key, chunk); !s.ok()) return s;
    cpu_->Delete(key);
    if (gpu_) gpu_->Delete(key);
    return absl::OkStatus();
  }
  if (nvme_) {
    absl::Status on_nvme = options_.write_through ? PutInNvme(key, chunk)
                                                  : nvme_->Delete(key).status();
    if (!on_nvme.ok()) return on_nvme;
  }
  absl::Status s = absl::ResourceExhaustedError("not admitted to memory");
  if (to_gpu) {
    const absl::Time start = absl::Now();
    s = PutInMemory(TierId::kGpu, key, chunk, held);
    gpu_counters_.write_latency.Record(absl::Now() - start);
    if (s.ok()) {
      cpu_->Delete(key);
      return s;
    }
    // Not room even after eviction: the GPU is full of pinned or leased
    // chunks, and the CPU tier takes this one.
    if (!absl::IsResourceExhausted(s)) return s;
  }
  if (gpu_) gpu_->Delete(key);
  if (AdmittedToCpu(size)) {
    const absl::Time start = absl::Now();
    s = PutInMemory(TierId::kCpu, key, chunk, held);
    cpu_counters_.write_latency.Record(absl::Now() - start);
    if (s.ok()) return s;
  }
  // Memory is full of pinned (or leased) chunks: NVMe takes the chunk.
  if (!nvme_ || !absl::IsResourceExhausted(s)) return s;
  return options_.write_through ? absl::OkStatus() : PutInNvme(key, chunk);
}

void TieredStore::DemoteFromGpu(std::vector<EvictedChunk> evicted,
                                absl::Span<absl::Mutex* const> held) {
  for (EvictedChunk& victim : evicted) {
    absl::Mutex& lock = KeyLock(victim.key);
    VictimLock victim_lock(lock, held);
    if (!victim_lock.locked()) {
      TierCounters::Add(gpu_counters_.dropped);
      continue;
    }
    // Nothing to do if the key has newer bytes in the GPU tier again, or
    // the CPU tier already holds these.
    absl::StatusOr<ChunkRef> in_cpu = cpu_->Peek(victim.key);
    if (gpu_->Peek(victim.key).ok() ||
        (in_cpu.ok() && in_cpu->crc32c == victim.chunk.crc32c)) {
      TierCounters::Add(gpu_counters_.demotions);
      continue;
    }
    absl::StatusOr<ChunkRef> chunk = OnHost(victim.chunk);
    absl::Status s = chunk.status();
    if (s.ok()) {
      std::vector<absl::Mutex*> locks(held.begin(), held.end());
      locks.push_back(&lock);
      if (!AdmittedToCpu(chunk->size_bytes) ||
          !PutInMemory(TierId::kCpu, victim.key, *chunk, locks).ok()) {
        s = nvme_
                ? (nvme_->Contains(victim.key) ? absl::OkStatus()
                                               : PutInNvme(victim.key, *chunk))
                : absl::ResourceExhaustedError(
                      "the CPU tier is full of pinned chunks");
      }
    }
    if (s.ok()) {
      TierCounters::Add(gpu_counters_.demotions);
    } else {
      std::fprintf(stderr,
                   "kvcached: chunk %s... evicted from the GPU and lost: %s\n",
                   KeyPrefix(victim.key).c_str(), s.ToString().c_str());
    }
  }
}

void TieredStore::Demote(std::vector<EvictedChunk> evicted,
                         absl::Span<absl::Mutex* const> held) {
  if (!nvme_) return;
  for (EvictedChunk& victim : evicted) {
    VictimLock victim_lock(KeyLock(victim.key), held);
    if (!victim_lock.locked()) {
      TierCounters::Add(cpu_counters_.dropped);
      continue;
    }
    absl::Status s;
    // Put again since it was evicted, or back in the GPU tier: the newer
    // bytes are authoritative. NVMe may already have the same bytes.
    if (!cpu_->Peek(victim.key).ok() &&
        !PeekTier(TierId::kGpu, victim.key).ok() &&
        !nvme_->Contains(victim.key)) {
      s = PutInNvme(victim.key, victim.chunk);
    }
    if (s.ok()) {
      TierCounters::Add(cpu_counters_.demotions);
    } else {
      std::fprintf(stderr,
                   "kvcached: chunk %s... evicted from memory and lost: %s\n",
                   KeyPrefix(victim.key).c_str(), s.ToString().c_str());
    }
  }
}

absl::Status TieredStore::PutInMemory(TierId tier, absl::string_view key,
                                      const ChunkRef& chunk,
                                      absl::Span<absl::Mutex* const> held) {
  const bool gpu = tier == TierId::kGpu;
  return (gpu ? *gpu_ : *cpu_)
      .PutUntil(
          key, chunk.bytes(), chunk.crc32c, chunk.pin_expiry,
          [&](std::vector<EvictedChunk> evicted) {
            if (gpu) {
              DemoteFromGpu(std::move(evicted), held);
            } else {
              Demote(std::move(evicted), held);
            }
          },
          chunk.parent_key, chunk.owner);
}

void TieredStore::Promote(absl::string_view key, const ChunkRef& chunk,
                          TierId from, TierId to) {
  const bool admitted = to == TierId::kGpu ? AdmittedToGpu(chunk.size_bytes)
                                           : AdmittedToCpu(chunk.size_bytes);
  if (!admitted) return;
  absl::Mutex& key_lock = KeyLock(key);
  absl::Mutex* const held[] = {&key_lock};
  absl::MutexLock lock(&key_lock);
  // Skip if a Put or another promotion got there first, or the key was
  // deleted or replaced in `from` since this read.
  absl::StatusOr<ChunkRef> now = PeekTier(from, key);
  if (PeekTier(to, key).ok() || !now.ok() || now->crc32c != chunk.crc32c) {
    return;
  }
  ChunkRef copy = chunk;
  copy.pin_expiry = now->pinned ? now->pin_expiry : absl::InfinitePast();
  // On failure `to` is full of pinned chunks; `from` keeps serving it.
  if (PutInMemory(to, key, copy, held).ok()) {
    TierCounters::Add(to == TierId::kGpu ? gpu_counters_.promotions
                                         : cpu_counters_.promotions);
  }
}

absl::StatusOr<LocatedChunk> TieredStore::Get(absl::string_view key) {
  return Find(key, /*promote_to_gpu=*/true);
}

absl::StatusOr<LocatedChunk> TieredStore::Find(absl::string_view key,
                                               bool promote_to_gpu) {
  absl::Time start = absl::Now();
  if (gpu_) {
    if (absl::StatusOr<ChunkRef> chunk = gpu_->Get(key); chunk.ok()) {
      absl::StatusOr<ChunkRef> on_host = OnHost(*std::move(chunk));
      if (!on_host.ok()) return on_host.status();
      gpu_counters_.read_latency.Record(absl::Now() - start);
      TierCounters::Add(gpu_counters_.hits);
      return LocatedChunk{*std::move(on_host), TierId::kGpu};
    }
    TierCounters::Add(gpu_counters_.misses);
    start = absl::Now();
  }
  if (absl::StatusOr<ChunkRef> chunk = cpu_->Get(key); chunk.ok()) {
    cpu_counters_.read_latency.Record(absl::Now() - start);
    TierCounters::Add(cpu_counters_.hits);
    if (gpu_ && promote_to_gpu) {
      Promote(key, *chunk, TierId::kCpu, TierId::kGpu);
    }
    return LocatedChunk{*std::move(chunk), TierId::kCpu};
  }
  TierCounters::Add(cpu_counters_.misses);
  if (!nvme_) return absl::NotFoundError("chunk not cached");
  start = absl::Now();
  absl::StatusOr<ChunkRef> chunk = nvme_->Get(key);
  if (absl::IsNotFound(chunk.status())) {
    TierCounters::Add(nvme_counters_.misses);
    return chunk.status();
  }
  if (!chunk.ok()) return chunk.status();
  nvme_counters_.read_latency.Record(absl::Now() - start);
  TierCounters::Add(nvme_counters_.hits);
  Promote(key, *chunk, TierId::kNvme, TierId::kCpu);
  return LocatedChunk{*std::move(chunk), TierId::kNvme};
}

absl::StatusOr<LocatedChunk> TieredStore::GetInMemory(absl::string_view key,
                                                      bool accept_device) {
  if (gpu_ && accept_device) {
    if (absl::StatusOr<ChunkRef> chunk = gpu_->Get(key); chunk.ok()) {
      TierCounters::Add(gpu_counters_.hits);
      return LocatedChunk{*std::move(chunk), TierId::kGpu};
    }
  }
  // No promotion to GPU: the worker reads the CPU copy in place anyway, and
  // promoting a prefix longer than the GPU tier as it is located would push
  // out the very chunks the same fetch reads next.
  absl::StatusOr<LocatedChunk> found = Find(key, /*promote_to_gpu=*/false);
  if (!found.ok()) return found.status();
  if (found->tier == TierId::kCpu) return found;
  // Get promoted an NVMe hit unless it was too large or memory was full of
  // pins; a GPU hit gets a copy in the CPU tier here.
  if (found->tier == TierId::kGpu) {
    Promote(key, found->chunk, TierId::kGpu, TierId::kCpu);
  }
  absl::StatusOr<ChunkRef> in_cpu = cpu_->Peek(key);
  if (in_cpu.ok() && in_cpu->crc32c == found->chunk.crc32c) {
    return LocatedChunk{*std::move(in_cpu), TierId::kCpu};
  }
  return absl::UnavailableError("chunk cannot be placed in the CPU tier");
}

void TieredStore::ReadUpFromNvme(absl::Span<const std::string> keys,
                                 int parallel) {
  if (nvme_ == nullptr || keys.empty()) return;
  std::atomic<size_t> next{0};
  auto read_up = [&] {
    for (size_t i; (i = next.fetch_add(1)) < keys.size();) {
      (void)GetInMemory(keys[i], /*accept_device=*/false);
    }
  };
  std::vector<std::thread> helpers;
  const size_t threads = std::min<size_t>(std::max(parallel, 1), keys.size());
  for (size_t t = 1; t < threads; ++t) helpers.emplace_back(read_up);
  read_up();
  for (std::thread& helper : helpers) helper.join();
}

absl::StatusOr<LocatedChunk> TieredStore::Peek(absl::string_view key) const {
  for (TierId tier : tiers_) {
    absl::StatusOr<ChunkRef> chunk = PeekTier(tier, key);
    if (chunk.ok()) {
      // Device memory is no use to callers of Peek.
      if (chunk->on_device) chunk->data = nullptr;
      return LocatedChunk{*std::move(chunk), tier};
    }
    if (!absl::IsNotFound(chunk.status())) return chunk.status();
  }
  return absl::NotFoundError("chunk not cached");
}

absl::StatusOr<bool> TieredStore::Delete(absl::string_view key) {
  absl::MutexLock lock(&KeyLock(key));
  bool deleted = cpu_->Delete(key);
  if (gpu_) deleted = gpu_->Delete(key) || deleted;
  if (nvme_) {
    absl::StatusOr<bool> on_nvme = nvme_->Delete(key);
    if (!on_nvme.ok()) return on_nvme.status();
    deleted = deleted || *on_nvme;
  }
  return deleted;
}

absl::StatusOr<absl::Time> TieredStore::Pin(absl::string_view key,
                                            absl::Duration ttl) {
  absl::MutexLock lock(&KeyLock(key));
  return PinLocked(key, ttl);
}

absl::StatusOr<absl::Time> TieredStore::PinLocked(absl::string_view key,
                                                  absl::Duration ttl) {
  // The tiers' pins may differ if one was extended earlier; report the
  // latest, which is what eviction in the slower tier honours.
  std::optional<absl::Time> expiry;
  auto note = [&](const absl::StatusOr<absl::Time>& pinned) {
    if (pinned.ok()) expiry = std::max(expiry.value_or(*pinned), *pinned);
  };
  if (gpu_) note(gpu_->Pin(key, ttl));
  note(cpu_->Pin(key, ttl));
  if (nvme_) {
    absl::StatusOr<absl::Time> on_nvme = nvme_->Pin(key, ttl);
    if (!on_nvme.ok() && !absl::IsNotFound(on_nvme.status())) {
      return on_nvme.status();
    }
    note(on_nvme);
  }
  if (!expiry.has_value()) return absl::NotFoundError("not cached");
  return *expiry;
}

absl::Status TieredStore::Unpin(absl::string_view key) {
  absl::MutexLock lock(&KeyLock(key));
  bool found = cpu_->Unpin(key).ok();
  if (gpu_) found = gpu_->Unpin(key).ok() || found;
  if (nvme_) {
    absl::Status on_nvme = nvme_->Unpin(key);
    if (!on_nvme.ok() && !absl::IsNotFound(on_nvme)) return on_nvme;
    found = found || on_nvme.ok();
  }
  return found ? absl::OkStatus() : absl::NotFoundError("chunk not cached");
}

absl::Status TieredStore::Flush() {
  if (!nvme_) return absl::OkStatus();
  absl::Status first_error;
  size_t written = 0;
  for (TierId tier : {TierId::kGpu, TierId::kCpu}) {
    if (tier == TierId::kGpu && !gpu_) continue;
    MemoryTier& memory = tier == TierId::kGpu ? *gpu_ : *cpu_;
    for (const std::string& key : memory.Keys()) {
      absl::MutexLock lock(&KeyLock(key));
      absl::StatusOr<ChunkRef> chunk = memory.Peek(key);
      if (!chunk.ok() || nvme_->Contains(key)) continue;
      chunk = OnHost(*std::move(chunk));
      absl::Status s = chunk.ok() ? PutInNvme(key, *chunk) : chunk.status();
      written += s.ok() ? 1 : 0;
      first_error.Update(s);
    }
  }
  std::fprintf(stderr, "kvcached: flushed %zu chunks from memory to NVMe\n",
               written);
  return first_error;
}

uint64_t TieredStore::LargestChunkFor(const std::string& owner) const {
  auto quotas = options_.quotas.find(owner);
  if (quotas == options_.quotas.end()) return UINT64_MAX;
  const TierQuotas& q = quotas->second;
  const std::pair<bool, uint64_t> tiers[] = {{gpu_ != nullptr, q.gpu_bytes},
                                             {true, q.cpu_bytes},
                                             {nvme_ != nullptr, q.nvme_bytes}};
  uint64_t largest = 0;
  for (const auto& [present, quota] : tiers) {
    if (!present) continue;
    if (quota == 0) return UINT64_MAX;
    largest = std::max(largest, quota);
  }
  return largest;
}

uint64_t TieredStore::chunks() const {
  uint64_t count = nvme_ ? nvme_->Usage().chunks : 0;
  for (const std::string& key : cpu_->Keys()) {
    count += nvme_ && nvme_->Contains(key) ? 0 : 1;
  }
  if (gpu_) {
    for (const std::string& key : gpu_->Keys()) {
      count += cpu_->Peek(key).ok() || (nvme_ && nvme_->Contains(key)) ? 0 : 1;
    }
  }
  return count;
}

std::vector<std::string> TieredStore::Keys() const {
  std::vector<std::string> keys = cpu_->Keys();
  if (gpu_) {
    for (std::string& key : gpu_->Keys()) {
      if (!cpu_->Peek(key).ok()) keys.push_back(std::move(key));
    }
  }
  if (nvme_) {
    for (std::string& key : nvme_->Keys()) {
      if (!cpu_->Peek(key).ok() && !PeekTier(TierId::kGpu, key).ok()) {
        keys.push_back(std::move(key));
      }
    }
  }
  return keys;
}

std::vector<TierReport> TieredStore::Report() const {
  std::vector<TierReport> reports;
  if (gpu_) {
    reports.push_back(TierReport{TierId::kGpu, gpu_->Usage(), &gpu_counters_});
  }
  reports.push_back(TierReport{TierId::kCpu, cpu_->Usage(), &cpu_counters_});
  if (nvme_) {
    reports.push_back(
        TierReport{TierId::kNvme, nvme_->Usage(), &nvme_counters_});
  }
  return reports;
}

}  // namespace kvcache::kvstore
