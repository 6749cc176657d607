// Benchmarks a kvcache cluster on this machine: a real etcd and real kvcached
// nodes on loopback, driven through ClusterClient as workers drive them.
//
//  1. Put/Get throughput: client threads sharing one ClusterClient put, then
//     get, random 4 MiB and 256 KiB chunks, one chunk per call, on clusters
//     of 1, 2 and 3 nodes with replication 1 and (2 and 3 nodes) 2. A plain
//     KvCacheClient on the one-node cluster's node is the baseline without
//     placement.
//  2. Prefix Lookup latency of a 128-chunk prompt: one call asks the
//     replicas of all its chunks in parallel.
//  3. Rebalance: chunks loaded into 2 nodes; the time until a 3rd node that
//     joins holds its share and the old owners have dropped their extra
//     copies, then the time until a drained node reports that its new owners
//     hold everything it had.
//
// The clusters of parts 1 and 2 run side by side (each under its own cluster
// name in one etcd) and every case alternates between them over rounds, so
// other load on the machine hits every cluster size alike. All processes
// share this machine's cores: a node added brings no CPU of its own, so the
// numbers show the cost of placement, fan-out and replication, not
// scale-out.
//
// Usage: cluster_bench [--case_mib=N] [--clients=N] [--rounds=N]
//                      [--lookups=N] [--rebalance_mib=N] [--log=FILE]
// Needs /usr/bin/etcd (Debian's etcd-server; deploy/setup.sh installs it).
#include <fcntl.h>
#include <signal.h>
#include <stdlib.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "absl/strings/strip.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "absl/types/span.h"
#include "client/chunk_key.h"
#include "client/chunk_store.h"
#include "client/cluster_client.h"
#include "client/kvcache_client.h"
#include "cluster/membership.h"
#include "cluster/placement.h"
#include "tests/testing/bench_payloads.h"
#include "tests/testing/daemon_process.h"
#include "tests/testing/etcd_process.h"

