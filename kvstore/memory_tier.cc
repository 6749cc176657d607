#include "kvstore/memory_tier.h"

#include <algorithm>
#include <utility>

#include "absl/strings/str_cat.h"

namespace kvcache::kvstore {

MemoryTier::MemoryTier(uint64_t capacity_bytes, Clock clock)
    : capacity_bytes_(capacity_bytes),
      clock_(clock ? std::move(clock) : Clock([] { return absl::Now(); })) {}

bool MemoryTier::IsPinned(const Entry& entry) const {
  return entry.chunk.pinned && entry.chunk.pin_expiry > clock_();
}

uint64_t MemoryTier::ReclaimableBytes(absl::string_view replaced_key) const {
  uint64_t reclaimable = capacity_bytes_ - used_bytes_;
  for (const auto& [key, entry] : entries_) {
    if (key == replaced_key || !IsPinned(entry)) {
      reclaimable += entry.chunk.size_bytes;
    }
  }
  return reclaimable;
}

void MemoryTier::Erase(absl::flat_hash_map<std::string, Entry>::iterator it) {
  used_bytes_ -= it->second.chunk.size_bytes;
  lru_.erase(it->second.recency);
  entries_.erase(it);
}

absl::Status MemoryTier::Put(absl::string_view key, std::string bytes,
                             uint32_t crc32c, absl::Duration pin_ttl,
                             std::vector<EvictedChunk>* evicted) {
  const absl::Time pin_expiry = pin_ttl > absl::ZeroDuration()
                                    ? clock_() + pin_ttl
                                    : absl::InfinitePast();
  return PutUntil(key, std::make_shared<const std::string>(std::move(bytes)),
                  crc32c, pin_expiry, evicted);
}

absl::Status MemoryTier::PutUntil(absl::string_view key,
                                  std::shared_ptr<const std::string> bytes,
                                  uint32_t crc32c, absl::Time pin_expiry,
                                  std::vector<EvictedChunk>* evicted) {
  const uint64_t size = bytes->size();
  if (size > capacity_bytes_) {
    return absl::ResourceExhaustedError(
        absl::StrCat("chunk of ", size, " bytes exceeds the CPU tier's ",
                     "capacity of ", capacity_bytes_, " bytes"));
  }
  absl::MutexLock lock(&mu_);
  // Check before evicting anything, so a put that cannot succeed leaves the
  // tier as it was.
  if (capacity_bytes_ - used_bytes_ < size && ReclaimableBytes(key) < size) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "no room for a chunk of ", size, " bytes: the CPU tier holds ",
        used_bytes_, " of ", capacity_bytes_,
        " bytes and the rest is pinned; unpin sessions or raise "
        "cpu_tier.capacity_bytes"));
  }
  ChunkRef chunk;
  if (auto old = entries_.find(key); old != entries_.end()) {
    // A replacement keeps an existing pin: the session still owns the key.
    chunk.pinned = old->second.chunk.pinned;
    chunk.pin_expiry = old->second.chunk.pin_expiry;
    Erase(old);
  }
  for (auto victim = lru_.begin();
       capacity_bytes_ - used_bytes_ < size && victim != lru_.end();) {
    auto it = entries_.find(*victim++);
    if (IsPinned(it->second)) continue;
    if (evicted != nullptr) {
      evicted->push_back(EvictedChunk{it->first, it->second.chunk});
    }
    Erase(it);
    ++evictions_;
  }
  chunk.bytes = std::move(bytes);
  chunk.size_bytes = size;
  chunk.crc32c = crc32c;
  if (pin_expiry > clock_()) {
    chunk.pinned = true;
    chunk.pin_expiry = std::max(chunk.pin_expiry, pin_expiry);
  }
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
  usage.capacity_bytes = capacity_bytes_;
  usage.chunks = entries_.size();
  usage.evictions = evictions_;
  for (const auto& [key, entry] : entries_) {
    if (IsPinned(entry)) ++usage.pinned_chunks;
  }
  return usage;
}

}  // namespace kvcache::kvstore
