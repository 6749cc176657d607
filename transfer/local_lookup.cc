#include "transfer/local_lookup.h"

#include <poll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "transfer/unix_socket.h"

namespace kvcache::transfer {
namespace {

constexpr absl::string_view kGreeting = "KVLK";
constexpr absl::string_view kRequest = "KVLQ";
constexpr size_t kKeyBytes = 32;

// Reads exactly `bytes`; false on an error, a timeout or the peer's end.
bool ReadAll(int fd, char* out, size_t bytes) {
  while (bytes > 0) {
    const ssize_t got = recv(fd, out, bytes, 0);
    if (got < 0 && errno == EINTR) continue;
    if (got <= 0) return false;
    out += got;
    bytes -= static_cast<size_t>(got);
  }
  return true;
}

bool WriteAll(int fd, const char* data, size_t bytes) {
  while (bytes > 0) {
    const ssize_t sent = send(fd, data, bytes, MSG_NOSIGNAL);
    if (sent < 0 && errno == EINTR) continue;
    if (sent <= 0) return false;
    data += sent;
    bytes -= static_cast<size_t>(sent);
  }
  return true;
}

}  // namespace

absl::StatusOr<std::unique_ptr<LocalLookupServer>> LocalLookupServer::Start(
    std::string socket_path, std::string node_id, CountHeld count_held,
    LocalLookupOptions options) {
  if (node_id.empty() || node_id.size() > 255) {
    return absl::InvalidArgumentError("node id must be 1-255 bytes");
  }
  if (options.allowed_uids.empty()) options.allowed_uids.push_back(geteuid());
  const int stop_fd = eventfd(0, EFD_CLOEXEC);
  if (stop_fd < 0) return absl::UnavailableError(Errno("eventfd"));
  absl::StatusOr<int> listen_fd = ListenUnix(socket_path, options.allowed_uids);
  if (!listen_fd.ok()) {
    close(stop_fd);
    return listen_fd.status();
  }
  std::string greeting(kGreeting);
  greeting += static_cast<char>(node_id.size());
  greeting += node_id;
  std::unique_ptr<LocalLookupServer> server(new LocalLookupServer(
      std::move(socket_path), *listen_fd, stop_fd, std::move(greeting),
      std::move(count_held), std::move(options)));
  server->accept_thread_ = std::thread([s = server.get()] { s->Accept(); });
  return server;
}

LocalLookupServer::LocalLookupServer(std::string socket_path, int listen_fd,
                                     int stop_fd, std::string greeting,
                                     CountHeld count_held,
                                     LocalLookupOptions options)
    : socket_path_(std::move(socket_path)),
      listen_fd_(listen_fd),
      stop_fd_(stop_fd),
      greeting_(std::move(greeting)),
      count_held_(std::move(count_held)),
      options_(std::move(options)) {}

LocalLookupServer::~LocalLookupServer() {
  const uint64_t one = 1;
  if (write(stop_fd_, &one, sizeof(one)) != sizeof(one)) std::abort();
  accept_thread_.join();
  {
    // Serving threads never take the lock: joining under it is safe.
    absl::MutexLock lock(&mu_);
    // Wakes every connection's thread out of its read.
    for (Connection& c : connections_) shutdown(c.fd, SHUT_RDWR);
    for (Connection& c : connections_) {
      c.thread.join();
      close(c.fd);
    }
  }
  unlink(socket_path_.c_str());
  close(listen_fd_);
  close(stop_fd_);
}

void LocalLookupServer::Reap() {
  for (auto it = connections_.begin(); it != connections_.end();) {
    if (it->done.load()) {
      it->thread.join();
      close(it->fd);
      it = connections_.erase(it);
    } else {
      ++it;
    }
  }
}

void LocalLookupServer::Accept() {
  pollfd fds[2] = {{listen_fd_, POLLIN, 0}, {stop_fd_, POLLIN, 0}};
  while (true) {
    if (poll(fds, 2, -1) < 0) {
      if (errno == EINTR) continue;
      return;
    }
    if (fds[1].revents != 0) return;
    const int fd = accept4(listen_fd_, nullptr, nullptr, SOCK_CLOEXEC);
    if (fd < 0) continue;
    absl::MutexLock lock(&mu_);
    Reap();
    if (!PeerAllowed(fd, options_.allowed_uids) ||
        connections_.size() >= options_.max_connections) {
      close(fd);
      continue;
    }
    Connection& c = connections_.emplace_back();
    c.fd = fd;
    c.thread = std::thread([this, &c] { Serve(c); });
  }
}

void LocalLookupServer::Serve(Connection& connection) {
  const int fd = connection.fd;
  SetTimeout(fd, SO_SNDTIMEO, 5);
  SetTimeout(fd, SO_RCVTIMEO,
             std::max<int>(1, absl::ToInt64Seconds(options_.idle_timeout)));
  std::string keys;
  std::vector<absl::string_view> views;
  bool open = WriteAll(fd, greeting_.data(), greeting_.size());
  while (open) {
    char header[8];
    uint32_t n = 0;
    open = ReadAll(fd, header, sizeof(header)) &&
           absl::string_view(header, 4) == kRequest;
    if (open) std::memcpy(&n, header + 4, sizeof(n));
    open = open && n >= 1 && n <= kMaxLocalLookupKeys;
    if (!open) break;
    keys.resize(size_t{n} * kKeyBytes);
    if (!ReadAll(fd, keys.data(), keys.size())) break;
    views.clear();
    for (uint32_t i = 0; i < n; ++i) {
      views.emplace_back(keys.data() + size_t{i} * kKeyBytes, kKeyBytes);
    }
    const uint32_t held = static_cast<uint32_t>(count_held_(views));
    open = WriteAll(fd, reinterpret_cast<const char*>(&held), sizeof(held));
  }
  // The peer sees the end now; Reap closes the descriptor.
  shutdown(fd, SHUT_RDWR);
  connection.done.store(true);
}

absl::StatusOr<std::unique_ptr<LocalLookupClient>> LocalLookupClient::Connect(
    const std::string& socket_path, const std::string& node_id) {
  std::unique_ptr<LocalLookupClient> client(
      new LocalLookupClient(socket_path, node_id));
  absl::StatusOr<int> fd = client->Open();
  if (!fd.ok()) return fd.status();
  client->idle_.push_back(*fd);
  return client;
}

LocalLookupClient::~LocalLookupClient() {
  for (int fd : idle_) close(fd);
}

absl::StatusOr<int> LocalLookupClient::Open() {
  absl::StatusOr<int> fd = ConnectUnix(socket_path_);
  if (!fd.ok()) return fd.status();
  SetTimeout(*fd, SO_RCVTIMEO, 5);
  SetTimeout(*fd, SO_SNDTIMEO, 5);
  char greeting[4 + 1 + 255];
  const bool greeted =
      ReadAll(*fd, greeting, 5) &&
      absl::string_view(greeting, 4) == kGreeting &&
      ReadAll(*fd, greeting + 5, static_cast<uint8_t>(greeting[4]));
  if (!greeted) {
    close(*fd);
    return absl::UnavailableError(absl::StrCat(
        "no lookup service greeted at ", socket_path_,
        " (this user may not be among the node's shared_memory.allowed_uids)"));
  }
  const absl::string_view id(greeting + 5, static_cast<uint8_t>(greeting[4]));
  if (id != node_id_) {
    close(*fd);
    return absl::FailedPreconditionError(
        absl::StrCat("the lookup socket ", socket_path_, " belongs to node ",
                     id, ", not ", node_id_));
  }
  return *fd;
}

absl::StatusOr<size_t> LocalLookupClient::CountHeld(
    absl::Span<const std::string> stored_keys) {
  if (stored_keys.empty()) return 0;
  if (stored_keys.size() > kMaxLocalLookupKeys) {
    return absl::InvalidArgumentError(
        absl::StrCat(stored_keys.size(), " keys; a local lookup takes up to ",
                     kMaxLocalLookupKeys));
  }
  std::string request(kRequest);
  const uint32_t n = static_cast<uint32_t>(stored_keys.size());
  request.append(reinterpret_cast<const char*>(&n), sizeof(n));
  for (const std::string& key : stored_keys) {
    if (key.size() != kKeyBytes) {
      return absl::InvalidArgumentError("stored keys are 32 bytes");
    }
    request += key;
  }
  int fd = -1;
  {
    absl::MutexLock lock(&mu_);
    if (!idle_.empty()) {
      fd = idle_.back();
      idle_.pop_back();
    }
  }
  if (fd < 0) {
    absl::StatusOr<int> opened = Open();
    if (!opened.ok()) return opened.status();
    fd = *opened;
  }
  uint32_t held = 0;
  if (!WriteAll(fd, request.data(), request.size()) ||
      !ReadAll(fd, reinterpret_cast<char*>(&held), sizeof(held)) || held > n) {
    close(fd);
    return absl::UnavailableError(
        absl::StrCat("local lookup at ", socket_path_, " failed"));
  }
  absl::MutexLock lock(&mu_);
  idle_.push_back(fd);
  return held;
}

}  // namespace kvcache::transfer