namespace kvcache {
namespace {

using ::kvcache::testing::DaemonProcess;
using ::kvcache::testing::EtcdProcess;

constexpr char kDaemon[] = "kvstore/kvcached";
constexpr uint64_t kKiB = 1 << 10;
constexpr uint64_t kMiB = 1 << 20;
constexpr uint64_t kGiB = 1 << 30;
constexpr size_t kPromptChunks = 128;
constexpr uint64_t kPromptChunkBytes = 16 * kKiB;
constexpr uint64_t kRebalanceChunkBytes = 4 * kMiB;

constexpr char kUsage[] =
    "usage: cluster_bench [--case_mib=N] [--clients=N] [--rounds=N]\n"
    "                     [--lookups=N] [--rebalance_mib=N] [--log=FILE]\n"
    "  --case_mib       payload MiB per Put/Get case and cluster (default\n"
    "                   768; a quarter of it for 256 KiB chunks)\n"
    "  --clients        client threads sharing one client (default 4)\n"
    "  --rounds         rounds each case alternates the clusters over\n"
    "                   (default 6)\n"
    "  --lookups        prompt lookups per cluster (default 500)\n"
    "  --rebalance_mib  MiB of 4 MiB chunks loaded before a node joins and\n"
    "                   one drains (default 1024)\n"
    "  --log            where etcd and the nodes log\n"
    "                   (default /tmp/cluster_bench.log)\n";

struct Flags {
  uint64_t case_mib = 768;
  int clients = 4;
  int rounds = 6;
  int lookups = 500;
  uint64_t rebalance_mib = 1024;
  std::string log = "/tmp/cluster_bench.log";
};

bool ParseFlags(int argc, char** argv, Flags& flags) {
  for (int i = 1; i < argc; ++i) {
    absl::string_view value = argv[i];
    bool ok = true;
    if (absl::ConsumePrefix(&value, "--case_mib=")) {
      ok = absl::SimpleAtoi(value, &flags.case_mib) && flags.case_mib >= 4;
    } else if (absl::ConsumePrefix(&value, "--clients=")) {
      ok = absl::SimpleAtoi(value, &flags.clients) && flags.clients > 0;
    } else if (absl::ConsumePrefix(&value, "--rounds=")) {
      ok = absl::SimpleAtoi(value, &flags.rounds) && flags.rounds > 0;
    } else if (absl::ConsumePrefix(&value, "--lookups=")) {
      ok = absl::SimpleAtoi(value, &flags.lookups) && flags.lookups > 0;
    } else if (absl::ConsumePrefix(&value, "--rebalance_mib=")) {
      ok = absl::SimpleAtoi(value, &flags.rebalance_mib) &&
           flags.rebalance_mib >= 4;
    } else if (absl::ConsumePrefix(&value, "--log=")) {
      flags.log = std::string(value);
      ok = !flags.log.empty();
    } else {
      ok = false;
    }
    if (!ok) {
      std::fprintf(stderr, "cluster_bench: bad argument '%s'\n%s", argv[i],
                   kUsage);
      return false;
    }
  }
  // `bazel run` starts us in the runfiles tree; relative paths mean the
  // caller's directory.
  const char* caller_dir = std::getenv("BUILD_WORKING_DIRECTORY");
  if (caller_dir != nullptr && flags.log.front() != '/') {
    flags.log = absl::StrCat(caller_dir, "/", flags.log);
  }
  return true;
}

using ::kvcache::testing::Payloads;
using ::kvcache::testing::SizeName;

// Random keys, so that placement spreads them as it spreads real prompts'
// SHA-256 keys.
std::vector<ChunkKey> RandomKeys(size_t count, std::mt19937_64& rng) {
  std::vector<ChunkKey> keys;
  keys.reserve(count);
  for (size_t i = 0; i < count; ++i) {
    std::array<uint8_t, ChunkKey::kSize> bytes;
    for (size_t b = 0; b < bytes.size(); b += 8) {
      const uint64_t word = rng();
      std::memcpy(&bytes[b], &word, 8);
    }
    keys.emplace_back(bytes);
  }
  return keys;
}

double Quantile(std::vector<double> values, double q) {
  if (values.empty()) return 0;
  std::sort(values.begin(), values.end());
  return values[std::min(values.size() - 1,
                         static_cast<size_t>(q * values.size()))];
}

// Polls `done` every `period` until it holds or `timeout` passes.
template <typename Predicate>
bool WaitFor(Predicate done, absl::Duration timeout,
             absl::Duration period = absl::Milliseconds(20)) {
  const absl::Time deadline = absl::Now() + timeout;
  while (absl::Now() < deadline) {
    if (done()) return true;
    absl::SleepFor(period);
  }
  return done();
}

// While alive, processes started from this one write their stderr to
// `fd` instead of the terminal, so that the tables stay readable.
class ChildLogs {
 public:
  explicit ChildLogs(int fd)
      : saved_(fcntl(STDERR_FILENO, F_DUPFD_CLOEXEC, 0)) {
    dup2(fd, STDERR_FILENO);
  }
  ChildLogs(const ChildLogs&) = delete;
  ChildLogs& operator=(const ChildLogs&) = delete;
  ~ChildLogs() {
    dup2(saved_, STDERR_FILENO);
    close(saved_);
  }

 private:
  const int saved_;
};

// kvcached nodes of one cluster (one cluster name in etcd) and a client.
class BenchCluster {
 public:
  struct Options {
    std::string etcd_endpoint;
    std::string name;
    uint32_t replication = 1;
    uint64_t capacity_bytes = kGiB;
    int membership_poll_ms = 1000;
    int log_fd = STDERR_FILENO;
  };

  // Starts nodes n1..n`nodes` and connects once the client sees them all.
  static absl::StatusOr<std::unique_ptr<BenchCluster>> Start(
      const Options& options, int nodes) {
    std::unique_ptr<BenchCluster> cluster(new BenchCluster(options));
    for (int i = 1; i <= nodes; ++i) {
      if (absl::Status s = cluster->StartNode(absl::StrCat("n", i)); !s.ok()) {
        return s;
      }
    }
    ClusterClientOptions client_options;
    client_options.etcd_endpoints = {options.etcd_endpoint};
    client_options.cluster_name = options.name;
    client_options.replication_factor = options.replication;
    client_options.membership_poll =
        absl::Milliseconds(options.membership_poll_ms);
    client_options.node.timeout = absl::Minutes(2);
    absl::StatusOr<std::unique_ptr<ClusterClient>> client;
    // Nodes register just after they start serving.
    WaitFor(
        [&] {
          client = ClusterClient::Connect(client_options);
          return client.ok();
        },
        absl::Seconds(20), absl::Milliseconds(50));
    if (!client.ok()) return client.status();
    cluster->client_ = std::move(*client);
    if (absl::Status s = cluster->WaitForMembers(nodes); !s.ok()) return s;
    return cluster;
  }

