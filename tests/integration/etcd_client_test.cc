// The etcd client against a real etcd: keys, prefix ranges, watches, leases
// that expire or are revoked, a clear error when etcd is down; and a
// membership view that sees a node join or leave within milliseconds, by
// watching instead of polling.
#include "cluster/etcd_client.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <random>
#include <thread>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "cluster/membership.h"
#include "tests/testing/daemon_process.h"
#include "tests/testing/etcd_process.h"

namespace kvcache::cluster {
namespace {

using ::kvcache::testing::EtcdProcess;

class EtcdClientTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto etcd = EtcdProcess::Start();
    ASSERT_TRUE(etcd.ok()) << etcd.status();
    etcd_ = std::move(*etcd);
    client_ = std::make_unique<EtcdClient>(EtcdOptions{{etcd_->endpoint()}});
  }

  std::unique_ptr<EtcdProcess> etcd_;
  std::unique_ptr<EtcdClient> client_;
};

TEST_F(EtcdClientTest, PutAndRangeByPrefix) {
  ASSERT_TRUE(client_->Put("/a/1", "one").ok());
  ASSERT_TRUE(client_->Put("/a/2", std::string("t\0o", 3)).ok());
  ASSERT_TRUE(client_->Put("/b/1", "other").ok());
  auto range = client_->RangePrefix("/a/");
  ASSERT_TRUE(range.ok()) << range.status();
  EXPECT_GT(range->revision, 0);
  EXPECT_EQ(range->skipped.count, 0);
  const std::vector<KeyValue>& kvs = range->kvs;
  ASSERT_EQ(kvs.size(), 2u);
  EXPECT_EQ(kvs[0].key, "/a/1");
  EXPECT_EQ(kvs[0].value, "one");
  EXPECT_EQ(kvs[1].value, std::string("t\0o", 3));
  EXPECT_TRUE(client_->RangePrefix("/none/")->kvs.empty());
}

TEST_F(EtcdClientTest, KeysVanishWithTheirLease) {
  auto lease = client_->GrantLease(absl::Seconds(2));
  ASSERT_TRUE(lease.ok()) << lease.status();
  ASSERT_TRUE(client_->Put("/l/kept", "x", *lease).ok());
  EXPECT_TRUE(client_->KeepAlive(*lease).ok());
  ASSERT_TRUE(client_->RevokeLease(*lease).ok());
  EXPECT_TRUE(client_->RangePrefix("/l/")->kvs.empty());
  EXPECT_EQ(client_->KeepAlive(*lease).code(), absl::StatusCode::kNotFound);

  auto short_lease = client_->GrantLease(absl::Seconds(2));
  ASSERT_TRUE(short_lease.ok());
  ASSERT_TRUE(client_->Put("/l/expires", "x", *short_lease).ok());
  absl::SleepFor(absl::Seconds(3));
  EXPECT_TRUE(client_->RangePrefix("/l/")->kvs.empty());
  EXPECT_EQ(client_->Put("/l/late", "x", *short_lease).code(),
            absl::StatusCode::kNotFound);
}

TEST_F(EtcdClientTest, FallsOverToALiveEndpointAndNamesDeadOnes) {
  const std::string dead =
      absl::StrCat("127.0.0.1:", testing::FreeLoopbackPort());
  EtcdClient both({{dead, etcd_->endpoint()}});
  EXPECT_TRUE(both.Put("/f/1", "x").ok());
  etcd_->Kill();
  const absl::Status down = both.Put("/f/2", "x");
  EXPECT_EQ(down.code(), absl::StatusCode::kUnavailable);
  EXPECT_TRUE(absl::StrContains(down.message(), dead)) << down;
  EXPECT_TRUE(absl::StrContains(down.message(), etcd_->endpoint())) << down;
}

TEST_F(EtcdClientTest, WatchSeesEveryChangeAfterTheRange) {
  ASSERT_TRUE(client_->Put("/w/before", "0").ok());
  auto range = client_->RangePrefix("/w/");
  ASSERT_TRUE(range.ok()) << range.status();
  auto lease = client_->GrantLease(absl::Seconds(30));
  ASSERT_TRUE(lease.ok()) << lease.status();
  ASSERT_TRUE(client_->Put("/w/a", "1", *lease).ok());
  ASSERT_TRUE(client_->Put("/elsewhere", "x").ok());
  ASSERT_TRUE(client_->Put("/w/b", "2").ok());
  ASSERT_TRUE(client_->RevokeLease(*lease).ok());

  std::unique_ptr<PrefixWatch> watch =
      client_->WatchPrefix("/w/", range->revision + 1, absl::Seconds(10));
  std::vector<WatchEvent> seen;
  Skipped skipped;
  while (seen.size() < 3) {
    std::vector<WatchEvent> events;
    ASSERT_TRUE(watch->Next(&events, &skipped).ok());
    seen.insert(seen.end(), events.begin(), events.end());
  }
  ASSERT_EQ(seen.size(), 3u);
  EXPECT_EQ(seen[0].kv.key, "/w/a");
  EXPECT_EQ(seen[0].kv.value, "1");
  EXPECT_EQ(seen[1].kv.key, "/w/b");
  EXPECT_EQ(seen[2].kv.key, "/w/a");  // its lease revoked
  EXPECT_EQ(seen[2].type, WatchEvent::Type::kDelete);
  EXPECT_EQ(skipped.count, 0);

  // Cancel ends a Next under way.
  std::thread canceller([&] {
    absl::SleepFor(absl::Milliseconds(100));
    watch->Cancel();
  });
  std::vector<WatchEvent> events;
  EXPECT_EQ(watch->Next(&events, &skipped).code(),
            absl::StatusCode::kCancelled);
  canceller.join();
}

