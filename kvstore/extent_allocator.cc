#include "kvstore/extent_allocator.h"

#include <iterator>

#include "absl/strings/str_cat.h"

namespace kvcache::kvstore {

ExtentAllocator::ExtentAllocator(uint32_t slab_count, uint64_t slab_bytes)
    : slab_bytes_(slab_bytes), capacity_bytes_(slab_bytes * slab_count) {
  absl::MutexLock lock(&mu_);
  for (uint32_t slab = 0; slab < slab_count; ++slab) {
    AddFreeRun(slab, 0, slab_bytes);
  }
}

void ExtentAllocator::AddFreeRun(uint32_t slab, uint64_t offset,
                                 uint64_t length) {
  if (length == 0) return;
  by_position_.emplace(std::make_pair(slab, offset), length);
  by_length_.emplace(length, slab, offset);
  free_bytes_ += length;
}

void ExtentAllocator::RemoveFreeRun(FreeRuns::iterator it) {
  by_length_.erase({it->second, it->first.first, it->first.second});
  free_bytes_ -= it->second;
  by_position_.erase(it);
}

absl::StatusOr<Extent> ExtentAllocator::Allocate(uint64_t bytes) {
  const uint64_t length = RoundUpToBlock(bytes == 0 ? 1 : bytes);
  absl::MutexLock lock(&mu_);
  auto fit = by_length_.lower_bound({length, 0, 0});
  if (fit == by_length_.end()) {
    return absl::ResourceExhaustedError(
        absl::StrCat("no free run of ", length, " bytes in the NVMe slabs (",
                     capacity_bytes_ - free_bytes_, " of ", capacity_bytes_,
                     " bytes used)"));
  }
  const auto [run_length, slab, offset] = *fit;
  RemoveFreeRun(by_position_.find({slab, offset}));
  AddFreeRun(slab, offset + length, run_length - length);
  return Extent{slab, offset, length};
}

absl::Status ExtentAllocator::Claim(const Extent& extent) {
  if (extent.length == 0 || extent.length % kBlockBytes != 0 ||
      extent.offset % kBlockBytes != 0 || extent.length > slab_bytes_ ||
      extent.offset > slab_bytes_ - extent.length) {
    return absl::FailedPreconditionError(absl::StrCat(
        "extent slab=", extent.slab, " offset=", extent.offset,
        " length=", extent.length, " is misaligned or outside a slab of ",
        slab_bytes_, " bytes"));
  }
  absl::MutexLock lock(&mu_);
  // The free run that would contain the extent starts at or before it.
  auto it = by_position_.upper_bound({extent.slab, extent.offset});
  if (it == by_position_.begin()) {
    return absl::FailedPreconditionError("extent overlaps used space");
  }
  --it;
  const auto [slab, run_offset] = it->first;
  const uint64_t run_length = it->second;
  if (slab != extent.slab ||
      extent.offset + extent.length > run_offset + run_length) {
    return absl::FailedPreconditionError(
        absl::StrCat("extent slab=", extent.slab, " offset=", extent.offset,
                     " overlaps space already used"));
  }
  RemoveFreeRun(it);
  AddFreeRun(slab, run_offset, extent.offset - run_offset);
  const uint64_t end = extent.offset + extent.length;
  AddFreeRun(slab, end, run_offset + run_length - end);
  return absl::OkStatus();
}

void ExtentAllocator::Free(const Extent& extent) {
  absl::MutexLock lock(&mu_);
  uint64_t offset = extent.offset;
  uint64_t length = extent.length;
  auto next = by_position_.lower_bound({extent.slab, offset});
  if (next != by_position_.begin()) {
    auto prev = std::prev(next);
    if (prev->first.first == extent.slab &&
        prev->first.second + prev->second == offset) {
      offset = prev->first.second;
      length += prev->second;
      RemoveFreeRun(prev);
    }
  }
  if (next != by_position_.end() && next->first.first == extent.slab &&
      next->first.second == extent.offset + extent.length) {
    length += next->second;
    RemoveFreeRun(next);
  }
  AddFreeRun(extent.slab, offset, length);
}

uint64_t ExtentAllocator::used_bytes() const {
  absl::MutexLock lock(&mu_);
  return capacity_bytes_ - free_bytes_;
}

uint64_t ExtentAllocator::largest_free_run() const {
  absl::MutexLock lock(&mu_);
  return by_length_.empty() ? 0 : std::get<0>(*by_length_.rbegin());
}

}  // namespace kvcache::kvstore