  BenchCluster(const BenchCluster&) = delete;
  BenchCluster& operator=(const BenchCluster&) = delete;

  // Starts node `id` in this cluster and returns once it serves (it
  // registers in etcd just after).
  absl::Status StartNode(const std::string& id) {
    absl::StatusOr<DaemonProcess> daemon = [&] {
      const ChildLogs logs(options_.log_fd);
      return DaemonProcess::Start(
          kDaemon,
          {absl::StrCat("--set=node_id: \"", id, "\""),
           absl::StrCat("--set=cpu_tier { capacity_bytes: ",
                        options_.capacity_bytes, " }"),
           absl::StrCat(
               "--set=cluster { etcd_endpoints: \"", options_.etcd_endpoint,
               "\" cluster_name: \"", options_.name,
               "\" replication_factor: ", options_.replication,
               " membership_poll_ms: ", options_.membership_poll_ms, " }")});
    }();
    if (!daemon.ok()) {
      return absl::Status(daemon.status().code(),
                          absl::StrCat(options_.name, " node ", id, ": ",
                                       daemon.status().message()));
    }
    ClientOptions client_options;
    client_options.address = daemon->address();
    client_options.timeout = absl::Minutes(2);
    absl::StatusOr<std::unique_ptr<KvCacheClient>> direct =
        KvCacheClient::Connect(client_options);
    if (!direct.ok()) return direct.status();
    nodes_.emplace(id, std::make_unique<DaemonProcess>(std::move(*daemon)));
    direct_.emplace(id, std::move(*direct));
    return absl::OkStatus();
  }

  // Waits until the client sees `count` nodes, none draining.
  absl::Status WaitForMembers(size_t count) {
    auto settled = [&] {
      const auto membership = client_->Membership();
      return membership->nodes.size() == count &&
             std::none_of(membership->nodes.begin(), membership->nodes.end(),
                          [](const auto& node) { return node.draining; });
    };
    if (WaitFor(settled, absl::Seconds(20), absl::Milliseconds(5))) {
      return absl::OkStatus();
    }
    return absl::DeadlineExceededError(absl::StrCat(
        "cluster ", options_.name, ": ", client_->Membership()->nodes.size(),
        " nodes registered after 20s, want ", count));
  }

  // Per node id, which of `keys` the node holds, asking each node.
  absl::StatusOr<std::map<std::string, std::vector<bool>>> Holdings(
      absl::Span<const ChunkKey> keys) {
    std::map<std::string, std::vector<bool>> held;
    for (const auto& [id, client] : direct_) {
      absl::StatusOr<std::vector<v1::ChunkInfo>> infos =
          client->LookupEach(keys);
      if (!infos.ok()) return infos.status();
      std::vector<bool>& bits = held[id];
      for (const v1::ChunkInfo& info : *infos) {
        bits.push_back(info.tier() != v1::TIER_UNSPECIFIED);
      }
    }
    return held;
  }

  // True when every key is held by exactly its replicas under the
  // membership the client sees, and by no other node (a draining node may
  // keep its copies: it serves reads until it stops).
  absl::StatusOr<bool> ExactlyOnReplicas(absl::Span<const ChunkKey> keys) {
    const auto membership = client_->Membership();
    const cluster::Placement placement(membership->nodes, options_.replication);
    absl::StatusOr<std::map<std::string, std::vector<bool>>> held =
        Holdings(keys);
    if (!held.ok()) return held.status();
    for (size_t k = 0; k < keys.size(); ++k) {
      std::vector<std::string> want, have;
      for (const auto* node : placement.Replicas(keys[k].AsBytes())) {
        want.push_back(node->node_id);
      }
      for (const cluster::NodeRecord& node : membership->nodes) {
        auto bits = held->find(node.node_id);
        if (bits == held->end()) return false;  // not ours (yet)
        if (bits->second[k] && !node.draining) have.push_back(node.node_id);
      }
      std::sort(want.begin(), want.end());
      std::sort(have.begin(), have.end());
      if (want.size() != options_.replication || want != have) return false;
    }
    return true;
  }

