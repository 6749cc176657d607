// Soak: real kvcached processes on loopback under many clients at once, for
// as long as SOAK_SECONDS says (CI runs a short round; tests/soak/run_soak.sh
// runs minutes or hours).
//
// Single node (NVMe write-through, a small CPU tier so chunks move down):
// workers put, get, pin, unpin, delete and look up chunks of random sizes;
// hostile clients stall Put streams, declare absurd sizes, flood the node
// with header-only streams and send garbage to its port; every few seconds
// the node is killed (SIGKILL) and restarted on the same port and data.
//
// Cluster (three nodes, etcd, replication 2): workers go through the
// cluster client while one node is frozen (SIGSTOP) long enough to drop out
// of the membership, then let go on again.
//
// Each worker owns its keys and runs its operations one at a time, so it
// knows what the node must hold: a chunk whose Put was acknowledged and not
// deleted since. A chunk's bytes follow from its key. The report gives
// operations, errors by code, resident memory over time, chunks lost (an
// acknowledged chunk the node says it does not hold) and corrupt chunks
// served (bytes that differ from what was put); the last two must be zero,
// and resident memory must stay within the tiers and limits plus the
// daemon's fixed overhead.
#include <arpa/inet.h>
#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <functional>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "client/chunk_key.h"
#include "client/chunk_store.h"
#include "client/cluster_client.h"
#include "client/kvcache_client.h"
#include "kvcache/v1/kvcache.grpc.pb.h"
#include "tests/testing/daemon_process.h"
#include "tests/testing/etcd_process.h"
#include "tests/testing/own_connection.h"

namespace kvcache {
namespace {

using ::kvcache::testing::DaemonProcess;
using ::kvcache::testing::EtcdProcess;

constexpr char kDaemon[] = "kvstore/kvcached";
constexpr uint64_t kMiB = 1 << 20;
// The node's memory: tiers and limits the single-node phase sets, and what
// the daemon holds beyond them (code, gRPC's threads and tables, RocksDB's
// caches, the allocator's kept blocks).
constexpr uint64_t kCpuTierBytes = 64 * kMiB;
constexpr uint64_t kPutBudgetBytes = 64 * kMiB;
constexpr uint64_t kGrpcMemoryBytes = 32 * kMiB;
constexpr uint64_t kFixedOverheadBytes = 192 * kMiB;

absl::Duration SoakDuration(absl::Duration fallback) {
  const char* seconds = std::getenv("SOAK_SECONDS");
  int value = 0;
  if (seconds != nullptr && absl::SimpleAtoi(seconds, &value) && value > 0) {
    return absl::Seconds(value);
  }
  return fallback;
}

// 0 while the daemon is gone (between a kill and its restart).
uint64_t ResidentBytes(pid_t pid) {
  return testing::ProcStatusField(pid, "VmRSS").value_or(0) * 1024;
}

// What the soak counts, shared by every thread.
class Tally {
 public:
  void Op(const std::string& kind) { Add(ops_, kind); }
  void Error(const absl::Status& status) {
    Add(errors_, absl::StatusCodeToString(status.code()));
  }
  void Hostile(const std::string& kind) { Add(hostile_, kind); }
  std::atomic<uint64_t> lost{0};
  std::atomic<uint64_t> corrupt{0};
  std::atomic<uint64_t> checked{0};

  std::string Report() const {
    absl::MutexLock lock(&mu_);
    std::string out;
    auto list = [&](const char* title,
                    const std::map<std::string, uint64_t>& counts) {
      absl::StrAppend(&out, "  ", title, ":");
      for (const auto& [name, count] : counts) {
        absl::StrAppend(&out, " ", name, "=", count);
      }
      absl::StrAppend(&out, "\n");
    };
    list("operations", ops_);
    list("errors by code", errors_);
    list("hostile calls", hostile_);
    absl::StrAppend(&out, "  chunks checked at the end: ", checked.load(),
                    ", lost: ", lost.load(),
                    ", corrupt served: ", corrupt.load(), "\n");
    return out;
  }

