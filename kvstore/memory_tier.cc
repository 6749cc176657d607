#include "kvstore/memory_tier.h"

#include <algorithm>
#include <cstring>
#include <optional>
#include <utility>

#include "absl/strings/str_cat.h"
#include "kvstore/codec_summary.h"

namespace kvcache::kvstore {

MemoryTier::MemoryTier(std::shared_ptr<ChunkArena> arena, Clock clock)
    : arena_(std::move(arena)),
      clock_(clock ? std::move(clock) : Clock([] { return absl::Now(); })) {}

absl::string_view MemoryTier::tier_name() const {
  return arena_->on_device() ? "GPU tier" : "CPU tier";
}

absl::string_view MemoryTier::config_section() const {
  return arena_->on_device() ? "gpu_tier" : "cpu_tier";
}

bool MemoryTier::IsPinned(const Entry& entry) const {
  return entry.chunk.pinned && entry.chunk.pin_expiry > clock_();
}

uint64_t MemoryTier::ReclaimableBytes(absl::string_view replaced_key) const {
  uint64_t reclaimable = arena_->capacity_bytes() - arena_->used_bytes();
  for (const auto& [key, entry] : entries_) {
    if (key == replaced_key || !IsPinned(entry)) {
      reclaimable += RoundUpToBlock(entry.chunk.size_bytes);
    }
  }
  return reclaimable;
}

void MemoryTier::EvictFor(uint64_t bytes, absl::string_view keep,
                          std::vector<EvictedChunk>* victims) {
  uint64_t freed = 0;
  for (const bool leaves_only : {true, false}) {
    for (auto victim = lru_.begin(); freed < bytes && victim != lru_.end();) {
      auto it = entries_.find(*victim++);
      if (it->first == keep || IsPinned(it->second) ||
          (leaves_only && links_.Extended(it->first))) {
        continue;
      }
      freed += RoundUpToBlock(it->second.chunk.size_bytes);
      victims->push_back(EvictedChunk{it->first, it->second.chunk});
      Erase(it);
      ++evictions_;
    }
  }
}

void MemoryTier::Erase(absl::flat_hash_map<std::string, Entry>::iterator it) {
  links_.Remove(it->first, it->second.chunk.parent_key);
  used_bytes_ -= it->second.chunk.size_bytes;
  lru_.erase(it->second.recency);
  entries_.erase(it);
}

absl::Status MemoryTier::Put(absl::string_view key, absl::string_view bytes,
                             uint32_t crc32c, absl::Duration pin_ttl,
                             const EvictionSink& sink,
                             absl::string_view parent_key) {
  const absl::Time pin_expiry = pin_ttl > absl::ZeroDuration()
                                    ? clock_() + pin_ttl
                                    : absl::InfinitePast();
  return PutUntil(key, bytes, crc32c, pin_expiry, sink, parent_key);
}

absl::Status MemoryTier::PutUntil(absl::string_view key,
                                  absl::string_view bytes, uint32_t crc32c,
                                  absl::Time pin_expiry,
                                  const EvictionSink& sink,
                                  absl::string_view parent_key) {
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
        " bytes and the rest is pinned or still being read; unpin sessions "
        "or raise ",
        config_section(), ".capacity_bytes"));
  };
  {
    // Checked before evicting anything, so a put that clearly cannot
    // succeed leaves the tier as it was. The scan over every chunk runs only
    // when the arena is short of room.
    absl::MutexLock lock(&mu_);
    if (arena_->capacity_bytes() - arena_->used_bytes() < footprint &&
        ReclaimableBytes(key) < footprint) {
      return no_room();
    }
  }
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
      EvictFor(footprint, key, &victims);
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

  absl::MutexLock lock(&mu_);
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
  links_.Add(key, parent_key);
  lru_.emplace_back(key);
  entries_.emplace(std::string(key), Entry{std::move(chunk), --lru_.end()});
  used_bytes_ += size;
  return absl::OkStatus();
}

absl::StatusOr<ChunkRef> MemoryTier::Get(absl::string_view key) {
  absl::MutexLock lock(&mu_);
  auto it = entries_.find(key);
  if (it == entries_.end()) return absl::NotFoundError("chunk not cached");
  lru_.splice(lru_.end(), lru_, it->second.recency);
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
  return std::vector<std::string>(lru_.begin(), lru_.end());
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
  return usage;
}

}  // namespace kvcache::kvstore