  // Payload bytes every node has taken in through Put since it started
  // (from clients and, when chunks move, from peers).
  absl::StatusOr<uint64_t> BytesIn() {
    uint64_t bytes = 0;
    for (const auto& [id, client] : direct_) {
      absl::StatusOr<v1::StatsResponse> stats = client->Stats();
      if (!stats.ok()) return stats.status();
      bytes += stats->bytes_in();
    }
    return bytes;
  }

  ClusterClient& client() { return *client_; }
  KvCacheClient& direct(const std::string& id) { return *direct_.at(id); }
  const std::string& name() const { return options_.name; }

  // Stops every node (SIGTERM: each leaves the cluster at once).
  void Stop() {
    client_.reset();
    direct_.clear();
    for (auto& [id, node] : nodes_) node->Signal(SIGTERM);
    for (auto& [id, node] : nodes_) {
      node->WaitForExit(absl::Seconds(20)).IgnoreError();
    }
    nodes_.clear();
  }
  ~BenchCluster() { Stop(); }

 private:
  explicit BenchCluster(const Options& options) : options_(options) {}

  const Options options_;
  std::map<std::string, std::unique_ptr<DaemonProcess>> nodes_;
  std::map<std::string, std::unique_ptr<KvCacheClient>> direct_;
  std::unique_ptr<ClusterClient> client_;
};

// What the benchmark drives: a cluster through ClusterClient, or one node
// through a plain KvCacheClient, both as a ChunkStore.
struct Target {
  std::string name;
  ChunkStore* store;
};

// Bytes and chunks moved in some seconds, summed over rounds.
struct Throughput {
  uint64_t bytes = 0;
  uint64_t chunks = 0;
  double seconds = 0;

