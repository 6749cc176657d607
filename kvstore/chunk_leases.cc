#include "kvstore/chunk_leases.h"

#include <sys/random.h>

#include <algorithm>
#include <utility>

#include "absl/time/clock.h"

namespace kvcache::kvstore {
namespace {

// Lease ids are random, so that one worker cannot guess, and release,
// another's lease. Early in boot, when the kernel has no randomness yet, a
// counter mixed with the time still gives distinct ids.
uint64_t RandomId(uint64_t fallback) {
  uint64_t id = 0;
  if (getrandom(&id, sizeof(id), 0) == sizeof(id)) return id;
  uint64_t x = fallback ^ static_cast<uint64_t>(absl::ToUnixNanos(absl::Now()));
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;  // splitmix64's finalizer
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

}  // namespace

ChunkLeases::ChunkLeases(uint64_t max_bytes, uint64_t max_bytes_per_owner,
                         Clock clock)
    : max_bytes_(max_bytes),
      max_bytes_per_owner_(std::min(max_bytes, max_bytes_per_owner)),
      clock_(clock ? std::move(clock) : Clock([] { return absl::Now(); })) {}

ChunkLeases::Lease ChunkLeases::Grant(const std::string& owner,
                                      std::vector<ChunkRef> chunks,
                                      absl::Duration ttl) {
  const absl::Time now = clock_();
  absl::MutexLock lock(&mu_);
  DropExpired(now);
  const uint64_t room = std::min(max_bytes_ - held_bytes_,
                                 max_bytes_per_owner_ - OwnerBytes(owner));
  Held held;
  held.owner = owner;
  for (const ChunkRef& chunk : chunks) {
    if (held.bytes + chunk.size_bytes > room) break;
    held.bytes += chunk.size_bytes;
    held.chunks.push_back(chunk);
  }
  if (held.chunks.empty()) return Lease{};
  held.expiry = now + ttl;
  uint64_t id = 0;
  while (id == 0 || leases_.contains(id)) id = RandomId(++ids_drawn_);
  Lease lease{id, held.expiry, held.chunks.size()};
  held_bytes_ += held.bytes;
  owner_bytes_[owner] += held.bytes;
  leases_.emplace(lease.id, std::move(held));
  return lease;
}

bool ChunkLeases::Release(const std::string& owner, uint64_t id) {
  const absl::Time now = clock_();
  absl::MutexLock lock(&mu_);
  DropExpired(now);
  auto it = leases_.find(id);
  if (it == leases_.end() || it->second.owner != owner) return false;
  Drop(it->second);
  leases_.erase(it);
  return true;
}

uint64_t ChunkLeases::held_bytes() const {
  absl::MutexLock lock(&mu_);
  return held_bytes_;
}

uint64_t ChunkLeases::held_bytes(const std::string& owner) const {
  absl::MutexLock lock(&mu_);
  return OwnerBytes(owner);
}

uint64_t ChunkLeases::room_bytes(const std::string& owner) {
  const absl::Time now = clock_();
  absl::MutexLock lock(&mu_);
  DropExpired(now);
  return std::min(max_bytes_ - held_bytes_,
                  max_bytes_per_owner_ - OwnerBytes(owner));
}

uint64_t ChunkLeases::OwnerBytes(const std::string& owner) const {
  auto it = owner_bytes_.find(owner);
  return it == owner_bytes_.end() ? 0 : it->second;
}

void ChunkLeases::Drop(const Held& held) {
  held_bytes_ -= held.bytes;
  auto it = owner_bytes_.find(held.owner);
  it->second -= held.bytes;
  if (it->second == 0) owner_bytes_.erase(it);
}

size_t ChunkLeases::live_leases() const {
  absl::MutexLock lock(&mu_);
  return leases_.size();
}

void ChunkLeases::DropExpired(absl::Time now) {
  absl::erase_if(leases_, [&](const auto& entry) {
    if (entry.second.expiry > now) return false;
    Drop(entry.second);
    return true;
  });
}

}  // namespace kvcache::kvstore
