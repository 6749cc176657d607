// The worker's read path from a node with a GPU tier, on a real GPU: chunks
// held in the node's device memory are decoded in place through CUDA IPC,
// the rest come from its shared CPU tier, and every restored value matches
// the CPU decoder's. Run by tests/gpu/run.sh with --kvcached=<binary>.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <memory>
#include <string>
#include <vector>

#include "client/host_decode_sink.h"
#include "tests/testing/device_blocks.h"
#include "tests/testing/fetch_fixture.h"
#include "transfer/gpu_decode_sink.h"

namespace kvcache {
namespace {

using testing::DeviceBlocks;

class GpuFetchTest : public testing::FetchFixture {
 protected:
  // A node whose GPU tier holds `gpu_chunks` of the prompt's chunks.
  void StartGpuNode(size_t gpu_chunks) {
    StartDaemon({testing::GpuTierFlag(*prompt_, gpu_chunks)});
  }
};

TEST_F(GpuFetchTest, GpuTierChunksAreDecodedInPlace) {
  const size_t n = prompt_->keys.size();
  StartGpuNode(2 * n);
  PutPrompt(n);
  std::unique_ptr<PrefixFetcher> fetcher = Fetcher(Transport::kAuto);
  ASSERT_TRUE(fetcher->shared_memory());
  ASSERT_TRUE(fetcher->gpu_tier());
  DeviceBlocks blocks(*prompt_, n);
  const FetchReport report = blocks.FetchAndCheck(*fetcher);
  EXPECT_EQ(report.gpu_tier_chunks, n);
  EXPECT_EQ(report.shared_memory_chunks + report.grpc_chunks, 0u);
}

TEST_F(GpuFetchTest, ChunksSpreadOverGpuAndCpuTiersAllArrive) {
  const size_t n = prompt_->keys.size();
  StartGpuNode(3);
  PutPrompt(n);
  std::unique_ptr<PrefixFetcher> fetcher = Fetcher(Transport::kAuto);
  ASSERT_TRUE(fetcher->gpu_tier());
  // The GPU tier holds the last (at least three) put; locating the others
  // does not promote them, which would push those out before they are read.
  for (int round = 0; round < 2; ++round) {
    DeviceBlocks blocks(*prompt_, n);
    const FetchReport report = blocks.FetchAndCheck(*fetcher);
    EXPECT_GE(report.gpu_tier_chunks, 3u);
    EXPECT_LT(report.gpu_tier_chunks, n);
    EXPECT_EQ(report.gpu_tier_chunks + report.shared_memory_chunks, n);
  }
}

TEST_F(GpuFetchTest, HostSinkGetsCpuCopiesOfGpuChunks) {
  const size_t n = prompt_->keys.size();
  StartGpuNode(2 * n);
  PutPrompt(n);
  std::unique_ptr<PrefixFetcher> fetcher = Fetcher(Transport::kAuto);
  std::vector<std::vector<uint16_t>> values(
      n, std::vector<uint16_t>(prompt_->shape.NumValues()));
  std::vector<absl::Span<uint16_t>> spans(values.begin(), values.end());
  HostDecodeSink sink(spans);
  absl::StatusOr<FetchReport> report = fetcher->Fetch(prompt_->keys, sink);
  ASSERT_TRUE(report.ok()) << report.status();
  EXPECT_EQ(report->shared_memory_chunks, n);
  EXPECT_EQ(report->gpu_tier_chunks, 0u);
  for (size_t i = 0; i < n; ++i) EXPECT_EQ(values[i], prompt_->decoded[i]);
}

TEST_F(GpuFetchTest, GrpcReadsGpuChunksToo) {
  const size_t n = prompt_->keys.size();
  StartGpuNode(2 * n);
  PutPrompt(n);
  std::unique_ptr<PrefixFetcher> fetcher = Fetcher(Transport::kGrpc);
  DeviceBlocks blocks(*prompt_, n);
  EXPECT_EQ(blocks.FetchAndCheck(*fetcher).grpc_chunks, n);
}

TEST_F(GpuFetchTest, GpuTierCanBeLeftClosed) {
  const size_t n = prompt_->keys.size();
  StartGpuNode(2 * n);
  PutPrompt(n);
  FetcherOptions options;
  options.open_gpu_tier = false;
  std::unique_ptr<PrefixFetcher> fetcher = Fetcher(options);
  EXPECT_FALSE(fetcher->gpu_tier());
  DeviceBlocks blocks(*prompt_, n);
  EXPECT_EQ(blocks.FetchAndCheck(*fetcher).shared_memory_chunks, n);
}

TEST_F(GpuFetchTest, CorruptGpuChunkIsRejectedByIndex) {
  StartGpuNode(16);
  PutPrompt(3);
  std::string damaged = prompt_->streams[3];
  damaged[damaged.size() / 2] ^= 0x10;
  ASSERT_TRUE(client_
                  ->Put({{prompt_->keys[3], damaged}},
                        PutOptions{absl::ZeroDuration(), /*replace=*/true})
                  .ok());
  std::unique_ptr<PrefixFetcher> fetcher = Fetcher(Transport::kAuto);
  DeviceBlocks blocks(*prompt_, 4);
  std::unique_ptr<transfer::GpuDecodeSink> sink = blocks.Sink();
  absl::StatusOr<FetchReport> report =
      fetcher->Fetch(absl::MakeConstSpan(prompt_->keys).first(4), *sink);
  ASSERT_FALSE(report.ok());
  EXPECT_EQ(report.status().code(), absl::StatusCode::kDataLoss);
  EXPECT_NE(report.status().message().find("chunk 3"), std::string::npos)
      << report.status();
}

}  // namespace
}  // namespace kvcache
