#include "cluster/placement.h"

#include <algorithm>
#include <utility>

namespace kvcache::cluster {
namespace {

// FNV-1a: fixed across processes and builds, unlike absl::Hash.
uint64_t Fnv1a(absl::string_view bytes) {
  uint64_t h = 0xcbf29ce484222325ull;
  for (const char c : bytes) {
    h ^= static_cast<unsigned char>(c);
    h *= 0x100000001b3ull;
  }
  return h;
}

// MurmurHash3's finaliser: spreads a (key, node) pair's bits so that scores
// of different nodes for one key are independent.
uint64_t Mix(uint64_t h) {
  h ^= h >> 33;
  h *= 0xff51afd7ed558ccdull;
  h ^= h >> 33;
  h *= 0xc4ceb9fe1a85ec53ull;
  h ^= h >> 33;
  return h;
}

}  // namespace

Placement::Placement(const std::vector<NodeRecord>& nodes, uint32_t replication)
    : nodes_(nodes), replication_(std::max<uint32_t>(1, replication)) {
  node_hashes_.reserve(nodes.size());
  for (const NodeRecord& node : nodes) {
    node_hashes_.push_back(Mix(Fnv1a(node.node_id)));
  }
}

std::vector<const NodeRecord*> Placement::Ranked(absl::string_view key) const {
  const uint64_t key_hash = Fnv1a(key);
  std::vector<std::pair<uint64_t, const NodeRecord*>> scored;
  scored.reserve(nodes_.size());
  for (size_t i = 0; i < nodes_.size(); ++i) {
    scored.emplace_back(Mix(key_hash ^ node_hashes_[i]), &nodes_[i]);
  }
  // Ties (vanishingly rare) break by node id so every process agrees.
  std::sort(scored.begin(), scored.end(), [](const auto& a, const auto& b) {
    return a.first != b.first ? a.first > b.first
                              : a.second->node_id < b.second->node_id;
  });
  std::vector<const NodeRecord*> ranked;
  ranked.reserve(scored.size());
  for (const auto& [score, node] : scored) ranked.push_back(node);
  return ranked;
}

std::vector<const NodeRecord*> Placement::Replicas(
    absl::string_view key) const {
  std::vector<const NodeRecord*> replicas;
  for (const NodeRecord* node : Ranked(key)) {
    if (replicas.size() == replication_) break;
    if (!node->draining) replicas.push_back(node);
  }
  return replicas;
}

std::vector<const NodeRecord*> Placement::ReadOrder(
    absl::string_view key) const {
  std::vector<const NodeRecord*> order = Replicas(key);
  for (const NodeRecord* node : Ranked(key)) {
    if (std::find(order.begin(), order.end(), node) == order.end()) {
      order.push_back(node);
    }
  }
  return order;
}

}  // namespace kvcache::cluster
