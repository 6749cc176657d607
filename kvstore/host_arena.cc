#include "kvstore/host_arena.h"

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <string>

#include "absl/strings/str_cat.h"
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

HostArena::~HostArena() {
  if (pinned_) transfer::UnregisterHostMemory(base());
  munmap(base(), capacity_bytes());
  close(fd_);
}

absl::Status HostArena::Write(char* dest, absl::string_view bytes) {
  std::memcpy(dest, bytes.data(), bytes.size());
  return absl::OkStatus();
}

}  // namespace kvcache::kvstore
