// GPU to GPU over NCCL, on a host with two GPUs: a node's GPU tier on GPU 0
// sends chunks to a worker on GPU 1, which decodes them into its blocks;
// every restored value matches the CPU decoder's. Also what happens when
// either side goes away or stalls. Run by tests/gpu/run.sh with
// --kvcached=<binary>.
#include <cuda_runtime.h>
#include <gtest/gtest.h>
#include <signal.h>

#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "tests/testing/device_blocks.h"
#include "tests/testing/fetch_fixture.h"
#include "transfer/gpu_decode_sink.h"
#include "transfer/nccl_link.h"

namespace kvcache {
namespace {

using testing::DeviceBlocks;
using transfer::NcclLink;

constexpr int kNodeGpu = 0;
constexpr int kWorkerGpu = 1;

class GpuNcclTest : public testing::FetchFixture {
 protected:
  void SetUp() override {
    int devices = 0;
    ASSERT_EQ(cudaGetDeviceCount(&devices), cudaSuccess);
    ASSERT_GE(devices, 2) << "NCCL between a node and a worker needs two GPUs";
    ASSERT_EQ(cudaSetDevice(kWorkerGpu), cudaSuccess);
    FetchFixture::SetUp();
  }

  // A node whose GPU tier, on GPU 0, holds `gpu_chunks` of the prompt's
  // chunks, with `args` on top.
  void StartGpuNode(size_t gpu_chunks, std::vector<std::string> args = {}) {
    args.push_back(testing::GpuTierFlag(*prompt_, gpu_chunks, kNodeGpu));
    StartDaemon(args);
  }

  std::unique_ptr<PrefixFetcher> NcclFetcher(uint64_t request_bytes = 32
                                                                      << 20) {
    FetcherOptions options;
    options.transport = Transport::kNccl;
    options.nccl_request_bytes = request_bytes;
    std::unique_ptr<PrefixFetcher> fetcher = Fetcher(options);
    EXPECT_TRUE(fetcher != nullptr && fetcher->nccl());
    return fetcher;
  }

