// The CPU tier's memory: one shared-memory region (a memfd) reserved once at
// start-up and carved into 4 KiB-block extents, so storing a chunk costs no
// heap allocation, and so the region can later be mapped read-only by
// workers on the same host. Pages are committed as they are first written.
// Where a GPU is present the region is registered with CUDA (page-locked),
// so host-to-device copies out of it run at full PCIe speed.
//
// Thread-safe. Slices keep the arena alive: it is released when the owner
// and every outstanding slice are gone.
#ifndef KVCACHE_KVSTORE_HOST_ARENA_H_
#define KVCACHE_KVSTORE_HOST_ARENA_H_

#include <cstdint>
#include <memory>
#include <optional>
#include <string>

#include "absl/status/statusor.h"
#include "kvstore/extent_allocator.h"

namespace kvcache::kvstore {

class HostArena : public std::enable_shared_from_this<HostArena> {
 public:
  // Reserves `capacity_bytes` (rounded up to 4 KiB). `pin_for_gpu`: register
  // the region with CUDA when a GPU is present (skipped, with a note on
  // stderr, when there is none). RESOURCE_EXHAUSTED if the region cannot be
  // reserved.
  static absl::StatusOr<std::shared_ptr<HostArena>> Create(
      uint64_t capacity_bytes, bool pin_for_gpu);
  ~HostArena();

  HostArena(const HostArena&) = delete;
  HostArena& operator=(const HostArena&) = delete;

  // `bytes` of writable arena memory, returned to the arena when the last
  // copy of the pointer is dropped. RESOURCE_EXHAUSTED if no free run is
  // large enough (the caller evicts and retries).
  absl::StatusOr<std::shared_ptr<char>> Allocate(uint64_t bytes);

  // Where `data` (memory this arena allocated) starts in the region, for
  // workers that map it (see transfer/shared_region.h); nullopt for memory
  // that is not the arena's.
  std::optional<uint64_t> OffsetOf(const char* data) const;

  // The memfd behind the region, and a random id that tells this region
  // from that of an earlier or other node.
  int fd() const { return fd_; }
  const std::string& id() const { return id_; }

  uint64_t used_bytes() const { return allocator_.used_bytes(); }
  uint64_t capacity_bytes() const { return allocator_.capacity_bytes(); }
  bool pinned() const { return pinned_; }

 private:
  HostArena(int fd, char* base, uint64_t capacity_bytes);

  const int fd_;
  char* const base_;
  const std::string id_;
  ExtentAllocator allocator_;
  bool pinned_ = false;
};

}  // namespace kvcache::kvstore

#endif  // KVCACHE_KVSTORE_HOST_ARENA_H_
