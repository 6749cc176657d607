// Benchmarks restoring a prefix from a node's NVMe tier right after the node
// restarted (nothing in memory), on a host without a GPU, against fio
// reading the same slab file sequentially in the same run:
//
//  - "bytes": the fetch over shared memory (Locate in windows, the node
//    reading each window up from NVMe while the worker copies the one
//    before), with a sink that only copies the compressed chunks out: what
//    the disk and the transport deliver.
//  - "bytes, one Locate": the same with the whole prefix located in one
//    call, the node reading all of it before the worker starts.
//  - "decoded": the same windows into a HostDecodeSink, on the fetching
//    thread or on one decoding thread per core: what a worker without a
//    GPU gets.
//  - fio: --rw=read, 1 MiB blocks, io_uring, O_DIRECT, queue depth 32, over
//    the bytes the chunks fill in the node's slab file; and the same job
//    issued from this process (tests/testing/raw_disk_read.h), the
//    reference where fio is not installed.
//
// The prefix is real KV (a model's dump, cut into 256-token chunks and
// repeated up to --tokens), encoded at --level. The sides alternate over
// --rounds, each restore from a freshly started node.
//
// Usage: nvme_restore_bench [--data_dir=DIR] [--tokens=N] [--level=NAME]
//                           [--rounds=N] [manifest.json]
// The manifest defaults to SmolLM2's 8192-token evaluation dump
// (~/.cache/kvcache/kvdata/smollm2-eval, made by //client/examples/chat:
// dump_kv). Needs fio (deploy/setup.sh installs it) and a data_dir on a
// local disk filesystem (not tmpfs).
#include <signal.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/string_view.h"
#include "absl/strings/strip.h"
#include "absl/time/time.h"
#include "absl/types/span.h"
#include "client/chunk_key.h"
#include "client/host_decode_sink.h"
#include "client/kvcache_client.h"
#include "client/prefix_fetcher.h"
#include "codec/codec.h"
#include "codec/kv_dump.h"
#include "tests/testing/daemon_process.h"
#include "tests/testing/fio_process.h"
#include "tests/testing/raw_disk_read.h"

namespace kvcache {
namespace {

using ::kvcache::testing::DaemonProcess;

constexpr uint32_t kChunkTokens = 256;
constexpr uint64_t kMiB = 1 << 20;

constexpr char kUsage[] =
    "usage: nvme_restore_bench [--data_dir=DIR] [--tokens=N] [--level=NAME]\n"
    "                          [--rounds=N] [manifest.json]\n"
    "  --data_dir  local disk directory for the node's NVMe tier\n"
    "              (default /var/tmp/nvme_restore_bench; not tmpfs)\n"
    "  --tokens    prefix length, a multiple of 256 (default 32768)\n"
    "  --level     codec level (default: default)\n"
    "  --rounds    rounds the sides alternate over (default 3)\n";

struct Flags {
  std::string data_dir = "/var/tmp/nvme_restore_bench";
  uint32_t tokens = 32768;
  codec::Level level = codec::Level::kDefault;
  int rounds = 3;
  std::string manifest;
};

bool ParseFlags(int argc, char** argv, Flags& flags) {
  const char* home = std::getenv("HOME");
  flags.manifest = absl::StrCat(
      home != nullptr ? home : "",
      "/.cache/kvcache/kvdata/smollm2-eval/smollm2-eval-8192.json");
  for (int i = 1; i < argc; ++i) {
    absl::string_view value = argv[i];
    bool ok = true;
    if (absl::ConsumePrefix(&value, "--data_dir=")) {
      flags.data_dir = std::string(value);
    } else if (absl::ConsumePrefix(&value, "--tokens=")) {
      ok = absl::SimpleAtoi(value, &flags.tokens) && flags.tokens > 0 &&
           flags.tokens % kChunkTokens == 0;
    } else if (absl::ConsumePrefix(&value, "--level=")) {
      absl::StatusOr<codec::Level> level = codec::ParseLevel(value);
      ok = level.ok() && !codec::LevelNeedsProfile(*level);
      if (ok) flags.level = *level;
    } else if (absl::ConsumePrefix(&value, "--rounds=")) {
      ok = absl::SimpleAtoi(value, &flags.rounds) && flags.rounds > 0;
    } else if (!value.empty() && value.front() != '-') {
      flags.manifest = std::string(value);
    } else {
      ok = false;
    }
    if (!ok) {
      std::fprintf(stderr, "nvme_restore_bench: bad argument '%s'\n%s", argv[i],
                   kUsage);
      return false;
    }
  }
  return true;
}

double Seconds(std::chrono::steady_clock::time_point since) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - since)
      .count();
}