  // The worker's half of a link made by hand, for tests that play a
  // misbehaving worker.
  struct RawLink {
    uint64_t id = 0;
    std::unique_ptr<NcclLink> link;
  };
  RawLink OpenRawLink() {
    RawLink raw;
    absl::StatusOr<std::string> id = NcclLink::NewId();
    EXPECT_TRUE(id.ok()) << id.status();
    if (!id.ok()) return raw;
    absl::StatusOr<v1::OpenNcclLinkResponse> opened =
        client_->OpenNcclLink(*id, absl::Seconds(30));
    EXPECT_TRUE(opened.ok()) << opened.status();
    if (!opened.ok()) return raw;
    absl::StatusOr<std::unique_ptr<NcclLink>> link = NcclLink::Join(
        *id, NcclLink::kWorkerRank, kWorkerGpu, absl::Seconds(30));
    EXPECT_TRUE(link.ok()) << link.status();
    if (!link.ok()) return raw;
    raw.id = opened->link_id();
    raw.link = *std::move(link);
    return raw;
  }
};

TEST_F(GpuNcclTest, GpuTierChunksArriveOverNccl) {
  const size_t n = prompt_->keys.size();
  StartGpuNode(2 * n);
  PutPrompt(n);
  absl::StatusOr<v1::NodeInfoResponse> info = client_->NodeInfo();
  ASSERT_TRUE(info.ok()) << info.status();
  EXPECT_TRUE(info->nccl_links());
  std::unique_ptr<PrefixFetcher> fetcher = NcclFetcher();
  // A receiver with no room for the first chunk is told so.
  {
    RawLink raw = OpenRawLink();
    EXPECT_EQ(
        client_->SendOverNccl(raw.id, {prompt_->keys[0]}, 1).status().code(),
        absl::StatusCode::kResourceExhausted);
  }
  // The link is kept: a second fetch reuses it.
  for (int round = 0; round < 2; ++round) {
    DeviceBlocks blocks(*prompt_, n);
    const FetchReport report = blocks.FetchAndCheck(*fetcher);
    EXPECT_EQ(report.nccl_chunks, n);
    EXPECT_EQ(report.grpc_chunks + report.shared_memory_chunks, 0u);
  }
}

TEST_F(GpuNcclTest, HostTierChunksAreStagedOnTheNodesGpu) {
  const size_t n = prompt_->keys.size();
  // Three chunks fit the GPU tier; the rest live in the CPU tier. Requests
  // of two chunks' bytes make the fetch ask again and again.
  StartGpuNode(3);
  PutPrompt(n);
  std::unique_ptr<PrefixFetcher> fetcher =
      NcclFetcher(2 * prompt_->streams[0].size());
  DeviceBlocks blocks(*prompt_, n);
  EXPECT_EQ(blocks.FetchAndCheck(*fetcher).nccl_chunks, n);
}

TEST_F(GpuNcclTest, AutoPicksNcclWithoutSharedMemory) {
  const size_t n = prompt_->keys.size();
  StartGpuNode(2 * n, {"--set=shared_memory { enabled: false }"});
  PutPrompt(n);
  std::unique_ptr<PrefixFetcher> fetcher = Fetcher(Transport::kAuto);
  ASSERT_FALSE(fetcher->shared_memory());
  ASSERT_TRUE(fetcher->nccl());
  DeviceBlocks blocks(*prompt_, n);
  EXPECT_EQ(blocks.FetchAndCheck(*fetcher).nccl_chunks, n);
}

TEST_F(GpuNcclTest, MissingChunkEndsTheFetchAndKeepsTheLink) {
  StartGpuNode(16);
  PutPrompt(6);
  ASSERT_TRUE(client_->Delete({prompt_->keys[3]}).ok());
  std::unique_ptr<PrefixFetcher> fetcher = NcclFetcher();
  {
    DeviceBlocks blocks(*prompt_, 6);
    std::unique_ptr<transfer::GpuDecodeSink> sink = blocks.Sink();
    absl::StatusOr<FetchReport> report =
        fetcher->Fetch(absl::MakeConstSpan(prompt_->keys).first(6), *sink);
    EXPECT_EQ(report.status().code(), absl::StatusCode::kNotFound)
        << report.status();
    EXPECT_NE(report.status().message().find("chunk 3"), std::string::npos)
        << report.status();
  }
  // The partial prefix before it comes over the same link.
  ASSERT_TRUE(fetcher->nccl());
  DeviceBlocks blocks(*prompt_, 3);
  EXPECT_EQ(blocks.FetchAndCheck(*fetcher).nccl_chunks, 3u);
}

TEST_F(GpuNcclTest, CorruptChunkIsRejectedByIndex) {
  StartGpuNode(16);
  PutPrompt(3);
  std::string damaged = prompt_->streams[3];
  damaged[damaged.size() / 2] ^= 0x10;
  ASSERT_TRUE(client_
                  ->Put({{prompt_->keys[3], damaged}},
                        PutOptions{absl::ZeroDuration(), /*replace=*/true})
                  .ok());
  std::unique_ptr<PrefixFetcher> fetcher = NcclFetcher();
  DeviceBlocks blocks(*prompt_, 4);
  std::unique_ptr<transfer::GpuDecodeSink> sink = blocks.Sink();
  absl::StatusOr<FetchReport> report =
      fetcher->Fetch(absl::MakeConstSpan(prompt_->keys).first(4), *sink);
  EXPECT_EQ(report.status().code(), absl::StatusCode::kDataLoss)
      << report.status();
  EXPECT_NE(report.status().message().find("chunk 3"), std::string::npos)
      << report.status();
}

TEST_F(GpuNcclTest, ConcurrentWorkersEachHaveTheirLink) {
  const size_t n = prompt_->keys.size();
  StartGpuNode(2 * n);
  PutPrompt(n);
  std::vector<std::unique_ptr<PrefixFetcher>> fetchers;
  for (int i = 0; i < 3; ++i) fetchers.push_back(NcclFetcher());
  std::vector<std::thread> workers;
  for (auto& fetcher : fetchers) {
    workers.emplace_back([&] {
      ASSERT_EQ(cudaSetDevice(kWorkerGpu), cudaSuccess);
      for (int round = 0; round < 3; ++round) {
        DeviceBlocks blocks(*prompt_, n);
        EXPECT_EQ(blocks.FetchAndCheck(*fetcher).nccl_chunks, n);
      }
    });
  }
  for (auto& w : workers) w.join();
}

TEST_F(GpuNcclTest, NodeDyingMidFetchIsAClearError) {
  const size_t n = prompt_->keys.size();
  StartGpuNode(2 * n);
  PutPrompt(n);
  std::unique_ptr<PrefixFetcher> fetcher = NcclFetcher();
  daemon_->Signal(SIGKILL);
  (void)daemon_->WaitForExit(absl::Seconds(10));
  DeviceBlocks blocks(*prompt_, n);
  std::unique_ptr<transfer::GpuDecodeSink> sink = blocks.Sink();
  absl::StatusOr<FetchReport> report = fetcher->Fetch(prompt_->keys, *sink);
  EXPECT_EQ(report.status().code(), absl::StatusCode::kUnavailable)
      << report.status();
}

TEST_F(GpuNcclTest, ReceivesFromADeadNodeAreAbortedNotHung) {
  StartGpuNode(16);
  PutPrompt(2);
  RawLink raw = OpenRawLink();
  ASSERT_NE(raw.link, nullptr);
  daemon_->Signal(SIGKILL);
  (void)daemon_->WaitForExit(absl::Seconds(10));
  // A receive the node will never send: aborting the link ends it.
  void* buffer = nullptr;
  ASSERT_EQ(cudaMalloc(&buffer, 1 << 20), cudaSuccess);
  cudaStream_t stream = nullptr;
  ASSERT_EQ(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking),
            cudaSuccess);
  ASSERT_TRUE(raw.link->Recv(buffer, 1 << 20, stream).ok());
  absl::SleepFor(absl::Milliseconds(200));
  EXPECT_EQ(cudaStreamQuery(stream), cudaErrorNotReady);
  raw.link->Abort();
  const absl::Time deadline = absl::Now() + absl::Seconds(20);
  while (cudaStreamQuery(stream) == cudaErrorNotReady &&
         absl::Now() < deadline) {
    absl::SleepFor(absl::Milliseconds(10));
  }
  EXPECT_NE(cudaStreamQuery(stream), cudaErrorNotReady);
  EXPECT_EQ(raw.link->Recv(buffer, 16, stream).code(),
            absl::StatusCode::kUnavailable);
  cudaStreamDestroy(stream);
  cudaFree(buffer);
}

TEST_F(GpuNcclTest, WorkerThatNeverReceivesLosesItsLinkNotTheNode) {
  StartGpuNode(16, {"--set=gpu_tier { nccl_send_timeout_seconds: 1 }"});
  PutPrompt(4);
  RawLink raw = OpenRawLink();
  ASSERT_NE(raw.link, nullptr);
  const std::vector<ChunkKey> keys(prompt_->keys.begin(),
                                   prompt_->keys.begin() + 4);
  absl::StatusOr<v1::SendOverNcclResponse> sent =
      client_->SendOverNccl(raw.id, keys, 1 << 30);
  ASSERT_TRUE(sent.ok()) << sent.status();
  EXPECT_EQ(sent->chunks_size(), 4);
  // Nothing receives: past the send timeout the node aborts the link.
  absl::StatusOr<v1::SendOverNcclResponse> again;
  const absl::Time deadline = absl::Now() + absl::Seconds(20);
  do {
    absl::SleepFor(absl::Milliseconds(200));
    again = client_->SendOverNccl(raw.id, keys, 1 << 30);
  } while (again.ok() && absl::Now() < deadline);
  EXPECT_EQ(again.status().code(), absl::StatusCode::kUnavailable)
      << again.status();
  EXPECT_NE(again.status().message().find("took no send"), std::string::npos)
      << again.status();
  // The node still serves, over gRPC and over a new link.
  absl::StatusOr<std::vector<FetchedChunk>> got = client_->Get(keys);
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_EQ((*got)[2].bytes, prompt_->streams[2]);
  std::unique_ptr<PrefixFetcher> fetcher = NcclFetcher();
  DeviceBlocks blocks(*prompt_, 4);
  EXPECT_EQ(blocks.FetchAndCheck(*fetcher).nccl_chunks, 4u);
}

TEST_F(GpuNcclTest, UnjoinedLinksTimeOutOnBothSides) {
  StartGpuNode(16);
  PutPrompt(1);
  absl::StatusOr<std::string> id = NcclLink::NewId();
  ASSERT_TRUE(id.ok()) << id.status();
  // The node is told of a link the worker never joins...
  absl::StatusOr<v1::OpenNcclLinkResponse> opened =
      client_->OpenNcclLink(*id, absl::Seconds(1));
  ASSERT_TRUE(opened.ok()) << opened.status();
  absl::SleepFor(absl::Seconds(2));
  absl::StatusOr<v1::SendOverNcclResponse> sent =
      client_->SendOverNccl(opened->link_id(), {prompt_->keys[0]}, 1 << 30);
  EXPECT_EQ(sent.status().code(), absl::StatusCode::kUnavailable)
      << sent.status();
  // ...and a worker waits for a node that never joins.
  absl::StatusOr<std::string> lonely = NcclLink::NewId();
  ASSERT_TRUE(lonely.ok());
  absl::StatusOr<std::unique_ptr<NcclLink>> joined = NcclLink::Join(
      *lonely, NcclLink::kWorkerRank, kWorkerGpu, absl::Seconds(1));
  EXPECT_EQ(joined.status().code(), absl::StatusCode::kDeadlineExceeded)
      << joined.status();
  // Unknown and closed links are NOT_FOUND.
  EXPECT_TRUE(*client_->CloseNcclLink(opened->link_id()));
  EXPECT_EQ(
      client_->SendOverNccl(opened->link_id(), {prompt_->keys[0]}, 1 << 30)
          .status()
          .code(),
      absl::StatusCode::kNotFound);
}

}  // namespace
}  // namespace kvcache
