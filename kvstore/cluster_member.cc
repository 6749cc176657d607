#include "kvstore/cluster_member.h"

#include <algorithm>
#include <cstdio>
#include <utility>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "cluster/placement.h"
#include "transfer/tls_credentials.h"

namespace kvcache::kvstore {
namespace {

using ::kvcache::cluster::Membership;
using ::kvcache::cluster::NodeRecord;

// Keys checked and copied per round trip to a peer.
constexpr size_t kBatchKeys = 256;
// How soon an incomplete pass is retried.
constexpr absl::Duration kRetryDelay = absl::Seconds(1);
// How many passes a missing copy is left to a holder ahead of this node
// before this node sends it too.
constexpr int kPassesLeftToOthers = 3;

cluster::EtcdOptions EtcdOptionsOf(
    const v1::ClusterConfig& config,
    std::shared_ptr<grpc::ChannelCredentials> credentials) {
  cluster::EtcdOptions etcd;
  etcd.endpoints.assign(config.etcd_endpoints().begin(),
                        config.etcd_endpoints().end());
  etcd.credentials = std::move(credentials);
  return etcd;
}

cluster::MembershipOptions MembershipOptionsOf(
    const v1::ClusterConfig& config,
    std::shared_ptr<grpc::ChannelCredentials> credentials) {
  return {EtcdOptionsOf(config, std::move(credentials)), config.cluster_name(),
          absl::Milliseconds(config.membership_poll_ms())};
}

std::string NodeIds(const Membership& membership) {
  return absl::StrJoin(
      membership.nodes, ",", [](std::string* out, const NodeRecord& node) {
        absl::StrAppend(out, node.node_id, node.draining ? "(draining)" : "");
      });
}

}  // namespace

absl::StatusOr<std::shared_ptr<grpc::ChannelCredentials>> EtcdCredentialsOf(
    const v1::ClusterConfig& config) {
  transfer::TlsFiles files;
  files.ca_file = config.etcd_tls().ca_file();
  files.cert_file = config.etcd_tls().cert_file();
  files.key_file = config.etcd_tls().key_file();
  files.ca_option = "cluster.etcd_tls.ca_file";
  files.cert_option = "cluster.etcd_tls.cert_file";
  files.key_option = "cluster.etcd_tls.key_file";
  return transfer::ClientCredentials(files);
}

ClusterMember::ClusterMember(
    NodeState& node, const std::string& advertise_address,
    PeerCredentials peer_credentials,
    std::shared_ptr<grpc::ChannelCredentials> etcd_credentials)
    : node_(node),
      config_(node.config().cluster()),
      membership_(MembershipOptionsOf(config_, etcd_credentials)),
      // A peer's key check is a lookup in its memory: a short deadline, so
      // a partitioned peer delays repair by seconds, not by a copy's 30 s.
      peers_(std::move(peer_credentials), /*lookup_timeout=*/absl::Seconds(3),
             /*copy_timeout=*/absl::Seconds(30)) {
  cluster::RegistrationOptions options;
  options.etcd = EtcdOptionsOf(config_, std::move(etcd_credentials));
  options.cluster_name = config_.cluster_name();
  options.ttl = absl::Seconds(config_.lease_ttl_seconds());
  options.on_state_change = [this](const absl::Status& status) {
    if (status.ok()) {
      std::fprintf(stderr, "kvcached: cluster %s: registered as %s\n",
                   config_.cluster_name().c_str(), node_.node_id().c_str());
    } else {
      std::fprintf(stderr,
                   "kvcached: cluster %s: not registered (%s); serving with "
                   "the last known membership and retrying\n",
                   config_.cluster_name().c_str(), status.ToString().c_str());
    }
  };
  NodeRecord self{node_.node_id(), advertise_address, node_.draining(),
                  absl::ToUnixMillis(node_.started())};
  registration_ = std::make_unique<cluster::NodeRegistration>(
      std::move(options), std::move(self));
  loop_ = std::thread([this] { Loop(); });
}

ClusterMember::~ClusterMember() {
  {
    absl::MutexLock lock(&mu_);
    stopping_ = true;
  }
  loop_.join();
  registration_.reset();  // revokes the lease: the node leaves now
}

bool ClusterMember::Sleep(absl::Time due, uint64_t generation, bool draining) {
  // The membership wait is sliced so that shutdown and a drain request
  // (a flag the Drain call sets) are seen within 100 ms.
  while (true) {
    {
      absl::MutexLock lock(&mu_);
      if (stopping_) return false;
    }
    const absl::Duration left = due - absl::Now();
    if (left <= absl::ZeroDuration() || node_.draining() != draining) {
      return true;
    }
    if (membership_
            .WaitForChange(generation, std::min(left, absl::Milliseconds(100)))
            ->generation != generation) {
      return true;
    }
  }
}

void ClusterMember::Loop() {
  uint64_t generation = 0;
  bool draining = false;
  while (true) {
    if (node_.draining() && !draining) {
      draining = true;
      registration_->SetDraining();  // clients stop placing chunks here
    }
    std::shared_ptr<const Membership> membership = membership_.Current();
    if (membership->generation != generation) {
      generation = membership->generation;
      std::fprintf(stderr, "kvcached: cluster %s: members %s\n",
                   config_.cluster_name().c_str(),
                   NodeIds(*membership).c_str());
    }
    const PassResult result = RunPass(*membership);
    node_.repaired_chunks.fetch_add(result.repaired);
    node_.handoff_chunks.fetch_add(result.handed_off);
    if (result.repaired + result.handed_off > 0) {
      std::fprintf(stderr,
                   "kvcached: cluster: copied %zu chunks to replicas that "
                   "lacked them, handed %zu to new owners\n",
                   result.repaired, result.handed_off);
    }
    if (draining && result.complete && !node_.handoff_done) {
      node_.handoff_done = true;
      std::fprintf(stderr,
                   "kvcached: drained: every chunk is held by its new owners; "
                   "the node can be stopped\n");
    }
    const absl::Duration wait =
        result.complete ? absl::Seconds(config_.repair_interval_seconds())
                        : kRetryDelay;
    if (!Sleep(absl::Now() + wait, generation, draining)) return;
  }
}

ClusterMember::PassResult ClusterMember::RunPass(const Membership& membership) {
  PassResult result;
  std::vector<NodeRecord> nodes = membership.nodes;
  auto self = std::find_if(nodes.begin(), nodes.end(), [&](const auto& n) {
    return n.node_id == node_.node_id();
  });
  if (self == nodes.end()) {
    result.complete = false;  // not (yet) listed: placement would skip us
    return result;
  }
  // Our own record may lag behind a drain that just started.
  self->draining = node_.draining();
  const std::vector<std::string> keys = node_.store().Keys();
  next_deferred_.clear();
  for (size_t i = 0; i < keys.size(); i += kBatchKeys) {
    const std::vector<std::string> batch(
        keys.begin() + i, keys.begin() + std::min(keys.size(), i + kBatchKeys));
    PlaceBatch(batch, nodes, *self, result);
    absl::MutexLock lock(&mu_);
    if (stopping_) break;
  }
  deferred_.swap(next_deferred_);
  return result;
}

void ClusterMember::PlaceBatch(const std::vector<std::string>& keys,
                               const std::vector<NodeRecord>& nodes,
                               const NodeRecord& self, PassResult& result) {
  const cluster::Placement placement(nodes, config_.replication_factor());
  // Per key: peers that should hold it, peers confirmed to, and whether we
  // are one of its replicas.
  std::vector<size_t> wanted(keys.size()), confirmed(keys.size());
  std::vector<bool> ours(keys.size());
  absl::flat_hash_map<std::string, std::vector<size_t>> by_peer;
  for (size_t i = 0; i < keys.size(); ++i) {
    for (const NodeRecord* replica : placement.Replicas(keys[i])) {
      if (replica->node_id == self.node_id) {
        ours[i] = true;
      } else {
        ++wanted[i];
        by_peer[replica->address].push_back(i);
      }
    }
  }
  // Which peers lack which keys.
  std::vector<std::pair<std::string, std::vector<size_t>>> missing_by_peer;
  std::vector<std::vector<std::string>> missing_on(keys.size());
  for (const auto& [address, indices] : by_peer) {
    std::vector<std::string> asked;
    for (size_t i : indices) asked.push_back(keys[i]);
    absl::StatusOr<std::vector<bool>> held = peers_.Holds(address, asked);
    if (!held.ok()) continue;  // counted as unconfirmed below
    std::vector<size_t> missing;
    for (size_t j = 0; j < indices.size(); ++j) {
      if ((*held)[j]) {
        ++confirmed[indices[j]];
      } else {
        missing.push_back(indices[j]);
        missing_on[indices[j]].push_back(address);
      }
    }
    if (!missing.empty()) missing_by_peer.emplace_back(address, missing);
  }
  const std::vector<bool> sent_elsewhere =
      SentByAnotherHolder(keys, missing_on, placement, self);
  for (const auto& [address, indices] : missing_by_peer) {
    std::vector<std::string> to_copy;
    std::vector<size_t> copied_indices;
    for (size_t i : indices) {
      if (sent_elsewhere[i]) continue;
      to_copy.push_back(keys[i]);
      copied_indices.push_back(i);
    }
    if (to_copy.empty()) continue;
    absl::StatusOr<size_t> copied =
        peers_.Copy(address, to_copy, node_.store());
    if (!copied.ok()) {
      std::fprintf(stderr, "kvcached: cluster: %s\n",
                   copied.status().ToString().c_str());
      continue;
    }
    for (size_t i : copied_indices) {
      ++confirmed[i];
      ++(ours[i] ? result.repaired : result.handed_off);
    }
  }
  for (size_t i = 0; i < keys.size(); ++i) {
    const bool placed = wanted[i] > 0 && confirmed[i] == wanted[i];
    if (ours[i]) {
      result.complete &= confirmed[i] == wanted[i];
    } else if (!placed) {
      result.complete = false;  // no other node can take it yet
    } else if (!self.draining) {
      // Handed off: the new owners hold it. A draining node keeps its copy
      // to serve reads until it stops.
      node_.store().Delete(keys[i]).IgnoreError();
    }
  }
}

std::vector<bool> ClusterMember::SentByAnotherHolder(
    const std::vector<std::string>& keys,
    const std::vector<std::vector<std::string>>& missing_on,
    const cluster::Placement& placement, const NodeRecord& self) {
  // Per node ahead of us in a key's read order (not one lacking the key):
  // the keys to ask it about.
  absl::flat_hash_map<std::string, std::vector<size_t>> ask;
  for (size_t i = 0; i < keys.size(); ++i) {
    if (missing_on[i].empty()) continue;
    for (const NodeRecord* node : placement.ReadOrder(keys[i])) {
      if (node->node_id == self.node_id) break;
      if (std::find(missing_on[i].begin(), missing_on[i].end(),
                    node->address) == missing_on[i].end()) {
        ask[node->address].push_back(i);
      }
    }
  }
  std::vector<bool> sent(keys.size(), false);
  for (const auto& [address, indices] : ask) {
    std::vector<std::string> asked;
    for (size_t i : indices) asked.push_back(keys[i]);
    absl::StatusOr<std::vector<bool>> held = peers_.Holds(address, asked);
    if (!held.ok()) continue;  // unreachable: it sends nothing
    for (size_t j = 0; j < indices.size(); ++j) {
      if ((*held)[j]) sent[indices[j]] = true;
    }
  }
  // Left to another holder for several passes and still missing: that
  // holder cannot reach the peer, or its view of the cluster differs. Send
  // it ourselves.
  for (size_t i = 0; i < keys.size(); ++i) {
    if (!sent[i]) continue;
    auto it = deferred_.find(keys[i]);
    const int passes = it == deferred_.end() ? 0 : it->second;
    if (passes >= kPassesLeftToOthers) {
      sent[i] = false;
    } else {
      next_deferred_[keys[i]] = passes + 1;
    }
  }
  return sent;
}

}  // namespace kvcache::kvstore
