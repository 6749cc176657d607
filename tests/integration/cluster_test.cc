// A cluster of real kvcached processes around a real etcd, on loopback:
// chunks survive a node killed with SIGKILL, a node frozen (SIGSTOP) and
// back, a node joining and a node draining while a reader fetches all the
// time, and an etcd outage. PartitionTest runs one node in a network
// namespace of its own to cut it off the network while it runs.
#include <gtest/gtest.h>
#include <signal.h>

#include <atomic>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "client/chunk_key.h"
#include "client/cluster_client.h"
#include "client/kvcache_client.h"
#include "cluster/placement.h"
#include "cluster/stored_key.h"
#include "tests/testing/daemon_process.h"
#include "tests/testing/etcd_process.h"
#include "tests/testing/network_namespace.h"
#include "tests/testing/tenant_access.h"

namespace kvcache {
namespace {

using ::kvcache::testing::DaemonProcess;
using ::kvcache::testing::EtcdProcess;
using ::kvcache::testing::NetworkNamespace;

constexpr char kDaemon[] = "kvstore/kvcached";
constexpr char kCtl[] = "client/kvcachectl";
constexpr char kCluster[] = "test";
constexpr int kPrompts = 12;
constexpr int kChunksPerPrompt = 4;
constexpr size_t kChunkBytes = 48 << 10;

struct Prompt {
  std::vector<ChunkKey> keys;
  std::vector<std::string> chunks;
};

std::vector<Prompt> MakePrompts(int count, int seed) {
  std::mt19937_64 rng(seed);
  KeySpace space;
  space.model_id = "cluster-test";
  space.chunk_tokens = 4;
  std::vector<Prompt> prompts(count);
  for (int p = 0; p < count; ++p) {
    std::vector<int32_t> tokens(4 * kChunksPerPrompt);
    for (size_t t = 0; t < tokens.size(); ++t) {
      tokens[t] = seed * 100000 + p * 100 + t;
    }
    prompts[p].keys = *ChunkKeysForTokens(space, tokens);
    for (int c = 0; c < kChunksPerPrompt; ++c) {
      std::string bytes(kChunkBytes, '\0');
      for (size_t i = 0; i < bytes.size(); i += 8) {
        const uint64_t v = rng();
        std::memcpy(&bytes[i], &v, 8);
      }
      prompts[p].chunks.push_back(std::move(bytes));
    }
  }
  return prompts;
}

// Polls `done` every 100 ms until it holds or `timeout` passes.
template <typename Predicate>
bool WaitFor(Predicate done, absl::Duration timeout) {
  const absl::Time deadline = absl::Now() + timeout;
  while (absl::Now() < deadline) {
    if (done()) return true;
    absl::SleepFor(absl::Milliseconds(100));
  }
  return done();
}

class ClusterTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto etcd = EtcdProcess::Start(host_);
    ASSERT_TRUE(etcd.ok()) << etcd.status();
    etcd_ = std::move(*etcd);
  }

  // Starts node `id`, on a host of its own if `netns` is given; short lease
  // and quick repairs keep the test short.
  void StartNode(const std::string& id,
                 const NetworkNamespace* netns = nullptr) {
    testing::StartOptions options;
    options.host = netns ? netns->address() : host_;
    if (netns) options.network_namespace = netns->name();
    auto daemon = DaemonProcess::Start(
        kDaemon,
        {absl::StrCat("--set=node_id: \"", id, "\""),
         "--set=cpu_tier { capacity_bytes: 268435456 }",
         absl::StrCat("--set=cluster { etcd_endpoints: \"", etcd_->endpoint(),
                      "\" cluster_name: \"", kCluster,
                      "\" lease_ttl_seconds: 2 replication_factor: 2 "
                      "membership_poll_ms: 100 repair_interval_seconds: 2 }"),
         node_access_},
        options);
    ASSERT_TRUE(daemon.ok()) << daemon.status();
    nodes_.emplace(id, std::make_unique<DaemonProcess>(std::move(*daemon)));
  }