// Copies each chunk's compressed bytes out, back to back.
class CopySink : public ChunkSink {
 public:
  explicit CopySink(std::vector<uint64_t> offsets, uint64_t total)
      : offsets_(std::move(offsets)), bytes_(total) {}
  absl::Status Consume(size_t index, absl::string_view bytes,
                       bool stable) override {
    std::memcpy(bytes_.data() + offsets_[index], bytes.data(), bytes.size());
    return absl::OkStatus();
  }
  absl::Status Finish() override { return absl::OkStatus(); }
  absl::string_view Chunk(size_t index, uint64_t size) const {
    return absl::string_view(bytes_.data() + offsets_[index], size);
  }

 private:
  const std::vector<uint64_t> offsets_;
  std::vector<char> bytes_;
};

struct Prefix {
  codec::ChunkShape shape;  // of one chunk
  std::vector<ChunkKey> keys;
  std::vector<std::string> distinct;  // chunk i's stream: distinct[i % n]
  std::vector<std::vector<uint16_t>> decoded;  // of each distinct stream
  const std::string& Stream(size_t i) const {
    return distinct[i % distinct.size()];
  }
  uint64_t compressed_bytes = 0;
};

absl::StatusOr<Prefix> MakePrefix(const Flags& flags) {
  absl::StatusOr<codec::KvDump> dump = codec::LoadKvDump(flags.manifest);
  if (!dump.ok()) {
    return absl::FailedPreconditionError(absl::StrCat(
        dump.status().message(),
        "; make the dumps with //client/examples/chat:dump_kv (README)"));
  }
  const uint32_t distinct = dump->shape.tokens / kChunkTokens;
  if (distinct == 0) return absl::InvalidArgumentError("dump too short");
  Prefix prefix;
  prefix.shape = dump->shape;
  prefix.shape.tokens = kChunkTokens;
  prefix.distinct.resize(distinct);
  prefix.decoded.resize(distinct);
  std::vector<absl::Status> status(distinct);
  std::vector<std::thread> threads;
  const unsigned workers = std::max(1u, std::thread::hardware_concurrency());
  for (unsigned w = 0; w < workers; ++w) {
    threads.emplace_back([&, w] {
      for (uint32_t i = w; i < distinct; i += workers) {
        const std::vector<uint16_t> values =
            codec::SliceTokens(*dump, i * kChunkTokens, (i + 1) * kChunkTokens);
        absl::StatusOr<std::string> stream =
            codec::EncodeChunk(prefix.shape, values, flags.level);
        if (!stream.ok()) {
          status[i] = stream.status();
          continue;
        }
        prefix.distinct[i] = *std::move(stream);
        prefix.decoded[i].resize(values.size());
        status[i] = codec::DecodeChunk(prefix.distinct[i],
                                       absl::MakeSpan(prefix.decoded[i]));
      }
    });
  }
  for (std::thread& t : threads) t.join();
  for (const absl::Status& s : status) {
    if (!s.ok()) return s;
  }
  KeySpace space;
  space.model_id = "nvme-restore-bench";
  space.chunk_tokens = kChunkTokens;
  std::vector<int32_t> tokens(flags.tokens);
  for (size_t i = 0; i < tokens.size(); ++i) tokens[i] = i % 50000;
  absl::StatusOr<std::vector<ChunkKey>> keys =
      ChunkKeysForTokens(space, tokens);
  if (!keys.ok()) return keys.status();
  prefix.keys = *std::move(keys);
  for (size_t i = 0; i < prefix.keys.size(); ++i) {
    prefix.compressed_bytes += prefix.Stream(i).size();
  }
  return prefix;
}

class Bench {
 public:
  Bench(const Flags& flags, const Prefix& prefix)
      : prefix_(prefix), nvme_dir_(flags.data_dir + "/nvme") {
    // One slab a little larger than the prefix, which fills it from the
    // start: fio reads the very blocks the node does.
    const uint64_t slab =
        (prefix.compressed_bytes + prefix.keys.size() * 4096) / kMiB * kMiB +
        64 * kMiB;
    args_ = {"--set=cpu_tier { capacity_bytes: 4294967296 }",
             absl::StrCat("--set=nvme_tier { data_dir: '", nvme_dir_,
                          "' slab_bytes: ", slab,
                          " slab_count: 1 write_through: true }"),
             "--set=shared_memory { max_leased_percent: 90 }",
             "--set=limits { max_chunk_bytes: 67108864 }"};
  }

