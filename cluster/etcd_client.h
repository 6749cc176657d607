// A client for the few etcd v3 calls cluster membership needs: put, prefix
// range, and leases (grant, keep alive, revoke).
//
// It speaks etcd's JSON gateway (HTTP on the client port, /v3/...), so it
// needs no etcd protos or extra libraries. Each call tries the endpoints in
// turn, starting with the last one that answered, and gives up after one
// round. Thread-safe.
#ifndef KVCACHE_CLUSTER_ETCD_CLIENT_H_
#define KVCACHE_CLUSTER_ETCD_CLIENT_H_

#include <atomic>
#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"

namespace kvcache::cluster {

struct EtcdOptions {
  // host:port of etcd client endpoints, e.g. "127.0.0.1:2379".
  std::vector<std::string> endpoints;
  // Deadline of one HTTP request to one endpoint.
  absl::Duration timeout = absl::Seconds(2);
};

struct KeyValue {
  std::string key;
  std::string value;
};

// Readers of the JSON gateway's replies, apart from the network so they can
// be tested and fuzzed on their own. Whatever `body` holds, they return a
// value or an error; nothing etcd sends can throw or crash.
//
// A lease grant's id; INTERNAL if the reply is not JSON or has no id.
absl::StatusOr<int64_t> ParseLeaseGrantReply(absl::string_view body);
// OK if the keepalive reply shows the lease alive; NOT_FOUND if it has
// expired; INTERNAL if the reply is not JSON.
absl::Status ParseKeepAliveReply(absl::string_view body, int64_t lease);
// The key-values of a range reply, as EtcdClient::RangePrefix describes.
absl::StatusOr<std::vector<KeyValue>> ParseRangeReply(absl::string_view body,
                                                      int* skipped = nullptr);
// The error an answer with HTTP status `http_status` (not 200) stands for:
// etcd's own gRPC code and message when the body carries them, UNKNOWN
// otherwise; never OK.
absl::Status ParseErrorReply(int http_status, absl::string_view body);

// Errors: UNAVAILABLE (or DEADLINE_EXCEEDED) naming every endpoint tried when
// none answers; otherwise etcd's own code and message (NOT_FOUND for a lease
// that expired or was revoked).
class EtcdClient {
 public:
  explicit EtcdClient(EtcdOptions options);

  // A new lease of `ttl` (whole seconds, at least 1); returns its id.
  absl::StatusOr<int64_t> GrantLease(absl::Duration ttl);
  // Restarts the lease's TTL. NOT_FOUND if it has already expired.
  absl::Status KeepAlive(int64_t lease);
  // Ends the lease now; the keys attached to it vanish.
  absl::Status RevokeLease(int64_t lease);

  // Sets `key` to `value`, attached to `lease` (0: no lease).
  absl::Status Put(absl::string_view key, absl::string_view value,
                   int64_t lease = 0);
  // Every key starting with `prefix` (non-empty), in key order. An entry of
  // the reply that is not a key and value (not an object, fields that are
  // not base64 strings) is skipped and counted in `*skipped` if given; a
  // reply whose entries are not a list is INTERNAL. Nothing etcd sends can
  // throw or crash.
  absl::StatusOr<std::vector<KeyValue>> RangePrefix(absl::string_view prefix,
                                                    int* skipped = nullptr);

  const EtcdOptions& options() const { return options_; }

 private:
  // POSTs the JSON `request` to `path`; returns the response body of a 200.
  absl::StatusOr<std::string> Call(absl::string_view path,
                                   const std::string& request);

  const EtcdOptions options_;
  // Index of the endpoint that answered last; tried first next time.
  std::atomic<size_t> preferred_{0};
};

}  // namespace kvcache::cluster

#endif  // KVCACHE_CLUSTER_ETCD_CLIENT_H_
