// Space management for the NVMe tier's slab files.
//
// Choice: variable-length extents in units of 4 KiB blocks (the O_DIRECT
// alignment), best-fit from a free list that coalesces neighbours on free.
// Chunks range from a few KiB to hundreds of MiB and are read in one piece,
// so a chunk needs one contiguous extent; fixed-size extents would either
// waste most of a large slot on small chunks or split big chunks into many
// reads. Best fit keeps large runs intact for large chunks; coalescing keeps
// fragmentation from growing without bound. Waste per chunk is < 4 KiB.
//
// Thread-safe: all methods may be called concurrently.
#ifndef KVCACHE_KVSTORE_EXTENT_ALLOCATOR_H_
#define KVCACHE_KVSTORE_EXTENT_ALLOCATOR_H_

#include <cstdint>
#include <map>
#include <set>
#include <tuple>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"

namespace kvcache::kvstore {

inline constexpr uint64_t kBlockBytes = 4096;

// `bytes` rounded up to whole blocks.
inline uint64_t RoundUpToBlock(uint64_t bytes) {
  return (bytes + kBlockBytes - 1) / kBlockBytes * kBlockBytes;
}

// A run of blocks in one slab. `length` is a multiple of kBlockBytes.
struct Extent {
  uint32_t slab = 0;
  uint64_t offset = 0;
  uint64_t length = 0;

  friend bool operator==(const Extent& a, const Extent& b) {
    return std::tie(a.slab, a.offset, a.length) ==
           std::tie(b.slab, b.offset, b.length);
  }
};

class ExtentAllocator {
 public:
  // `slab_count` slabs of `slab_bytes` (a multiple of kBlockBytes), all free.
  ExtentAllocator(uint32_t slab_count, uint64_t slab_bytes);

  ExtentAllocator(const ExtentAllocator&) = delete;
  ExtentAllocator& operator=(const ExtentAllocator&) = delete;

  // The smallest free run that holds `bytes` (rounded up to blocks), or
  // RESOURCE_EXHAUSTED if no single free run is large enough.
  absl::StatusOr<Extent> Allocate(uint64_t bytes);

  // Marks `extent` used; for rebuilding the allocator from the index at
  // start-up. FAILED_PRECONDITION if it is out of bounds, misaligned or
  // overlaps space already used (the index entry is then not trustworthy).
  absl::Status Claim(const Extent& extent);

  // Returns `extent` (from Allocate or Claim) to the free list.
  void Free(const Extent& extent);

  uint64_t used_bytes() const;
  uint64_t capacity_bytes() const { return capacity_bytes_; }
  // The longest free run, i.e. the largest chunk Allocate can place now.
  uint64_t largest_free_run() const;

 private:
  // (slab, offset) -> length of the free run starting there.
  using FreeRuns = std::map<std::pair<uint32_t, uint64_t>, uint64_t>;

  void AddFreeRun(uint32_t slab, uint64_t offset, uint64_t length)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void RemoveFreeRun(FreeRuns::iterator it) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  const uint64_t slab_bytes_;
  const uint64_t capacity_bytes_;

  mutable absl::Mutex mu_;
  FreeRuns by_position_ ABSL_GUARDED_BY(mu_);
  // (length, slab, offset) of every free run, for best fit.
  std::set<std::tuple<uint64_t, uint32_t, uint64_t>> by_length_
      ABSL_GUARDED_BY(mu_);
  uint64_t free_bytes_ ABSL_GUARDED_BY(mu_) = 0;
};

}  // namespace kvcache::kvstore

#endif  // KVCACHE_KVSTORE_EXTENT_ALLOCATOR_H_
