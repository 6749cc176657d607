#include "transfer/local_lookup.h"

#include <fcntl.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
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
  // Every loop polls the listening socket; the one whose accept wins takes
  // the connection, the others find nothing (non-blocking) and go on.
  fcntl(*listen_fd, F_SETFL, fcntl(*listen_fd, F_GETFL) | O_NONBLOCK);
  for (uint32_t t = 0; t < std::max<uint32_t>(1, server->options_.threads);
       ++t) {
    server->threads_.emplace_back([s = server.get()] { s->Serve(); });
  }
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
  for (std::thread& thread : threads_) thread.join();
  unlink(socket_path_.c_str());
  close(listen_fd_);
  close(stop_fd_);
}

namespace {

// A client connection: the request read so far, never more than one.
struct Connection {
  int fd;
  std::string in;
  absl::Time last_active;
};

// Reads what `c` has sent and answers each whole request; false once the
// connection is to be closed (its end, an error, a malformed request).
bool Advance(Connection& c, const LocalLookupServer::CountHeld& count_held,
             std::vector<absl::string_view>& views) {
  while (true) {
    size_t need = 8;
    uint32_t n = 0;
    if (c.in.size() >= 8) {
      std::memcpy(&n, c.in.data() + 4, sizeof(n));
      if (absl::string_view(c.in.data(), 4) != kRequest || n < 1 ||
          n > kMaxLocalLookupKeys) {
        return false;
      }
      need = 8 + size_t{n} * kKeyBytes;
    }
    if (c.in.size() == need) {
      views.clear();
      for (uint32_t i = 0; i < n; ++i) {
        views.emplace_back(c.in.data() + 8 + size_t{i} * kKeyBytes, kKeyBytes);
      }
      const uint32_t held = static_cast<uint32_t>(count_held(views));
      // Four bytes fit any socket buffer; a client that does not read its
      // answers is dropped.
      if (send(c.fd, &held, sizeof(held), MSG_NOSIGNAL | MSG_DONTWAIT) !=
          sizeof(held)) {
        return false;
      }
      c.in.clear();
      continue;
    }
    const size_t have = c.in.size();
    c.in.resize(need);
    const ssize_t got =
        recv(c.fd, c.in.data() + have, need - have, MSG_DONTWAIT);
    if (got <= 0) {
      c.in.resize(have);
      return got < 0 && (errno == EAGAIN || errno == EINTR);
    }
    c.in.resize(have + static_cast<size_t>(got));
  }
}

}  // namespace

void LocalLookupServer::Serve() {
  // Best effort (see LocalLookupOptions::nice): EPERM leaves it as it was.
  setpriority(PRIO_PROCESS, static_cast<id_t>(gettid()), options_.nice);
  std::vector<Connection> connections;
  std::vector<pollfd> fds;
  std::vector<absl::string_view> views;
  auto drop = [&](size_t i) {
    close(connections[i].fd);
    connections.erase(connections.begin() + i);
    connections_.fetch_sub(1);
  };
  while (true) {
    fds.assign({{listen_fd_, POLLIN, 0}, {stop_fd_, POLLIN, 0}});
    for (const Connection& c : connections) fds.push_back({c.fd, POLLIN, 0});
    // Wakes at least once a second to close idle connections.
    if (poll(fds.data(), fds.size(), 1000) < 0 && errno != EINTR) break;
    if (fds[1].revents != 0) break;
    const absl::Time now = absl::Now();
    // Backwards, so dropping one leaves the indices of those before it.
    for (size_t i = connections.size(); i-- > 0;) {
      Connection& c = connections[i];
      if (fds[i + 2].revents != 0) {
        c.last_active = now;
        if (!Advance(c, count_held_, views)) drop(i);
      } else if (now - c.last_active > options_.idle_timeout) {
        drop(i);
      }
    }
    if (fds[0].revents == 0) continue;
    const int fd =
        accept4(listen_fd_, nullptr, nullptr, SOCK_CLOEXEC | SOCK_NONBLOCK);
    if (fd < 0) continue;
    if (!PeerAllowed(fd, options_.allowed_uids)) {
      close(fd);
      continue;
    }
    if (connections_.fetch_add(1) >= options_.max_connections) {
      connections_.fetch_sub(1);
      close(fd);
      continue;
    }
    connections.push_back({fd, std::string(), now});
    if (send(fd, greeting_.data(), greeting_.size(), MSG_NOSIGNAL) !=
        static_cast<ssize_t>(greeting_.size())) {
      drop(connections.size() - 1);
    }
  }
  for (const Connection& c : connections) close(c.fd);
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