  // Connects once some node has registered (nodes register just after
  // they start serving).
  std::unique_ptr<ClusterClient> Connect() {
    ClusterClientOptions options;
    options.etcd_endpoints = {etcd_->endpoint()};
    options.cluster_name = kCluster;
    options.membership_poll = absl::Milliseconds(100);
    // A call to a node that is cut off hangs until its deadline before the
    // client turns to another replica; workers want that in seconds.
    options.node.timeout = absl::Seconds(5);
    options.node.token = token_;
    absl::StatusOr<std::unique_ptr<ClusterClient>> client;
    WaitFor(
        [&] {
          client = ClusterClient::Connect(options);
          return client.ok();
        },
        absl::Seconds(10));
    EXPECT_TRUE(client.ok()) << client.status();
    return client.ok() ? std::move(*client) : nullptr;
  }

  // Node ids `client` currently sees, in order, draining ones marked.
  static std::string Members(const ClusterClient& client) {
    std::string ids;
    for (const cluster::NodeRecord& node : client.Membership()->nodes) {
      absl::StrAppend(&ids, ids.empty() ? "" : ",", node.node_id,
                      node.draining ? "(draining)" : "");
    }
    return ids;
  }

  bool WaitForMembers(const ClusterClient& client, const std::string& ids) {
    const bool ok =
        WaitFor([&] { return Members(client) == ids; }, absl::Seconds(15));
    EXPECT_TRUE(ok) << "members " << Members(client) << ", want " << ids;
    return ok;
  }

  void PutAll(ClusterClient& client, const std::vector<Prompt>& prompts) {
    for (const Prompt& prompt : prompts) {
      std::vector<ChunkToPut> chunks;
      for (int c = 0; c < kChunksPerPrompt; ++c) {
        chunks.push_back({prompt.keys[c], prompt.chunks[c]});
      }
      ASSERT_TRUE(client.Put(chunks).ok());
    }
  }

  // Looks up and fetches every prompt, checking bytes; "" if all is well.
  static std::string FetchAll(ClusterClient& client,
                              const std::vector<Prompt>& prompts) {
    for (size_t p = 0; p < prompts.size(); ++p) {
      auto hit = client.Lookup(prompts[p].keys);
      if (!hit.ok()) return hit.status().ToString();
      if (hit->prefix_chunks != kChunksPerPrompt) {
        return absl::StrCat("prompt ", p, ": lookup found ", hit->prefix_chunks,
                            " chunks");
      }
      auto chunks = client.Get(prompts[p].keys);
      if (!chunks.ok()) return chunks.status().ToString();
      for (int c = 0; c < kChunksPerPrompt; ++c) {
        if ((*chunks)[c].bytes != prompts[p].chunks[c]) {
          return absl::StrCat("prompt ", p, " chunk ", c, " differs");
        }
      }
    }
    return "";
  }

  // Per node id, which keys of `prompts` it holds (asking each node).
  std::map<std::string, std::vector<bool>> Holdings(
      const std::vector<Prompt>& prompts) {
    std::vector<ChunkKey> keys;
    for (const Prompt& prompt : prompts) {
      keys.insert(keys.end(), prompt.keys.begin(), prompt.keys.end());
    }
    std::map<std::string, std::vector<bool>> held;
    for (const auto& [id, daemon] : nodes_) {
      // A node cut off from the network is skipped within seconds (its
      // channel may share a connection made before it was cut off).
      ClientOptions options;
      options.address = daemon->address();
      options.timeout = absl::Seconds(3);
      options.connect_timeout = absl::Seconds(1);
      options.token = token_;
      auto client = KvCacheClient::Connect(options);
      if (!client.ok()) continue;
      auto infos = (*client)->LookupEach(keys);
      if (!infos.ok()) continue;
      for (const v1::ChunkInfo& info : *infos) {
        held[id].push_back(info.tier() != v1::TIER_UNSPECIFIED);
      }
    }
    return held;
  }

