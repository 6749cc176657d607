// Reservations of chunks in the shared tiers (CPU, and GPU where there is
// one) for same-host workers (Locate/Release in kvcache.proto). A lease holds
// references to chunks, so their arena extents are not reused, even if the
// chunks are evicted or deleted, until the lease is released or expires; a
// worker can then copy them out of its read-only mapping without a race.
//
// Every lease belongs to an owner (the connection that took it): only the
// owner releases it. The total leased bytes are capped, so workers that
// forget to release cannot keep the tier from making room for long, and so
// are each owner's, so that one worker cannot take the whole allowance from
// the others.
//
// Thread-safe.
#ifndef KVCACHE_KVSTORE_CHUNK_LEASES_H_
#define KVCACHE_KVSTORE_CHUNK_LEASES_H_

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "kvstore/chunk_ref.h"

namespace kvcache::kvstore {

class ChunkLeases {
 public:
  using Clock = std::function<absl::Time()>;

  struct Lease {
    uint64_t id = 0;  // 0: nothing was leased; otherwise random.
    absl::Time expiry;
    // How many of the offered chunks, from the front, the lease holds.
    size_t chunks = 0;
  };

  // `max_bytes`: most chunk bytes all live leases may hold together;
  // `max_bytes_per_owner`: most the leases of one owner may hold.
  ChunkLeases(uint64_t max_bytes, uint64_t max_bytes_per_owner,
              Clock clock = nullptr);

  // Leases to `owner` the longest leading run of `chunks` that fits under
  // both caps, until now + ttl. A chunk leased twice counts twice: the caps
  // bound what workers hold, not what the tier holds.
  Lease Grant(const std::string& owner, std::vector<ChunkRef> chunks,
              absl::Duration ttl);

  // Drops `owner`'s lease; false if it was unknown, had expired, or
  // belongs to another owner (which then keeps it).
  bool Release(const std::string& owner, uint64_t id);

  uint64_t held_bytes() const;
  uint64_t held_bytes(const std::string& owner) const;
  // Chunk bytes a new lease of `owner` could hold now (expired leases let
  // go first).
  uint64_t room_bytes(const std::string& owner);
  size_t live_leases() const;

 private:
  struct Held {
    std::string owner;
    std::vector<ChunkRef> chunks;
    uint64_t bytes = 0;
    absl::Time expiry;
  };

  void DropExpired(absl::Time now) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void Drop(const Held& held) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  uint64_t OwnerBytes(const std::string& owner) const
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  const uint64_t max_bytes_;
  const uint64_t max_bytes_per_owner_;
  const Clock clock_;

  mutable absl::Mutex mu_;
  absl::flat_hash_map<uint64_t, Held> leases_ ABSL_GUARDED_BY(mu_);
  uint64_t held_bytes_ ABSL_GUARDED_BY(mu_) = 0;
  // Owners with live leases only, so the map stays as small as the leases.
  absl::flat_hash_map<std::string, uint64_t> owner_bytes_ ABSL_GUARDED_BY(mu_);
  uint64_t ids_drawn_ ABSL_GUARDED_BY(mu_) = 0;
};

}  // namespace kvcache::kvstore

#endif  // KVCACHE_KVSTORE_CHUNK_LEASES_H_
