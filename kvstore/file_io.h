// Block I/O on a tier's files: positioned reads and writes, and a sync that
// makes the writes before it durable. The NVMe tier does all its slab I/O
// through this interface, so that its durability order (bytes synced before
// their index record) can be checked by a FileIo that loses what was not
// synced (kvstore/power_loss_file_io.h). UringFileIo is the real one.
//
// Implementations are thread-safe unless they say otherwise.
#ifndef KVCACHE_KVSTORE_FILE_IO_H_
#define KVCACHE_KVSTORE_FILE_IO_H_

#include <cstdint>

#include "absl/functional/function_ref.h"
#include "absl/status/status.h"
#include "absl/strings/string_view.h"

namespace kvcache::kvstore {

class FileIo {
 public:
  virtual ~FileIo() = default;

  // Transfers `length` bytes between `buffer` and `fd` at `offset`. All
  // three must be multiples of the block size for an O_DIRECT fd. A read past
  // the end of the file is DATA_LOSS. Read calls `on_read` with consecutive
  // pieces of `buffer`, in order, each as soon as it has been read; not after
  // an error. A write that returned OK may still be lost in a crash until
  // Sync(fd) returns OK.
  virtual absl::Status Read(
      int fd, uint64_t offset, char* buffer, uint64_t length,
      absl::FunctionRef<void(absl::string_view)> on_read) = 0;
  virtual absl::Status Write(int fd, uint64_t offset, const char* buffer,
                             uint64_t length) = 0;

  // Makes every write to `fd` that returned before this call durable, with
  // the file metadata needed to read it back (fdatasync). Errors are the
  // errno's status.
  virtual absl::Status Sync(int fd) = 0;
};

}  // namespace kvcache::kvstore

#endif  // KVCACHE_KVSTORE_FILE_IO_H_