  // True when every chunk is held by exactly its replicas under the
  // membership `client` sees (and by no other node).
  bool ExactlyOnReplicas(const ClusterClient& client,
                         const std::vector<Prompt>& prompts) {
    const auto membership = client.Membership();
    const cluster::Placement placement(membership->nodes, 2);
    const auto held = Holdings(prompts);
    size_t k = 0;
    for (const Prompt& prompt : prompts) {
      for (const ChunkKey& key : prompt.keys) {
        std::vector<std::string> want, have;
        const std::string stored =
            cluster::StoredKey(key_namespace_, key.AsBytes());
        for (const auto* node : placement.Replicas(stored)) {
          want.push_back(node->node_id);
        }
        for (const auto& [id, bits] : held) {
          if (bits[k]) have.push_back(id);
        }
        std::sort(want.begin(), want.end());
        if (want.size() != 2 || want != have) return false;
        ++k;
      }
    }
    return true;
  }

  void KillNode(const std::string& id) {
    nodes_[id]->Signal(SIGKILL);
    ASSERT_TRUE(nodes_[id]->WaitForExit(absl::Seconds(10)).ok());
    nodes_.erase(id);
  }

  // Runs kvcachectl against the cluster; returns its output, or "" with a
  // test failure if it exits non-zero.
  std::string Ctl(const std::string& args) {
    const std::string command =
        absl::StrCat(kCtl, " --etcd=", etcd_->endpoint(),
                     " --cluster=", kCluster, " ", args, " 2>&1");
    FILE* pipe = popen(command.c_str(), "r");
    std::string out;
    char buffer[4096];
    while (size_t n = fread(buffer, 1, sizeof(buffer), pipe)) {
      out.append(buffer, n);
    }
    EXPECT_EQ(pclose(pipe), 0) << command << "\n" << out;
    return out;
  }

  // A worker fetching every prompt over and over on a client of its own,
  // from construction until Stop().
  class Reader {
   public:
    Reader(std::unique_ptr<ClusterClient> client, std::vector<Prompt> prompts)
        : client_(std::move(client)),
          prompts_(std::move(prompts)),
          thread_([this] {
            while (!stop_.load()) {
              const std::string error = FetchAll(*client_, prompts_);
              if (!error.empty()) failures_.push_back(error);
              ++rounds_;
            }
          }) {}
    ~Reader() { Stop(); }

    // Rounds of fetching everything so far.
    int rounds() const { return rounds_.load(); }
    // Stops and returns the errors of the rounds that failed.
    std::vector<std::string> Stop() {
      stop_ = true;
      if (thread_.joinable()) thread_.join();
      return failures_;
    }

   private:
    const std::unique_ptr<ClusterClient> client_;
    const std::vector<Prompt> prompts_;
    std::atomic<bool> stop_{false};
    std::atomic<int> rounds_{0};
    std::vector<std::string> failures_;  // written by the thread only
    std::thread thread_;
  };

  // Where etcd and the nodes not in a namespace of their own listen.
  std::string host_ = "127.0.0.1";
  // Declared first so that it goes last, after the processes in it.
  std::unique_ptr<NetworkNamespace> netns_;
  std::unique_ptr<EtcdProcess> etcd_;
  std::map<std::string, std::unique_ptr<DaemonProcess>> nodes_;
  // On nodes with tenants: the access flag every node starts with, the
  // token the test's clients send, and the namespace their keys live in.
  std::string node_access_ = "--set=access {}";
  std::string token_;
  std::string key_namespace_;
};

// Runs node n2 on a host of its own (a network namespace) that the test can
// cut off from etcd and the other nodes while n2 keeps running; etcd and the
// other nodes listen on this side's end of its link.
class PartitionTest : public ClusterTest {
 protected:
  void SetUp() override {
    auto netns = NetworkNamespace::Create();
    ASSERT_TRUE(netns.ok()) << netns.status();
    netns_ = std::move(*netns);
    host_ = netns_->host_address();
    ClusterTest::SetUp();
  }
};

