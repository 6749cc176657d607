// Who is in a cluster. Each node keeps a record (NodeRecord, as JSON) in etcd
// under /kvcache/<cluster>/nodes/<node_id>, attached to a lease so that a
// node that dies drops out when the lease expires (see node_registration.h).
// A MembershipView reads those records once, then follows etcd's watch of
// them from the revision it read, so a node joining or leaving is seen within
// milliseconds. It reads them all again (and watches anew) when the watch
// breaks or etcd has compacted the revisions it needs, and every resync
// interval as a safety net. While etcd cannot be read it keeps serving the
// last membership it read, so the cluster goes on working through an etcd
// outage.
#ifndef KVCACHE_CLUSTER_MEMBERSHIP_H_
#define KVCACHE_CLUSTER_MEMBERSHIP_H_

#include <cstdint>
#include <map>
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
  // The record stored under etcd key `key` of cluster prefix `prefix`:
  // INVALID_ARGUMENT, naming the key, if the value is not a record, names a
  // node other than the key does, or has an empty address.
  static absl::StatusOr<NodeRecord> FromEtcd(absl::string_view prefix,
                                             absl::string_view key,
                                             absl::string_view value);

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
  // How often every record is read again although the watch reports each
  // change: a bound on how long a change the watch missed stays unseen. It is
  // also the longest one watch stream lives.
  absl::Duration resync_interval = absl::Seconds(10);
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
  // Starts reading and watching at once; the first reading may still be
  // under way when this returns (call Refresh to wait for one).
  explicit MembershipView(MembershipOptions options);
  MembershipView(const MembershipView&) = delete;
  MembershipView& operator=(const MembershipView&) = delete;
  ~MembershipView();

  // Reads every record again now (and watches anew from there), and returns
  // once that reading is done. On error (etcd unreachable or its reply
  // unreadable) the view keeps its last membership and returns the error.
  // Records that are not node records (bad JSON, missing fields, a key that
  // does not match the node id) are skipped: the others make the
  // membership, and skipped_records() says how many and why.
  absl::Status Refresh();

  // The membership as last read (empty, generation 0, before the first).
  std::shared_ptr<const Membership> Current() const;

  // Blocks until the generation differs from `generation`, or `timeout`
  // passes; returns the membership then.
  std::shared_ptr<const Membership> WaitForChange(uint64_t generation,
                                                  absl::Duration timeout) const;

  // The error of the last reading, or of the watch since if it broke (OK
  // while both are well).
  absl::Status last_error() const;

  // How many entries are skipped now: records under the prefix that are not
  // node records, and entries etcd sent since the last reading that were
  // not records at all (see etcd_replies.h); and the first one's problem
  // (OK if none).
  std::pair<int, absl::Status> skipped_records() const;

 private:
  void WatchLoop();
  // Replaces every record with those of `range`.
  void ApplyRange(const PrefixRange& range) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void ApplyEvents(const std::vector<WatchEvent>& events)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Makes the records the current membership if its nodes changed.
  void Publish() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Waits up to `delay` unless stopping or a Refresh asks for a reading
  // newer than `serving`.
  void Pause(absl::Duration delay, uint64_t serving)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  const MembershipOptions options_;
  const std::string prefix_;
  EtcdClient etcd_;
  mutable absl::Mutex mu_;
  std::shared_ptr<const Membership> current_ ABSL_GUARDED_BY(mu_);
  // Every key under the prefix, with its node record or why it is not one.
  std::map<std::string, absl::StatusOr<NodeRecord>> records_
      ABSL_GUARDED_BY(mu_);
  // Entries etcd sent since the last reading that were not records at all.
  Skipped malformed_ ABSL_GUARDED_BY(mu_);
  absl::Status last_error_ ABSL_GUARDED_BY(mu_);
  // Readings asked for by Refresh, and the last one done (its outcome in
  // last_reading_).
  uint64_t readings_wanted_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t readings_done_ ABSL_GUARDED_BY(mu_) = 0;
  absl::Status last_reading_ ABSL_GUARDED_BY(mu_);
  // The watch under way, for Refresh and the destructor to cancel.
  PrefixWatch* watch_ ABSL_GUARDED_BY(mu_) = nullptr;
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  std::thread watcher_;
};

}  // namespace kvcache::cluster

#endif  // KVCACHE_CLUSTER_MEMBERSHIP_H_
