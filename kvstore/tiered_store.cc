#include "kvstore/tiered_store.h"

#include <cstdio>
#include <utility>

#include "absl/hash/hash.h"
#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"

namespace kvcache::kvstore {
namespace {

std::string KeyPrefix(absl::string_view key) {
  return absl::BytesToHexString(key.substr(0, 8));
}

}  // namespace

TieredStore::TieredStore(const TieredStoreOptions& options, Clock clock)
    : options_(options),
      clock_(clock ? std::move(clock) : Clock([] { return absl::Now(); })) {}

absl::StatusOr<std::unique_ptr<TieredStore>> TieredStore::Open(
    const TieredStoreOptions& options, Clock clock) {
  std::unique_ptr<TieredStore> store(new TieredStore(options, clock));
  absl::StatusOr<std::shared_ptr<HostArena>> arena =
      HostArena::Create(options.cpu_capacity_bytes, options.pin_cpu_memory);
  if (!arena.ok()) return arena.status();
  store->cpu_arena_ = *std::move(arena);
  store->cpu_ = std::make_unique<MemoryTier>(store->cpu_arena_, store->clock_);
  if (options.nvme.has_value()) {
    absl::StatusOr<std::unique_ptr<NvmeTier>> nvme =
        NvmeTier::Open(*options.nvme, store->clock_);
    if (!nvme.ok()) return nvme.status();
    store->nvme_ = std::move(*nvme);
  }
  return store;
}

absl::Mutex& TieredStore::KeyLock(absl::string_view key) const {
  return key_locks_[absl::Hash<absl::string_view>()(key) % key_locks_.size()];
}

bool TieredStore::AdmittedToCpu(uint64_t size) const {
  // In 128-bit-safe form: size / capacity <= percent / 100.
  return static_cast<unsigned __int128>(size) * 100 <=
         static_cast<unsigned __int128>(options_.cpu_capacity_bytes) *
             options_.cpu_max_admit_percent;
}

absl::Status TieredStore::Put(absl::string_view key, std::string bytes,
                              uint32_t crc32c, absl::Duration pin_ttl,
                              absl::string_view parent_key) {
  absl::Time pin_expiry = pin_ttl > absl::ZeroDuration() ? clock_() + pin_ttl
                                                         : absl::InfinitePast();
  {
    absl::Mutex& key_lock = KeyLock(key);
    absl::MutexLock lock(&key_lock);
    if (!AdmittedToCpu(bytes.size()) && !nvme_) {
      return absl::ResourceExhaustedError(absl::StrCat(
          "chunk of ", bytes.size(), " bytes is over ",
          options_.cpu_max_admit_percent, "% of the CPU tier (",
          options_.cpu_capacity_bytes,
          " bytes) and no NVMe tier is configured; raise "
          "cpu_tier.max_admit_percent or configure nvme_tier.data_dir"));
    }
    auto put_nvme = [&]() {
      const absl::Time start = absl::Now();
      absl::Status s = nvme_->Put(key, bytes, crc32c, pin_expiry, parent_key);
      nvme_counters_.write_latency.Record(absl::Now() - start);
      return s;
    };
    if (nvme_) {
      // A pin held by the NVMe copy carries over to the new bytes.
      if (absl::StatusOr<ChunkRef> old = nvme_->Peek(key); old.ok()) {
        pin_expiry = std::max(pin_expiry, old->pin_expiry);
      }
      if (!AdmittedToCpu(bytes.size())) {
        if (absl::Status s = put_nvme(); !s.ok()) return s;
        cpu_->Delete(key);
        return absl::OkStatus();
      }
      absl::Status on_nvme =
          options_.write_through ? put_nvme() : nvme_->Delete(key).status();
      if (!on_nvme.ok()) return on_nvme;
    }
    const absl::Time start = absl::Now();
    absl::Status s = cpu_->PutUntil(
        key, bytes, crc32c, pin_expiry,
        [&](std::vector<EvictedChunk> evicted) {
          Demote(std::move(evicted), &key_lock);
        },
        parent_key);
    cpu_counters_.write_latency.Record(absl::Now() - start);
    if (s.code() == absl::StatusCode::kResourceExhausted && nvme_) {
      // Memory is full of pinned chunks: NVMe takes the chunk instead.
      if (options_.write_through) return absl::OkStatus();
      s = put_nvme();
    }
    return s;
  }
}

void TieredStore::Demote(std::vector<EvictedChunk> evicted, absl::Mutex* held) {
  if (!nvme_) return;
  for (EvictedChunk& victim : evicted) {
    // This runs inside a write holding `held`. Waiting for another key's
    // lock could deadlock with a write demoting the other way, so a victim
    // whose lock is busy is dropped instead: it is only a cache entry.
    absl::Mutex& lock = KeyLock(victim.key);
    const bool already_held = &lock == held;
    if (!already_held && !lock.TryLock()) {
      TierCounters::Add(cpu_counters_.dropped);
      continue;
    }
    absl::Status s;
    // Put again since it was evicted: the newer bytes are authoritative.
    // NVMe may already have the same bytes.
    if (!cpu_->Peek(victim.key).ok() && !nvme_->Contains(victim.key)) {
      const absl::Time start = absl::Now();
      s = nvme_->Put(victim.key, victim.chunk.bytes(), victim.chunk.crc32c,
                     victim.chunk.pin_expiry, victim.chunk.parent_key);
      nvme_counters_.write_latency.Record(absl::Now() - start);
    }
    if (!already_held) lock.Unlock();
    if (s.ok()) {
      TierCounters::Add(cpu_counters_.demotions);
    } else {
      std::fprintf(stderr,
                   "kvcached: chunk %s... evicted from memory and lost: %s\n",
                   KeyPrefix(victim.key).c_str(), s.ToString().c_str());
    }
  }
}

void TieredStore::Promote(absl::string_view key, const ChunkRef& chunk) {
  if (!AdmittedToCpu(chunk.size_bytes)) return;
  absl::Mutex& key_lock = KeyLock(key);
  absl::MutexLock lock(&key_lock);
  // Skip if a Put or another promotion got there first, or the key was
  // deleted or replaced on NVMe since this read.
  absl::StatusOr<ChunkRef> now = nvme_->Peek(key);
  if (cpu_->Peek(key).ok() || !now.ok() || now->crc32c != chunk.crc32c) {
    return;
  }
  // On failure memory is full of pinned chunks; NVMe keeps serving it.
  if (cpu_->PutUntil(
              key, chunk.bytes(), chunk.crc32c, now->pin_expiry,
              [&](std::vector<EvictedChunk> evicted) {
                Demote(std::move(evicted), &key_lock);
              },
              chunk.parent_key)
          .ok()) {
    TierCounters::Add(cpu_counters_.promotions);
  }
}

absl::StatusOr<LocatedChunk> TieredStore::Get(absl::string_view key) {
  absl::Time start = absl::Now();
  if (absl::StatusOr<ChunkRef> chunk = cpu_->Get(key); chunk.ok()) {
    cpu_counters_.read_latency.Record(absl::Now() - start);
    TierCounters::Add(cpu_counters_.hits);
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
  Promote(key, *chunk);
  return LocatedChunk{*std::move(chunk), TierId::kNvme};
}

absl::StatusOr<ChunkRef> TieredStore::GetInMemory(absl::string_view key) {
  absl::StatusOr<LocatedChunk> found = Get(key);
  if (!found.ok()) return found.status();
  if (found->tier == TierId::kCpu) return std::move(found->chunk);
  // Get promoted it unless it was too large or memory was full of pins.
  absl::StatusOr<ChunkRef> promoted = cpu_->Peek(key);
  if (promoted.ok() && promoted->crc32c == found->chunk.crc32c) {
    return promoted;
  }
  return absl::UnavailableError(
      "chunk is on NVMe and cannot be placed in memory");
}

absl::StatusOr<LocatedChunk> TieredStore::Peek(absl::string_view key) const {
  if (absl::StatusOr<ChunkRef> chunk = cpu_->Peek(key); chunk.ok()) {
    return LocatedChunk{*std::move(chunk), TierId::kCpu};
  }
  if (!nvme_) return absl::NotFoundError("chunk not cached");
  absl::StatusOr<ChunkRef> chunk = nvme_->Peek(key);
  if (!chunk.ok()) return chunk.status();
  return LocatedChunk{*std::move(chunk), TierId::kNvme};
}

absl::StatusOr<bool> TieredStore::Delete(absl::string_view key) {
  absl::MutexLock lock(&KeyLock(key));
  bool deleted = cpu_->Delete(key);
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
  absl::StatusOr<absl::Time> in_cpu = cpu_->Pin(key, ttl);
  absl::StatusOr<absl::Time> on_nvme =
      nvme_ ? nvme_->Pin(key, ttl) : absl::NotFoundError("no NVMe tier");
  if (!on_nvme.ok() && !absl::IsNotFound(on_nvme.status()))
    return on_nvme.status();
  if (!in_cpu.ok() && !on_nvme.ok()) return absl::NotFoundError("not cached");
  // The tiers' pins may differ if one was extended earlier; report the
  // later, which is what eviction in the slower tier honours.
  return std::max(in_cpu.ok() ? *in_cpu : absl::InfinitePast(),
                  on_nvme.ok() ? *on_nvme : absl::InfinitePast());
}

absl::Status TieredStore::Unpin(absl::string_view key) {
  absl::MutexLock lock(&KeyLock(key));
  absl::Status in_cpu = cpu_->Unpin(key);
  absl::Status on_nvme =
      nvme_ ? nvme_->Unpin(key) : absl::NotFoundError("no NVMe tier");
  if (!on_nvme.ok() && !absl::IsNotFound(on_nvme)) return on_nvme;
  return in_cpu.ok() ? in_cpu : on_nvme;
}

absl::Status TieredStore::Flush() {
  if (!nvme_) return absl::OkStatus();
  absl::Status first_error;
  size_t written = 0;
  for (const std::string& key : cpu_->Keys()) {
    absl::MutexLock lock(&KeyLock(key));
    absl::StatusOr<ChunkRef> chunk = cpu_->Peek(key);
    if (!chunk.ok() || nvme_->Contains(key)) continue;
    absl::Status s = nvme_->Put(key, chunk->bytes(), chunk->crc32c,
                                chunk->pin_expiry, chunk->parent_key);
    written += s.ok() ? 1 : 0;
    first_error.Update(s);
  }
  std::fprintf(stderr, "kvcached: flushed %zu chunks from memory to NVMe\n",
               written);
  return first_error;
}

uint64_t TieredStore::chunks() const {
  if (!nvme_) return cpu_->Usage().chunks;
  uint64_t only_in_memory = 0;
  for (const std::string& key : cpu_->Keys()) {
    only_in_memory += nvme_->Contains(key) ? 0 : 1;
  }
  return nvme_->Usage().chunks + only_in_memory;
}

std::vector<std::string> TieredStore::Keys() const {
  std::vector<std::string> keys = cpu_->Keys();
  if (!nvme_) return keys;
  for (std::string& key : nvme_->Keys()) {
    if (!cpu_->Peek(key).ok()) keys.push_back(std::move(key));
  }
  return keys;
}

std::vector<TierReport> TieredStore::Report() const {
  std::vector<TierReport> reports = {
      TierReport{TierId::kCpu, cpu_->Usage(), &cpu_counters_}};
  if (nvme_) {
    reports.push_back(
        TierReport{TierId::kNvme, nvme_->Usage(), &nvme_counters_});
  }
  return reports;
}

}  // namespace kvcache::kvstore
