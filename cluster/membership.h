// Who is in a cluster. Each node keeps a record (NodeRecord, as JSON) in etcd
// under /kvcache/<cluster>/nodes/<node_id>, attached to a lease so that a
// node that dies drops out when the lease expires (see node_registration.h).
// A MembershipView reads those records every poll interval in a background
// thread; while etcd cannot be read it keeps serving the last membership it
// read, so the cluster goes on working through an etcd outage.
#ifndef KVCACHE_CLUSTER_MEMBERSHIP_H_
#define KVCACHE_CLUSTER_MEMBERSHIP_H_

#include <cstdint>
#include <memory>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "cluster/etcd_client.h"

namespace kvcache::cluster {

// One node as the cluster sees it.
struct NodeRecord {
  std::string node_id;
  // host:port where the node serves the KvCache and Admin APIs.
  std::string address;
  // A draining node serves reads but takes no new chunks, so placement
  // skips it.
  bool draining = false;
  int64_t started_unix_ms = 0;

  std::string ToJson() const;
  // INVALID_ARGUMENT if `json` is not a record with a node id and address.
  static absl::StatusOr<NodeRecord> FromJson(absl::string_view json);

  friend bool operator==(const NodeRecord& a, const NodeRecord& b) {
    return a.node_id == b.node_id && a.address == b.address &&
           a.draining == b.draining && a.started_unix_ms == b.started_unix_ms;
  }
};

// The etcd key prefix under which a cluster's nodes register.
std::string NodesPrefix(absl::string_view cluster_name);

struct MembershipOptions {
  EtcdOptions etcd;
  std::string cluster_name = "default";
  absl::Duration poll_interval = absl::Seconds(1);
};

// One reading of the membership.
struct Membership {
  // Grows by one each time the set of records changes.
  uint64_t generation = 0;
  // Sorted by node id.
  std::vector<NodeRecord> nodes;
};

// Thread-safe.
class MembershipView {
 public:
  // Starts polling at once; the first reading may still be under way when
  // this returns (call Refresh to wait for one).
  explicit MembershipView(MembershipOptions options);
  MembershipView(const MembershipView&) = delete;
  MembershipView& operator=(const MembershipView&) = delete;
  ~MembershipView();

  // Reads the membership now. On error (etcd unreachable or its reply
  // unreadable) the view keeps its last membership and returns the error.
  // Records that are not node records (bad JSON, missing fields) are
  // skipped: the others make the membership, and skipped_records() says
  // how many and why.
  absl::Status Refresh();

  // The membership as last read (empty, generation 0, before the first).
  std::shared_ptr<const Membership> Current() const;

  // Blocks until the generation differs from `generation`, or `timeout`
  // passes; returns the membership then.
  std::shared_ptr<const Membership> WaitForChange(uint64_t generation,
                                                  absl::Duration timeout) const;

  // The error of the last reading (OK if it succeeded).
  absl::Status last_error() const;

  // Records the last reading skipped, and the first one's problem (OK if
  // none).
  std::pair<int, absl::Status> skipped_records() const;

 private:
  void PollLoop();

  const MembershipOptions options_;
  EtcdClient etcd_;
  mutable absl::Mutex mu_;
  std::shared_ptr<const Membership> current_ ABSL_GUARDED_BY(mu_);
  absl::Status last_error_ ABSL_GUARDED_BY(mu_);
  int skipped_ ABSL_GUARDED_BY(mu_) = 0;
  absl::Status skipped_reason_ ABSL_GUARDED_BY(mu_);
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  std::thread poller_;
};

}  // namespace kvcache::cluster

#endif  // KVCACHE_CLUSTER_MEMBERSHIP_H_
