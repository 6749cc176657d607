// Unix stream sockets for the node's same-host services (the shared region,
// local lookups): listening with a peer-user check, and connecting.
#ifndef KVCACHE_TRANSFER_UNIX_SOCKET_H_
#define KVCACHE_TRANSFER_UNIX_SOCKET_H_

#include <sys/types.h>

#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace kvcache::transfer {

// "what: strerror(errno)".
std::string Errno(absl::string_view what);

// A listening socket at `path` (replacing a stale socket file there). The
// file is mode 0600 when `allowed_uids` is only this process's user, 0666
// otherwise, where PeerAllowed decides.
absl::StatusOr<int> ListenUnix(const std::string& path,
                               const std::vector<uid_t>& allowed_uids);

// Whether the kernel vouches that the peer of `connection` runs as one of
// `allowed_uids`.
bool PeerAllowed(int connection, const std::vector<uid_t>& allowed_uids);

// A connected socket; UNAVAILABLE if nothing listens at `path`.
absl::StatusOr<int> ConnectUnix(const std::string& path);

// Sets a send (SO_SNDTIMEO) or receive (SO_RCVTIMEO) timeout, so a stalled
// peer cannot hold the caller.
void SetTimeout(int fd, int option, int seconds);

}  // namespace kvcache::transfer

#endif  // KVCACHE_TRANSFER_UNIX_SOCKET_H_
