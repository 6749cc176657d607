// The worker's read path against a real kvcached: a prompt's chunks, encoded
// from the real KV dumps, fetched over the same-host shared region and over
// gRPC, decoded on the CPU and compared with decoding the stored bytes
// directly. Also what a worker must survive: no shared region, a restarted
// node, a node dying mid-fetch, a lease limit, corrupt chunks, and several
// workers at once.
#include <gtest/gtest.h>
#include <signal.h>

#include <cstdlib>
#include <filesystem>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "client/chunk_key.h"
#include "client/host_decode_sink.h"
#include "client/kvcache_client.h"
#include "client/prefix_fetcher.h"
#include "codec/codec.h"
#include "tests/testing/fetch_fixture.h"

namespace kvcache {
namespace {

using ::kvcache::testing::DaemonProcess;
using ::kvcache::testing::Prompt;

// Buffers for `n` decoded chunks and a sink that fills them.
struct Destination {
  Destination(const Prompt& prompt, size_t n, int decode_threads = 1)
      : values(n, std::vector<uint16_t>(prompt.shape.NumValues(), 0xFFFF)) {
    std::vector<absl::Span<uint16_t>> spans;
    for (auto& v : values) spans.emplace_back(v);
    sink = std::make_unique<HostDecodeSink>(
        std::move(spans), HostDecodeOptions{.threads = decode_threads});
  }
  std::vector<std::vector<uint16_t>> values;
  std::unique_ptr<HostDecodeSink> sink;
};

class FetchTest : public testing::FetchFixture {
 protected:
  // Fetches the whole prompt through `fetcher` and checks every value.
  FetchReport FetchPrompt(PrefixFetcher& fetcher, int decode_threads = 1) {
    const size_t n = prompt_->keys.size();
    Destination destination(*prompt_, n, decode_threads);
    absl::StatusOr<FetchReport> report =
        fetcher.Fetch(prompt_->keys, *destination.sink);
    EXPECT_TRUE(report.ok()) << report.status();
    ExpectDecoded(destination, n);
    return report.ok() ? *report : FetchReport{};
  }

  // Starts a node with a 1 MiB CPU tier over NVMe in `dir` (under the
  // test's temporary directory), with `args` on top, and puts the prompt,
  // which newer chunks then push down to NVMe.
  void StartWithPromptOnNvme(const std::string& dir,
                             std::vector<std::string> args = {}) {
    const std::string data_dir = absl::StrCat(
        getenv("TEST_TMPDIR") ? getenv("TEST_TMPDIR") : "/tmp", "/", dir);
    std::filesystem::remove_all(data_dir);
    args.push_back("--set=cpu_tier { capacity_bytes: 1048576 }");
    args.push_back(absl::StrCat("--set=nvme_tier { data_dir: '", data_dir,
                                "' slab_bytes: 16777216 slab_count: 1 }"));
    StartDaemon(args);
    PutPrompt(prompt_->keys.size());
    PushPromptToNvme(0);
  }

  // Puts three 512 KiB fillers, distinct for each `first` (a filler
  // already held would be kept where it is, pushing nothing out).
  void PushPromptToNvme(int first) {
    for (int i = first; i < first + 3; ++i) {
      const std::string filler(512 << 10, static_cast<char>(i));
      ASSERT_TRUE(client_->Put({{ContentKey(filler), filler}}).ok());
    }
  }

