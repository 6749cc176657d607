#include "kvstore/uring_file_io.h"

#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <vector>

#include "absl/cleanup/cleanup.h"
#include "absl/strings/str_cat.h"

namespace kvcache::kvstore {

absl::StatusOr<std::unique_ptr<UringFileIo>> UringFileIo::Create(
    const UringOptions& options) {
  std::unique_ptr<UringFileIo> io(new UringFileIo(options));
  for (uint32_t i = 0; i < options.rings; ++i) {
    auto ring = std::make_unique<Ring>();
    absl::MutexLock lock(&ring->mu);
    const int rc = io_uring_queue_init(options.queue_depth, &ring->ring, 0);
    if (rc < 0) {
      return absl::UnavailableError(absl::StrCat(
          "io_uring_queue_init failed: ", std::strerror(-rc),
          "; the NVMe tier needs io_uring (check sysctl "
          "kernel.io_uring_disabled and the container's seccomp profile)"));
    }
    io->rings_.push_back(std::move(ring));
  }
  return io;
}

UringFileIo::~UringFileIo() {
  for (auto& ring : rings_) {
    absl::MutexLock lock(&ring->mu);
    io_uring_queue_exit(&ring->ring);
  }
}

UringFileIo::Ring& UringFileIo::AcquireRing() {
  const uint32_t first = next_ring_.fetch_add(1);
  for (uint32_t i = 0; i < rings_.size(); ++i) {
    Ring& ring = *rings_[(first + i) % rings_.size()];
    if (ring.mu.TryLock()) return ring;
  }
  Ring& ring = *rings_[first % rings_.size()];
  ring.mu.Lock();
  return ring;
}

absl::Status UringFileIo::Read(
    int fd, uint64_t offset, char* buffer, uint64_t length,
    absl::FunctionRef<void(absl::string_view)> on_read) {
  return Transfer(false, fd, offset, buffer, length, on_read);
}

absl::Status UringFileIo::Write(int fd, uint64_t offset, const char* buffer,
                                uint64_t length) {
  // io_uring's write prep takes a mutable pointer but only reads from it.
  return Transfer(true, fd, offset, const_cast<char*>(buffer), length,
                  [](absl::string_view) {});
}

absl::Status UringFileIo::Sync(int fd) {
  // A plain fdatasync rather than IORING_OP_FSYNC: a device cache flush can
  // take milliseconds, and on a ring it would hold that ring from other
  // callers' reads all the while.
  if (fdatasync(fd) != 0) return absl::ErrnoToStatus(errno, "fdatasync");
  return absl::OkStatus();
}

absl::Status UringFileIo::Transfer(
    bool write, int fd, uint64_t offset, char* buffer, uint64_t length,
    absl::FunctionRef<void(absl::string_view)> on_done) {
  const uint64_t op_bytes = options_.op_bytes;
  const uint32_t depth = options_.queue_depth;
  const uint64_t ops = (length + op_bytes - 1) / op_bytes;
  auto length_of = [&](uint64_t op) {
    return std::min(op_bytes, length - op * op_bytes);
  };
  Ring& ring = AcquireRing();
  const absl::Cleanup unlock = [&ring] { ring.mu.Unlock(); };
  // Bytes that each operation in flight still has to move, by op % depth.
  std::vector<uint64_t> left(depth, 0);
  uint64_t started = 0;    // operations submitted
  uint64_t finished = 0;   // operations completed and passed to on_done
  uint32_t in_flight = 0;  // requests in the ring
  // Queues operation `op` from its byte `from` on. The ring has room: it
  // has queue_depth entries and at most that many requests are in flight.
  auto queue = [&](uint64_t op, uint64_t from) {
    io_uring_sqe* sqe = io_uring_get_sqe(&ring.ring);
    char* const data = buffer + op * op_bytes + from;
    const uint64_t at = offset + op * op_bytes + from;
    const uint64_t bytes = length_of(op) - from;
    if (write) {
      io_uring_prep_write(sqe, fd, data, bytes, at);
    } else {
      io_uring_prep_read(sqe, fd, data, bytes, at);
    }
    io_uring_sqe_set_data64(sqe, op);
    ++in_flight;
  };

  absl::Status status;
  // After an error no operation starts, but every request in flight is
  // reaped, so the ring is empty for the next caller.
  while (in_flight > 0 || (status.ok() && finished < ops)) {
    while (status.ok() && started < ops && started - finished < depth) {
      left[started % depth] = length_of(started);
      queue(started++, 0);
    }
    const int rc = io_uring_submit_and_wait(&ring.ring, 1);
    if (rc < 0) return absl::ErrnoToStatus(-rc, "io_uring_submit_and_wait");
    io_uring_cqe* cqe = nullptr;
    unsigned head = 0;
    unsigned reaped = 0;
    io_uring_for_each_cqe(&ring.ring, head, cqe) {
      ++reaped;
      --in_flight;
      const uint64_t op = io_uring_cqe_get_data64(cqe);
      const int res = cqe->res;
      if (res < 0) {
        status.Update(absl::ErrnoToStatus(
            -res, absl::StrCat(write ? "write" : "read", " of ", length_of(op),
                               " bytes at offset ", offset + op * op_bytes)));
      } else if (res == 0) {
        status.Update(absl::DataLossError(
            absl::StrCat("read at offset ", offset + op * op_bytes,
                         " hit the end of the slab file")));
      } else if ((left[op % depth] -= res) > 0 && status.ok()) {
        queue(op, length_of(op) - left[op % depth]);  // a short transfer
      }
    }
    io_uring_cq_advance(&ring.ring, reaped);
    while (status.ok() && finished < started && left[finished % depth] == 0) {
      on_done(
          absl::string_view(buffer + finished * op_bytes, length_of(finished)));
      ++finished;
    }
  }
  return status;
}

}  // namespace kvcache::kvstore
