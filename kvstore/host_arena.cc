#include "kvstore/host_arena.h"

#include <sys/mman.h>
#include <sys/random.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <string>

#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "transfer/cuda_devices.h"

namespace kvcache::kvstore {

absl::StatusOr<std::shared_ptr<HostArena>> HostArena::Create(
    uint64_t capacity_bytes, bool pin_for_gpu) {
  const uint64_t size = RoundUpToBlock(std::max<uint64_t>(capacity_bytes, 1));
  auto fail = [&](const char* what) {
    return absl::ResourceExhaustedError(
        absl::StrCat("cannot reserve the CPU tier's ", size, " bytes (", what,
                     ": ", std::strerror(errno), ")"));
  };
  const int fd = memfd_create("kvcache-cpu-tier", MFD_CLOEXEC);
  if (fd < 0) return fail("memfd_create");
  if (ftruncate(fd, static_cast<off_t>(size)) != 0) {
    close(fd);
    return fail("ftruncate");
  }
  void* base = mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  if (base == MAP_FAILED) {
    close(fd);
    return fail("mmap");
  }
  std::shared_ptr<HostArena> arena(
      new HostArena(fd, static_cast<char*>(base), size));
  if (pin_for_gpu) {
    std::string error;
    arena->pinned_ = transfer::RegisterHostMemory(base, size, &error);
    if (!arena->pinned_) {
      std::fprintf(stderr, "kvcached: CPU tier not page-locked: %s\n",
                   error.c_str());
    }
  }
  return arena;
}

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

HostArena::HostArena(int fd, char* base, uint64_t capacity_bytes)
    : fd_(fd),
      base_(base),
      id_(RandomRegionId()),
      allocator_(1, capacity_bytes) {}

std::optional<uint64_t> HostArena::OffsetOf(const char* data) const {
  if (data < base_ || data >= base_ + allocator_.capacity_bytes()) {
    return std::nullopt;
  }
  return static_cast<uint64_t>(data - base_);
}

HostArena::~HostArena() {
  if (pinned_) transfer::UnregisterHostMemory(base_);
  munmap(base_, allocator_.capacity_bytes());
  close(fd_);
}

absl::StatusOr<std::shared_ptr<char>> HostArena::Allocate(uint64_t bytes) {
  absl::StatusOr<Extent> extent =
      allocator_.Allocate(std::max<uint64_t>(bytes, 1));
  if (!extent.ok()) return extent.status();
  std::shared_ptr<HostArena> self = shared_from_this();
  const Extent held = *extent;
  return std::shared_ptr<char>(
      base_ + held.offset,
      [self = std::move(self), held](char*) { self->allocator_.Free(held); });
}

}  // namespace kvcache::kvstore