TEST_F(ClusterTest, NodeKilledWithSigkillLosesNoPrefix) {
  for (const char* id : {"n1", "n2", "n3"}) StartNode(id);
  auto client = Connect();
  ASSERT_NE(client, nullptr);
  ASSERT_TRUE(WaitForMembers(*client, "n1,n2,n3"));
  const std::vector<Prompt> prompts = MakePrompts(kPrompts, 1);
  PutAll(*client, prompts);
  EXPECT_TRUE(ExactlyOnReplicas(*client, prompts));

  KillNode("n2");
  // Before its lease runs out n2 is still listed: reads fall back to the
  // other replica.
  EXPECT_EQ(FetchAll(*client, prompts), "");
  ASSERT_TRUE(WaitForMembers(*client, "n1,n3"));
  EXPECT_EQ(FetchAll(*client, prompts), "");
  // The survivors copy what n2 held so every chunk has two copies again.
  EXPECT_TRUE(WaitFor([&] { return ExactlyOnReplicas(*client, prompts); },
                      absl::Seconds(20)));
}

// With tenants, nodes place and repair a chunk by its stored key: the
// tenant's cluster client must place by it too, and peers must show the
// node their own credentials to copy chunks.
TEST_F(ClusterTest, TenantChunksArePlacedAndRepairedByStoredKey) {
  const std::string peer_token_file =
      absl::StrCat(getenv("TEST_TMPDIR"), "/peer-token");
  std::ofstream(peer_token_file) << "peer-token-0123456789";
  token_ = "alice-token-0123456789";
  key_namespace_ = "tenant/alice";
  node_access_ = absl::StrCat(
      "--set=access { ", testing::TenantEntry("alice", token_),
      "peer_token_sha256: \"", kvstore::Sha256Hex("peer-token-0123456789"),
      "\" peer_token_file: \"", peer_token_file, "\" }");
  for (const char* id : {"n1", "n2", "n3"}) StartNode(id);
  auto client = Connect();
  ASSERT_NE(client, nullptr);
  ASSERT_TRUE(WaitForMembers(*client, "n1,n2,n3"));
  const std::vector<Prompt> prompts = MakePrompts(kPrompts, 5);
  PutAll(*client, prompts);
  EXPECT_TRUE(ExactlyOnReplicas(*client, prompts));
  EXPECT_EQ(FetchAll(*client, prompts), "");

  KillNode("n2");
  ASSERT_TRUE(WaitForMembers(*client, "n1,n3"));
  EXPECT_EQ(FetchAll(*client, prompts), "");
  EXPECT_TRUE(WaitFor([&] { return ExactlyOnReplicas(*client, prompts); },
                      absl::Seconds(20)));
}

TEST_F(ClusterTest, FrozenNodeAndBackHealsWithoutLossOrDuplicates) {
  for (const char* id : {"n1", "n2", "n3"}) StartNode(id);
  auto client = Connect();
  ASSERT_NE(client, nullptr);
  ASSERT_TRUE(WaitForMembers(*client, "n1,n2,n3"));
  std::vector<Prompt> prompts = MakePrompts(kPrompts, 4);
  PutAll(*client, prompts);

  // A hung host: n2 stops renewing its lease, and its kernel still accepts
  // connections and data that nobody answers; its chunks are kept.
  nodes_["n2"]->Signal(SIGSTOP);
  ASSERT_TRUE(WaitForMembers(*client, "n1,n3"));
  EXPECT_EQ(FetchAll(*client, prompts), "");
  const std::vector<Prompt> written_meanwhile = MakePrompts(kPrompts, 5);
  PutAll(*client, written_meanwhile);

  nodes_["n2"]->Signal(SIGCONT);
  ASSERT_TRUE(WaitForMembers(*client, "n1,n2,n3"));
  // n2 gets what was written without it, the extra copies made while it
  // was away go, and every chunk still reads back byte-exact.
  prompts.insert(prompts.end(), written_meanwhile.begin(),
                 written_meanwhile.end());
  EXPECT_TRUE(WaitFor([&] { return ExactlyOnReplicas(*client, prompts); },
                      absl::Seconds(30)));
  EXPECT_EQ(FetchAll(*client, prompts), "");
}

