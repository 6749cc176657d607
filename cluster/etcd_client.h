// A client for the few etcd v3 calls cluster membership needs: put, prefix
// range, prefix watch, and leases (grant, keep alive, revoke).
//
// It speaks etcd's v3 gRPC API (etcdserverpb's KV, Lease and Watch services
// on the client port, 2379 by default) with the project's own gRPC. Each
// unary call has a deadline and tries the endpoints in turn, starting with
// the last one that answered, and gives up after one round. Connections are
// kept open between calls and reconnect on their own, within a second of an
// endpoint coming back. Every reply is checked before it is used (see
// etcd_replies.h). Thread-safe.
#ifndef KVCACHE_CLUSTER_ETCD_CLIENT_H_
#define KVCACHE_CLUSTER_ETCD_CLIENT_H_

#include <grpcpp/grpcpp.h>

#include <atomic>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "cluster/etcd_replies.h"
#include "etcd/etcdserver/etcdserverpb/rpc.grpc.pb.h"

namespace kvcache::cluster {

struct EtcdOptions {
  // host:port of etcd client endpoints, e.g. "127.0.0.1:2379".
  std::vector<std::string> endpoints;
  // Deadline of one call to one endpoint.
  absl::Duration timeout = absl::Seconds(2);
  // How to reach etcd: TLS, with etcd's client certificate where it asks for
  // one; null means plaintext.
  std::shared_ptr<grpc::ChannelCredentials> credentials;
};

// One watch over every key under a prefix: a gRPC stream to one endpoint
// that lasts until it breaks, etcd cancels it, it is cancelled here, or its
// lifetime ends. It does not reconnect; a caller that wants to go on watching
// reads the range again and starts a new watch from the revision after it
// (MembershipView does). Next is for one thread; Cancel for any.
class PrefixWatch {
 public:
  PrefixWatch(const PrefixWatch&) = delete;
  PrefixWatch& operator=(const PrefixWatch&) = delete;
  // Cancels the stream if it is still open.
  ~PrefixWatch();

  // Blocks until etcd sends changes and returns OK with them in `*events`
  // (in order; possibly none when every change was skipped). Changes that
  // fail the checks of ReadWatchResponse are skipped and counted in
  // `*skipped`. When the watch has ended, returns why, and the same again on
  // later calls: CANCELLED after Cancel; DEADLINE_EXCEEDED at the end of its
  // lifetime; OUT_OF_RANGE if the start revision was compacted away;
  // ABORTED if etcd cancelled the watch; UNAVAILABLE (naming the endpoint)
  // if the stream broke or never opened; INTERNAL if etcd sent something
  // that is not this watch's.
  absl::Status Next(std::vector<WatchEvent>* events, Skipped* skipped);

  // Ends the watch; a Next under way returns CANCELLED soon after.
  void Cancel();

 private:
  friend class EtcdClient;
  PrefixWatch(etcdserverpb::Watch::Stub* stub, std::string endpoint,
              std::string prefix, int64_t start_revision,
              absl::Duration lifetime);
  // Closes the stream (if open) and keeps `status` as the watch's outcome.
  absl::Status End(absl::Status status);

  etcdserverpb::Watch::Stub* const stub_;  // null: no endpoint
  const std::string endpoint_;
  const std::string prefix_;
  // The revision the watch has reached; events before it are skipped.
  int64_t revision_;
  grpc::ClientContext context_;
  std::atomic<bool> cancelled_{false};
  std::unique_ptr<grpc::ClientReaderWriter<etcdserverpb::WatchRequest,
                                           etcdserverpb::WatchResponse>>
      stream_;
  int64_t watch_id_ = -1;  // -1 until etcd has created the watch
  absl::Status outcome_;   // set once the watch has ended
  bool ended_ = false;
};

// Errors of the unary calls: UNAVAILABLE naming every endpoint tried and its
// failure when none answers (unreachable, or past the deadline); otherwise
// etcd's own code and message (NOT_FOUND for a lease that expired or was
// revoked), or INTERNAL for a reply that fails its checks.
class EtcdClient {
 public:
  explicit EtcdClient(EtcdOptions options);

  // A new lease of `ttl` (whole seconds, at least 1); returns its id.
  absl::StatusOr<int64_t> GrantLease(absl::Duration ttl);
  // Restarts the lease's TTL (one request on a keepalive stream of its
  // own). NOT_FOUND if it has already expired.
  absl::Status KeepAlive(int64_t lease);
  // Ends the lease now; the keys attached to it vanish.
  absl::Status RevokeLease(int64_t lease);

  // Sets `key` to `value`, attached to `lease` (0: no lease).
  absl::Status Put(absl::string_view key, absl::string_view value,
                   int64_t lease = 0);
  // Every key starting with `prefix` (non-empty), in key order, and the
  // revision they were read at. Entries that fail the checks of
  // ReadRangeResponse are skipped and counted in the result.
  absl::StatusOr<PrefixRange> RangePrefix(absl::string_view prefix);

  // Watches every key starting with `prefix` from `start_revision` (usually
  // a range's revision + 1) for at most `lifetime`, on the endpoint that
  // answered last. Nothing is sent until the first PrefixWatch::Next. The
  // client must outlive the watch.
  std::unique_ptr<PrefixWatch> WatchPrefix(absl::string_view prefix,
                                           int64_t start_revision,
                                           absl::Duration lifetime);

  const EtcdOptions& options() const { return options_; }

 private:
  struct Endpoint {
    std::string address;
    std::shared_ptr<grpc::Channel> channel;
    std::unique_ptr<etcdserverpb::KV::Stub> kv;
    std::unique_ptr<etcdserverpb::Lease::Stub> lease;
    std::unique_ptr<etcdserverpb::Watch::Stub> watch;
  };

  // Runs `call` against each endpoint in turn, with a fresh context that
  // has the deadline, until one answers; see the class comment for errors.
  template <typename CallFn>
  absl::Status Call(const CallFn& call);

  const EtcdOptions options_;
  std::vector<Endpoint> endpoints_;
  // Index of the endpoint that answered last; tried first next time.
  std::atomic<size_t> preferred_{0};
};

}  // namespace kvcache::cluster

#endif  // KVCACHE_CLUSTER_ETCD_CLIENT_H_
