#include "kvstore/chunk_arena.h"

#include <sys/random.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>

#include "absl/strings/escaping.h"
#include "absl/time/clock.h"

namespace kvcache::kvstore {
namespace {

std::string RandomRegionId() {
  char bytes[16] = {};
  if (getrandom(bytes, sizeof(bytes), 0) != sizeof(bytes)) {
    // Only early in boot; time and process still tell regions apart.
    const int64_t parts[2] = {absl::ToUnixNanos(absl::Now()), getpid()};
    std::memcpy(bytes, parts, sizeof(bytes));
  }
  return absl::BytesToHexString(absl::string_view(bytes, sizeof(bytes)));
}

}  // namespace

ChunkArena::ChunkArena(char* base, uint64_t capacity_bytes)
    : base_(base), id_(RandomRegionId()), allocator_(1, capacity_bytes) {}

absl::StatusOr<std::shared_ptr<char>> ChunkArena::Allocate(uint64_t bytes) {
  absl::StatusOr<Extent> extent =
      allocator_.Allocate(std::max<uint64_t>(bytes, 1));
  if (!extent.ok()) return extent.status();
  std::shared_ptr<ChunkArena> self = shared_from_this();
  const Extent held = *extent;
  return std::shared_ptr<char>(
      base_ + held.offset,
      [self = std::move(self), held](char*) { self->allocator_.Free(held); });
}

std::optional<uint64_t> ChunkArena::OffsetOf(const char* data) const {
  if (data < base_ || data >= base_ + allocator_.capacity_bytes()) {
    return std::nullopt;
  }
  return static_cast<uint64_t>(data - base_);
}

}  // namespace kvcache::kvstore
