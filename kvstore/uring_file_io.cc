#include "kvstore/uring_file_io.h"

#include <cerrno>
#include <cstring>
#include <deque>

#include "absl/strings/str_cat.h"

namespace kvcache::kvstore {
namespace {

// One outstanding piece of a transfer.
struct Op {
  uint64_t offset;
  char* buffer;
  uint64_t length;
};

}  // namespace

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

absl::Status UringFileIo::Read(int fd, uint64_t offset, char* buffer,
                               uint64_t length) {
  return Transfer(false, fd, offset, buffer, length);
}

absl::Status UringFileIo::Write(int fd, uint64_t offset, const char* buffer,
                                uint64_t length) {
  // io_uring's write prep takes a mutable pointer but only reads from it.
  return Transfer(true, fd, offset, const_cast<char*>(buffer), length);
}

absl::Status UringFileIo::Transfer(bool write, int fd, uint64_t offset,
                                   char* buffer, uint64_t length) {
  std::deque<Op> pending;
  for (uint64_t done = 0; done < length; done += options_.op_bytes) {
    pending.push_back(Op{offset + done, buffer + done,
                         std::min<uint64_t>(options_.op_bytes, length - done)});
  }
  Ring& ring = *rings_[next_ring_.fetch_add(1) % rings_.size()];
  absl::MutexLock lock(&ring.mu);
  std::vector<Op> in_flight;
  absl::Status status;
  while (!pending.empty() && status.ok()) {
    in_flight.clear();
    while (!pending.empty() && in_flight.size() < options_.queue_depth) {
      io_uring_sqe* sqe = io_uring_get_sqe(&ring.ring);
      if (sqe == nullptr) break;
      const Op& op = pending.front();
      if (write) {
        io_uring_prep_write(sqe, fd, op.buffer, op.length, op.offset);
      } else {
        io_uring_prep_read(sqe, fd, op.buffer, op.length, op.offset);
      }
      io_uring_sqe_set_data64(sqe, in_flight.size());
      in_flight.push_back(op);
      pending.pop_front();
    }
    const int submitted =
        io_uring_submit_and_wait(&ring.ring, in_flight.size());
    if (submitted < 0) {
      return absl::ErrnoToStatus(-submitted, "io_uring_submit");
    }
    // Reap every completion of this batch, even after an error, so the ring
    // is empty for the next caller.
    for (size_t reaped = 0; reaped < in_flight.size(); ++reaped) {
      io_uring_cqe* cqe = nullptr;
      const int rc = io_uring_wait_cqe(&ring.ring, &cqe);
      if (rc < 0) return absl::ErrnoToStatus(-rc, "io_uring_wait_cqe");
      const Op op = in_flight[io_uring_cqe_get_data64(cqe)];
      const int res = cqe->res;
      io_uring_cqe_seen(&ring.ring, cqe);
      if (res < 0) {
        status.Update(absl::ErrnoToStatus(
            -res, absl::StrCat(write ? "write" : "read", " of ", op.length,
                               " bytes at offset ", op.offset)));
      } else if (res == 0) {
        status.Update(absl::DataLossError(absl::StrCat(
            "read at offset ", op.offset, " hit the end of the slab file")));
      } else if (static_cast<uint64_t>(res) < op.length) {
        pending.push_back(
            Op{op.offset + res, op.buffer + res, op.length - res});
      }
    }
  }
  return status;
}

}  // namespace kvcache::kvstore
