#include "transfer/unix_socket.h"

#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"

namespace kvcache::transfer {
namespace {

absl::StatusOr<sockaddr_un> UnixAddress(const std::string& path) {
  sockaddr_un address{};
  address.sun_family = AF_UNIX;
  if (path.empty() || path.size() >= sizeof(address.sun_path)) {
    return absl::InvalidArgumentError(
        absl::StrCat("unusable Unix socket path '", path, "'"));
  }
  std::memcpy(address.sun_path, path.data(), path.size());
  return address;
}

}  // namespace

std::string Errno(absl::string_view what) {
  return absl::StrCat(what, ": ", std::strerror(errno));
}

absl::StatusOr<int> ListenUnix(const std::string& path,
                               const std::vector<uid_t>& allowed_uids) {
  absl::StatusOr<sockaddr_un> address = UnixAddress(path);
  if (!address.ok()) return address.status();
  const int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return absl::UnavailableError(Errno("socket"));
  auto fail = [&](absl::string_view what) {
    const std::string message = Errno(what);
    close(fd);
    return absl::UnavailableError(
        absl::StrCat("cannot listen on ", path, ": ", message));
  };
  // A socket file left by a node that died would make bind fail.
  unlink(path.c_str());
  if (bind(fd, reinterpret_cast<const sockaddr*>(&*address),
           sizeof(*address)) != 0) {
    return fail("bind");
  }
  // Only this user may even connect when no other is allowed; otherwise
  // anyone may, and the peer's credentials decide.
  const bool only_self =
      allowed_uids.size() == 1 && allowed_uids[0] == geteuid();
  if (chmod(path.c_str(), only_self ? 0600 : 0666) != 0) return fail("chmod");
  if (listen(fd, 64) != 0) return fail("listen");
  return fd;
}

bool PeerAllowed(int connection, const std::vector<uid_t>& allowed_uids) {
  ucred peer{};
  socklen_t peer_size = sizeof(peer);
  return getsockopt(connection, SOL_SOCKET, SO_PEERCRED, &peer, &peer_size) ==
             0 &&
         std::find(allowed_uids.begin(), allowed_uids.end(), peer.uid) !=
             allowed_uids.end();
}

absl::StatusOr<int> ConnectUnix(const std::string& path) {
  absl::StatusOr<sockaddr_un> address = UnixAddress(path);
  if (!address.ok()) return address.status();
  const int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return absl::InternalError(Errno("socket"));
  if (connect(fd, reinterpret_cast<const sockaddr*>(&*address),
              sizeof(*address)) != 0) {
    const std::string message = Errno("connect");
    close(fd);
    return absl::UnavailableError(
        absl::StrCat("nothing listens at ", path, " (", message, ")"));
  }
  return fd;
}

void SetTimeout(int fd, int option, int seconds) {
  timeval timeout{seconds, 0};
  setsockopt(fd, SOL_SOCKET, option, &timeout, sizeof(timeout));
}

}  // namespace kvcache::transfer