  absl::Status Store() {
    std::filesystem::remove_all(nvme_dir_);
    absl::StatusOr<DaemonProcess> daemon = Start();
    if (!daemon.ok()) return daemon.status();
    absl::StatusOr<std::shared_ptr<KvCacheClient>> client = Connect(*daemon);
    if (!client.ok()) return client.status();
    for (size_t i = 0; i < prefix_.keys.size(); i += 16) {
      std::vector<ChunkToPut> puts;
      for (size_t j = i; j < std::min(i + 16, prefix_.keys.size()); ++j) {
        puts.push_back({prefix_.keys[j], prefix_.Stream(j)});
      }
      if (absl::Status s = (*client)->Put(puts); !s.ok()) return s;
    }
    return Stop(*daemon);
  }

  // Seconds to restore the whole prefix from a node just started, into a
  // copy or a decoding sink, located `window` bytes at a time (0: all in
  // one Locate); checks what arrived.
  absl::StatusOr<double> Restore(int decode_threads, uint64_t window,
                                 FetchReport* report) {
    const bool decode = decode_threads > 0;
    absl::StatusOr<DaemonProcess> daemon = Start();
    if (!daemon.ok()) return daemon.status();
    absl::StatusOr<std::shared_ptr<KvCacheClient>> client = Connect(*daemon);
    if (!client.ok()) return client.status();
    absl::StatusOr<std::unique_ptr<PrefixFetcher>> fetcher =
        PrefixFetcher::Create(*client, {.transport = Transport::kSharedMemory,
                                        .lease = absl::Minutes(2),
                                        .nvme_window_bytes = window});
    if (!fetcher.ok()) return fetcher.status();
    const size_t n = prefix_.keys.size();
    std::vector<uint64_t> offsets(n);
    uint64_t total = 0;
    for (size_t i = 0; i < n; ++i) {
      offsets[i] = total;
      total += prefix_.Stream(i).size();
    }
    CopySink copies(offsets, total);
    std::vector<std::vector<uint16_t>> values;
    std::vector<absl::Span<uint16_t>> destinations;
    if (decode) {
      values.assign(n, std::vector<uint16_t>(prefix_.shape.NumValues()));
      for (auto& v : values) destinations.push_back(absl::MakeSpan(v));
    }
    HostDecodeSink decoder(destinations, {.threads = decode_threads});
    ChunkSink& sink = decode ? static_cast<ChunkSink&>(decoder) : copies;
    const auto start = std::chrono::steady_clock::now();
    absl::StatusOr<FetchReport> fetched = (*fetcher)->Fetch(prefix_.keys, sink);
    const double seconds = Seconds(start);
    if (!fetched.ok()) return fetched.status();
    *report = *fetched;
    for (size_t i = 0; i < n; ++i) {
      const size_t d = i % prefix_.distinct.size();
      const bool same = decode ? values[i] == prefix_.decoded[d]
                               : copies.Chunk(i, prefix_.distinct[d].size()) ==
                                     prefix_.distinct[d];
      if (!same) {
        return absl::DataLossError(absl::StrCat("chunk ", i, " differs"));
      }
    }
    fetcher->reset();
    if (absl::Status s = Stop(*daemon); !s.ok()) return s;
    return seconds;
  }

  absl::StatusOr<testing::DiskReadResult> RawRead() const {
    return testing::RawSequentialRead(nvme_dir_ + "/slab-000",
                                      prefix_.compressed_bytes);
  }

  absl::StatusOr<testing::DiskReadResult> Fio() const {
    return testing::RunFioRead({.file = nvme_dir_ + "/slab-000",
                                .bytes = prefix_.compressed_bytes / kMiB * kMiB,
                                .duration = absl::Seconds(2),
                                .report_path = nvme_dir_ + "/../fio.json"});
  }

  void Clean() const { std::filesystem::remove_all(nvme_dir_); }

 private:
  absl::StatusOr<DaemonProcess> Start() const {
    return DaemonProcess::Start("kvstore/kvcached", args_);
  }
  static absl::StatusOr<std::shared_ptr<KvCacheClient>> Connect(
      const DaemonProcess& daemon) {
    ClientOptions options;
    options.address = daemon.address();
    options.timeout = absl::Minutes(5);
    absl::StatusOr<std::unique_ptr<KvCacheClient>> client =
        KvCacheClient::Connect(options);
    if (!client.ok()) return client.status();
    return std::shared_ptr<KvCacheClient>(*std::move(client));
  }
  static absl::Status Stop(DaemonProcess& daemon) {
    daemon.Signal(SIGTERM);
    absl::StatusOr<int> code = daemon.WaitForExit(absl::Seconds(60));
    return code.ok() ? absl::OkStatus() : code.status();
  }

