// Benchmarks kvcache's storage engine against the standard tools, side by
// side in one run on this machine:
//
//  1. Put/Get over loopback: a real kvcached (gRPC, CPU tier) against Redis
//     (redis-server driven through hiredis, no persistence), with the same
//     payloads and the same number of client threads. Each Redis client has
//     its own connection; each kvcache client its own KvCacheClient, whose
//     calls gRPC multiplexes over one HTTP/2 connection to the node.
//     Throughput is payload bytes over wall time; latency is per chunk.
//     --part=tls instead compares two kvcached nodes, one plaintext and one
//     over mutual TLS, at 256 KiB and 4 MiB: what encryption costs.
//  2. NVMe tier reads: NvmeTier::Get of random chunks, in this process,
//     against fio (io_uring, O_DIRECT, randread) on the same slab file with
//     the same block size and queue depth. O_DIRECT keeps the page cache out
//     of both.
//
// Payloads are random bytes, incompressible like codec output; neither store
// looks inside them.
//
// Each comparison alternates its two sides over several rounds, so that a
// burst of other load on the machine (or of the disk's own variance) hits
// both rather than one.
//
// Usage: kvstore_bench [--data_dir=DIR] [--case_mib=N] [--nvme_mib=N]
//                      [--nvme_chunk_kib=N] [--nvme_seconds=N]
//                      [--rounds=N]
//                      [--part=all|store|nvme|tls|lookup|stream]
//                      [--chunk_kib=256,4096,32768]
// Needs redis-server and fio (deploy/setup.sh installs them) and a data_dir
// on a local disk filesystem such as ext4 or xfs (not tmpfs).
#include <arpa/inet.h>
#include <hiredis/hiredis.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/string_view.h"
#include "absl/strings/strip.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "absl/types/span.h"
#include "client/chunk_key.h"
#include "client/kvcache_client.h"
#include "codec/crc32c.h"
#include "kvstore/malloc_options.h"
#include "kvstore/nvme_tier.h"
#include "tests/testing/bench_payloads.h"
#include "tests/testing/daemon_process.h"
#include "tests/testing/fio_process.h"

namespace kvcache::kvstore {
namespace {

using ::kvcache::testing::DaemonProcess;

constexpr char kDaemon[] = "kvstore/kvcached";
constexpr char kRedisServer[] = "/usr/bin/redis-server";
constexpr uint64_t kKiB = 1 << 10;
constexpr uint64_t kMiB = 1 << 20;
constexpr uint64_t kGiB = 1 << 30;

constexpr char kUsage[] =
    "usage: kvstore_bench [--data_dir=DIR] [--case_mib=N] [--nvme_mib=N]\n"
    "                     [--nvme_chunk_kib=N] [--nvme_seconds=N]\n"
    "                     [--rounds=N]\n"
    "                     [--part=all|store|nvme|tls|lookup|stream]\n"
    "                     [--chunk_kib=256,4096,32768]\n"
    "  --data_dir      local disk directory for the NVMe slab and Redis\n"
    "                  (default /var/tmp/kvstore_bench; not tmpfs)\n"
    "  --case_mib      payload MiB per Put/Get case (default 1024; a quarter\n"
    "                  of it for 256 KiB chunks)\n"
    "  --nvme_mib      MiB of chunks the NVMe tier is filled with\n"
    "                  (default 1024)\n"
    "  --nvme_chunk_kib  KiB per NVMe chunk, a multiple of 4 (default 4096)\n"
    "  --nvme_seconds  seconds of NVMe reads per side and queue depth\n"
    "                  (default 12)\n"
    "  --rounds        rounds each comparison alternates its sides over\n"
    "                  (default 3)\n"
    "  --part          which comparisons to run (default all: store and\n"
    "                  nvme; tls: plaintext against mutual TLS only;\n"
    "                  lookup: prefix lookups only; stream: the Get\n"
    "                  stream against plain TCP only)\n"
    "  --chunk_kib     chunk sizes of the Put/Get comparison, in KiB\n"
    "                  (default 256,4096,32768)\n";

struct Flags {
  std::string data_dir = "/var/tmp/kvstore_bench";
  uint64_t case_mib = 1024;
  uint64_t nvme_mib = 1024;
  uint64_t nvme_chunk_kib = 4096;
  int nvme_seconds = 12;
  int rounds = 3;
  std::string part = "all";
  std::vector<uint64_t> chunk_sizes = {256 * kKiB, 4 * kMiB, 32 * kMiB};
};

bool ParseFlags(int argc, char** argv, Flags& flags) {
  for (int i = 1; i < argc; ++i) {
    absl::string_view value = argv[i];
    bool ok = true;
    if (absl::ConsumePrefix(&value, "--data_dir=")) {
      flags.data_dir = std::string(value);
    } else if (absl::ConsumePrefix(&value, "--case_mib=")) {
      ok = absl::SimpleAtoi(value, &flags.case_mib) && flags.case_mib > 0;
    } else if (absl::ConsumePrefix(&value, "--nvme_mib=")) {
      ok = absl::SimpleAtoi(value, &flags.nvme_mib) && flags.nvme_mib >= 4;
    } else if (absl::ConsumePrefix(&value, "--nvme_chunk_kib=")) {
      ok = absl::SimpleAtoi(value, &flags.nvme_chunk_kib) &&
           flags.nvme_chunk_kib > 0 && flags.nvme_chunk_kib % 4 == 0;
    } else if (absl::ConsumePrefix(&value, "--nvme_seconds=")) {
      ok = absl::SimpleAtoi(value, &flags.nvme_seconds) &&
           flags.nvme_seconds > 0;
    } else if (absl::ConsumePrefix(&value, "--rounds=")) {
      ok = absl::SimpleAtoi(value, &flags.rounds) && flags.rounds > 0;
    } else if (absl::ConsumePrefix(&value, "--chunk_kib=")) {
      flags.chunk_sizes.clear();
      for (absl::string_view kib : absl::StrSplit(value, ',')) {
        uint64_t n = 0;
        ok = ok && absl::SimpleAtoi(kib, &n) && n > 0 && n <= 64 * 1024;
        flags.chunk_sizes.push_back(n * kKiB);
      }
    } else if (absl::ConsumePrefix(&value, "--part=")) {
      flags.part = std::string(value);
      ok = value == "all" || value == "store" || value == "nvme" ||
           value == "tls" || value == "lookup" || value == "stream";
    } else {
      ok = false;
    }
    if (!ok) {
      std::fprintf(stderr, "kvstore_bench: bad argument '%s'\n%s", argv[i],
                   kUsage);
      return false;
    }
  }
  // `bazel run` starts us in the runfiles tree; relative paths mean the
  // caller's directory.
  const char* caller_dir = std::getenv("BUILD_WORKING_DIRECTORY");
  if (caller_dir != nullptr && !flags.data_dir.empty() &&
      flags.data_dir.front() != '/') {
    flags.data_dir = absl::StrCat(caller_dir, "/", flags.data_dir);
  }
  return true;
}

using ::kvcache::testing::Payloads;
using ::kvcache::testing::SizeName;

ChunkKey KeyOf(uint64_t id) {
  std::array<uint8_t, ChunkKey::kSize> bytes{};
  std::memcpy(bytes.data(), &id, sizeof(id));
  return ChunkKey(bytes);
}

// Timings of one kind of call, accumulated over rounds.
struct Samples {
  uint64_t bytes = 0;
  double seconds = 0;
  double server_cpu_seconds = 0;   // the store's process, user + system
  double client_cpu_seconds = 0;   // this process (the clients), likewise
  std::vector<double> latency_ms;  // one per call; empty where not known