 private:
  void Add(std::map<std::string, uint64_t>& counts, const std::string& key) {
    absl::MutexLock lock(&mu_);
    ++counts[key];
  }
  mutable absl::Mutex mu_;
  std::map<std::string, uint64_t> ops_ ABSL_GUARDED_BY(mu_);
  std::map<std::string, uint64_t> errors_ ABSL_GUARDED_BY(mu_);
  std::map<std::string, uint64_t> hostile_ ABSL_GUARDED_BY(mu_);
};

// One worker's keys and what the node must hold of them.
class Worker {
 public:
  Worker(int id, int keys, ChunkStore& store, Tally& tally)
      : store_(store), tally_(tally), rng_(id) {
    for (int k = 0; k < keys; ++k) {
      const std::string name = absl::StrCat("soak-", id, "-", k);
      keys_.push_back(ContentKey(name));
      // 4 KiB to 512 KiB, fixed per key.
      sizes_.push_back(4096 + std::hash<std::string>()(name) % (508 << 10));
    }
    state_.assign(keys, State::kAbsent);
  }

  void RunUntil(absl::Time deadline) {
    while (absl::Now() < deadline) {
      // A worker riding out a restart backs off rather than spinning.
      if (!Step()) absl::SleepFor(absl::Milliseconds(20));
    }
  }

  // After the storm: every chunk the node must hold is there, intact.
  // Until `settle` has passed, a failed Get is tried again: a node may still
  // be restarting, a cluster still repairing.
  void CheckAll(absl::Duration settle) {
    const absl::Time deadline = absl::Now() + settle;
    for (size_t k = 0; k < keys_.size(); ++k) {
      if (state_[k] != State::kPresent) continue;
      tally_.checked.fetch_add(1);
      absl::StatusOr<std::vector<FetchedChunk>> got = store_.Get({keys_[k]});
      while (!got.ok() && absl::Now() < deadline) {
        absl::SleepFor(absl::Milliseconds(200));
        got = store_.Get({keys_[k]});
      }
      if (absl::IsNotFound(got.status())) {
        tally_.lost.fetch_add(1);
      } else if (!got.ok()) {
        tally_.Error(got.status());
        tally_.lost.fetch_add(1);
      } else if (got->front().bytes != Bytes(k)) {
        tally_.corrupt.fetch_add(1);
      }
    }
  }

  // Missing-while-acknowledged seen during the run counts as lost only on
  // a single node; a cluster may miss a chunk while its holder is cut off.
  bool single_node = true;

 private:
  enum class State { kAbsent, kPresent, kUnknown };

  std::string Bytes(size_t k) const {
    std::mt19937_64 rng(k * 7919 + sizes_[k]);
    std::string bytes(sizes_[k], '\0');
    for (size_t i = 0; i < bytes.size(); i += 8) {
      const uint64_t v = rng();
      std::memcpy(&bytes[i], &v, std::min<size_t>(8, bytes.size() - i));
    }
    return bytes;
  }

  void Error(const absl::Status& status) {
    tally_.Error(status);
    if (absl::IsUnavailable(status)) ++unreachable_;
  }

  // A call that failed on the way may or may not have taken effect.
  void Uncertain(size_t k, const absl::Status& status) {
    Error(status);
    state_[k] = State::kUnknown;
  }

