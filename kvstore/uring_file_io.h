// Block I/O on O_DIRECT files through io_uring.
//
// A chunk's read or write is split into operations of at most `op_bytes`,
// and up to `queue_depth` of them are kept in flight, so one large chunk
// keeps the device's queue busy. A read reports each piece as soon as it and
// all before it have landed, so the caller can checksum it while the rest is
// still being read. Short transfers are resumed; errors come back as the
// errno's status (ENOSPC is RESOURCE_EXHAUSTED).
//
// Thread-safe: several rings serve concurrent callers; each read or write
// takes one ring for its duration, so up to `rings` of them proceed in
// parallel. A sync takes no ring.
#ifndef KVCACHE_KVSTORE_URING_FILE_IO_H_
#define KVCACHE_KVSTORE_URING_FILE_IO_H_

#include <liburing.h>

#include <atomic>
#include <cstdint>
#include <memory>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/functional/function_ref.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "kvstore/file_io.h"

namespace kvcache::kvstore {

struct UringOptions {
  uint32_t rings = 4;
  uint32_t queue_depth = 32;
  uint64_t op_bytes = 1 << 20;
};

class UringFileIo : public FileIo {
 public:
  // UNAVAILABLE (with the kernel's reason) if io_uring cannot be set up, e.g.
  // it is disabled by sysctl kernel.io_uring_disabled or a seccomp profile.
  static absl::StatusOr<std::unique_ptr<UringFileIo>> Create(
      const UringOptions& options);
  ~UringFileIo() override;

  UringFileIo(const UringFileIo&) = delete;
  UringFileIo& operator=(const UringFileIo&) = delete;

  // As FileIo says; a read past the end of the file means the slab is
  // shorter than the index says.
  absl::Status Read(
      int fd, uint64_t offset, char* buffer, uint64_t length,
      absl::FunctionRef<void(absl::string_view)> on_read) override;
  absl::Status Write(int fd, uint64_t offset, const char* buffer,
                     uint64_t length) override;
  absl::Status Sync(int fd) override;

 private:
  struct Ring {
    absl::Mutex mu;
    io_uring ring ABSL_GUARDED_BY(mu);
  };

  explicit UringFileIo(const UringOptions& options) : options_(options) {}
  // Locks a ring that no other call holds, if there is one; else waits for
  // the next one in turn. The caller unlocks it.
  Ring& AcquireRing();
  // Moves the bytes on one ring, calling `on_done` with each operation's
  // piece of `buffer` once it and all before it have completed.
  absl::Status Transfer(bool write, int fd, uint64_t offset, char* buffer,
                        uint64_t length,
                        absl::FunctionRef<void(absl::string_view)> on_done);

  const UringOptions options_;
  std::vector<std::unique_ptr<Ring>> rings_;
  std::atomic<uint32_t> next_ring_{0};
};

}  // namespace kvcache::kvstore

#endif  // KVCACHE_KVSTORE_URING_FILE_IO_H_