TEST_F(PartitionTest, PartitionedNodeRejoinsWithoutLossOrDuplicates) {
  StartNode("n1");
  StartNode("n2", netns_.get());
  StartNode("n3");
  auto client = Connect();
  ASSERT_NE(client, nullptr);
  ASSERT_TRUE(WaitForMembers(*client, "n1,n2,n3"));
  std::vector<Prompt> prompts = MakePrompts(kPrompts, 6);
  PutAll(*client, prompts);
  ASSERT_TRUE(ExactlyOnReplicas(*client, prompts));
  auto reader_client = Connect();
  ASSERT_NE(reader_client, nullptr);
  Reader reader(std::move(reader_client), prompts);

  // n2 keeps running but no longer reaches etcd or its peers, nor they it.
  const absl::Status cut = netns_->Cut();
  ASSERT_TRUE(cut.ok()) << cut;
  ASSERT_TRUE(WaitForMembers(*client, "n1,n3"));
  const int rounds_cut_off = reader.rounds();
  // Its lease ran out: n1 and n3 copy what they shared with it, so every
  // chunk has two copies again without n2. A repair pass that asked n2
  // before its lease ran out waits for the peer call's 30 s deadline first.
  EXPECT_TRUE(WaitFor([&] { return ExactlyOnReplicas(*client, prompts); },
                      absl::Seconds(60)));
  const std::vector<Prompt> written_meanwhile = MakePrompts(kPrompts, 7);
  PutAll(*client, written_meanwhile);
  EXPECT_EQ(FetchAll(*client, written_meanwhile), "");
  // The worker keeps reading everything from n1 and n3.
  EXPECT_TRUE(WaitFor([&] { return reader.rounds() > rounds_cut_off + 3; },
                      absl::Seconds(60)));

  const absl::Status restored = netns_->Restore();
  ASSERT_TRUE(restored.ok()) << restored;
  ASSERT_TRUE(WaitForMembers(*client, "n1,n2,n3"));
  // n2 gets what was written without it, the copies made while it was away
  // go, and every chunk still reads back byte-exact.
  prompts.insert(prompts.end(), written_meanwhile.begin(),
                 written_meanwhile.end());
  EXPECT_TRUE(WaitFor([&] { return ExactlyOnReplicas(*client, prompts); },
                      absl::Seconds(60)));
  EXPECT_EQ(FetchAll(*client, prompts), "");
  const std::vector<std::string> failures = reader.Stop();
  EXPECT_TRUE(failures.empty())
      << failures.size() << " failed, first: " << failures.front();
}