  void Add(const Samples& other) {
    bytes += other.bytes;
    seconds += other.seconds;
    server_cpu_seconds += other.server_cpu_seconds;
    client_cpu_seconds += other.client_cpu_seconds;
    latency_ms.insert(latency_ms.end(), other.latency_ms.begin(),
                      other.latency_ms.end());
  }
  double GbPerSecond() const { return seconds > 0 ? bytes / seconds / 1e9 : 0; }
  // The server's CPU time per byte moved, in nanoseconds.
  double ServerCpuNsPerByte() const {
    return bytes > 0 ? server_cpu_seconds * 1e9 / bytes : 0;
  }
  double LatencyMs(double quantile) {
    if (latency_ms.empty()) return 0;
    std::sort(latency_ms.begin(), latency_ms.end());
    const size_t at = static_cast<size_t>(quantile * latency_ms.size());
    return latency_ms[std::min(latency_ms.size() - 1, at)];
  }
};

// ---------------------------------------------------------------------------
// Put/Get over loopback.

// CPU time (user + system) process `pid` has used so far, from
// /proc/PID/stat; 0 if it cannot be read.
double ProcessCpuSeconds(pid_t pid) {
  std::ifstream file(absl::StrCat("/proc/", pid, "/stat"));
  std::string stat((std::istreambuf_iterator<char>(file)),
                   std::istreambuf_iterator<char>());
  // The command name may hold spaces; fields are counted after its ')'.
  const size_t name_end = stat.rfind(')');
  if (name_end == std::string::npos) return 0;
  const std::vector<absl::string_view> fields = absl::StrSplit(
      absl::string_view(stat).substr(name_end + 1), ' ', absl::SkipEmpty());
  // Fields 14 and 15 of the file (utime, stime), counting state as 3.
  uint64_t user = 0, system = 0;
  if (fields.size() < 13 || !absl::SimpleAtoi(fields[11], &user) ||
      !absl::SimpleAtoi(fields[12], &system)) {
    return 0;
  }
  return static_cast<double>(user + system) / sysconf(_SC_CLK_TCK);
}

// One client connection to a store under test.
class StoreConnection {
 public:
  virtual ~StoreConnection() = default;
  virtual absl::Status Put(const ChunkKey& key, absl::string_view bytes) = 0;
  // Fetches the chunk and checks that `size` bytes came back.
  virtual absl::Status Get(const ChunkKey& key, uint64_t size) = 0;
  // Drops the chunks after a round (untimed).
  virtual absl::Status Clear(absl::Span<const ChunkKey> keys) = 0;
  // How many of `keys` the store holds, in one call: a count-only prefix
  // Lookup for kvcache, EXISTS of them all for Redis.
  virtual absl::StatusOr<size_t> CountHeld(absl::Span<const ChunkKey> keys) = 0;
};

class KvCacheConnection final : public StoreConnection {
 public:
  explicit KvCacheConnection(std::unique_ptr<KvCacheClient> client)
      : client_(std::move(client)) {}

  absl::Status Put(const ChunkKey& key, absl::string_view bytes) override {
    const ChunkToPut chunk{key, bytes};
    return client_->Put({&chunk, 1});
  }

