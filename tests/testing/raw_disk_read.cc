#include "tests/testing/raw_disk_read.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <memory>

#include "absl/cleanup/cleanup.h"
#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "kvstore/aligned_buffer.h"
#include "kvstore/uring_file_io.h"

namespace kvcache::testing {

absl::StatusOr<DiskReadResult> RawSequentialRead(const std::string& file,
                                                 uint64_t bytes,
                                                 absl::Duration duration) {
  constexpr uint64_t kPiece = 64 << 20;  // one Read: 64 requests of 1 MiB
  bytes = bytes / 4096 * 4096;
  if (bytes == 0) return absl::InvalidArgumentError("nothing to read");
  const int fd = open(file.c_str(), O_RDONLY | O_DIRECT);
  if (fd < 0) {
    return absl::ErrnoToStatus(errno, absl::StrCat("opening ", file));
  }
  absl::Cleanup close_fd = [fd] { close(fd); };
  absl::StatusOr<std::unique_ptr<kvstore::UringFileIo>> io =
      kvstore::UringFileIo::Create(
          {.rings = 1, .queue_depth = 32, .op_bytes = 1 << 20});
  if (!io.ok()) return io.status();
  kvstore::AlignedBuffer buffer(std::min(kPiece, bytes));
  DiskReadResult result;
  const absl::Time start = absl::Now();
  const absl::Time deadline = start + duration;
  uint64_t offset = 0;
  while (absl::Now() < deadline) {
    const uint64_t length = std::min(buffer.size(), bytes - offset);
    if (absl::Status s = (*io)->Read(fd, offset, buffer.data(), length,
                                     [](absl::string_view) {});
        !s.ok()) {
      return s;
    }
    result.bytes += length;
    offset = offset + length == bytes ? 0 : offset + length;
  }
  result.seconds = absl::ToDoubleSeconds(absl::Now() - start);
  return result;
}

}  // namespace kvcache::testing
