// The CPU tier's memory: a ChunkArena over one shared-memory region (a
// memfd), so workers on the same host can map it read-only. Pages are
// committed as they are first written. Where a GPU is present the region is
// registered with CUDA (page-locked), so host-to-device copies out of it run
// at full PCIe speed.
//
// Thread-safe.
#ifndef KVCACHE_KVSTORE_HOST_ARENA_H_
#define KVCACHE_KVSTORE_HOST_ARENA_H_

#include <cstdint>
#include <memory>

#include "absl/status/statusor.h"
#include "kvstore/chunk_arena.h"

namespace kvcache::kvstore {

class HostArena : public ChunkArena {
 public:
  // Reserves `capacity_bytes` (rounded up to 4 KiB). `pin_for_gpu`: register
  // the region with CUDA when a GPU is present (skipped, with a note on
  // stderr, when there is none). RESOURCE_EXHAUSTED if the region cannot be
  // reserved.
  static absl::StatusOr<std::shared_ptr<HostArena>> Create(
      uint64_t capacity_bytes, bool pin_for_gpu);
  ~HostArena() override;

  absl::Status Write(char* dest, absl::string_view bytes) override;
  bool on_device() const override { return false; }

  // The memfd behind the region.
  int fd() const { return fd_; }
  bool pinned() const { return pinned_; }

 private:
  HostArena(int fd, char* base, uint64_t capacity_bytes)
      : ChunkArena(base, capacity_bytes), fd_(fd) {}

  const int fd_;
  bool pinned_ = false;
};

}  // namespace kvcache::kvstore

#endif  // KVCACHE_KVSTORE_HOST_ARENA_H_
