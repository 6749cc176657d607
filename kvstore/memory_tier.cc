#include "kvstore/memory_tier.h"

#include <algorithm>
#include <cstring>
#include <optional>
#include <utility>

#include "absl/strings/str_cat.h"
#include "kvstore/codec_summary.h"

namespace kvcache::kvstore {

MemoryTier::MemoryTier(std::shared_ptr<ChunkArena> arena, Clock clock,
                       const OwnerQuotas& quotas)
    : arena_(std::move(arena)),
      clock_(clock ? std::move(clock) : Clock([] { return absl::Now(); })),
      order_(quotas) {}

absl::string_view MemoryTier::tier_name() const {
  return arena_->on_device() ? "GPU tier" : "CPU tier";
}

absl::string_view MemoryTier::config_section() const {
  return arena_->on_device() ? "gpu_tier" : "cpu_tier";
}

absl::string_view MemoryTier::quota_field() const {
  return arena_->on_device() ? "gpu_quota_bytes" : "cpu_quota_bytes";
}

bool MemoryTier::IsPinned(const Entry& entry) const {
  return entry.chunk.pinned && entry.chunk.pin_expiry > clock_();
}

uint64_t MemoryTier::ReclaimableBytes(absl::string_view replaced_key,
                                      absl::string_view owner) const {
  uint64_t reclaimable = arena_->capacity_bytes() - arena_->used_bytes();
  for (const auto& [key, entry] : entries_) {
    if (key == replaced_key ||
        (!IsPinned(entry) && order_.MayEvictFor(owner, entry.chunk.owner))) {
      reclaimable += RoundUpToBlock(entry.chunk.size_bytes);
    }
  }
  return reclaimable;
}

uint64_t MemoryTier::OverQuota(absl::string_view owner, uint64_t size,
                               absl::string_view replaced_key) const {
  auto old = entries_.find(replaced_key);
  const bool replaces_own =
      old != entries_.end() && old->second.chunk.owner == owner;
  return order_.OverQuota(owner, size,
                          replaces_own ? old->second.chunk.size_bytes : 0);
}

uint64_t MemoryTier::PinnedBytes(absl::string_view owner,
                                 absl::string_view replaced_key) {
  uint64_t pinned = 0;
  // Every chunk is offered twice (leaves first, then all): count it once.
  order_.OfferOwn(owner, [&](const std::string& key, bool leaves_only) {
    const Entry& entry = entries_.find(key)->second;
    if (!leaves_only && key != replaced_key && IsPinned(entry)) {
      pinned += entry.chunk.size_bytes;
    }
    return true;
  });
  return pinned;
}

uint64_t MemoryTier::TakeVictim(const std::string& key, bool leaves_only,
                                absl::string_view keep,
                                std::vector<EvictedChunk>* victims) {
  auto it = entries_.find(key);
  if (it->first == keep || IsPinned(it->second) ||
      (leaves_only && links_.Extended(it->first))) {
    return 0;
  }
  const uint64_t freed = RoundUpToBlock(it->second.chunk.size_bytes);
  victims->push_back(EvictedChunk{it->first, it->second.chunk});
  Erase(it);
  ++evictions_;
  return freed;
}

void MemoryTier::EvictToQuota(absl::string_view owner, uint64_t size,
                              absl::string_view keep,
                              std::vector<EvictedChunk>* victims) {
  if (OverQuota(owner, size, keep) == 0) return;
  order_.OfferOwn(owner, [&](const std::string& key, bool leaves_only) {
    TakeVictim(key, leaves_only, keep, victims);
    return OverQuota(owner, size, keep) > 0;
  });
}

void MemoryTier::EvictFor(uint64_t bytes, absl::string_view keep,
                          absl::string_view owner,
                          std::vector<EvictedChunk>* victims) {
  uint64_t freed = 0;
  order_.OfferForRoom(owner, [&](const std::string& key, bool leaves_only) {
    freed += TakeVictim(key, leaves_only, keep, victims);
    return freed < bytes;
  });
}

void MemoryTier::Erase(absl::flat_hash_map<std::string, Entry>::iterator it) {
  links_.Remove(it->first, it->second.chunk.parent_key);
  used_bytes_ -= it->second.chunk.size_bytes;
  order_.Remove(it->second.place, it->second.chunk.size_bytes);
  entries_.erase(it);
}

absl::Status MemoryTier::Put(absl::string_view key, absl::string_view bytes,
                             uint32_t crc32c, absl::Duration pin_ttl,
                             const EvictionSink& sink,
                             absl::string_view parent_key,
                             absl::string_view owner) {
  const absl::Time pin_expiry = pin_ttl > absl::ZeroDuration()
                                    ? clock_() + pin_ttl
                                    : absl::InfinitePast();
  return PutUntil(key, bytes, crc32c, pin_expiry, sink, parent_key, owner);
}

absl::Status MemoryTier::PutUntil(absl::string_view key,
                                  absl::string_view bytes, uint32_t crc32c,
                                  absl::Time pin_expiry,
                                  const EvictionSink& sink,
                                  absl::string_view parent_key,
                                  absl::string_view owner) {
  const uint64_t size = bytes.size();
  const uint64_t footprint = RoundUpToBlock(std::max<uint64_t>(size, 1));
  if (footprint > arena_->capacity_bytes()) {
    return absl::ResourceExhaustedError(
        absl::StrCat("chunk of ", size, " bytes exceeds the ", tier_name(),
                     "'s capacity of ", arena_->capacity_bytes(), " bytes"));
  }
  auto no_room = [&] {
    return absl::ResourceExhaustedError(absl::StrCat(
        "no room for a chunk of ", size, " bytes: the ", tier_name(), " holds ",
        used_bytes_, " of ", arena_->capacity_bytes(),
        " bytes and the rest is pinned, still being read, or other tenants' "
        "within their quotas; unpin sessions or raise ",
        config_section(), ".capacity_bytes"));
  };
  std::vector<EvictedChunk> over_quota;
  {
    // Checked before evicting anything, so a put that clearly cannot
    // succeed leaves the tier as it was. The scans run only when the owner
    // is at its quota, or the arena short of room.
    absl::MutexLock lock(&mu_);
    if (OverQuota(owner, size, key) > 0) {
      const uint64_t quota = order_.quota(owner);
      const uint64_t pinned = PinnedBytes(owner, key);
      if (pinned + size > quota) {
        return absl::ResourceExhaustedError(absl::StrCat(
            "tenant ", owner, "'s chunk of ", size, " bytes does not fit its ",
            quota_field(), " of ", quota, " bytes in the ", tier_name(), ": ",
            size > quota ? "it is larger than the quota"
                         : absl::StrCat(pinned,
                                        " bytes of its chunks are "
                                        "pinned; unpin sessions"),
            " or raise access.tenants.", quota_field()));
      }
    }
    if (arena_->capacity_bytes() - arena_->used_bytes() < footprint &&
        ReclaimableBytes(key, owner) < footprint) {
      return no_room();
    }
    // The owner's own chunks go first: making room among them may also
    // make the room in the arena.
    EvictToQuota(owner, size, key, &over_quota);
  }
  if (sink && !over_quota.empty()) sink(std::move(over_quota));
  // A pin on the bytes being replaced carries over: the session still owns
  // the key.
  absl::Time carried_pin = absl::InfinitePast();
  std::shared_ptr<char> slice;
  while (slice == nullptr) {
    absl::StatusOr<std::shared_ptr<char>> allocated = arena_->Allocate(size);
    if (allocated.ok()) {
      slice = *std::move(allocated);
      break;
    }
    std::vector<EvictedChunk> victims;
    {
      absl::MutexLock lock(&mu_);
      EvictFor(footprint, key, owner, &victims);
      if (victims.empty()) {
        // Last resort: the bytes this put replaces. Never demoted: they are
        // stale once the put succeeds.
        auto old = entries_.find(key);
        if (old == entries_.end()) return no_room();
        if (old->second.chunk.pinned) {
          carried_pin = std::max(carried_pin, old->second.chunk.pin_expiry);
        }
        Erase(old);
        continue;
      }
    }
    if (sink) sink(std::move(victims));
  }
  if (absl::Status s = arena_->Write(slice.get(), bytes); !s.ok()) return s;
  // Read here, from host bytes: the GPU tier's copy is out of the CPU's
  // reach later.
  const std::optional<CodecSummary> codec = SummarizeChunk(bytes);

  std::vector<EvictedChunk> late_victims;
  absl::ReleasableMutexLock lock(&mu_);
  // Another put of the owner's may have filled its quota meanwhile.
  EvictToQuota(owner, size, key, &late_victims);
  ChunkRef chunk;
  chunk.pin_expiry = carried_pin;
  if (auto old = entries_.find(key); old != entries_.end()) {
    if (old->second.chunk.pinned) {
      chunk.pin_expiry =
          std::max(chunk.pin_expiry, old->second.chunk.pin_expiry);
    }
    Erase(old);
  }
  chunk.pin_expiry = std::max(chunk.pin_expiry, pin_expiry);
  chunk.pinned = chunk.pin_expiry > clock_();
  if (!chunk.pinned) chunk.pin_expiry = absl::InfinitePast();
  chunk.data = std::move(slice);
  chunk.size_bytes = size;
  chunk.crc32c = crc32c;
  chunk.parent_key = std::string(parent_key);
  chunk.codec = codec;
  chunk.on_device = arena_->on_device();
  chunk.owner = std::string(owner);
  links_.Add(key, parent_key);
  std::string stored_key(key);
  const EvictionOrder::Place place = order_.Add(stored_key, chunk.owner, size);
  entries_.emplace(std::move(stored_key), Entry{std::move(chunk), place});
  used_bytes_ += size;
  lock.Release();
  if (sink && !late_victims.empty()) sink(std::move(late_victims));
  return absl::OkStatus();
}

absl::StatusOr<ChunkRef> MemoryTier::Get(absl::string_view key) {
  absl::MutexLock lock(&mu_);
  auto it = entries_.find(key);
  if (it == entries_.end()) return absl::NotFoundError("chunk not cached");
  order_.Touch(it->second.place);
  ChunkRef chunk = it->second.chunk;
  chunk.pinned = IsPinned(it->second);
  return chunk;
}

absl::StatusOr<ChunkRef> MemoryTier::Peek(absl::string_view key) const {
  absl::MutexLock lock(&mu_);
  auto it = entries_.find(key);
  if (it == entries_.end()) return absl::NotFoundError("chunk not cached");
  ChunkRef chunk = it->second.chunk;
  chunk.pinned = IsPinned(it->second);
  return chunk;
}

size_t MemoryTier::LongestPrefix(absl::Span<const std::string> keys) const {
  absl::MutexLock lock(&mu_);
  size_t n = 0;
  while (n < keys.size() && entries_.contains(keys[n])) ++n;
  return n;
}

std::vector<std::string> MemoryTier::Keys() const {
  absl::MutexLock lock(&mu_);
  return std::vector<std::string>(order_.all().begin(), order_.all().end());
}

bool MemoryTier::Delete(absl::string_view key) {
  absl::MutexLock lock(&mu_);
  auto it = entries_.find(key);
  if (it == entries_.end()) return false;
  Erase(it);
  return true;
}

absl::StatusOr<absl::Time> MemoryTier::Pin(absl::string_view key,
                                           absl::Duration ttl) {
  absl::MutexLock lock(&mu_);
  auto it = entries_.find(key);
  if (it == entries_.end()) return absl::NotFoundError("chunk not cached");
  ChunkRef& chunk = it->second.chunk;
  const absl::Time now = clock_();
  chunk.pin_expiry =
      IsPinned(it->second) ? std::max(chunk.pin_expiry, now + ttl) : now + ttl;
  chunk.pinned = true;
  return chunk.pin_expiry;
}

absl::Status MemoryTier::Unpin(absl::string_view key) {
  absl::MutexLock lock(&mu_);
  auto it = entries_.find(key);
  if (it == entries_.end()) return absl::NotFoundError("chunk not cached");
  it->second.chunk.pinned = false;
  it->second.chunk.pin_expiry = absl::InfinitePast();
  return absl::OkStatus();
}

TierUsage MemoryTier::Usage() const {
  absl::MutexLock lock(&mu_);
  TierUsage usage;
  usage.used_bytes = used_bytes_;
  usage.capacity_bytes = arena_->capacity_bytes();
  usage.chunks = entries_.size();
  usage.evictions = evictions_;
  for (const auto& [key, entry] : entries_) {
    if (IsPinned(entry)) ++usage.pinned_chunks;
  }
  usage.owners = order_.Usage();
  return usage;
}

}  // namespace kvcache::kvstore
