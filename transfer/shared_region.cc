#include "transfer/shared_region.h"

#include <fcntl.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "transfer/unix_socket.h"

namespace kvcache::transfer {
namespace {

constexpr absl::string_view kMagic = "KVCSHM01";
constexpr size_t kHeaderBytes = 8 + 8 + 1;
constexpr size_t kMaxIdBytes = 255;

// A message of `bytes` at `data` with room for one descriptor.
struct FdMessage {
  FdMessage(void* data, size_t bytes) : iov{data, bytes} {
    header.msg_iov = &iov;
    header.msg_iovlen = 1;
    header.msg_control = control;
    header.msg_controllen = sizeof(control);
  }
  FdMessage(const FdMessage&) = delete;
  FdMessage& operator=(const FdMessage&) = delete;

  iovec iov;
  alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int))] = {};
  msghdr header{};
};

}  // namespace

absl::StatusOr<std::unique_ptr<SharedRegionServer>> SharedRegionServer::Start(
    std::string socket_path, int region_fd, uint64_t size,
    std::string region_id, std::vector<uid_t> allowed_uids) {
  if (allowed_uids.empty()) allowed_uids.push_back(geteuid());
  if (region_id.empty() || region_id.size() > kMaxIdBytes) {
    return absl::InvalidArgumentError("region id must be 1-255 bytes");
  }
  // Opening the memfd through /proc gives a descriptor of its own with
  // read-only access, so receivers can map the region but never write it.
  const int read_only_fd = open(
      absl::StrCat("/proc/self/fd/", region_fd).c_str(), O_RDONLY | O_CLOEXEC);
  if (read_only_fd < 0) {
    return absl::InternalError(Errno("cannot reopen the region read-only"));
  }
  const int stop_fd = eventfd(0, EFD_CLOEXEC);
  if (stop_fd < 0) {
    close(read_only_fd);
    return absl::UnavailableError(Errno("eventfd"));
  }
  absl::StatusOr<int> listen_fd = ListenUnix(socket_path, allowed_uids);
  if (!listen_fd.ok()) {
    close(stop_fd);
    close(read_only_fd);
    return absl::UnavailableError(absl::StrCat(
        "cannot serve the shared region: ", listen_fd.status().message()));
  }

  std::string message(kMagic);
  char fields[9];
  std::memcpy(fields, &size, 8);  // hosts that share memory share endianness
  fields[8] = static_cast<char>(region_id.size());
  message.append(fields, sizeof(fields));
  message += region_id;
  std::unique_ptr<SharedRegionServer> server(new SharedRegionServer(
      std::move(socket_path), *listen_fd, stop_fd, read_only_fd,
      std::move(message), std::move(allowed_uids)));
  server->thread_ = std::thread([s = server.get()] { s->Serve(); });
  return server;
}

SharedRegionServer::SharedRegionServer(std::string socket_path, int listen_fd,
                                       int stop_fd, int read_only_fd,
                                       std::string message,
                                       std::vector<uid_t> allowed_uids)
    : socket_path_(std::move(socket_path)),
      listen_fd_(listen_fd),
      stop_fd_(stop_fd),
      read_only_fd_(read_only_fd),
      message_(std::move(message)),
      allowed_uids_(std::move(allowed_uids)) {}

SharedRegionServer::~SharedRegionServer() {
  const uint64_t one = 1;
  if (write(stop_fd_, &one, sizeof(one)) != sizeof(one)) std::abort();
  thread_.join();
  unlink(socket_path_.c_str());
  close(listen_fd_);
  close(stop_fd_);
  close(read_only_fd_);
}

