#include "kvstore/eviction_order.h"

#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "absl/container/flat_hash_map.h"

namespace kvcache::kvstore {
namespace {

// A tier's bookkeeping around an EvictionOrder: keys, their owners and
// places, each chunk one byte.
class Chunks {
 public:
  explicit Chunks(const OwnerQuotas& quotas) : order_(quotas) {}

  void Add(const std::string& key, const std::string& owner) {
    places_[key] = order_.Add(key, owner, 1);
  }
  void Touch(const std::string& key) { order_.Touch(places_[key]); }
  void Remove(const std::string& key) {
    order_.Remove(places_[key], 1);
    places_.erase(key);
  }
  // The keys room for a chunk of `owner` takes, in order, until `n` went.
  std::vector<std::string> EvictForRoom(const std::string& owner, size_t n) {
    std::vector<std::string> taken;
    order_.OfferForRoom(owner, [&](const std::string& key, bool) {
      taken.push_back(key);
      Remove(taken.back());
      return taken.size() < n;
    });
    return taken;
  }
  EvictionOrder& order() { return order_; }

 private:
  EvictionOrder order_;
  absl::flat_hash_map<std::string, EvictionOrder::Place> places_;
};

TEST(EvictionOrderTest, CountsEachOwnersBytes) {
  Chunks chunks({{"a", 10}});
  chunks.Add("a1", "a");
  chunks.Add("a2", "a");
  chunks.Add("b1", "b");
  EXPECT_EQ(chunks.order().used("a"), 2u);
  EXPECT_EQ(chunks.order().used("b"), 1u);
  EXPECT_EQ(chunks.order().quota("a"), 10u);
  EXPECT_EQ(chunks.order().quota("b"), 0u);
  chunks.Remove("b1");
  // An owner without a quota is forgotten with its last chunk; one with a
  // quota is reported even when it holds nothing.
  chunks.Remove("a1");
  chunks.Remove("a2");
  const std::vector<OwnerUsage> usage = chunks.order().Usage();
  ASSERT_EQ(usage.size(), 1u);
  EXPECT_EQ(usage[0].owner, "a");
  EXPECT_EQ(usage[0].used_bytes, 0u);
  EXPECT_EQ(usage[0].quota_bytes, 10u);
}

TEST(EvictionOrderTest, RoomComesFromOverQuotaThenUnquotedThenOwn) {
  // "a" is one over its quota; "b" and "c" are within theirs; "free" has
  // no quota.
  Chunks chunks({{"a", 1}, {"b", 5}, {"c", 5}});
  chunks.Add("b1", "b");
  chunks.Add("a1", "a");
  chunks.Add("c1", "c");
  chunks.Add("free1", "free");
  chunks.Add("a2", "a");
  chunks.Add("free2", "");
  chunks.Add("c2", "c");
  EXPECT_EQ(chunks.EvictForRoom("c", 100),
            (std::vector<std::string>{"a1", "free1", "free2", "c1", "c2"}));
  // What is left is b's (within its quota) and a's last chunk (at it).
  EXPECT_EQ(chunks.order().all(), (EvictionOrder::Queue{"b1", "a2"}));
}

TEST(EvictionOrderTest, TouchMovesAChunkToTheBackOfBothLists) {
  Chunks chunks({{"a", 5}});
  chunks.Add("a1", "a");
  chunks.Add("a2", "a");
  chunks.Add("x", "");
  chunks.Touch("a1");
  std::vector<std::string> offered;
  chunks.order().OfferOwn("a", [&](const std::string& key, bool leaves_only) {
    if (leaves_only) offered.push_back(key);
    return true;
  });
  EXPECT_EQ(offered, (std::vector<std::string>{"a2", "a1"}));
  EXPECT_EQ(chunks.order().all(), (EvictionOrder::Queue{"a2", "x", "a1"}));
}

TEST(EvictionOrderTest, OfferOwnIsEmptyWithoutAQuota) {
  Chunks chunks({});
  chunks.Add("x", "b");
  bool offered = false;
  chunks.order().OfferOwn("b", [&](const std::string&, bool) {
    offered = true;
    return true;
  });
  EXPECT_FALSE(offered);
  EXPECT_TRUE(chunks.order().MayEvictFor("a", "b"));
}

}  // namespace
}  // namespace kvcache::kvstore