  const Prefix& prefix_;
  const std::string nvme_dir_;
  std::vector<std::string> args_;
};

// "1.23 (1.10-1.40)": median and range over rounds, with `decimals`.
std::string Range(std::vector<double> v, int decimals = 2) {
  std::sort(v.begin(), v.end());
  return absl::StrFormat("%.*f (%.*f-%.*f)", decimals, v[v.size() / 2],
                         decimals, v.front(), decimals, v.back());
}

absl::Status Run(const Flags& flags) {
  absl::StatusOr<Prefix> prefix = MakePrefix(flags);
  if (!prefix.ok()) return prefix.status();
  const double raw_bytes =
      double(prefix->keys.size()) * prefix->shape.RawBytes();
  std::printf(
      "prefix: %zu chunks x %u tokens of %s (%u layers, %u KV heads, head "
      "dim %u): %.1f MiB fp16, %.1f MiB at level %s (%.2fx)\n",
      prefix->keys.size(), kChunkTokens, flags.manifest.c_str(),
      prefix->shape.layers, prefix->shape.kv_heads, prefix->shape.head_dim,
      raw_bytes / kMiB, prefix->compressed_bytes / double(kMiB),
      std::string(codec::LevelName(flags.level)).c_str(),
      raw_bytes / prefix->compressed_bytes);
  Bench bench(flags, *prefix);
  if (absl::Status s = bench.Store(); !s.ok()) return s;
  struct Side {
    std::string name;
    int decode_threads;  // 0: bytes only
    uint64_t window;
    std::vector<double> seconds, vs_fio;
    FetchReport report;
  };
  const uint64_t window = FetcherOptions{}.nvme_window_bytes;
  const int cores = std::max(1u, std::thread::hardware_concurrency());
  std::vector<Side> sides = {
      {"bytes, located in windows", 0, window},
      {"bytes, located in one call", 0, 0},
      {"decoded on the fetching thread, windows", 1, window},
      {absl::StrCat("decoded on ", cores, " threads, windows"), cores, window}};
  std::vector<double> fio_gbps, raw_gbps;
  for (int round = 0; round < flags.rounds; ++round) {
    absl::StatusOr<testing::DiskReadResult> fio = bench.Fio();
    if (!fio.ok()) return fio.status();
    fio_gbps.push_back(fio->GbPerSecond());
    absl::StatusOr<testing::DiskReadResult> raw = bench.RawRead();
    if (!raw.ok()) return raw.status();
    raw_gbps.push_back(raw->GbPerSecond());
    for (Side& side : sides) {
      absl::StatusOr<double> s =
          bench.Restore(side.decode_threads, side.window, &side.report);
      if (!s.ok()) return s.status();
      side.seconds.push_back(*s);
      side.vs_fio.push_back(prefix->compressed_bytes / *s / 1e9 /
                            fio->GbPerSecond());
    }
    std::fprintf(stderr, "nvme_restore_bench: round %d of %d done\n", round + 1,
                 flags.rounds);
  }
  bench.Clean();
  std::printf(
      "\nfio sequential read of the same slab: %s GB/s; the same job from "
      "this process (RawSequentialRead): %s GB/s\n\n"
      "| restore (cold node) | seconds | compressed GB/s | KV GB/s | vs fio "
      "(same round) | Locate calls |\n|---|---:|---:|---:|---:|---:|\n",
      Range(fio_gbps).c_str(), Range(raw_gbps).c_str());
  for (Side& side : sides) {
    std::vector<double> compressed, kv;
    for (double s : side.seconds) {
      compressed.push_back(prefix->compressed_bytes / s / 1e9);
      kv.push_back(raw_bytes / s / 1e9);
    }
    std::vector<double> percent;
    for (double r : side.vs_fio) percent.push_back(100 * r);
    std::printf("| %s | %s | %s | %s | %s%% | %zu |\n", side.name.c_str(),
                Range(side.seconds).c_str(), Range(compressed).c_str(),
                Range(kv).c_str(), Range(percent, 0).c_str(),
                side.report.locate_calls);
  }
  return absl::OkStatus();
}

}  // namespace
}  // namespace kvcache

int main(int argc, char** argv) {
  kvcache::Flags flags;
  if (!kvcache::ParseFlags(argc, argv, flags)) return 2;
  const absl::Status s = kvcache::Run(flags);
  if (!s.ok()) {
    std::fprintf(stderr, "nvme_restore_bench: %s\n", s.ToString().c_str());
    return 1;
  }
  return 0;
}