  absl::Status Get(const ChunkKey& key, uint64_t size) override {
    absl::StatusOr<std::vector<FetchedChunk>> chunks = client_->Get({&key, 1});
    if (!chunks.ok()) return chunks.status();
    if ((*chunks)[0].bytes.size() != size) {
      return absl::DataLossError("kvcached returned a chunk of the wrong size");
    }
    return absl::OkStatus();
  }

  absl::Status Clear(absl::Span<const ChunkKey> keys) override {
    return client_->Delete(keys).status();
  }

  absl::StatusOr<size_t> CountHeld(absl::Span<const ChunkKey> keys) override {
    return client_->CountCached(keys);
  }

 private:
  std::unique_ptr<KvCacheClient> client_;
};

class RedisConnection final : public StoreConnection {
 public:
  // Connects to Redis on loopback; UNAVAILABLE if nothing answers there.
  static absl::StatusOr<std::unique_ptr<RedisConnection>> Connect(int port) {
    redisContext* context = redisConnect("127.0.0.1", port);
    if (context == nullptr || context->err != 0) {
      const std::string why = context ? context->errstr : "out of memory";
      redisFree(context);
      return absl::UnavailableError(
          absl::StrCat("cannot reach redis on port ", port, ": ", why));
    }
    return std::unique_ptr<RedisConnection>(new RedisConnection(context));
  }
  ~RedisConnection() override { redisFree(context_); }

  absl::Status Put(const ChunkKey& key, absl::string_view bytes) override {
    const absl::string_view k = key.AsBytes();
    return Command("SET %b %b", k.data(), k.size(), bytes.data(), bytes.size())
        .status();
  }

  absl::Status Get(const ChunkKey& key, uint64_t size) override {
    const absl::string_view k = key.AsBytes();
    absl::StatusOr<Reply> reply = Command("GET %b", k.data(), k.size());
    if (!reply.ok()) return reply.status();
    if ((*reply)->type != REDIS_REPLY_STRING || (*reply)->len != size) {
      return absl::DataLossError("redis returned no chunk or a wrong size");
    }
    return absl::OkStatus();
  }

  absl::Status Clear(absl::Span<const ChunkKey>) override {
    return Command("FLUSHALL").status();
  }

  absl::StatusOr<size_t> CountHeld(absl::Span<const ChunkKey> keys) override {
    std::vector<const char*> argv = {"EXISTS"};
    std::vector<size_t> lengths = {6};
    for (const ChunkKey& key : keys) {
      argv.push_back(key.AsBytes().data());
      lengths.push_back(key.AsBytes().size());
    }
    Reply reply(static_cast<redisReply*>(redisCommandArgv(
        context_, static_cast<int>(argv.size()), argv.data(), lengths.data())));
    if (reply == nullptr || reply->type != REDIS_REPLY_INTEGER) {
      return absl::UnavailableError("redis: EXISTS failed");
    }
    return static_cast<size_t>(reply->integer);
  }

  absl::Status Ping() { return Command("PING").status(); }

 private:
  struct FreeReply {
    void operator()(redisReply* reply) const { freeReplyObject(reply); }
  };
  using Reply = std::unique_ptr<redisReply, FreeReply>;

  explicit RedisConnection(redisContext* context) : context_(context) {}

  template <typename... Args>
  absl::StatusOr<Reply> Command(const char* format, Args... args) {
    Reply reply(
        static_cast<redisReply*>(redisCommand(context_, format, args...)));
    if (reply == nullptr) {
      return absl::UnavailableError(absl::StrCat("redis: ", context_->errstr));
    }
    if (reply->type == REDIS_REPLY_ERROR) {
      return absl::InternalError(absl::StrCat("redis: ", reply->str));
    }
    return reply;
  }

