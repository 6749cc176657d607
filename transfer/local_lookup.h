// Same-host prefix lookups without a gRPC call. A worker on the node's host
// asks, over a Unix socket, how many leading chunks of a prompt the node
// holds: what a scheduler asks for every request, where a gRPC call costs
// more than the lookup itself. Keys are stored keys (cluster/stored_key.h;
// a client learns its namespace from NodeInfo), and the socket serves the
// same users as the shared region, who may map the whole CPU tier anyway.
//
// Wire format (host byte order: both ends share a host):
//   on connecting, the server sends  "KVLK" | u8 id length | node id bytes
//   request:  "KVLQ" | u32 n (1 to kMaxLocalLookupKeys) | n 32-byte keys
//   answer:   u32 leading keys held
// A connection carries requests one at a time. A malformed request, or no
// request for `idle_timeout`, closes it.
#ifndef KVCACHE_TRANSFER_LOCAL_LOOKUP_H_
#define KVCACHE_TRANSFER_LOCAL_LOOKUP_H_

#include <sys/types.h>

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "absl/types/span.h"

namespace kvcache::transfer {

inline constexpr uint32_t kMaxLocalLookupKeys = 16384;

struct LocalLookupOptions {
  std::vector<uid_t> allowed_uids;  // empty: this process's user only
  uint32_t max_connections = 64;    // more are closed at once
  // Poll loops serving the connections, each taking those it accepts.
  uint32_t threads = 2;
  // The loops' scheduling priority (a nice value, -20 to 19). A lookup is
  // microseconds of work on a worker's critical path; at the process's
  // priority a loop woken by a request can wait a whole scheduler slice
  // behind the workers' threads, which is what makes the tail. Below 0
  // needs CAP_SYS_NICE; without it the loops keep the process's priority.
  int nice = -10;
  absl::Duration idle_timeout = absl::Seconds(60);
};

// Daemon side. A few threads serve the connections from poll loops, as an
// event-driven server does: a request is answered in microseconds, so a
// thread per connection would only add wake-ups and context switches.
class LocalLookupServer {
 public:
  // How many leading keys of a request the node holds.
  using CountHeld = std::function<size_t(absl::Span<const absl::string_view>)>;

  // Listens on `socket_path`, answering with `count_held` and greeting each
  // connection with `node_id` (1 to 255 bytes).
  static absl::StatusOr<std::unique_ptr<LocalLookupServer>> Start(
      std::string socket_path, std::string node_id, CountHeld count_held,
      LocalLookupOptions options = {});
  // Closes every connection and removes the socket file.
  ~LocalLookupServer();

  LocalLookupServer(const LocalLookupServer&) = delete;
  LocalLookupServer& operator=(const LocalLookupServer&) = delete;

  const std::string& socket_path() const { return socket_path_; }

 private:
  LocalLookupServer(std::string socket_path, int listen_fd, int stop_fd,
                    std::string greeting, CountHeld count_held,
                    LocalLookupOptions options);
  void Serve();

  const std::string socket_path_;
  const int listen_fd_;
  const int stop_fd_;  // eventfd that wakes Serve to stop
  const std::string greeting_;
  const CountHeld count_held_;
  const LocalLookupOptions options_;
  std::atomic<uint32_t> connections_{0};
  std::vector<std::thread> threads_;
};

// Worker side: a few connections kept open and lent one per call.
// Thread-safe.
class LocalLookupClient {
 public:
  // Connects to `socket_path` and checks that the node there greets with
  // `node_id`: FAILED_PRECONDITION if another node answers (a socket of
  // the same name on another host's node), UNAVAILABLE if none listens.
  static absl::StatusOr<std::unique_ptr<LocalLookupClient>> Connect(
      const std::string& socket_path, const std::string& node_id);
  ~LocalLookupClient();

  // How many leading `stored_keys` (32 bytes each, at most
  // kMaxLocalLookupKeys) the node holds. UNAVAILABLE if the connection
  // fails (it is dropped).
  absl::StatusOr<size_t> CountHeld(absl::Span<const std::string> stored_keys);

 private:
  LocalLookupClient(std::string socket_path, std::string node_id)
      : socket_path_(std::move(socket_path)), node_id_(std::move(node_id)) {}
  // A connection greeted by the right node.
  absl::StatusOr<int> Open();

  const std::string socket_path_;
  const std::string node_id_;
  absl::Mutex mu_;
  std::vector<int> idle_ ABSL_GUARDED_BY(mu_);
};

}  // namespace kvcache::transfer

#endif  // KVCACHE_TRANSFER_LOCAL_LOOKUP_H_
