// Keeps one node listed in its cluster's membership (see membership.h) for
// as long as it runs.
//
// The node's record lives under an etcd lease of `ttl` that a background
// thread renews every ttl/3. If the lease is lost (etcd restarted without
// it, or the node could not reach etcd for longer than the TTL), the thread
// grants a new lease and writes the record again. While etcd is unreachable
// it keeps trying and the node keeps serving. Destroying the registration
// revokes the lease, so a node that stops cleanly leaves at once instead of
// after the TTL.
#ifndef KVCACHE_CLUSTER_NODE_REGISTRATION_H_
#define KVCACHE_CLUSTER_NODE_REGISTRATION_H_

#include <cstdint>
#include <functional>
#include <string>
#include <thread>

#include "absl/status/status.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "cluster/etcd_client.h"
#include "cluster/membership.h"

namespace kvcache::cluster {

struct RegistrationOptions {
  EtcdOptions etcd;
  std::string cluster_name = "default";
  absl::Duration ttl = absl::Seconds(10);
  // Told about each change between registered and not (with the reason);
  // called from the background thread.
  std::function<void(const absl::Status&)> on_state_change;
};

// Thread-safe.
class NodeRegistration {
 public:
  // Starts registering `self` in the background.
  NodeRegistration(RegistrationOptions options, NodeRecord self);
  NodeRegistration(const NodeRegistration&) = delete;
  NodeRegistration& operator=(const NodeRegistration&) = delete;
  // Revokes the lease (best effort) so the node leaves the membership now.
  ~NodeRegistration();

  // Marks the node draining in its record (written at once when etcd is
  // reachable, else as soon as it is again).
  void SetDraining();

 private:
  void Loop();
  // One round: (re)register if needed, else renew. Returns the outcome.
  absl::Status Renew() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  const RegistrationOptions options_;
  const std::string key_;
  EtcdClient etcd_;

  absl::Mutex mu_;
  NodeRecord self_ ABSL_GUARDED_BY(mu_);
  int64_t lease_ ABSL_GUARDED_BY(mu_) = 0;
  // The record changed since it was last written.
  bool dirty_ ABSL_GUARDED_BY(mu_) = true;
  // Renew now rather than at the next period.
  bool kick_ ABSL_GUARDED_BY(mu_) = false;
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  std::thread thread_;
};

}  // namespace kvcache::cluster

#endif  // KVCACHE_CLUSTER_NODE_REGISTRATION_H_