  redisContext* context_;
};

// Starts redis-server as a pure in-memory cache on a free loopback port and
// waits until it answers.
absl::StatusOr<DaemonProcess> StartRedis(const std::string& dir,
                                         uint64_t max_memory, int& port) {
  port = testing::FreeLoopbackPort();
  absl::StatusOr<DaemonProcess> redis = DaemonProcess::Spawn(
      kRedisServer,
      {"--bind", "127.0.0.1", "--port", absl::StrCat(port), "--save", "",
       "--appendonly", "no", "--maxmemory", absl::StrCat(max_memory),
       "--proto-max-bulk-len", "512mb", "--dir", dir, "--loglevel", "warning"});
  if (!redis.ok()) return redis.status();
  const absl::Time deadline = absl::Now() + absl::Seconds(10);
  while (absl::Now() < deadline) {
    absl::StatusOr<std::unique_ptr<RedisConnection>> connection =
        RedisConnection::Connect(port);
    if (connection.ok() && (*connection)->Ping().ok()) return redis;
    if (redis->WaitForExit(absl::ZeroDuration()).ok()) {
      return absl::FailedPreconditionError(
          absl::StrCat(kRedisServer, " exited during start-up"));
    }
    absl::SleepFor(absl::Milliseconds(20));
  }
  return absl::DeadlineExceededError("redis-server did not answer within 10s");
}

struct Store {
  std::string name;
  std::function<absl::StatusOr<std::unique_ptr<StoreConnection>>()> connect;
  pid_t pid;  // the server's process, whose CPU time is counted
};

// Put and Get timings of one store in one case.
struct CaseSamples {
  Samples put;
  Samples get;
};

// Runs op(connection c, key, payload index) for every key of every
// connection, one thread per connection, and times the whole and each call.
absl::StatusOr<Samples> RunPhase(
    absl::Span<const std::unique_ptr<StoreConnection>> connections,
    const std::vector<std::vector<ChunkKey>>& keys, uint64_t chunk_bytes,
    pid_t server,
    const std::function<absl::Status(StoreConnection&, const ChunkKey&,
                                     uint64_t)>& op) {
  std::vector<Samples> samples(connections.size());
  std::vector<absl::Status> status(connections.size());
  const double server_cpu = ProcessCpuSeconds(server);
  const double client_cpu = ProcessCpuSeconds(getpid());
  const absl::Time start = absl::Now();
  std::vector<std::thread> threads;
  for (size_t c = 0; c < connections.size(); ++c) {
    threads.emplace_back([&, c] {
      for (size_t i = 0; i < keys[c].size() && status[c].ok(); ++i) {
        const absl::Time t0 = absl::Now();
        status[c] = op(*connections[c], keys[c][i], c * keys[c].size() + i);
        samples[c].latency_ms.push_back(
            absl::ToDoubleMilliseconds(absl::Now() - t0));
        samples[c].bytes += chunk_bytes;
      }
    });
  }
  for (std::thread& thread : threads) thread.join();
  Samples all;
  for (size_t c = 0; c < connections.size(); ++c) {
    if (!status[c].ok()) return status[c];
    all.Add(samples[c]);
  }
  all.seconds = absl::ToDoubleSeconds(absl::Now() - start);
  all.server_cpu_seconds = ProcessCpuSeconds(server) - server_cpu;
  all.client_cpu_seconds = ProcessCpuSeconds(getpid()) - client_cpu;
  return all;
}

// Puts `bytes` of chunks through `clients` connections, gets them all back
// the same way, then drops them.
absl::StatusOr<CaseSamples> RunRound(const Store& store,
                                     const Payloads& payloads,
                                     uint64_t chunk_bytes, int clients,
                                     uint64_t bytes, uint64_t& next_key) {
  std::vector<std::unique_ptr<StoreConnection>> connections;
  std::vector<std::vector<ChunkKey>> keys(clients);
  std::vector<ChunkKey> all_keys;
  const uint64_t per_client =
      std::max<uint64_t>(1, bytes / chunk_bytes / clients);
  for (int c = 0; c < clients; ++c) {
    absl::StatusOr<std::unique_ptr<StoreConnection>> connection =
        store.connect();
    if (!connection.ok()) return connection.status();
    connections.push_back(std::move(*connection));
    for (uint64_t i = 0; i < per_client; ++i) {
      keys[c].push_back(KeyOf(next_key++));
      all_keys.push_back(keys[c].back());
    }
  }
  absl::StatusOr<Samples> put = RunPhase(
      connections, keys, chunk_bytes, store.pid,
      [&](StoreConnection& connection, const ChunkKey& key, uint64_t index) {
        return connection.Put(key, payloads.Chunk(index, chunk_bytes));
      });
  if (!put.ok()) return put.status();
  absl::StatusOr<Samples> get =
      RunPhase(connections, keys, chunk_bytes, store.pid,
               [&](StoreConnection& connection, const ChunkKey& key, uint64_t) {
                 return connection.Get(key, chunk_bytes);
               });
  if (!get.ok()) return get.status();
  if (absl::Status s = connections[0]->Clear(all_keys); !s.ok()) return s;
  return CaseSamples{*std::move(put), *std::move(get)};
}

// The rows CompareStores prints.
constexpr char kTableHeader[] =
    "| chunk | clients | store | put GB/s | put p50 ms | put p99 ms | "
    "get GB/s | get p50 ms | get p99 ms | put server CPU ns/B | "
    "get server CPU ns/B |\n"
    "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|\n";

// Runs every store through each chunk size and client count, alternating
// the stores round by round, and prints a table row per store and case.
absl::Status CompareStores(absl::Span<const Store> stores,
                           absl::Span<const uint64_t> chunk_sizes,
                           absl::Span<const int> client_counts,
                           const Flags& flags, const Payloads& payloads,
                           uint64_t case_bytes) {
  uint64_t next_key = 1;
  for (uint64_t chunk_bytes : chunk_sizes) {
    const uint64_t bytes = chunk_bytes < kMiB ? case_bytes / 4 : case_bytes;
    for (int clients : client_counts) {
      std::vector<CaseSamples> results(stores.size());
      for (int round = 0; round < flags.rounds; ++round) {
        for (size_t s = 0; s < stores.size(); ++s) {
          absl::StatusOr<CaseSamples> r =
              RunRound(stores[s], payloads, chunk_bytes, clients,
                       bytes / flags.rounds, next_key);
          if (!r.ok()) {
            return absl::Status(
                r.status().code(),
                absl::StrCat(stores[s].name, ", ", SizeName(chunk_bytes), " x ",
                             clients, ": ", r.status().message()));
          }
          results[s].put.Add(r->put);
          results[s].get.Add(r->get);
        }
      }
      for (size_t s = 0; s < stores.size(); ++s) {
        Samples& put = results[s].put;
        Samples& get = results[s].get;
        std::printf(
            "| %s | %d | %s | %.2f | %.2f | %.2f | %.2f | %.2f | %.2f | %.2f "
            "| %.2f |\n",
            SizeName(chunk_bytes).c_str(), clients, stores[s].name.c_str(),
            put.GbPerSecond(), put.LatencyMs(0.5), put.LatencyMs(0.99),
            get.GbPerSecond(), get.LatencyMs(0.5), get.LatencyMs(0.99),
            put.ServerCpuNsPerByte(), get.ServerCpuNsPerByte());
      }
      std::fflush(stdout);
    }
  }
  return absl::OkStatus();
}

// Times `clients` threads asking, each `lookups` times, how many of a
// 128-chunk prompt's keys each store holds, the stores taking turns over
// `rounds` rounds; then the same for the prompt's first key alone, which
// is what a call costs with next to nothing to look up. Prints p50 and p99
// per store and key count.
absl::Status CompareLookups(absl::Span<const Store> stores, int clients,
                            int lookups, int rounds) {
  constexpr int kChunks = 128;
  std::vector<ChunkKey> prompt;
  for (int i = 0; i < kChunks; ++i) prompt.push_back(KeyOf(1'000'000'000 + i));
  for (const Store& store : stores) {
    absl::StatusOr<std::unique_ptr<StoreConnection>> setup = store.connect();
    if (!setup.ok()) return setup.status();
    for (const ChunkKey& key : prompt) {
      if (absl::Status st = (*setup)->Put(key, std::string(4096, 'k'));
          !st.ok()) {
        return st;
      }
    }
  }
  std::printf(
      "## Prefix lookup\n\n%d clients, each asking %d times in each of %d "
      "rounds (the stores alternating) how many of a prompt's keys are held: "
      "a count-only Lookup for kvcache, EXISTS of the keys in one command for "
      "Redis.\n\n| store | keys | lookups/s | p50 ms | p99 ms | p99.9 ms "
      "|\n|---|---:|---:|---:|---:|---:|\n",
      clients, lookups, rounds);
  for (const size_t chunks : {size_t{kChunks}, size_t{1}}) {
    const absl::Span<const ChunkKey> keys =
        absl::MakeConstSpan(prompt).subspan(0, chunks);
    std::vector<Samples> results(stores.size());
    for (int round = 0; round < rounds; ++round) {
      for (size_t s = 0; s < stores.size(); ++s) {
        std::vector<std::unique_ptr<StoreConnection>> connections;
        std::vector<std::vector<ChunkKey>> per_client(clients);
        for (int c = 0; c < clients; ++c) {
          absl::StatusOr<std::unique_ptr<StoreConnection>> connection =
              stores[s].connect();
          if (!connection.ok()) return connection.status();
          connections.push_back(*std::move(connection));
          per_client[c].assign(lookups, keys[0]);  // one entry per lookup
        }
        absl::StatusOr<Samples> samples = RunPhase(
            connections, per_client, 0, stores[s].pid,
            [&](StoreConnection& connection, const ChunkKey&, uint64_t) {
              absl::StatusOr<size_t> held = connection.CountHeld(keys);
              if (!held.ok()) return held.status();
              return *held == chunks ? absl::OkStatus()
                                     : absl::InternalError(absl::StrCat(
                                           stores[s].name, " holds ", *held,
                                           " of ", chunks, " chunks"));
            });
        if (!samples.ok()) return samples.status();
        results[s].Add(*samples);
      }
    }
    for (size_t s = 0; s < stores.size(); ++s) {
      Samples& r = results[s];
      std::printf("| %s | %zu | %.0f | %.3f | %.3f | %.3f |\n",
                  stores[s].name.c_str(), chunks,
                  r.latency_ms.size() / r.seconds, r.LatencyMs(0.5),
                  r.LatencyMs(0.99), r.LatencyMs(0.999));
    }
    std::fflush(stdout);
  }
  std::printf("\n");
  return absl::OkStatus();
}

// GB/s of one plain TCP stream over loopback: a child process writes
// `bytes` in 4 MiB writes from memory it touched first, this process reads
// them into a 4 MiB buffer. The peer of a Get stream without gRPC, HTTP/2,
// protobuf or checksums.
absl::StatusOr<double> PlainTcpGbPerSecond(uint64_t bytes) {
  const int listener = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in address{};
  address.sin_family = AF_INET;
  address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t length = sizeof(address);
  if (listener < 0 ||
      bind(listener, reinterpret_cast<sockaddr*>(&address), length) != 0 ||
      listen(listener, 1) != 0 ||
      getsockname(listener, reinterpret_cast<sockaddr*>(&address), &length) !=
          0) {
    if (listener >= 0) close(listener);
    return absl::InternalError("cannot listen on loopback");
  }
  std::vector<char> buffer(4 * kMiB, 'x');
  const pid_t child = fork();
  if (child == 0) {
    const int out = socket(AF_INET, SOCK_STREAM, 0);
    if (connect(out, reinterpret_cast<sockaddr*>(&address), length) != 0) {
      _exit(1);
    }
    for (uint64_t sent = 0; sent < bytes;) {
      const ssize_t n = write(out, buffer.data(),
                              std::min<uint64_t>(buffer.size(), bytes - sent));
      if (n <= 0) _exit(1);
      sent += n;
    }
    _exit(0);
  }
  const int in = accept(listener, nullptr, nullptr);
  close(listener);
  if (in < 0) return absl::InternalError("accept failed");
  const absl::Time start = absl::Now();
  uint64_t received = 0;
  while (received < bytes) {
    const ssize_t n = read(in, buffer.data(), buffer.size());
    if (n <= 0) break;
    received += n;
  }
  const double seconds = absl::ToDoubleSeconds(absl::Now() - start);
  close(in);
  waitpid(child, nullptr, 0);
  if (received != bytes)
    return absl::DataLossError("the TCP stream ended early");
  return bytes / seconds / 1e9;
}

// kvcache's Get stream (4 MiB chunks, one client) against a plain TCP
// stream moving the same bytes between two processes, round by round.
absl::Status CompareWithTcp(const Store& kvcache, const Payloads& payloads,
                            uint64_t bytes, int rounds) {
  std::printf(
      "## Get stream against plain TCP\n\n%llu MiB a round: kvcache Get of "
      "4 MiB chunks with one client, then one plain TCP stream between two "
      "processes; the receiving side's CPU time (this process: the client, "
      "or the TCP reader) per byte.\n\n| round | kvcache get GB/s | TCP GB/s "
      "| kvcache / TCP | client CPU ns/B | TCP reader CPU ns/B "
      "|\n|---:|---:|---:|---:|---:|---:|\n",
      static_cast<unsigned long long>(bytes / kMiB));
  uint64_t next_key = 2'000'000'000;
  const pid_t self = getpid();
  for (int round = 1; round <= rounds; ++round) {
    absl::StatusOr<CaseSamples> get =
        RunRound(kvcache, payloads, 4 * kMiB, 1, bytes, next_key);
    if (!get.ok()) return get.status();
    const double tcp_cpu = ProcessCpuSeconds(self);
    absl::StatusOr<double> tcp = PlainTcpGbPerSecond(bytes);
    if (!tcp.ok()) return tcp.status();
    std::printf("| %d | %.2f | %.2f | %.0f%% | %.2f | %.2f |\n", round,
                get->get.GbPerSecond(), *tcp,
                100 * get->get.GbPerSecond() / *tcp,
                get->get.client_cpu_seconds * 1e9 / bytes,
                (ProcessCpuSeconds(self) - tcp_cpu) * 1e9 / bytes);
    std::fflush(stdout);
  }
  std::printf("\n");
  return absl::OkStatus();
}

absl::Status RunStoreComparison(const Flags& flags) {
  const std::vector<uint64_t>& chunk_sizes = flags.chunk_sizes;
  const uint64_t case_bytes = flags.case_mib * kMiB;
  // Room for a whole case plus allocator slack; both stores are emptied
  // after every round.
  const uint64_t capacity = std::max<uint64_t>(4 * kGiB, 2 * case_bytes);
  const Payloads payloads(
      64 * kMiB + *std::max_element(chunk_sizes.begin(), chunk_sizes.end()));

  absl::StatusOr<DaemonProcess> kvcached = DaemonProcess::Start(
      kDaemon,
      {absl::StrCat("--set=cpu_tier { capacity_bytes: ", capacity, " }")});
  if (!kvcached.ok()) return kvcached.status();
  int redis_port = 0;
  absl::StatusOr<DaemonProcess> redis =
      StartRedis(flags.data_dir, capacity, redis_port);
  if (!redis.ok()) return redis.status();

  const std::string kvcached_address = kvcached->address();
  // kvcache's clients; count-only lookups over the node's local lookup
  // socket or, without `local_lookups`, gRPC.
  auto kvcache = [&](std::string name, bool local_lookups) {
    return Store{
        std::move(name),
        [&,
         local_lookups]() -> absl::StatusOr<std::unique_ptr<StoreConnection>> {
          ClientOptions options;
          options.address = kvcached_address;
          options.timeout = absl::Minutes(2);
          options.local_lookups = local_lookups;
          absl::StatusOr<std::unique_ptr<KvCacheClient>> client =
              KvCacheClient::Connect(options);
          if (!client.ok()) return client.status();
          return std::make_unique<KvCacheConnection>(std::move(*client));
        },
        kvcached->pid()};
  };
  const Store redis_store = {
      "Redis (hiredis)",
      [&]() -> absl::StatusOr<std::unique_ptr<StoreConnection>> {
        absl::StatusOr<std::unique_ptr<RedisConnection>> connection =
            RedisConnection::Connect(redis_port);
        if (!connection.ok()) return connection.status();
        return std::unique_ptr<StoreConnection>(std::move(*connection));
      },
      redis->pid()};
  const Store stores[] = {kvcache("kvcache (gRPC)", true), redis_store};
  const Store lookup_stores[] = {kvcache("kvcache (local lookup socket)", true),
                                 kvcache("kvcache (gRPC)", false), redis_store};
  if (flags.part == "lookup") {
    return CompareLookups(lookup_stores, /*clients=*/8, /*lookups=*/500,
                          flags.rounds);
  }
  if (flags.part == "stream") {
    return CompareWithTcp(stores[0], payloads, case_bytes, flags.rounds);
  }

  std::printf(
      "## Put/Get over loopback\n\n"
      "%llu MiB per case (%llu MiB for 256 KiB chunks) in %d rounds, random "
      "payloads, one client per thread; latency per chunk; server CPU: the "
      "store's process's CPU time (user + system) per byte stored or "
      "served.\n\n%s",
      static_cast<unsigned long long>(flags.case_mib),
      static_cast<unsigned long long>(flags.case_mib / 4), flags.rounds,
      kTableHeader);
  std::fflush(stdout);
  if (absl::Status s = CompareStores(stores, chunk_sizes, {1, 8}, flags,
                                     payloads, case_bytes);
      !s.ok()) {
    return s;
  }
  std::printf("\n");
  if (absl::Status s =
          CompareWithTcp(stores[0], payloads, case_bytes, flags.rounds);
      !s.ok()) {
    return s;
  }
  return CompareLookups(lookup_stores, /*clients=*/8, /*lookups=*/500,
                        flags.rounds);
}

// ---------------------------------------------------------------------------
// NVMe tier reads against fio.

// Reads random chunks with `threads` threads for `duration`.
absl::StatusOr<Samples> ReadRandomChunks(NvmeTier& tier,
                                         const std::vector<ChunkKey>& keys,
                                         uint64_t chunk_bytes, int threads,
                                         absl::Duration duration) {
  std::vector<Samples> samples(threads);
  std::vector<absl::Status> status(threads);
  const absl::Time start = absl::Now();
  const absl::Time deadline = start + duration;
  std::vector<std::thread> workers;
  for (int t = 0; t < threads; ++t) {
    workers.emplace_back([&, t] {
      std::mt19937 rng(t + 1);
      while (status[t].ok() && absl::Now() < deadline) {
        const ChunkKey& key = keys[rng() % keys.size()];
        const absl::Time t0 = absl::Now();
        absl::StatusOr<ChunkRef> chunk = tier.Get(key.AsBytes());
        samples[t].latency_ms.push_back(
            absl::ToDoubleMilliseconds(absl::Now() - t0));
        samples[t].bytes += chunk_bytes;
        if (!chunk.ok()) {
          status[t] = chunk.status();
        } else if (chunk->bytes().size() != chunk_bytes) {
          status[t] = absl::DataLossError("NVMe tier returned a wrong size");
        }
      }
    });
  }
  for (std::thread& worker : workers) worker.join();
  Samples all;
  for (int t = 0; t < threads; ++t) {
    if (!status[t].ok()) return status[t];
    all.Add(samples[t]);
  }
  all.seconds = absl::ToDoubleSeconds(absl::Now() - start);
  return all;
}

absl::Status RunNvmeComparison(const Flags& flags) {
  const uint64_t chunk_bytes = flags.nvme_chunk_kib * kKiB;
  const uint64_t fill_bytes = flags.nvme_mib * kMiB / chunk_bytes * chunk_bytes;
  if (fill_bytes == 0) {
    return absl::InvalidArgumentError(
        "--nvme_mib must hold at least one chunk of --nvme_chunk_kib");
  }
  const std::string dir = flags.data_dir + "/nvme";
  const std::string report = flags.data_dir + "/fio.json";
  std::filesystem::remove_all(dir);
  // One slab exactly as large as the chunks, so they fill it from start to
  // end and fio reads the very same blocks.
  NvmeTierOptions options;
  options.data_dir = dir;
  options.slab_bytes = fill_bytes;
  options.slab_count = 1;
  absl::StatusOr<std::unique_ptr<NvmeTier>> tier = NvmeTier::Open(options);
  if (!tier.ok()) return tier.status();

  const Payloads payloads(64 * kMiB + chunk_bytes);
  std::vector<ChunkKey> keys;
  for (uint64_t i = 0; i < fill_bytes / chunk_bytes; ++i) {
    keys.push_back(KeyOf(i + 1));
    const absl::string_view bytes = payloads.Chunk(i, chunk_bytes);
    if (absl::Status s =
            (*tier)->Put(keys.back().AsBytes(), bytes, codec::Crc32c(bytes),
                         absl::InfinitePast());
        !s.ok()) {
      return s;
    }
  }

  std::printf(
      "## NVMe tier random reads\n\n"
      "%s of %s chunks in %s/slab-000. kvcache: NvmeTier::Get of random "
      "chunks from N threads, each read into a buffer the caller keeps and "
      "CRC32C-checked; fio: randread, bs=%llu, iodepth=N, io_uring, "
      "O_DIRECT, same file. %d s per side and depth, alternating in %d "
      "rounds; the median of the rounds' ratios pairs each kvcache round "
      "with the fio round right after it, so a disk that drifts between "
      "rounds moves both sides of a pair alike.\n\n"
      "| queue depth | kvcache GB/s | fio GB/s | kvcache / fio | "
      "median round ratio | kvcache p50 ms | kvcache p99 ms |\n"
      "|---:|---:|---:|---:|---:|---:|---:|\n",
      SizeName(fill_bytes).c_str(), SizeName(chunk_bytes).c_str(), dir.c_str(),
      static_cast<unsigned long long>(chunk_bytes), flags.nvme_seconds,
      flags.rounds);
  std::fflush(stdout);
  const absl::Duration round = absl::Seconds(flags.nvme_seconds) / flags.rounds;
  for (int depth : {1, 4}) {
    Samples ours, theirs;
    std::vector<double> round_ratios;
    for (int r = 0; r < flags.rounds; ++r) {
      absl::StatusOr<Samples> read =
          ReadRandomChunks(**tier, keys, chunk_bytes, depth, round);
      if (!read.ok()) return read.status();
      ours.Add(*read);
      absl::StatusOr<testing::DiskReadResult> fio =
          testing::RunFioRead({.file = dir + "/slab-000",
                               .bytes = fill_bytes,
                               .block_bytes = chunk_bytes,
                               .queue_depth = depth,
                               .random = true,
                               .duration = round,
                               .report_path = report});
      if (!fio.ok()) return fio.status();
      theirs.bytes += fio->bytes;
      theirs.seconds += fio->seconds;
      if (fio->GbPerSecond() > 0) {
        round_ratios.push_back(read->GbPerSecond() / fio->GbPerSecond());
      }
    }
    std::sort(round_ratios.begin(), round_ratios.end());
    const double median_ratio =
        round_ratios.empty() ? 0 : round_ratios[round_ratios.size() / 2];
    std::printf("| %d | %.2f | %.2f | %.0f%% | %.0f%% | %.2f | %.2f |\n", depth,
                ours.GbPerSecond(), theirs.GbPerSecond(),
                100 * ours.GbPerSecond() / theirs.GbPerSecond(),
                100 * median_ratio, ours.LatencyMs(0.5), ours.LatencyMs(0.99));
    std::fflush(stdout);
  }
  std::printf("\n");
  tier->reset();
  std::filesystem::remove_all(dir);
  std::filesystem::remove(report);
  return absl::OkStatus();
}

// kvcache over plaintext against kvcache over mutual TLS (certificates made
// by deploy/make_certs.sh), two nodes configured alike, same payloads: what
// encryption costs on Put and Get.
absl::Status RunTlsComparison(const Flags& flags) {
  char dir_template[] = "/tmp/kvstore_bench_certs.XXXXXX";
  if (mkdtemp(dir_template) == nullptr) {
    return absl::InternalError("cannot make a directory for certificates");
  }
  const std::string certs = dir_template;
  const std::string command = absl::StrCat(
      "deploy/make_certs.sh ", certs, " --node node --client bench >/dev/null");
  if (std::system(command.c_str()) != 0) {
    return absl::InternalError(absl::StrCat("failed: ", command));
  }
  const std::vector<uint64_t> chunk_sizes = {256 * kKiB, 4 * kMiB};
  const uint64_t case_bytes = flags.case_mib * kMiB;
  const uint64_t capacity = std::max<uint64_t>(4 * kGiB, 2 * case_bytes);
  const Payloads payloads(
      64 * kMiB + *std::max_element(chunk_sizes.begin(), chunk_sizes.end()));
  const std::string capacity_flag =
      absl::StrCat("--set=cpu_tier { capacity_bytes: ", capacity, " }");
  absl::StatusOr<DaemonProcess> plaintext =
      DaemonProcess::Start(kDaemon, {capacity_flag});
  if (!plaintext.ok()) return plaintext.status();
  absl::StatusOr<DaemonProcess> tls = DaemonProcess::Start(
      kDaemon, {capacity_flag,
                absl::StrCat("--set=tls { cert_file: \"", certs,
                             "/node.crt\" key_file: \"", certs,
                             "/node.key\" ca_file: \"", certs,
                             "/ca.crt\" require_client_certificate: true }")});
  if (!tls.ok()) return tls.status();

  auto connect_to = [](const std::string& address, const std::string& certs)
      -> absl::StatusOr<std::unique_ptr<StoreConnection>> {
    ClientOptions options;
    options.address = address;
    options.timeout = absl::Minutes(2);
    if (!certs.empty()) {
      options.ca_file = certs + "/ca.crt";
      options.cert_file = certs + "/bench.crt";
      options.key_file = certs + "/bench.key";
    }
    absl::StatusOr<std::unique_ptr<KvCacheClient>> client =
        KvCacheClient::Connect(options);
    if (!client.ok()) return client.status();
    return std::make_unique<KvCacheConnection>(std::move(*client));
  };
  const std::string plaintext_address = plaintext->address();
  const std::string tls_address = tls->address();
  const Store stores[] = {
      {"kvcache plaintext", [&] { return connect_to(plaintext_address, ""); },
       plaintext->pid()},
      {"kvcache mTLS", [&] { return connect_to(tls_address, certs); },
       tls->pid()},
  };
  std::printf(
      "## Put/Get over loopback: plaintext against mutual TLS\n\n"
      "%llu MiB per case (%llu MiB for 256 KiB chunks) in %d rounds, the two "
      "nodes alternating; random payloads, one client per thread.\n\n%s",
      static_cast<unsigned long long>(flags.case_mib),
      static_cast<unsigned long long>(flags.case_mib / 4), flags.rounds,
      kTableHeader);
  std::fflush(stdout);
  absl::Status status =
      CompareStores(stores, chunk_sizes, {1, 8}, flags, payloads, case_bytes);
  std::printf("\n");
  std::filesystem::remove_all(certs);
  return status;
}

std::string LoadAverage() {
  std::string one, five, fifteen;
  std::ifstream("/proc/loadavg") >> one >> five >> fifteen;
  return absl::StrCat(one, " ", five, " ", fifteen);
}

int Run(int argc, char** argv) {
  Flags flags;
  if (!ParseFlags(argc, argv, flags)) return 2;
  std::error_code error;
  std::filesystem::create_directories(flags.data_dir, error);
  if (error) {
    std::fprintf(stderr, "kvstore_bench: cannot create %s: %s\n",
                 flags.data_dir.c_str(), error.message().c_str());
    return 1;
  }
  // This process is the worker side of both clients and hosts the NVMe tier
  // under test; it keeps freed buffers for reuse as kvcached does, so that
  // glibc handing them back to the kernel after every call dominates neither
  // client's numbers.
  KeepLargeBlocksForReuse();
  std::printf("# kvstore_bench: %u cores, load average %s at start\n\n",
              std::thread::hardware_concurrency(), LoadAverage().c_str());
  std::fflush(stdout);
  absl::Status status;
  if (flags.part == "tls") {
    status = RunTlsComparison(flags);
  } else {
    if (flags.part != "nvme") status = RunStoreComparison(flags);
    if (status.ok() && (flags.part == "all" || flags.part == "nvme")) {
      status = RunNvmeComparison(flags);
    }
  }
  std::printf("load average %s at end\n", LoadAverage().c_str());
  if (!status.ok()) {
    std::fprintf(stderr, "kvstore_bench: %s\n", status.ToString().c_str());
    return 1;
  }
  return 0;
}

}  // namespace
}  // namespace kvcache::kvstore

int main(int argc, char** argv) { return kvcache::kvstore::Run(argc, argv); }