TEST_F(ClusterTest, JoinAndDrainWithoutFailedFetches) {
  for (const char* id : {"n1", "n2", "n3"}) StartNode(id);
  auto client = Connect();
  ASSERT_NE(client, nullptr);
  ASSERT_TRUE(WaitForMembers(*client, "n1,n2,n3"));
  const std::vector<Prompt> prompts = MakePrompts(kPrompts, 2);
  PutAll(*client, prompts);

  auto reader_client = Connect();
  ASSERT_NE(reader_client, nullptr);
  Reader reader(std::move(reader_client), prompts);

  StartNode("n4");
  ASSERT_TRUE(WaitForMembers(*client, "n1,n2,n3,n4"));
  // Old owners hand n4 its share and drop their extra copies.
  EXPECT_TRUE(WaitFor([&] { return ExactlyOnReplicas(*client, prompts); },
                      absl::Seconds(30)));

  const std::string drained = Ctl("drain n2 --wait=60s");
  EXPECT_TRUE(absl::StrContains(drained, "n2 drained")) << drained;
  const int rounds_before_stop = reader.rounds();
  nodes_["n2"]->Signal(SIGTERM);
  EXPECT_EQ(*nodes_["n2"]->WaitForExit(absl::Seconds(20)), 0);
  nodes_.erase("n2");
  ASSERT_TRUE(WaitForMembers(*client, "n1,n3,n4"));
  EXPECT_TRUE(WaitFor([&] { return ExactlyOnReplicas(*client, prompts); },
                      absl::Seconds(30)));
  // Keep reading a little after n2 left.
  WaitFor([&] { return reader.rounds() > rounds_before_stop + 3; },
          absl::Seconds(20));
  const std::vector<std::string> failures = reader.Stop();
  EXPECT_GT(reader.rounds(), 3);
  EXPECT_TRUE(failures.empty())
      << failures.size() << " failed, first: " << failures.front();
}

TEST_F(ClusterTest, KeepsServingThroughEtcdOutage) {
  for (const char* id : {"n1", "n2", "n3"}) StartNode(id);
  auto client = Connect();
  ASSERT_NE(client, nullptr);
  ASSERT_TRUE(WaitForMembers(*client, "n1,n2,n3"));
  const std::vector<Prompt> before = MakePrompts(kPrompts, 3);
  PutAll(*client, before);

  etcd_->Kill();
  // Longer than the lease TTL: nobody may drop out for lack of etcd.
  absl::SleepFor(absl::Seconds(3));
  EXPECT_EQ(Members(*client), "n1,n2,n3");
  EXPECT_EQ(FetchAll(*client, before), "");
  const std::vector<Prompt> during = MakePrompts(4, 4);
  PutAll(*client, during);
  EXPECT_EQ(FetchAll(*client, during), "");

  ASSERT_TRUE(etcd_->Restart().ok());
  // Nodes renew their leases (or register afresh) and a new client sees
  // the whole cluster.
  absl::SleepFor(absl::Seconds(3));
  auto fresh = Connect();
  ASSERT_NE(fresh, nullptr);
  ASSERT_TRUE(WaitForMembers(*fresh, "n1,n2,n3"));
  EXPECT_EQ(FetchAll(*fresh, before), "");
  EXPECT_EQ(FetchAll(*fresh, during), "");

  const std::string status = Ctl("cluster status");
  for (const char* id : {"n1", "n2", "n3"}) {
    EXPECT_TRUE(absl::StrContains(status, id)) << status;
  }
  EXPECT_TRUE(absl::StrContains(status, "3 nodes")) << status;
}

TEST_F(ClusterTest, ClearErrorsForUnknownKeysAndMissingEtcd) {
  StartNode("n1");
  auto client = Connect();
  ASSERT_NE(client, nullptr);
  ASSERT_TRUE(WaitForMembers(*client, "n1"));
  const std::vector<Prompt> absent = MakePrompts(1, 5);
  auto got = client->Get(absent[0].keys);
  EXPECT_EQ(got.status().code(), absl::StatusCode::kNotFound);
  EXPECT_TRUE(
      absl::StrContains(got.status().message(), "is held by no reachable node"))
      << got.status();
  EXPECT_EQ(client->Lookup(absent[0].keys)->prefix_chunks, 0u);

  ClusterClientOptions options;
  options.etcd_endpoints = {
      absl::StrCat("127.0.0.1:", testing::FreeLoopbackPort())};
  auto no_etcd = ClusterClient::Connect(options);
  EXPECT_EQ(no_etcd.status().code(), absl::StatusCode::kUnavailable);
  EXPECT_TRUE(absl::StrContains(no_etcd.status().message(), "etcd"))
      << no_etcd.status();
}

}  // namespace
}  // namespace kvcache
