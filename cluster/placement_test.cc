#include "cluster/placement.h"

#include <gtest/gtest.h>

#include <map>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"

namespace kvcache::cluster {
namespace {

std::vector<NodeRecord> Nodes(int n) {
  std::vector<NodeRecord> nodes;
  for (int i = 0; i < n; ++i) {
    nodes.push_back({absl::StrCat("node-", i), absl::StrCat("10.0.0.", i)});
  }
  return nodes;
}

std::string Key(int i) { return absl::StrCat("chunk-key-", i); }

TEST(PlacementTest, ReplicasAreDistinctAndBestFirst) {
  const std::vector<NodeRecord> nodes = Nodes(5);
  const Placement placement(nodes, 3);
  for (int k = 0; k < 100; ++k) {
    const auto replicas = placement.Replicas(Key(k));
    ASSERT_EQ(replicas.size(), 3u);
    EXPECT_NE(replicas[0], replicas[1]);
    EXPECT_NE(replicas[1], replicas[2]);
    EXPECT_NE(replicas[0], replicas[2]);
    const auto order = placement.ReadOrder(Key(k));
    ASSERT_EQ(order.size(), 5u);
    EXPECT_EQ(std::vector<const NodeRecord*>(order.begin(), order.begin() + 3),
              replicas);
  }
}

TEST(PlacementTest, SpreadsKeysEvenly) {
  const std::vector<NodeRecord> nodes = Nodes(3);
  const Placement placement(nodes, 1);
  std::map<std::string, int> owned;
  constexpr int kKeys = 30000;
  for (int k = 0; k < kKeys; ++k) {
    ++owned[placement.Replicas(Key(k))[0]->node_id];
  }
  for (const auto& [node, count] : owned) {
    EXPECT_NEAR(count, kKeys / 3, kKeys / 30) << node;
  }
}

TEST(PlacementTest, JoiningNodeTakesOnlyItsShare) {
  const std::vector<NodeRecord> three = Nodes(3);
  const std::vector<NodeRecord> four = Nodes(4);
  const Placement before(three, 2), after(four, 2);
  constexpr int kKeys = 20000;
  int moved = 0;
  for (int k = 0; k < kKeys; ++k) {
    const auto old_replicas = before.Replicas(Key(k));
    for (const NodeRecord* node : after.Replicas(Key(k))) {
      if (node->node_id == "node-3") continue;
      // Every copy the new node does not take stays where it was.
      bool kept = false;
      for (const NodeRecord* old : old_replicas) {
        kept |= old->node_id == node->node_id;
      }
      EXPECT_TRUE(kept) << Key(k);
    }
    for (const NodeRecord* node : after.Replicas(Key(k))) {
      moved += node->node_id == "node-3";
    }
  }
  // The new node holds about R/N = 2/4 of the keys.
  EXPECT_NEAR(moved, kKeys / 2, kKeys / 20);
}

TEST(PlacementTest, DrainingNodesAreReadButNotWritten) {
  std::vector<NodeRecord> nodes = Nodes(3);
  nodes[1].draining = true;
  const Placement placement(nodes, 2);
  for (int k = 0; k < 200; ++k) {
    const auto replicas = placement.Replicas(Key(k));
    ASSERT_EQ(replicas.size(), 2u);
    for (const NodeRecord* node : replicas) EXPECT_FALSE(node->draining);
    EXPECT_EQ(placement.ReadOrder(Key(k)).back()->node_id, "node-1");
  }
}

TEST(PlacementTest, FewerNodesThanReplicas) {
  const std::vector<NodeRecord> nodes = Nodes(1);
  EXPECT_EQ(Placement(nodes, 3).Replicas(Key(1)).size(), 1u);
  const std::vector<NodeRecord> none;
  EXPECT_TRUE(Placement(none, 2).Replicas(Key(1)).empty());
}

}  // namespace
}  // namespace kvcache::cluster