  // False if the node could not be reached.
  bool Step() {
    const uint64_t unreachable_before = unreachable_;
    const size_t k = rng_() % keys_.size();
    switch (rng_() % 10) {
      case 0:
      case 1:
      case 2: {
        tally_.Op("put");
        const std::string bytes = Bytes(k);
        PutOptions options;
        if (rng_() % 4 == 0) options.pin_ttl = absl::Seconds(2);
        absl::Status s = store_.Put({{keys_[k], bytes}}, options);
        if (s.ok()) {
          state_[k] = State::kPresent;
        } else if (absl::IsResourceExhausted(s) || absl::IsInvalidArgument(s)) {
          Error(s);  // refused: nothing changed
        } else {
          Uncertain(k, s);
        }
        break;
      }
      case 3:
      case 4:
      case 5:
      case 6: {
        tally_.Op("get");
        absl::StatusOr<std::vector<FetchedChunk>> got = store_.Get({keys_[k]});
        if (got.ok()) {
          if (got->front().bytes != Bytes(k)) tally_.corrupt.fetch_add(1);
          state_[k] = State::kPresent;
        } else if (absl::IsNotFound(got.status())) {
          if (state_[k] == State::kPresent && single_node) {
            tally_.lost.fetch_add(1);
          }
          if (single_node) state_[k] = State::kAbsent;
        } else {
          Error(got.status());
        }
        break;
      }
      case 7: {
        tally_.Op("delete");
        absl::StatusOr<uint32_t> gone = store_.Delete({keys_[k]});
        if (gone.ok()) {
          state_[k] = State::kAbsent;
        } else {
          Uncertain(k, gone.status());
        }
        break;
      }
      case 8: {
        tally_.Op("pin");
        absl::StatusOr<absl::Time> pinned =
            store_.Pin({keys_[k]}, absl::Seconds(2));
        if (!pinned.ok() && !absl::IsNotFound(pinned.status())) {
          Error(pinned.status());
        }
        absl::Status unpinned = store_.Unpin({keys_[k]});
        if (!unpinned.ok() && !absl::IsNotFound(unpinned)) {
          Error(unpinned);
        }
        break;
      }
      case 9: {
        tally_.Op("lookup");
        const size_t first = rng_() % keys_.size();
        const size_t n = std::min<size_t>(8, keys_.size() - first);
        absl::StatusOr<LookupResult> found =
            store_.Lookup(absl::MakeConstSpan(keys_).subspan(first, n));
        if (!found.ok()) Error(found.status());
        break;
      }
    }
    return unreachable_ == unreachable_before;
  }

  ChunkStore& store_;
  Tally& tally_;
  std::mt19937_64 rng_;
  std::vector<ChunkKey> keys_;
  std::vector<size_t> sizes_;
  std::vector<State> state_;
  uint64_t unreachable_ = 0;
};

// Clients that try to hurt the node, each kind in a loop until `stop`.
class HostileClients {
 public:
  HostileClients(std::string address, Tally& tally)
      : address_(std::move(address)), tally_(tally) {}

  void Start() {
    threads_.emplace_back([this] { Loop([this] { StalledPut(); }); });
    threads_.emplace_back([this] { Loop([this] { AbsurdHeader(); }); });
    threads_.emplace_back([this] { Loop([this] { HeaderFlood(); }); });
    threads_.emplace_back([this] { Loop([this] { Garbage(); }); });
  }
  void Stop() {
    stop_.store(true);
    for (std::thread& t : threads_) t.join();
  }

 private:
  template <typename F>
  void Loop(F attack) {
    while (!stop_.load()) {
      attack();
      absl::SleepFor(absl::Milliseconds(50));
    }
  }

  std::unique_ptr<v1::KvCache::Stub> Stub() {
    return v1::KvCache::NewStub(testing::OwnConnection(address_));
  }

  static v1::PutRequest Header(uint64_t size) {
    v1::PutRequest request;
    request.mutable_header()->set_key(
        std::string(ContentKey(absl::StrCat("hostile-", size)).AsBytes()));
    request.mutable_header()->set_size_bytes(size);
    return request;
  }