void SharedRegionServer::Serve() {
  pollfd fds[2] = {{listen_fd_, POLLIN, 0}, {stop_fd_, POLLIN, 0}};
  while (true) {
    if (poll(fds, 2, -1) < 0) {
      if (errno == EINTR) continue;
      return;
    }
    if (fds[1].revents != 0) return;
    const int connection = accept4(listen_fd_, nullptr, nullptr, SOCK_CLOEXEC);
    if (connection < 0) continue;
    // A process of any other user gets nothing and learns only that the
    // socket closed.
    if (!PeerAllowed(connection, allowed_uids_)) {
      refused_.fetch_add(1);
      close(connection);
      continue;
    }
    SetTimeout(connection, SO_SNDTIMEO, 1);
    FdMessage message(const_cast<char*>(message_.data()), message_.size());
    cmsghdr* rights = CMSG_FIRSTHDR(&message.header);
    rights->cmsg_level = SOL_SOCKET;
    rights->cmsg_type = SCM_RIGHTS;
    rights->cmsg_len = CMSG_LEN(sizeof(int));
    std::memcpy(CMSG_DATA(rights), &read_only_fd_, sizeof(int));
    // A peer that went away before reading loses nothing; ignore the error.
    (void)sendmsg(connection, &message.header, MSG_NOSIGNAL);
    close(connection);
  }
}

absl::StatusOr<std::unique_ptr<SharedRegion>> SharedRegion::Connect(
    const std::string& socket_path) {
  absl::StatusOr<int> connected = ConnectUnix(socket_path);
  if (!connected.ok()) {
    return absl::Status(
        connected.status().code(),
        absl::StrCat("no shared region: ", connected.status().message()));
  }
  const int connection = *connected;
  SetTimeout(connection, SO_RCVTIMEO, 5);
  char buffer[kHeaderBytes + kMaxIdBytes];
  FdMessage message(buffer, sizeof(buffer));
  const ssize_t got = recvmsg(connection, &message.header, MSG_CMSG_CLOEXEC);
  const int saved_errno = errno;
  close(connection);
  int region_fd = -1;
  if (got > 0) {
    for (cmsghdr* c = CMSG_FIRSTHDR(&message.header); c != nullptr;
         c = CMSG_NXTHDR(&message.header, c)) {
      if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS &&
          c->cmsg_len == CMSG_LEN(sizeof(int))) {
        std::memcpy(&region_fd, CMSG_DATA(c), sizeof(int));
      }
    }
  }
  auto reject = [&](absl::string_view why) {
    if (region_fd >= 0) close(region_fd);
    return absl::DataLossError(
        absl::StrCat("bad shared region from ", socket_path, ": ", why));
  };
  if (got < 0) {
    errno = saved_errno;
    return absl::UnavailableError(Errno("receiving the shared region"));
  }
  if (got == 0) {
    return absl::PermissionDeniedError(
        absl::StrCat("the node at ", socket_path,
                     " shares its memory with other users only (its "
                     "shared_memory.allowed_uids does not list uid ",
                     geteuid(), "); fetch over gRPC instead"));
  }
  if (static_cast<size_t>(got) < kHeaderBytes || region_fd < 0 ||
      absl::string_view(buffer, kMagic.size()) != kMagic) {
    return reject("no region header and descriptor");
  }
  uint64_t size;
  std::memcpy(&size, buffer + 8, 8);
  const size_t id_bytes = static_cast<uint8_t>(buffer[16]);
  if (id_bytes == 0 || kHeaderBytes + id_bytes != static_cast<size_t>(got)) {
    return reject("header length");
  }
  struct stat file;
  if (fstat(region_fd, &file) != 0 || size == 0 ||
      static_cast<uint64_t>(file.st_size) < size) {
    return reject("region smaller than announced");
  }
  void* base = mmap(nullptr, size, PROT_READ, MAP_SHARED, region_fd, 0);
  close(region_fd);
  if (base == MAP_FAILED) {
    return absl::ResourceExhaustedError(Errno("mapping the shared region"));
  }
  return std::unique_ptr<SharedRegion>(
      new SharedRegion(std::string(buffer + kHeaderBytes, id_bytes),
                       static_cast<const char*>(base), size));
}

SharedRegion::~SharedRegion() { munmap(const_cast<char*>(base_), size_); }

absl::StatusOr<absl::string_view> SharedRegion::View(uint64_t offset,
                                                     uint64_t bytes) const {
  if (offset > size_ || bytes > size_ - offset) {
    return absl::OutOfRangeError(
        absl::StrCat("extent [", offset, ", +", bytes,
                     ") lies outside the shared region of ", size_, " bytes"));
  }
  return absl::string_view(base_ + offset, bytes);
}

}  // namespace kvcache::transfer
