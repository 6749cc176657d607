// A node's part in a cluster (the `cluster` section of its configuration).
//
// It registers the node in etcd (cluster/node_registration.h), follows the
// membership (cluster/membership.h), and keeps every chunk the node holds
// on the nodes that placement (cluster/placement.h) names for it:
//  - repair: a replica that lacks the chunk (it joined, or it replaced a node
//    that died) gets a copy through its Put API;
//  - handoff: a chunk whose replicas no longer include this node (a node
//    joined and took its place) is copied to them, then deleted here;
//  - drain: a draining node leaves the placement, copies every chunk to its
//    new owners and then reports itself drained (safe to stop).
// A pass over every chunk runs at start, whenever membership changes or
// draining starts, and every repair_interval_seconds; an incomplete pass (a
// peer unreachable) is retried within seconds. The node acts only on a
// membership that lists it, so a node whose registration lapsed never hands
// its chunks away.
#ifndef KVCACHE_KVSTORE_CLUSTER_MEMBER_H_
#define KVCACHE_KVSTORE_CLUSTER_MEMBER_H_

#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/synchronization/mutex.h"
#include "cluster/membership.h"
#include "cluster/node_registration.h"
#include "cluster/placement.h"
#include "kvstore/kvcache_service.h"
#include "kvstore/peer_client.h"

namespace kvcache::kvstore {

// How the node reaches etcd, from `config`'s etcd_tls: TLS with etcd's
// client certificate, or plaintext without ca_file. Errors name the field
// and file that failed.
absl::StatusOr<std::shared_ptr<grpc::ChannelCredentials>> EtcdCredentialsOf(
    const v1::ClusterConfig& config);

class ClusterMember {
 public:
  // Joins the cluster `node`'s configuration names, as reachable at
  // `advertise_address`, and starts the repair loop; peers are called with
  // `peer_credentials`, etcd with `etcd_credentials`. Never fails: while
  // etcd is unreachable the node serves alone and keeps trying.
  ClusterMember(NodeState& node, const std::string& advertise_address,
                PeerCredentials peer_credentials,
                std::shared_ptr<grpc::ChannelCredentials> etcd_credentials);
  ClusterMember(const ClusterMember&) = delete;
  ClusterMember& operator=(const ClusterMember&) = delete;
  // Stops the loop and leaves the cluster at once (revokes the lease).
  ~ClusterMember();

 private:
  struct PassResult {
    bool complete = true;  // every chunk is where placement wants it
    size_t repaired = 0;
    size_t handed_off = 0;
  };

  void Loop();
  // Sleeps until `due`, a membership change past `generation`, draining
  // starting (when `draining` is false) or shutdown; false on shutdown.
  bool Sleep(absl::Time due, uint64_t generation, bool draining);
  PassResult RunPass(const cluster::Membership& membership);
  // Makes sure the batch of keys is on its replicas; adds to `result`.
  void PlaceBatch(const std::vector<std::string>& keys,
                  const std::vector<cluster::NodeRecord>& nodes,
                  const cluster::NodeRecord& self, PassResult& result);
  // For each key some peers lack (missing_on[i] names them): whether a node
  // ahead of this one in the key's read order holds it, and so sends it
  // instead, so that each missing copy crosses the network once. A key left
  // to another holder for a few passes is sent by this node after all.
  std::vector<bool> SentByAnotherHolder(
      const std::vector<std::string>& keys,
      const std::vector<std::vector<std::string>>& missing_on,
      const cluster::Placement& placement, const cluster::NodeRecord& self);

  NodeState& node_;
  const v1::ClusterConfig& config_;
  cluster::MembershipView membership_;
  PeerClient peers_;
  std::unique_ptr<cluster::NodeRegistration> registration_;

  // Keys left to another holder, with how many passes in a row, as of the
  // last pass and of this one; used by the loop thread only.
  absl::flat_hash_map<std::string, int> deferred_;
  absl::flat_hash_map<std::string, int> next_deferred_;

  absl::Mutex mu_;
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  std::thread loop_;
};

}  // namespace kvcache::kvstore

#endif  // KVCACHE_KVSTORE_CLUSTER_MEMBER_H_
