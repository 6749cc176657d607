#include "client/cluster_client.h"

#include <algorithm>
#include <optional>
#include <thread>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "cluster/placement.h"
#include "cluster/stored_key.h"
#include "transfer/tls_credentials.h"

namespace kvcache {
namespace {

using ::kvcache::cluster::NodeRecord;
using ::kvcache::cluster::Placement;

// Runs fn(i) for every i in [0, n) at once: one thread each, the last on the
// caller's. Returns when all are done.
template <typename Fn>
void InParallel(size_t n, Fn&& fn) {
  std::vector<std::thread> threads;
  for (size_t i = 0; i + 1 < n; ++i) threads.emplace_back(fn, i);
  if (n > 0) fn(n - 1);
  for (std::thread& t : threads) t.join();
}

template <typename T>
std::vector<T> Pick(absl::Span<const T> all, const std::vector<size_t>& at) {
  std::vector<T> picked;
  picked.reserve(at.size());
  for (size_t i : at) picked.push_back(all[i]);
  return picked;
}

bool NodeUnreachable(const absl::Status& status) {
  return absl::IsUnavailable(status) || absl::IsDeadlineExceeded(status);
}

std::string KeyName(const ChunkKey& key, size_t i) {
  return absl::StrCat("chunk ", i, " (", key.ToHex().substr(0, 16), "...)");
}

// A node, the keys (by index into the caller's span) it is asked about,
// and how the call went.
struct NodeShare {
  const NodeRecord* node = nullptr;
  std::vector<size_t> indices;
  KvCacheClient* client = nullptr;  // set by Connect
  absl::Status status;
};

// Adds key `index` to `node`'s share (one share per node).
void AddToShare(std::vector<NodeShare>& shares, const NodeRecord* node,
                size_t index) {
  auto it = std::find_if(shares.begin(), shares.end(),
                         [&](const auto& share) { return share.node == node; });
  if (it == shares.end()) {
    shares.push_back({node, {}, nullptr, absl::OkStatus()});
    it = shares.end() - 1;
  }
  it->indices.push_back(index);
}

// Sets the share's client; false (with the reason in its status) if the
// node cannot be reached.
bool ConnectShare(ClusterClient& cluster, NodeShare& share) {
  absl::StatusOr<KvCacheClient*> client = cluster.Node(*share.node);
  share.status = client.status();
  share.client = client.ok() ? *client : nullptr;
  return client.ok();
}

// Asks every node which of `keys` it holds; each share lists those keys.
std::vector<NodeShare> HoldersOf(ClusterClient& cluster,
                                 const cluster::Membership& membership,
                                 absl::Span<const ChunkKey> keys) {
  std::vector<NodeShare> shares(membership.nodes.size());
  InParallel(shares.size(), [&](size_t s) {
    NodeShare& share = shares[s];
    share.node = &membership.nodes[s];
    if (!ConnectShare(cluster, share)) return;
    absl::StatusOr<std::vector<v1::ChunkInfo>> infos =
        share.client->LookupEach(keys);
    share.status = infos.status();
    if (!infos.ok()) return;
    for (size_t i = 0; i < keys.size(); ++i) {
      if ((*infos)[i].tier() != v1::TIER_UNSPECIFIED) {
        share.indices.push_back(i);
      }
    }
  });
  return shares;
}

// The NOT_FOUND for a key no reachable node holds.
absl::Status HeldNowhere(const ChunkKey& key, size_t i,
                         absl::string_view done) {
  return absl::NotFoundError(
      absl::StrCat(KeyName(key, i), " is held by no reachable node; ", done));
}

}  // namespace

ClusterClient::ClusterClient(
    const ClusterClientOptions& options,
    std::shared_ptr<grpc::ChannelCredentials> etcd_credentials)
    : options_(options),
      membership_(
          std::make_unique<cluster::MembershipView>(cluster::MembershipOptions{
              {.endpoints = options.etcd_endpoints,
               .credentials = std::move(etcd_credentials)},
              options.cluster_name,
              options.membership_poll})) {}

absl::StatusOr<std::unique_ptr<ClusterClient>> ClusterClient::Connect(
    const ClusterClientOptions& options) {
  transfer::TlsFiles etcd_files;
  etcd_files.ca_file = options.etcd_ca_file;
  etcd_files.cert_file = options.etcd_cert_file;
  etcd_files.key_file = options.etcd_key_file;
  etcd_files.ca_option = "etcd_ca_file";
  etcd_files.cert_option = "etcd_cert_file";
  etcd_files.key_option = "etcd_key_file";
  absl::StatusOr<std::shared_ptr<grpc::ChannelCredentials>> etcd_credentials =
      transfer::ClientCredentials(etcd_files);
  if (!etcd_credentials.ok()) return etcd_credentials.status();
  std::unique_ptr<ClusterClient> client(
      new ClusterClient(options, *std::move(etcd_credentials)));
  if (absl::Status s = client->membership_->Refresh(); !s.ok()) {
    return absl::UnavailableError(
        absl::StrCat("cannot read the membership of cluster '",
                     options.cluster_name, "': ", s.message()));
  }
  if (client->Membership()->nodes.empty()) {
    return absl::UnavailableError(
        absl::StrCat("cluster '", options.cluster_name,
                     "' has no nodes registered in etcd"));
  }
  if (absl::Status s = client->LearnKeyNamespace(); !s.ok()) return s;
  return client;
}

absl::Status ClusterClient::LearnKeyNamespace() {
  // Every node of a cluster has the same access section, so any one that
  // answers says where this caller's keys are stored.
  absl::Status last = absl::UnavailableError("no node answered");
  for (const NodeRecord& node : Membership()->nodes) {
    absl::StatusOr<KvCacheClient*> client = Node(node);
    if (!client.ok()) {
      last = client.status();
      continue;
    }
    absl::StatusOr<v1::NodeInfoResponse> info = (*client)->NodeInfo();
    if (info.ok()) {
      key_namespace_ = info->key_namespace();
      return absl::OkStatus();
    }
    last = info.status();
    // Wrong credentials are as wrong on every other node.
    if (absl::IsUnauthenticated(last) || absl::IsPermissionDenied(last)) break;
  }
  return absl::Status(
      last.code(), absl::StrCat("cannot learn this caller's key namespace "
                                "from any node of cluster '",
                                options_.cluster_name, "': ", last.message()));
}

std::string ClusterClient::PlacementKey(const ChunkKey& key) const {
  return cluster::StoredKey(key_namespace_, key.AsBytes());
}

absl::StatusOr<KvCacheClient*> ClusterClient::Node(const NodeRecord& node) {
  {
    absl::MutexLock lock(&mu_);
    auto it = nodes_.find(node.address);
    if (it != nodes_.end()) return it->second.get();
  }
  // Connect outside the lock: an unreachable node must not stall calls to
  // the others.
  ClientOptions options = options_.node;
  options.address = node.address;
  absl::StatusOr<std::unique_ptr<KvCacheClient>> client =
      KvCacheClient::Connect(options);
  if (!client.ok()) {
    return absl::Status(
        client.status().code(),
        absl::StrCat("node ", node.node_id, ": ", client.status().message()));
  }
  absl::MutexLock lock(&mu_);
  auto [it, inserted] = nodes_.emplace(node.address, std::move(*client));
  return it->second.get();
}

absl::StatusOr<LookupResult> ClusterClient::Lookup(
    absl::Span<const ChunkKey> keys) {
  LookupResult result;
  if (keys.empty()) return result;
  const std::shared_ptr<const cluster::Membership> membership = Membership();
  const Placement placement(membership->nodes, options_.replication_factor);
  std::vector<NodeShare> shares;
  for (size_t i = 0; i < keys.size(); ++i) {
    for (const NodeRecord* node : placement.Replicas(PlacementKey(keys[i]))) {
      AddToShare(shares, node, i);
    }
  }
  // Whatever replica answers first for a key wins; all copies are equal.
  absl::Mutex mu;
  std::vector<std::optional<v1::ChunkInfo>> found(keys.size());
  InParallel(shares.size(), [&](size_t s) {
    NodeShare& share = shares[s];
    if (!ConnectShare(*this, share)) return;
    absl::StatusOr<std::vector<v1::ChunkInfo>> infos =
        share.client->LookupEach(Pick(keys, share.indices));
    share.status = infos.status();
    if (!infos.ok()) return;
    absl::MutexLock lock(&mu);
    for (size_t j = 0; j < share.indices.size(); ++j) {
      std::optional<v1::ChunkInfo>& slot = found[share.indices[j]];
      if (!slot && (*infos)[j].tier() != v1::TIER_UNSPECIFIED) {
        slot = (*infos)[j];
      }
    }
  });
  while (result.prefix_chunks < keys.size() && found[result.prefix_chunks]) {
    result.chunks.push_back(*found[result.prefix_chunks++]);
  }
  if (result.prefix_chunks == 0) {
    // A miss because every replica was unreachable is an error, not a miss.
    for (const NodeShare& share : shares) {
      if (share.status.ok()) return result;
    }
    if (!shares.empty()) return shares.front().status;
  }
  return result;
}

absl::Status ClusterClient::Put(absl::Span<const ChunkToPut> chunks,
                                const PutOptions& options) {
  if (chunks.empty()) return absl::OkStatus();
  const std::shared_ptr<const cluster::Membership> membership = Membership();
  const Placement placement(membership->nodes, options_.replication_factor);
  std::vector<NodeShare> shares;
  for (size_t i = 0; i < chunks.size(); ++i) {
    const std::vector<const NodeRecord*> replicas =
        placement.Replicas(PlacementKey(chunks[i].key));
    if (replicas.empty()) {
      return absl::FailedPreconditionError(
          absl::StrCat("no node of cluster '", options_.cluster_name,
                       "' takes new chunks (all ", membership->nodes.size(),
                       " are draining)"));
    }
    for (const NodeRecord* node : replicas) AddToShare(shares, node, i);
  }
  std::vector<std::atomic<int>> copies(chunks.size());
  InParallel(shares.size(), [&](size_t s) {
    NodeShare& share = shares[s];
    if (!ConnectShare(*this, share)) return;
    share.status = share.client->Put(Pick(chunks, share.indices), options);
    if (!share.status.ok()) return;
    for (size_t i : share.indices) copies[i].fetch_add(1);
  });
  for (size_t i = 0; i < chunks.size(); ++i) {
    if (copies[i].load() > 0) continue;
    absl::StatusCode code = absl::StatusCode::kUnavailable;
    std::vector<std::string> errors;
    for (const NodeShare& share : shares) {
      if (std::find(share.indices.begin(), share.indices.end(), i) !=
          share.indices.end()) {
        code = share.status.code();
        errors.push_back(std::string(share.status.message()));
      }
    }
    return absl::Status(code, absl::StrCat(KeyName(chunks[i].key, i),
                                           " was stored on none of its "
                                           "replicas: ",
                                           absl::StrJoin(errors, "; ")));
  }
  return absl::OkStatus();
}

absl::StatusOr<std::vector<FetchedChunk>> ClusterClient::Get(
    absl::Span<const ChunkKey> keys) {
  const std::shared_ptr<const cluster::Membership> membership = Membership();
  const Placement placement(membership->nodes, options_.replication_factor);
  std::vector<std::vector<const NodeRecord*>> order(keys.size());
  for (size_t i = 0; i < keys.size(); ++i) {
    order[i] = placement.ReadOrder(PlacementKey(keys[i]));
  }
  std::vector<std::optional<FetchedChunk>> fetched(keys.size());
  std::vector<std::vector<std::string>> failures(keys.size());
  std::vector<size_t> pending(keys.size());
  for (size_t i = 0; i < keys.size(); ++i) pending[i] = i;
  // Round r asks each pending key's r-th node in read order; one call per
  // node per round.
  for (size_t round = 0; !pending.empty(); ++round) {
    std::vector<NodeShare> shares;
    for (size_t i : pending) {
      if (round < order[i].size()) AddToShare(shares, order[i][round], i);
    }
    if (shares.empty()) break;
    InParallel(shares.size(), [&](size_t s) {
      NodeShare& share = shares[s];
      if (!ConnectShare(*this, share)) return;
      KvCacheClient& client = *share.client;
      std::vector<size_t> asked = share.indices;
      absl::StatusOr<std::vector<FetchedChunk>> chunks =
          client.Get(Pick(keys, asked));
      if (!chunks.ok() && !NodeUnreachable(chunks.status())) {
        // One absent key fails the whole stream: fetch the ones it holds.
        share.status = chunks.status();
        absl::StatusOr<std::vector<v1::ChunkInfo>> infos =
            client.LookupEach(Pick(keys, asked));
        if (!infos.ok()) return;
        std::vector<size_t> held;
        for (size_t j = 0; j < asked.size(); ++j) {
          if ((*infos)[j].tier() != v1::TIER_UNSPECIFIED) {
            held.push_back(asked[j]);
          }
        }
        asked = std::move(held);
        chunks = asked.empty() ? std::vector<FetchedChunk>()
                               : client.Get(Pick(keys, asked));
      }
      if (!chunks.ok()) {
        share.status = chunks.status();
        return;
      }
      for (size_t j = 0; j < asked.size(); ++j) {
        fetched[asked[j]] = std::move((*chunks)[j]);
      }
    });
    std::vector<size_t> still;
    for (const NodeShare& share : shares) {
      for (size_t i : share.indices) {
        if (fetched[i]) continue;
        still.push_back(i);
        failures[i].push_back(
            share.status.ok() ? absl::StrCat(share.node->node_id, ": not held")
                              : absl::StrCat(share.node->node_id, ": ",
                                             share.status.message()));
      }
    }
    pending = std::move(still);
  }
  if (!pending.empty()) {
    const size_t i = *std::min_element(pending.begin(), pending.end());
    return absl::NotFoundError(absl::StrCat(
        KeyName(keys[i], i), " is held by no reachable node of cluster '",
        options_.cluster_name, "' (",
        failures[i].empty() ? "the cluster has no nodes"
                            : absl::StrJoin(failures[i], "; "),
        ")"));
  }
  std::vector<FetchedChunk> chunks;
  chunks.reserve(keys.size());
  for (std::optional<FetchedChunk>& chunk : fetched) {
    chunks.push_back(std::move(*chunk));
  }
  return chunks;
}

absl::StatusOr<uint32_t> ClusterClient::Delete(
    absl::Span<const ChunkKey> keys) {
  const std::shared_ptr<const cluster::Membership> membership = Membership();
  std::vector<NodeShare> shares = HoldersOf(*this, *membership, keys);
  InParallel(shares.size(), [&](size_t s) {
    NodeShare& share = shares[s];
    if (!share.status.ok() || share.indices.empty()) return;
    share.status = share.client->Delete(Pick(keys, share.indices)).status();
  });
  std::vector<bool> held(keys.size());
  for (const NodeShare& share : shares) {
    // A node we could not ask may still hold a copy: say so rather than
    // report the keys gone.
    if (!share.status.ok()) return share.status;
    for (size_t i : share.indices) held[i] = true;
  }
  return static_cast<uint32_t>(std::count(held.begin(), held.end(), true));
}

absl::StatusOr<absl::Time> ClusterClient::Pin(absl::Span<const ChunkKey> keys,
                                              absl::Duration ttl) {
  const std::shared_ptr<const cluster::Membership> membership = Membership();
  std::vector<NodeShare> shares = HoldersOf(*this, *membership, keys);
  std::vector<bool> pinned(keys.size());
  absl::Mutex mu;
  absl::Time earliest = absl::InfiniteFuture();
  InParallel(shares.size(), [&](size_t s) {
    NodeShare& share = shares[s];
    if (!share.status.ok() || share.indices.empty()) return;
    absl::StatusOr<absl::Time> expiry =
        share.client->Pin(Pick(keys, share.indices), ttl);
    share.status = expiry.status();
    if (!expiry.ok()) return;
    absl::MutexLock lock(&mu);
    earliest = std::min(earliest, *expiry);
    for (size_t i : share.indices) pinned[i] = true;
  });
  for (size_t i = 0; i < keys.size(); ++i) {
    if (!pinned[i]) return HeldNowhere(keys[i], i, "the others were pinned");
  }
  return earliest;
}

absl::Status ClusterClient::Unpin(absl::Span<const ChunkKey> keys) {
  const std::shared_ptr<const cluster::Membership> membership = Membership();
  std::vector<NodeShare> shares = HoldersOf(*this, *membership, keys);
  InParallel(shares.size(), [&](size_t s) {
    NodeShare& share = shares[s];
    if (!share.status.ok() || share.indices.empty()) return;
    share.status = share.client->Unpin(Pick(keys, share.indices));
  });
  std::vector<bool> held(keys.size());
  for (const NodeShare& share : shares) {
    if (!share.status.ok()) return share.status;
    for (size_t i : share.indices) held[i] = true;
  }
  for (size_t i = 0; i < keys.size(); ++i) {
    if (!held[i]) return HeldNowhere(keys[i], i, "the others were unpinned");
  }
  return absl::OkStatus();
}

}  // namespace kvcache