  void ExpectDecoded(const Destination& destination, size_t chunks) {
    for (size_t i = 0; i < chunks; ++i) {
      EXPECT_EQ(destination.values[i], prompt_->decoded[i]) << "chunk " << i;
    }
  }
};

TEST_F(FetchTest, SameHostFetchReadsTheSharedRegionInPlace) {
  StartDaemon();
  const size_t n = prompt_->keys.size();
  PutPrompt(n);
  std::unique_ptr<PrefixFetcher> fetcher = Fetcher(Transport::kAuto);
  ASSERT_TRUE(fetcher->shared_memory());
  EXPECT_EQ(*fetcher->Lookup(prompt_->keys), n);
  const FetchReport report = FetchPrompt(*fetcher);
  EXPECT_EQ(report.shared_memory_chunks, n);
  EXPECT_EQ(report.grpc_chunks, 0u);
}

TEST_F(FetchTest, DecodingThreadsGiveTheSameValues) {
  StartDaemon();
  PutPrompt(prompt_->keys.size());
  for (Transport t : {Transport::kSharedMemory, Transport::kGrpc}) {
    const FetchReport report = FetchPrompt(*Fetcher(t), /*decode_threads=*/3);
    EXPECT_EQ(report.shared_memory_chunks + report.grpc_chunks,
              prompt_->keys.size());
  }
}

TEST_F(FetchTest, GrpcFetchDecodesTheSameValues) {
  StartDaemon();
  const size_t n = prompt_->keys.size();
  PutPrompt(n);
  std::unique_ptr<PrefixFetcher> fetcher = Fetcher(Transport::kGrpc);
  EXPECT_FALSE(fetcher->shared_memory());
  EXPECT_EQ(FetchPrompt(*fetcher).grpc_chunks, n);
}

TEST_F(FetchTest, PartialPrefixFetchesWhatIsCached) {
  StartDaemon();
  PutPrompt(5);
  std::unique_ptr<PrefixFetcher> fetcher = Fetcher(Transport::kAuto);
  absl::StatusOr<size_t> cached = fetcher->Lookup(prompt_->keys);
  ASSERT_TRUE(cached.ok());
  ASSERT_EQ(*cached, 5u);
  auto prefix = absl::MakeConstSpan(prompt_->keys).first(*cached);
  Destination destination(*prompt_, *cached);
  ASSERT_TRUE(fetcher->Fetch(prefix, *destination.sink).ok());
  ExpectDecoded(destination, 5);

  // Asking for more than is cached is NOT_FOUND, not a partial success.
  Destination too_far(*prompt_, prompt_->keys.size());
  for (Transport t : {Transport::kAuto, Transport::kGrpc}) {
    EXPECT_EQ(Fetcher(t)->Fetch(prompt_->keys, *too_far.sink).status().code(),
              absl::StatusCode::kNotFound);
  }
}

TEST_F(FetchTest, NoSharedRegionFallsBackToGrpc) {
  StartDaemon({"--set=shared_memory { enabled: false }"});
  const size_t n = prompt_->keys.size();
  PutPrompt(n);
  std::unique_ptr<PrefixFetcher> fetcher = Fetcher(Transport::kAuto);
  EXPECT_FALSE(fetcher->shared_memory());
  EXPECT_EQ(FetchPrompt(*fetcher).grpc_chunks, n);
  // Forcing shared memory says why it cannot be had.
  absl::StatusOr<std::unique_ptr<PrefixFetcher>> forced =
      PrefixFetcher::Create(client_, {.transport = Transport::kSharedMemory});
  EXPECT_EQ(forced.status().code(), absl::StatusCode::kFailedPrecondition);
}

TEST_F(FetchTest, NcclNeedsANodeWithAGpuTier) {
  StartDaemon();
  PutPrompt(2);
  absl::StatusOr<v1::NodeInfoResponse> info = client_->NodeInfo();
  ASSERT_TRUE(info.ok()) << info.status();
  EXPECT_FALSE(info->nccl_links());
  FetcherOptions options;
  options.transport = Transport::kNccl;
  absl::StatusOr<std::unique_ptr<PrefixFetcher>> forced =
      PrefixFetcher::Create(client_, options);
  EXPECT_EQ(forced.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(forced.status().message().find("no NCCL links"), std::string::npos)
      << forced.status();
  // Asked directly, the node refuses both halves.
  EXPECT_EQ(client_->OpenNcclLink(std::string(128, 'x'), absl::Seconds(1))
                .status()
                .code(),
            absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(
      client_->SendOverNccl(1, {prompt_->keys[0]}, 1 << 20).status().code(),
      absl::StatusCode::kFailedPrecondition);
}

TEST_F(FetchTest, LeaseLimitSendsTheRestOverGrpc) {
  // Leases may hold 2% of 1 MiB: a few chunks, not the whole prompt.
  StartDaemon({"--set=cpu_tier { capacity_bytes: 1048576 }",
               "--set=shared_memory { max_leased_percent: 2 }"});
  const size_t n = prompt_->keys.size();
  PutPrompt(n);
  ASSERT_GT(prompt_->streams[0].size() * n, 1048576u * 2 / 100)
      << "prompt too small to cross the lease limit";
  std::unique_ptr<PrefixFetcher> fetcher = Fetcher(Transport::kAuto);
  const FetchReport report = FetchPrompt(*fetcher);
  EXPECT_GT(report.shared_memory_chunks, 0u);
  EXPECT_GT(report.grpc_chunks, 0u);
  EXPECT_EQ(report.shared_memory_chunks + report.grpc_chunks, n);
  // Forced shared memory refuses rather than switch transports.
  Destination again(*prompt_, n);
  EXPECT_EQ(Fetcher(Transport::kSharedMemory)
                ->Fetch(prompt_->keys, *again.sink)
                .status()
                .code(),
            absl::StatusCode::kFailedPrecondition);
}

TEST_F(FetchTest, PrefixOnNvmeIsLocatedInWindows) {
  StartWithPromptOnNvme("nvme_windows");
  const size_t n = prompt_->keys.size();
  for (uint64_t window : {uint64_t{0}, 3 * prompt_->streams[0].size()}) {
    absl::StatusOr<LookupResult> before = client_->Lookup(prompt_->keys);
    ASSERT_TRUE(before.ok()) << before.status();
    ASSERT_EQ(before->prefix_chunks, n);
    ASSERT_EQ(before->chunks[0].tier(), v1::TIER_NVME);
    std::unique_ptr<PrefixFetcher> fetcher = Fetcher(
        {.transport = Transport::kSharedMemory, .nvme_window_bytes = window});
    const FetchReport report = FetchPrompt(*fetcher);
    EXPECT_EQ(report.shared_memory_chunks, n) << "window " << window;
    if (window == 0) {
      EXPECT_EQ(report.locate_calls, 1u);
    } else {
      // About three chunks a window (chunk sizes vary a little).
      EXPECT_GE(report.locate_calls, n / 4) << "window " << window;
    }
    PushPromptToNvme(window == 0 ? 3 : 6);
  }
}

// Refuses every chunk.
class RefusingSink : public ChunkSink {
 public:
  absl::Status Consume(size_t index, absl::string_view, bool) override {
    return absl::InternalError(absl::StrCat("sink refused chunk ", index));
  }
  absl::Status Finish() override { return absl::OkStatus(); }
};

TEST_F(FetchTest, FailedFetchReleasesTheWindowLocatedAhead) {
  uint64_t prompt_bytes = 0;
  for (const std::string& stream : prompt_->streams) {
    prompt_bytes += stream.size();
  }
  // Two windows, and lease room for the prompt and a quarter: the second
  // window's lease, left behind by the failed fetch, would make the next
  // one run out.
  const uint64_t percent = (prompt_bytes * 5 / 4 * 100 >> 20) + 1;
  ASSERT_LT(percent, 100u);
  StartWithPromptOnNvme(
      "nvme_ahead", {absl::StrCat("--set=shared_memory { max_leased_percent: ",
                                  percent, " }")});
  const FetcherOptions windows = {.transport = Transport::kSharedMemory,
                                  .nvme_window_bytes = prompt_bytes / 2 + 1};
  RefusingSink refusing;
  absl::StatusOr<FetchReport> failed =
      Fetcher(windows)->Fetch(prompt_->keys, refusing);
  ASSERT_FALSE(failed.ok());
  EXPECT_EQ(failed.status().message(), "sink refused chunk 0");
  PushPromptToNvme(3);
  EXPECT_EQ(FetchPrompt(*Fetcher(windows)).shared_memory_chunks,
            prompt_->keys.size());
}

TEST_F(FetchTest, RestartedNodeIsMappedAnew) {
  StartDaemon();
  const size_t n = prompt_->keys.size();
  PutPrompt(n);
  std::unique_ptr<PrefixFetcher> fetcher = Fetcher(Transport::kAuto);
  FetchPrompt(*fetcher);

  // Same address, new process: a new region behind a socket of the same
  // name, which the fetcher must not mistake for the one it mapped.
  const std::string address = daemon_->address();
  daemon_.reset();
  StartDaemon({absl::StrCat("--listen=", address)});
  PutPrompt(n);
  // The old client's channel reconnects on its own; a worker retries.
  absl::StatusOr<size_t> cached;
  for (int i = 0; i < 50; ++i) {
    cached = fetcher->Lookup(prompt_->keys);
    if (cached.ok()) break;
    absl::SleepFor(absl::Milliseconds(100));
  }
  ASSERT_TRUE(cached.ok()) << cached.status();
  ASSERT_EQ(*cached, n);

  EXPECT_EQ(FetchPrompt(*fetcher).grpc_chunks, n) << "read a stale region";
  ASSERT_TRUE(fetcher->shared_memory()) << "new region not mapped";
  EXPECT_EQ(FetchPrompt(*fetcher).shared_memory_chunks, n);
}

// Counts the chunks it takes and kills the node when it takes chunk
// `kill_at`.
class KillingSink : public ChunkSink {
 public:
  KillingSink(DaemonProcess& daemon, size_t kill_at)
      : daemon_(daemon), kill_at_(kill_at) {}
  absl::Status Consume(size_t index, absl::string_view, bool) override {
    if (index == kill_at_) daemon_.Signal(SIGKILL);
    ++taken_;
    return absl::OkStatus();
  }
  absl::Status Finish() override { return absl::OkStatus(); }
  size_t taken() const { return taken_; }

 private:
  DaemonProcess& daemon_;
  const size_t kill_at_;
  size_t taken_ = 0;
};

TEST_F(FetchTest, NodeDyingMidFetchIsAClearError) {
  StartDaemon();
  // 48 MiB: far more than a stream has in flight, so most of it is still on
  // the node when it dies.
  KeySpace space;
  space.model_id = "fetch-test-large";
  space.chunk_tokens = 1;
  std::vector<int32_t> tokens(12);
  const std::vector<ChunkKey> keys = *ChunkKeysForTokens(space, tokens);
  for (size_t i = 0; i < keys.size(); ++i) {
    ASSERT_TRUE(
        client_->Put({{keys[i], std::string(4 << 20, static_cast<char>(i))}})
            .ok());
  }
  std::unique_ptr<PrefixFetcher> fetcher = Fetcher(Transport::kGrpc);
  KillingSink sink(*daemon_, 0);
  absl::StatusOr<FetchReport> report = fetcher->Fetch(keys, sink);
  ASSERT_FALSE(report.ok()) << "a fetch from a dead node reported done";
  EXPECT_EQ(report.status().code(), absl::StatusCode::kUnavailable)
      << report.status();
  EXPECT_LT(sink.taken(), keys.size());
}

TEST_F(FetchTest, CorruptChunkIsReportedWithItsIndex) {
  StartDaemon();
  PutPrompt(3);
  std::string damaged = prompt_->streams[3];
  damaged[damaged.size() / 2] ^= 0x10;
  ASSERT_TRUE(client_
                  ->Put({{prompt_->keys[3], damaged}},
                        PutOptions{absl::ZeroDuration(), /*replace=*/true})
                  .ok());
  for (Transport t : {Transport::kSharedMemory, Transport::kGrpc}) {
    for (int threads : {1, 3}) {
      Destination destination(*prompt_, 4, threads);
      absl::StatusOr<FetchReport> report = Fetcher(t)->Fetch(
          absl::MakeConstSpan(prompt_->keys).first(4), *destination.sink);
      ASSERT_FALSE(report.ok());
      EXPECT_EQ(report.status().code(), absl::StatusCode::kDataLoss)
          << report.status();
      EXPECT_NE(report.status().message().find("chunk 3"), std::string::npos)
          << report.status();
      EXPECT_EQ(destination.sink->decoded(), 3u) << threads << " threads";
    }
  }
}

TEST_F(FetchTest, CountCachedAsksTheLocalLookupSocket) {
  StartDaemon();
  const size_t n = prompt_->keys.size();
  PutPrompt(n - 2);
  ClientOptions options;
  options.address = daemon_->address();
  options.local_lookups = false;
  std::unique_ptr<KvCacheClient> over_grpc = *KvCacheClient::Connect(options);
  for (size_t k : {n, n - 2, size_t{1}}) {
    const auto keys = absl::MakeConstSpan(prompt_->keys).first(k);
    EXPECT_EQ(*client_->CountCached(keys), std::min(k, n - 2)) << k;
    EXPECT_EQ(*over_grpc->CountCached(keys), std::min(k, n - 2)) << k;
  }
  EXPECT_EQ(client_->local_lookups(), 3u);
  EXPECT_EQ(over_grpc->local_lookups(), 0u);
  absl::StatusOr<v1::NodeInfoResponse> info = client_->NodeInfo();
  ASSERT_TRUE(info.ok()) << info.status();
  EXPECT_EQ(info->local_lookup_socket(),
            info->shared_memory_socket() + ".lookup");

  // A restarted node at the same address: the old socket's connections
  // fail, gRPC answers, and a later call finds the new node's socket.
  std::shared_ptr<KvCacheClient> old_client = client_;
  const std::string address = daemon_->address();
  daemon_.reset();
  StartDaemon({absl::StrCat("--listen=", address)});
  PutPrompt(1);
  // The old client's channel reconnects on its own; a worker retries.
  absl::StatusOr<size_t> counted;
  for (int i = 0; i < 50; ++i) {
    counted = old_client->CountCached(prompt_->keys);
    if (counted.ok()) break;
    absl::SleepFor(absl::Milliseconds(100));
  }
  ASSERT_TRUE(counted.ok()) << counted.status();
  EXPECT_EQ(*counted, 1u);
  EXPECT_EQ(*old_client->CountCached(prompt_->keys), 1u);
  EXPECT_GT(old_client->local_lookups(), 3u);
}

TEST_F(FetchTest, ConcurrentWorkersEachGetTheirPrefix) {
  StartDaemon();
  const size_t n = prompt_->keys.size();
  PutPrompt(n);
  std::vector<std::thread> workers;
  std::vector<absl::Status> results(6);
  for (size_t w = 0; w < results.size(); ++w) {
    workers.emplace_back([&, w] {
      const Transport t = w % 2 ? Transport::kGrpc : Transport::kSharedMemory;
      std::unique_ptr<PrefixFetcher> fetcher = Fetcher(t);
      for (int round = 0; round < 3 && results[w].ok(); ++round) {
        const size_t len = 1 + (w + round) % n;
        Destination destination(*prompt_, len);
        absl::StatusOr<FetchReport> report = fetcher->Fetch(
            absl::MakeConstSpan(prompt_->keys).first(len), *destination.sink);
        results[w] = report.status();
        for (size_t i = 0; i < len && results[w].ok(); ++i) {
          if (destination.values[i] != prompt_->decoded[i]) {
            results[w] = absl::DataLossError(absl::StrCat("chunk ", i));
          }
        }
      }
    });
  }
  for (std::thread& t : workers) t.join();
  for (size_t w = 0; w < results.size(); ++w) {
    EXPECT_TRUE(results[w].ok()) << "worker " << w << ": " << results[w];
  }
}

}  // namespace
}  // namespace kvcache