  // Declares 32 MiB, sends 1 MiB, then waits to be cancelled.
  void StalledPut() {
    tally_.Hostile("stalled_put");
    auto stub = Stub();
    grpc::ClientContext context;
    context.set_deadline(std::chrono::system_clock::now() +
                         std::chrono::seconds(10));
    v1::PutResponse response;
    auto writer = stub->Put(&context, &response);
    v1::PutRequest data;
    data.set_data(std::string(kMiB, 's'));
    if (writer->Write(Header(32 * kMiB))) writer->Write(data);
    writer->Finish();
  }

  void AbsurdHeader() {
    tally_.Hostile("absurd_header");
    auto stub = Stub();
    grpc::ClientContext context;
    v1::PutResponse response;
    auto writer = stub->Put(&context, &response);
    writer->Write(Header(uint64_t{1} << 50));
    writer->WritesDone();
    writer->Finish();
  }

  // 64 streams that send a header and nothing else, then go.
  void HeaderFlood() {
    tally_.Hostile("header_flood");
    auto stub = Stub();
    std::vector<std::unique_ptr<grpc::ClientContext>> contexts;
    std::vector<std::unique_ptr<grpc::ClientWriter<v1::PutRequest>>> writers;
    v1::PutResponse response;
    for (int i = 0; i < 64; ++i) {
      contexts.push_back(std::make_unique<grpc::ClientContext>());
      writers.push_back(stub->Put(contexts.back().get(), &response));
      writers.back()->Write(Header(kMiB));
    }
    absl::SleepFor(absl::Milliseconds(500));
    for (size_t i = 0; i < writers.size(); ++i) {
      contexts[i]->TryCancel();
      writers[i]->Finish();
    }
  }

  // Random bytes straight to the gRPC port.
  void Garbage() {
    tally_.Hostile("garbage");
    const size_t colon = address_.rfind(':');
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_port = htons(std::stoi(address_.substr(colon + 1)));
    inet_pton(AF_INET, address_.substr(0, colon).c_str(), &addr.sin_addr);
    const int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0) {
      std::string junk(4096 + rng_() % 65536, '\0');
      for (char& c : junk) c = static_cast<char>(rng_());
      send(fd, junk.data(), junk.size(), MSG_NOSIGNAL);
    }
    close(fd);
  }

  const std::string address_;
  Tally& tally_;
  std::mt19937_64 rng_{7};
  std::atomic<bool> stop_{false};
  std::vector<std::thread> threads_;
};

// The daemon's resident memory, sampled while the soak runs.
class MemorySampler {
 public:
  explicit MemorySampler(std::function<pid_t()> pid) : pid_(std::move(pid)) {
    thread_ = std::thread([this] {
      const absl::Time start = absl::Now();
      while (!stop_.load()) {
        const uint64_t rss = ResidentBytes(pid_());
        {
          absl::MutexLock lock(&mu_);
          peak_ = std::max(peak_, rss);
          const int second = absl::ToInt64Seconds(absl::Now() - start);
          if (second / 5 >= static_cast<int>(series_.size())) {
            series_.push_back(rss);
          }
          series_.back() = std::max(series_.back(), rss);
        }
        absl::SleepFor(absl::Milliseconds(200));
      }
    });
  }
  ~MemorySampler() { Stop(); }
  void Stop() {
    stop_.store(true);
    if (thread_.joinable()) thread_.join();
  }
  uint64_t peak() const {
    absl::MutexLock lock(&mu_);
    return peak_;
  }
  std::string Report() const {
    absl::MutexLock lock(&mu_);
    std::string out = "  resident MiB, peak per 5 s:";
    for (uint64_t rss : series_) absl::StrAppend(&out, " ", rss / kMiB);
    absl::StrAppend(&out, "\n  resident peak: ", peak_ / kMiB, " MiB\n");
    return out;
  }