  void Add(const Throughput& other) {
    bytes += other.bytes;
    chunks += other.chunks;
    seconds += other.seconds;
  }
  double GbPerSecond() const { return seconds > 0 ? bytes / seconds / 1e9 : 0; }
  double ChunksPerSecond() const { return seconds > 0 ? chunks / seconds : 0; }
};

// Runs op(key index) for every index, spread over `threads` threads (thread
// t takes t, t + threads, ...), and times the whole.
absl::StatusOr<Throughput> RunThreads(
    size_t count, int threads, uint64_t chunk_bytes,
    const std::function<absl::Status(size_t)>& op) {
  std::vector<absl::Status> status(threads);
  const absl::Time start = absl::Now();
  std::vector<std::thread> workers;
  for (int t = 0; t < threads; ++t) {
    workers.emplace_back([&, t] {
      for (size_t i = t; i < count && status[t].ok(); i += threads) {
        status[t] = op(i);
      }
    });
  }
  for (std::thread& worker : workers) worker.join();
  const double seconds = absl::ToDoubleSeconds(absl::Now() - start);
  for (const absl::Status& s : status) {
    if (!s.ok()) return s;
  }
  return Throughput{count * chunk_bytes, count, seconds};
}

struct PutGet {
  Throughput put;
  Throughput get;
};

// Puts `count` chunks, one per call, gets them back the same way and
// deletes them (untimed).
absl::StatusOr<PutGet> RunPutGet(const Target& target, const Payloads& payloads,
                                 size_t count, uint64_t chunk_bytes,
                                 int threads, std::mt19937_64& rng) {
  const std::vector<ChunkKey> keys = RandomKeys(count, rng);
  PutGet result;
  absl::StatusOr<Throughput> put =
      RunThreads(count, threads, chunk_bytes, [&](size_t i) {
        const ChunkToPut chunk{keys[i], payloads.Chunk(i, chunk_bytes)};
        return target.store->Put({&chunk, 1});
      });
  if (!put.ok()) return put.status();
  absl::StatusOr<Throughput> get =
      RunThreads(count, threads, chunk_bytes, [&](size_t i) -> absl::Status {
        absl::StatusOr<std::vector<FetchedChunk>> chunks =
            target.store->Get({&keys[i], 1});
        if (!chunks.ok()) return chunks.status();
        if ((*chunks)[0].bytes.size() != chunk_bytes) {
          return absl::DataLossError("a chunk came back with a wrong size");
        }
        return absl::OkStatus();
      });
  if (!get.ok()) return get.status();
  if (absl::Status s = target.store->Delete(keys).status(); !s.ok()) return s;
  return PutGet{*put, *get};
}

absl::Status RunThroughput(const Flags& flags,
                           absl::Span<const Target> targets) {
  const std::vector<uint64_t> chunk_sizes = {4 * kMiB, 256 * kKiB};
  const Payloads payloads(64 * kMiB + chunk_sizes.front());
  std::mt19937_64 rng(1);
  std::printf(
      "## Put/Get throughput\n\n"
      "%d client threads sharing one client, one chunk per call, random "
      "payloads; %llu MiB per case (%llu MiB for 256 KiB chunks) in %d "
      "rounds, each taking the clusters in a fresh random order, each case "
      "after an untimed warm-up of 2 chunks per thread. GB/s counts payload "
      "bytes once, also where replication 2 writes them twice.\n\n"
      "| chunk | cluster | put GB/s | put chunks/s | get GB/s | "
      "get chunks/s |\n"
      "|---|---|---:|---:|---:|---:|\n",
      flags.clients, static_cast<unsigned long long>(flags.case_mib),
      static_cast<unsigned long long>(flags.case_mib / 4), flags.rounds);
  std::fflush(stdout);
  for (uint64_t chunk_bytes : chunk_sizes) {
    const uint64_t case_bytes =
        (chunk_bytes < kMiB ? flags.case_mib / 4 : flags.case_mib) * kMiB;
    const size_t per_round = std::max<uint64_t>(
        flags.clients, case_bytes / chunk_bytes / flags.rounds);
    std::vector<PutGet> results(targets.size());
    for (int round = 0; round < flags.rounds; ++round) {
      // A fresh order each round, so that no cluster always runs first or
      // after the same other one.
      std::vector<size_t> order(targets.size());
      for (size_t t = 0; t < order.size(); ++t) order[t] = t;
      std::shuffle(order.begin(), order.end(), rng);
      for (size_t t : order) {
        // An untimed warm-up first: connections and nodes that sat idle
        // while the other clusters ran are slow for their first few chunks.
        absl::StatusOr<PutGet> r =
            RunPutGet(targets[t], payloads, 2 * flags.clients, chunk_bytes,
                      flags.clients, rng);
        if (r.ok()) {
          r = RunPutGet(targets[t], payloads, per_round, chunk_bytes,
                        flags.clients, rng);
        }
        if (!r.ok()) {
          return absl::Status(
              r.status().code(),
              absl::StrCat(targets[t].name, ", ", SizeName(chunk_bytes), ": ",
                           r.status().message()));
        }
        results[t].put.Add(r->put);
        results[t].get.Add(r->get);
      }
    }
    for (size_t t = 0; t < targets.size(); ++t) {
      std::printf(
          "| %s | %s | %.2f | %.0f | %.2f | %.0f |\n",
          SizeName(chunk_bytes).c_str(), targets[t].name.c_str(),
          results[t].put.GbPerSecond(), results[t].put.ChunksPerSecond(),
          results[t].get.GbPerSecond(), results[t].get.ChunksPerSecond());
    }
    std::fflush(stdout);
  }
  std::printf("\n");
  return absl::OkStatus();
}

absl::Status RunLookups(const Flags& flags, absl::Span<const Target> targets) {
  // One real prompt's keys: 128 chunks of 256 tokens.
  KeySpace space;
  space.model_id = "cluster-bench";
  space.layers = 32;
  space.kv_heads = 8;
  space.head_dim = 128;
  std::vector<int32_t> tokens(kPromptChunks * space.chunk_tokens);
  for (size_t t = 0; t < tokens.size(); ++t) tokens[t] = 1000 + t % 31000;
  absl::StatusOr<std::vector<ChunkKey>> keys =
      ChunkKeysForTokens(space, tokens);
  if (!keys.ok()) return keys.status();
  const Payloads payloads(4 * kMiB);
  std::vector<std::string> bytes;
  for (size_t c = 0; c < kPromptChunks; ++c) {
    bytes.emplace_back(payloads.Chunk(c, kPromptChunkBytes));
  }
  const std::vector<ChunkToPut> chunks = PromptChunks(*keys, 0, bytes);
  // Stored through every target; where two share a node the second put
  // replaces the same bytes.
  std::vector<std::vector<double>> latency_ms(targets.size());
  for (const Target& target : targets) {
    if (absl::Status s = target.store->Put(chunks); !s.ok()) return s;
  }
  // Lookups are short: the clusters take turns one lookup at a time, each
  // turn starting with the next cluster.
  for (int i = 0; i < flags.lookups; ++i) {
    for (size_t turn = 0; turn < targets.size(); ++turn) {
      const size_t t = (turn + i) % targets.size();
      const absl::Time start = absl::Now();
      absl::StatusOr<LookupResult> hit = targets[t].store->Lookup(*keys);
      latency_ms[t].push_back(absl::ToDoubleMilliseconds(absl::Now() - start));
      if (!hit.ok()) return hit.status();
      if (hit->prefix_chunks != kPromptChunks) {
        return absl::InternalError(
            absl::StrCat(targets[t].name, ": lookup found ", hit->prefix_chunks,
                         " of ", kPromptChunks));
      }
    }
  }
  std::printf(
      "## Prefix Lookup\n\n"
      "One thread; a %zu-chunk prompt (256-token chunks), all cached; %d "
      "lookups per cluster, the clusters taking turns.\n\n"
      "| cluster | p50 ms | p99 ms | mean ms |\n"
      "|---|---:|---:|---:|\n",
      kPromptChunks, flags.lookups);
  for (size_t t = 0; t < targets.size(); ++t) {
    double sum = 0;
    for (double ms : latency_ms[t]) sum += ms;
    std::printf("| %s | %.3f | %.3f | %.3f |\n", targets[t].name.c_str(),
                Quantile(latency_ms[t], 0.5), Quantile(latency_ms[t], 0.99),
                sum / latency_ms[t].size());
  }
  std::printf("\n");
  std::fflush(stdout);
  for (const Target& target : targets) {
    target.store->Delete(*keys).status().IgnoreError();
  }
  return absl::OkStatus();
}

// (node, chunk) pairs in `after` that are not in `before`.
uint64_t CopiesGained(const std::map<std::string, std::vector<bool>>& before,
                      const std::map<std::string, std::vector<bool>>& after) {
  uint64_t gained = 0;
  for (const auto& [id, bits] : after) {
    auto was = before.find(id);
    for (size_t k = 0; k < bits.size(); ++k) {
      if (bits[k] && (was == before.end() || !was->second[k])) ++gained;
    }
  }
  return gained;
}

// One row of the rebalance table: `copies` chunks landed where they were
// missing, `sent` bytes crossed between nodes to get them there.
void PrintMove(const std::string& step, uint32_t replication, uint64_t copies,
               uint64_t sent, absl::Duration took) {
  const double gib = static_cast<double>(copies * kRebalanceChunkBytes) / kGiB;
  const double seconds = absl::ToDoubleSeconds(took);
  std::printf("| %u | %s | %llu | %.2f | %.2f | %.2f | %.3f |\n", replication,
              step.c_str(), static_cast<unsigned long long>(copies), gib,
              static_cast<double>(sent) / kGiB, seconds,
              seconds > 0 ? gib / seconds : 0);
  std::fflush(stdout);
}

// Loads `flags.rebalance_mib` into 2 nodes, then times a 3rd node joining
// and node n1 draining.
absl::Status RunRebalance(const Flags& flags, const std::string& etcd,
                          uint32_t replication, int log_fd) {
  const uint64_t bytes = flags.rebalance_mib * kMiB;
  const size_t count = bytes / kRebalanceChunkBytes;
  BenchCluster::Options options;
  options.etcd_endpoint = etcd;
  options.name = absl::StrCat("rebalance-r", replication);
  options.replication = replication;
  // Room for every chunk on every node, as after n1 drains with
  // replication 2.
  options.capacity_bytes = bytes + bytes / 4 + 64 * kMiB;
  options.membership_poll_ms = 100;
  options.log_fd = log_fd;
  absl::StatusOr<std::unique_ptr<BenchCluster>> cluster =
      BenchCluster::Start(options, 2);
  if (!cluster.ok()) return cluster.status();
  BenchCluster& c = **cluster;

  std::mt19937_64 rng(100 + replication);
  const std::vector<ChunkKey> keys = RandomKeys(count, rng);
  const Payloads payloads(64 * kMiB + kRebalanceChunkBytes);
  absl::StatusOr<Throughput> load =
      RunThreads(count, flags.clients, kRebalanceChunkBytes, [&](size_t i) {
        const ChunkToPut chunk{keys[i],
                               payloads.Chunk(i, kRebalanceChunkBytes)};
        return c.client().Put({&chunk, 1});
      });
  if (!load.ok()) return load.status();

  // Join: from the moment the client sees n3 listed until every chunk is
  // exactly on its replicas (n3 has its share, old owners dropped theirs).
  absl::StatusOr<std::map<std::string, std::vector<bool>>> before =
      c.Holdings(keys);
  if (!before.ok()) return before.status();
  absl::StatusOr<uint64_t> bytes_before = c.BytesIn();
  if (!bytes_before.ok()) return bytes_before.status();
  if (absl::Status s = c.StartNode("n3"); !s.ok()) return s;
  if (absl::Status s = c.WaitForMembers(3); !s.ok()) return s;
  const absl::Time listed = absl::Now();
  absl::Status poll;
  const bool joined = WaitFor(
      [&] {
        absl::StatusOr<bool> exact = c.ExactlyOnReplicas(keys);
        poll = exact.status();
        return !exact.ok() || *exact;
      },
      absl::Minutes(2));
  const absl::Duration join_time = absl::Now() - listed;
  if (!poll.ok()) return poll;
  if (!joined) {
    return absl::DeadlineExceededError(
        absl::StrCat(c.name(), ": n3's share not in place after 2 minutes"));
  }
  absl::StatusOr<std::map<std::string, std::vector<bool>>> after_join =
      c.Holdings(keys);
  if (!after_join.ok()) return after_join.status();
  absl::StatusOr<uint64_t> bytes_joined = c.BytesIn();
  if (!bytes_joined.ok()) return bytes_joined.status();
  PrintMove("n3 joins 2 nodes", replication, CopiesGained(*before, *after_join),
            *bytes_joined - *bytes_before, join_time);

  // Drain: from the Drain call until n1 reports drained (its new owners
  // hold every chunk it had).
  const absl::Time drain_start = absl::Now();
  if (absl::Status s = c.direct("n1").Drain().status(); !s.ok()) return s;
  const bool drained = WaitFor(
      [&] {
        absl::StatusOr<v1::NodeInfoResponse> info = c.direct("n1").NodeInfo();
        poll = info.status();
        return !info.ok() || info->drained();
      },
      absl::Minutes(2));
  const absl::Duration drain_time = absl::Now() - drain_start;
  if (!poll.ok()) return poll;
  if (!drained) {
    return absl::DeadlineExceededError(
        absl::StrCat(c.name(), ": n1 not drained after 2 minutes"));
  }
  absl::StatusOr<std::map<std::string, std::vector<bool>>> after_drain =
      c.Holdings(keys);
  if (!after_drain.ok()) return after_drain.status();
  absl::StatusOr<uint64_t> bytes_drained = c.BytesIn();
  if (!bytes_drained.ok()) return bytes_drained.status();
  // Every chunk must be on its replicas among n2 and n3 now.
  for (size_t k = 0; k < count; ++k) {
    const int copies =
        (*after_drain)["n2"][k] + static_cast<int>((*after_drain)["n3"][k]);
    if (copies < static_cast<int>(replication)) {
      return absl::InternalError(
          absl::StrCat(c.name(), ": n1 reported drained but chunk ", k, " has ",
                       copies, " copies on n2 and n3"));
    }
  }
  PrintMove("n1 drains (3 nodes)", replication,
            CopiesGained(*after_join, *after_drain),
            *bytes_drained - *bytes_joined, drain_time);
  return absl::OkStatus();
}

std::string LoadAverage() {
  std::string one, five, fifteen;
  std::ifstream("/proc/loadavg") >> one >> five >> fifteen;
  return absl::StrCat(one, " ", five, " ", fifteen);
}

absl::Status RunAll(const Flags& flags, int log_fd) {
  absl::StatusOr<std::unique_ptr<EtcdProcess>> etcd;
  {
    const ChildLogs logs(log_fd);
    etcd = EtcdProcess::Start();
  }
  if (!etcd.ok()) return etcd.status();
  const std::string endpoint = (*etcd)->endpoint();

  {
    // Parts 1 and 2: every cluster at once, alternating.
    struct Spec {
      int nodes;
      uint32_t replication;
    };
    const Spec specs[] = {{1, 1}, {2, 1}, {3, 1}, {2, 2}, {3, 2}};
    std::vector<std::unique_ptr<BenchCluster>> clusters;
    std::vector<Target> targets;
    for (const Spec& spec : specs) {
      BenchCluster::Options options;
      options.etcd_endpoint = endpoint;
      options.name =
          absl::StrCat("bench-", spec.nodes, "n-r", spec.replication);
      options.replication = spec.replication;
      // Room for a whole case on one node: nothing is ever evicted.
      options.capacity_bytes =
          std::max<uint64_t>(kGiB, 2 * flags.case_mib * kMiB);
      options.log_fd = log_fd;
      absl::StatusOr<std::unique_ptr<BenchCluster>> cluster =
          BenchCluster::Start(options, spec.nodes);
      if (!cluster.ok()) return cluster.status();
      clusters.push_back(std::move(*cluster));
    }
    targets.push_back(
        {"1 node, no cluster client", &clusters[0]->direct("n1")});
    for (size_t i = 0; i < clusters.size(); ++i) {
      targets.push_back({absl::StrCat(specs[i].nodes,
                                      specs[i].nodes == 1 ? " node" : " nodes",
                                      ", replication ", specs[i].replication),
                         &clusters[i]->client()});
    }
    if (absl::Status s = RunThroughput(flags, targets); !s.ok()) return s;
    if (absl::Status s = RunLookups(flags, targets); !s.ok()) return s;
  }

  std::printf(
      "## Rebalance\n\n"
      "%llu MiB of 4 MiB chunks put into 2 nodes, then a 3rd node joins, "
      "then n1 drains; membership polled every 100 ms. Join: from the client "
      "seeing n3 listed until every chunk is held by exactly its replicas. "
      "Drain: from the Drain call until n1 reports drained. Copies: chunks "
      "that landed on a node that lacked them (GiB moved); GiB sent: bytes "
      "the nodes put to each other, duplicates included; GiB/s: moved over "
      "seconds.\n\n"
      "| replication | step | copies | GiB moved | GiB sent | seconds | "
      "GiB/s |\n"
      "|---:|---|---:|---:|---:|---:|---:|\n",
      static_cast<unsigned long long>(flags.rebalance_mib));
  std::fflush(stdout);
  for (uint32_t replication : {1u, 2u}) {
    if (absl::Status s = RunRebalance(flags, endpoint, replication, log_fd);
        !s.ok()) {
      return s;
    }
  }
  std::printf("\n");
  return absl::OkStatus();
}

int Run(int argc, char** argv) {
  Flags flags;
  if (!ParseFlags(argc, argv, flags)) return 2;
  const int log_fd =
      open(flags.log.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (log_fd < 0) {
    std::fprintf(stderr, "cluster_bench: cannot write %s: %s\n",
                 flags.log.c_str(), std::strerror(errno));
    return 1;
  }
  // The process helpers keep etcd's data and the nodes' port files under
  // TEST_TMPDIR: a scratch directory, removed at the end.
  char scratch[] = "/tmp/cluster_bench-XXXXXX";
  if (mkdtemp(scratch) == nullptr) {
    std::fprintf(stderr, "cluster_bench: cannot create a directory in /tmp\n");
    return 1;
  }
  setenv("TEST_TMPDIR", scratch, 1);

  std::printf(
      "# cluster_bench: %u cores, load average %s at start\n\n"
      "etcd, every kvcached node and this client share the same %u cores: "
      "adding nodes adds no CPU, so these numbers show the cost of "
      "placement, fan-out and replication on loopback, not scale-out. Node "
      "and etcd logs: %s\n\n",
      std::thread::hardware_concurrency(), LoadAverage().c_str(),
      std::thread::hardware_concurrency(), flags.log.c_str());
  std::fflush(stdout);
  const absl::Time start = absl::Now();
  const absl::Status status = RunAll(flags, log_fd);
  std::printf("load average %s at end; %.0f s in all\n", LoadAverage().c_str(),
              absl::ToDoubleSeconds(absl::Now() - start));
  close(log_fd);
  std::error_code ignored;
  std::filesystem::remove_all(scratch, ignored);
  if (!status.ok()) {
    std::fprintf(stderr, "cluster_bench: %s (see %s)\n",
                 status.ToString().c_str(), flags.log.c_str());
    return 1;
  }
  return 0;
}

}  // namespace
}  // namespace kvcache

int main(int argc, char** argv) { return kvcache::Run(argc, argv); }
