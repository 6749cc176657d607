// A client for a cluster of kvcached nodes, with the same calls as
// KvCacheClient (client/kvcache_client.h).
//
// It follows the cluster's membership in etcd (cluster/membership.h) and
// places chunks by rendezvous hashing (cluster/placement.h), exactly as the
// nodes do:
//  - Put writes each chunk to its `replication_factor` replicas in parallel;
//    it succeeds once every chunk is on at least one (the nodes' repair loop
//    restores the missing copies).
//  - Get reads each chunk from its first replica, then the other replicas,
//    then every other node (a draining node, or a previous owner that has
//    not yet handed the chunk to a node that just joined). A dead node costs
//    a fast UNAVAILABLE and a retry elsewhere, not a failed fetch.
//  - Lookup asks every replica of the prompt's chunks in parallel and
//    returns the longest prefix whose every chunk some replica holds.
//  - Delete, Pin and Unpin apply to every node holding the chunk.
// While etcd is unreachable it keeps using the last membership it read.
//
// Thread-safe; meant to be shared. Errors are KvCacheClient's, with the
// node named; NOT_FOUND from Get names the key and every node asked.
#ifndef KVCACHE_CLIENT_CLUSTER_CLIENT_H_
#define KVCACHE_CLIENT_CLUSTER_CLIENT_H_

#include <memory>
#include <string>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "absl/types/span.h"
#include "client/chunk_key.h"
#include "client/kvcache_client.h"
#include "cluster/membership.h"

namespace kvcache {

struct ClusterClientOptions {
  // host:port of etcd client endpoints.
  std::vector<std::string> etcd_endpoints = {"127.0.0.1:2379"};
  std::string cluster_name = "default";
  // Must match the nodes' cluster.replication_factor.
  uint32_t replication_factor = 2;
  // How often membership is read in full from etcd; changes arrive at once
  // through a watch in between (see cluster/membership.h).
  absl::Duration membership_poll = absl::Seconds(10);
  // TLS to etcd: the CA etcd's certificate chains to (setting it turns TLS
  // on), and a client certificate etcd accepts when it requires one.
  std::string etcd_ca_file;
  std::string etcd_cert_file;
  std::string etcd_key_file;
  // Settings for the call to each node, credentials included (the same CA,
  // client certificate and token serve every node, so node certificates
  // must name the addresses nodes advertise; leave server_name empty);
  // `address` is ignored (membership says where nodes are). A short
  // connect_timeout keeps a node that died but is still listed from stalling
  // calls.
  ClientOptions node = {.connect_timeout = absl::Seconds(1)};
};

class ClusterClient : public ChunkStore {
 public:
  // Reads the membership once. UNAVAILABLE if etcd cannot be read or the
  // cluster has no nodes; an etcd credential file that cannot be used is
  // reported naming it.
  static absl::StatusOr<std::unique_ptr<ClusterClient>> Connect(
      const ClusterClientOptions& options);

  // Lookup asks the owners of the keys in parallel and merges; Put writes
  // to every replica (it succeeds once each chunk is on one); Get tries the
  // replicas, then every other node. Delete returns how many of the keys
  // some node held.
  absl::StatusOr<LookupResult> Lookup(absl::Span<const ChunkKey> keys) override;
  absl::Status Put(absl::Span<const ChunkToPut> chunks,
                   const PutOptions& options = {}) override;
  absl::StatusOr<std::vector<FetchedChunk>> Get(
      absl::Span<const ChunkKey> keys) override;
  absl::StatusOr<uint32_t> Delete(absl::Span<const ChunkKey> keys) override;
  absl::StatusOr<absl::Time> Pin(absl::Span<const ChunkKey> keys,
                                 absl::Duration ttl) override;
  absl::Status Unpin(absl::Span<const ChunkKey> keys) override;

  // The membership as last read.
  std::shared_ptr<const cluster::Membership> Membership() const {
    return membership_->Current();
  }
  // The client for one node (connected on first use), e.g. for Admin calls.
  absl::StatusOr<KvCacheClient*> Node(const cluster::NodeRecord& node);

 private:
  ClusterClient(const ClusterClientOptions& options,
                std::shared_ptr<grpc::ChannelCredentials> etcd_credentials);

  // Asks a node which namespace this caller's keys are stored in.
  absl::Status LearnKeyNamespace();
  // What nodes place a chunk by: its stored key (cluster/stored_key.h).
  std::string PlacementKey(const ChunkKey& key) const;

  const ClusterClientOptions options_;
  std::unique_ptr<cluster::MembershipView> membership_;
  // Set once by Connect.
  std::string key_namespace_;
  absl::Mutex mu_;
  // By address.
  absl::flat_hash_map<std::string, std::unique_ptr<KvCacheClient>> nodes_
      ABSL_GUARDED_BY(mu_);
};

}  // namespace kvcache

#endif  // KVCACHE_CLIENT_CLUSTER_CLIENT_H_
