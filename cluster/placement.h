// Which nodes hold a chunk: rendezvous (highest random weight) hashing of the
// chunk key over the cluster's nodes, with a replication factor.
//
// Every node gets a score per key from a fixed hash of (key, node id); the
// `replication` serving nodes with the highest scores hold the key. When a
// node joins or leaves, only keys for which it is (or was) among the top
// scorers change owners, and every client and node computes the same answer
// from the same membership without talking to each other. The hash is
// fixed (not seeded per process) for that reason.
#ifndef KVCACHE_CLUSTER_PLACEMENT_H_
#define KVCACHE_CLUSTER_PLACEMENT_H_

#include <cstdint>
#include <vector>

#include "absl/strings/string_view.h"
#include "cluster/membership.h"

namespace kvcache::cluster {

// Immutable and cheap to build; thread-safe.
class Placement {
 public:
  // `nodes` must outlive the Placement.
  Placement(const std::vector<NodeRecord>& nodes, uint32_t replication);

  // The nodes that should hold `key`: the `replication` highest-scoring
  // nodes that are not draining, best first (fewer if the cluster has fewer).
  std::vector<const NodeRecord*> Replicas(absl::string_view key) const;

  // Every node in the order a reader should try them: the replicas, then the
  // others by score (draining nodes, and previous owners that have not yet
  // handed the key over after a node joined).
  std::vector<const NodeRecord*> ReadOrder(absl::string_view key) const;

  uint32_t replication() const { return replication_; }

 private:
  // Nodes by descending score for `key`.
  std::vector<const NodeRecord*> Ranked(absl::string_view key) const;

  const std::vector<NodeRecord>& nodes_;
  std::vector<uint64_t> node_hashes_;  // parallel to nodes_
  const uint32_t replication_;
};

}  // namespace kvcache::cluster

#endif  // KVCACHE_CLUSTER_PLACEMENT_H_