 private:
  const std::function<pid_t()> pid_;
  std::atomic<bool> stop_{false};
  mutable absl::Mutex mu_;
  uint64_t peak_ ABSL_GUARDED_BY(mu_) = 0;
  std::vector<uint64_t> series_ ABSL_GUARDED_BY(mu_);
  std::thread thread_;
};

std::string TestDir(const std::string& name) {
  const char* tmp = std::getenv("TEST_TMPDIR");
  const std::string dir = absl::StrCat(tmp ? tmp : "/tmp", "/", name);
  std::filesystem::remove_all(dir);
  std::filesystem::create_directories(dir);
  return dir;
}

TEST(SoakTest, SingleNodeKilledAndRestartedUnderHostileLoad) {
  const absl::Duration duration = SoakDuration(absl::Seconds(40));
  const std::string data_dir = TestDir("soak-nvme");
  const int port = testing::FreeLoopbackPort();
  const std::vector<std::string> args = {
      absl::StrCat("--listen=127.0.0.1:", port),
      absl::StrCat("--set=cpu_tier { capacity_bytes: ", kCpuTierBytes, " }"),
      absl::StrCat("--set=nvme_tier { data_dir: '", data_dir,
                   "' slab_bytes: 268435456 slab_count: 2 "
                   "write_through: true }"),
      absl::StrCat("--set=limits { max_chunk_bytes: 33554432 "
                   "max_put_bytes_in_flight: ",
                   kPutBudgetBytes, " grpc_memory_bytes: ", kGrpcMemoryBytes,
                   " max_concurrent_calls: 64 stream_idle_timeout_seconds: 2 "
                   "}")};
  absl::Mutex daemon_mu;
  auto started = DaemonProcess::Start(kDaemon, args);
  ASSERT_TRUE(started.ok()) << started.status();
  auto daemon = std::make_unique<DaemonProcess>(std::move(*started));
  const std::string address = daemon->address();
  MemorySampler memory([&] {
    absl::MutexLock lock(&daemon_mu);
    return daemon ? daemon->pid() : pid_t{-1};
  });

  Tally tally;
  constexpr int kWorkers = 6;
  std::vector<std::unique_ptr<KvCacheClient>> clients;
  std::vector<std::unique_ptr<Worker>> workers;
  for (int w = 0; w < kWorkers; ++w) {
    ClientOptions options;
    options.address = address;
    options.timeout = absl::Seconds(10);
    auto client = KvCacheClient::Connect(options);
    ASSERT_TRUE(client.ok()) << client.status();
    clients.push_back(std::move(*client));
    // 6 workers x 120 keys x 260 KiB on average: about 180 MiB, all of it
    // fits on the 512 MiB of NVMe, so nothing acknowledged is evicted.
    workers.push_back(std::make_unique<Worker>(w, 120, *clients.back(), tally));
  }
  HostileClients hostile(address, tally);
  hostile.Start();
  const absl::Time deadline = absl::Now() + duration;
  std::vector<std::thread> threads;
  for (auto& worker : workers) {
    threads.emplace_back([&worker, deadline] { worker->RunUntil(deadline); });
  }

  int kills = 0;
  std::mt19937_64 rng(1);
  while (absl::Now() + absl::Seconds(6) < deadline) {
    absl::SleepFor(absl::Milliseconds(2000 + rng() % 4000));
    {
      absl::MutexLock lock(&daemon_mu);
      daemon.reset();  // SIGKILL
    }
    ++kills;
    auto restarted = DaemonProcess::Start(kDaemon, args);
    ASSERT_TRUE(restarted.ok()) << restarted.status();
    absl::MutexLock lock(&daemon_mu);
    daemon = std::make_unique<DaemonProcess>(std::move(*restarted));
  }
  for (std::thread& t : threads) t.join();
  hostile.Stop();
  for (auto& worker : workers) worker->CheckAll(absl::Seconds(10));
  memory.Stop();

  std::printf("soak, single node: %s, %d kills\n%s%s",
              absl::FormatDuration(duration).c_str(), kills,
              tally.Report().c_str(), memory.Report().c_str());
  EXPECT_GT(kills, 0);
  EXPECT_EQ(tally.lost.load(), 0u);
  EXPECT_EQ(tally.corrupt.load(), 0u);
  EXPECT_GT(tally.checked.load(), 0u);
  const uint64_t bound =
      kCpuTierBytes + kPutBudgetBytes + kGrpcMemoryBytes + kFixedOverheadBytes;
  EXPECT_LE(memory.peak(), bound) << "resident peak " << memory.peak() / kMiB
                                  << " MiB, bound " << bound / kMiB << " MiB";
}

TEST(SoakTest, ClusterWithANodeCutOffAndHealed) {
  const absl::Duration duration = SoakDuration(absl::Seconds(30));
  auto etcd = EtcdProcess::Start("127.0.0.1");
  ASSERT_TRUE(etcd.ok()) << etcd.status();
  std::vector<std::unique_ptr<DaemonProcess>> nodes;
  for (int n = 0; n < 3; ++n) {
    auto node = DaemonProcess::Start(
        kDaemon,
        {absl::StrCat("--set=node_id: \"soak-", n, "\""),
         "--set=cpu_tier { capacity_bytes: 268435456 }",
         absl::StrCat("--set=cluster { etcd_endpoints: \"", (*etcd)->endpoint(),
                      "\" cluster_name: \"soak\" lease_ttl_seconds: 2 "
                      "replication_factor: 2 membership_poll_ms: 200 "
                      "repair_interval_seconds: 2 }")});
    ASSERT_TRUE(node.ok()) << node.status();
    nodes.push_back(std::make_unique<DaemonProcess>(std::move(*node)));
  }
  ClusterClientOptions options;
  options.etcd_endpoints = {(*etcd)->endpoint()};
  options.cluster_name = "soak";
  options.membership_poll = absl::Milliseconds(200);
  options.node.timeout = absl::Seconds(5);
  Tally tally;
  std::vector<std::unique_ptr<ClusterClient>> clients;
  std::vector<std::unique_ptr<Worker>> workers;
  for (int w = 0; w < 4; ++w) {
    absl::StatusOr<std::unique_ptr<ClusterClient>> client;
    for (int attempt = 0; attempt < 50; ++attempt) {
      client = ClusterClient::Connect(options);
      if (client.ok() && (*client)->Membership()->nodes.size() == 3) break;
      absl::SleepFor(absl::Milliseconds(100));
    }
    ASSERT_TRUE(client.ok()) << client.status();
    clients.push_back(std::move(*client));
    workers.push_back(
        std::make_unique<Worker>(100 + w, 80, *clients.back(), tally));
    workers.back()->single_node = false;
  }
  const absl::Time deadline = absl::Now() + duration;
  std::vector<std::thread> threads;
  for (auto& worker : workers) {
    threads.emplace_back([&worker, deadline] { worker->RunUntil(deadline); });
  }
  // Node 2 is cut off (frozen past its lease, so it leaves the membership)
  // and healed, again and again.
  int cuts = 0;
  while (absl::Now() + absl::Seconds(8) < deadline) {
    absl::SleepFor(absl::Seconds(2));
    nodes[2]->Signal(SIGSTOP);
    absl::SleepFor(absl::Seconds(4));
    nodes[2]->Signal(SIGCONT);
    ++cuts;
  }
  for (std::thread& t : threads) t.join();
  // Repairs bring every chunk back to two replicas once all nodes are up.
  for (auto& worker : workers) worker->CheckAll(absl::Seconds(15));
  std::printf("soak, three-node cluster: %s, node cut off %d times\n%s",
              absl::FormatDuration(duration).c_str(), cuts,
              tally.Report().c_str());
  EXPECT_GT(cuts, 0);
  EXPECT_EQ(tally.lost.load(), 0u);
  EXPECT_EQ(tally.corrupt.load(), 0u);
  EXPECT_GT(tally.checked.load(), 0u);
}

}  // namespace
}  // namespace kvcache
