#include "cluster/node_registration.h"

#include <utility>

#include "absl/strings/str_cat.h"

namespace kvcache::cluster {

NodeRegistration::NodeRegistration(RegistrationOptions options, NodeRecord self)
    : options_(std::move(options)),
      key_(absl::StrCat(NodesPrefix(options_.cluster_name), self.node_id)),
      etcd_(options_.etcd),
      self_(std::move(self)) {
  thread_ = std::thread([this] { Loop(); });
}

NodeRegistration::~NodeRegistration() {
  int64_t lease = 0;
  {
    absl::MutexLock lock(&mu_);
    stopping_ = true;
    lease = lease_;
  }
  thread_.join();
  if (lease != 0) etcd_.RevokeLease(lease).IgnoreError();  // else: TTL ends it
}

void NodeRegistration::SetDraining() {
  absl::MutexLock lock(&mu_);
  if (self_.draining) return;
  self_.draining = true;
  dirty_ = true;
  kick_ = true;
}

absl::Status NodeRegistration::Renew() {
  if (lease_ != 0 && !dirty_) {
    absl::Status s = etcd_.KeepAlive(lease_);
    if (!absl::IsNotFound(s)) return s;
    lease_ = 0;  // expired: register afresh below
  }
  if (lease_ == 0) {
    absl::StatusOr<int64_t> lease = etcd_.GrantLease(options_.ttl);
    if (!lease.ok()) return lease.status();
    lease_ = *lease;
  }
  absl::Status s = etcd_.Put(key_, self_.ToJson(), lease_);
  // A lease that lapsed between grant/renew and put: start over next round.
  if (absl::IsNotFound(s)) lease_ = 0;
  if (s.ok()) dirty_ = false;
  return s;
}

void NodeRegistration::Loop() {
  absl::MutexLock lock(&mu_);
  bool registered = false;
  while (!stopping_) {
    kick_ = false;
    // etcd calls under the lock are bounded by the etcd timeout; the lock
    // only delays SetDraining and shutdown by that much.
    const absl::Status s = Renew();
    if (s.ok() != registered) {
      registered = s.ok();
      if (options_.on_state_change) options_.on_state_change(s);
    }
    // Retry a failure sooner than a routine renewal.
    const absl::Duration wait = s.ok() ? options_.ttl / 3 : options_.ttl / 6;
    auto wake = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
      return stopping_ || kick_;
    };
    mu_.AwaitWithTimeout(absl::Condition(&wake), wait);
  }
}

}  // namespace kvcache::cluster