TEST_F(EtcdClientTest, AWatchEndsWhenEtcdGoes) {
  auto range = client_->RangePrefix("/g/");
  ASSERT_TRUE(range.ok()) << range.status();
  std::unique_ptr<PrefixWatch> watch =
      client_->WatchPrefix("/g/", range->revision + 1, absl::Seconds(30));
  ASSERT_TRUE(client_->Put("/g/1", "x").ok());
  std::vector<WatchEvent> events;
  Skipped skipped;
  ASSERT_TRUE(watch->Next(&events, &skipped).ok());
  etcd_->Kill();
  const absl::Status ended = watch->Next(&events, &skipped);
  EXPECT_EQ(ended.code(), absl::StatusCode::kUnavailable) << ended;
  EXPECT_TRUE(absl::StrContains(ended.message(), etcd_->endpoint())) << ended;
}

// Another member sees a node join (its record put) and leave (its lease
// revoked) through the watch, long before the resync that polling would
// have waited for.
TEST_F(EtcdClientTest, MembershipSeesJoinAndLeaveWithinMilliseconds) {
  MembershipOptions options;
  options.etcd.endpoints = {etcd_->endpoint()};
  options.cluster_name = "fast";
  options.resync_interval = absl::Seconds(5);
  MembershipView view(options);
  ASSERT_TRUE(view.Refresh().ok());
  const std::string key = NodesPrefix("fast") + "b";
  absl::Duration slowest;
  for (int round = 0; round < 5; ++round) {
    auto lease = client_->GrantLease(absl::Seconds(10));
    ASSERT_TRUE(lease.ok()) << lease.status();
    uint64_t generation = view.Current()->generation;
    NodeRecord b{"b", "127.0.0.1:2", false, round};
    // Timed from before the write: etcd may tell watchers before it
    // answers the writer.
    absl::Time written = absl::Now();
    ASSERT_TRUE(client_->Put(key, b.ToJson(), *lease).ok());
    auto seen = view.WaitForChange(generation, absl::Seconds(10));
    const absl::Duration join = absl::Now() - written;
    ASSERT_EQ(seen->nodes.size(), 1u);
    EXPECT_EQ(seen->nodes[0], b);

    generation = seen->generation;
    written = absl::Now();
    ASSERT_TRUE(client_->RevokeLease(*lease).ok());
    seen = view.WaitForChange(generation, absl::Seconds(10));
    const absl::Duration leave = absl::Now() - written;
    EXPECT_TRUE(seen->nodes.empty());
    std::printf("membership change seen: join %.1f ms, leave %.1f ms\n",
                absl::ToDoubleMilliseconds(join),
                absl::ToDoubleMilliseconds(leave));
    slowest = std::max({slowest, join, leave});
  }
  EXPECT_LT(slowest, absl::Milliseconds(300));
}

// Clients come and go: a view destroyed at any point of its first read or
// of its watch stops cleanly, while nodes keep changing.
TEST_F(EtcdClientTest, MembershipViewsComeAndGoWhileNodesChange) {
  MembershipOptions options;
  options.etcd.endpoints = {etcd_->endpoint()};
  options.cluster_name = "churn";
  std::atomic<bool> stop{false};
  std::thread writer([&] {
    for (int i = 0; !stop.load(); ++i) {
      NodeRecord record{"n", "127.0.0.1:3", false, i};
      // A write lost to an overloaded etcd only means one change fewer.
      (void)client_->Put(NodesPrefix("churn") + "n", record.ToJson());
    }
  });
  std::mt19937 rng(3);
  for (int i = 0; i < 60; ++i) {
    MembershipView view(options);
    if (i % 2 == 0) {
      EXPECT_TRUE(view.Refresh().ok());
    }
    absl::SleepFor(absl::Microseconds(rng() % 20000));
  }
  stop.store(true);
  writer.join();
}

// The watch reconnects: after an etcd outage the view follows changes
// again without a Refresh, well within the resync interval.
TEST_F(EtcdClientTest, MembershipWatchesAgainAfterAnOutage) {
  MembershipOptions options;
  options.etcd.endpoints = {etcd_->endpoint()};
  options.cluster_name = "outage";
  options.resync_interval = absl::Seconds(30);
  MembershipView view(options);
  ASSERT_TRUE(view.Refresh().ok());
  etcd_->Kill();
  ASSERT_TRUE(etcd_->Restart().ok());
  // Long enough for the view to have read the range again after the
  // restart (it retries every second).
  absl::SleepFor(absl::Seconds(2));
  const uint64_t generation = view.Current()->generation;
  NodeRecord c{"c", "127.0.0.1:3", false, 3};
  ASSERT_TRUE(client_->Put(NodesPrefix("outage") + "c", c.ToJson()).ok());
  auto seen = view.WaitForChange(generation, absl::Seconds(3));
  ASSERT_EQ(seen->nodes.size(), 1u);
  EXPECT_EQ(seen->nodes[0], c);
  EXPECT_TRUE(view.last_error().ok()) << view.last_error();
}

}  // namespace
}  // namespace kvcache::cluster
