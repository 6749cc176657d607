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

  // Replaces the prompt's chunk 3 on the node with a copy whose byte `at`
  // is flipped, and fetches the first four chunks into the GPU through a
  // sink made with `options`.
  absl::Status FetchWithChunk3Damaged(
      size_t at, transfer::GpuDecodeSinkOptions options = {}) {
    std::string damaged = prompt_->streams[3];
    damaged[at] ^= 0x10;
    if (absl::Status s =
            client_->Put({{prompt_->keys[3], damaged}},
                         PutOptions{absl::ZeroDuration(), /*replace=*/true});
        !s.ok()) {
      return s;
    }
    std::unique_ptr<PrefixFetcher> fetcher = Fetcher(Transport::kAuto);
    DeviceBlocks blocks(*prompt_, 4);
    std::unique_ptr<transfer::GpuDecodeSink> sink = blocks.Sink(options);
    return fetcher->Fetch(absl::MakeConstSpan(prompt_->keys).first(4), *sink)
        .status();
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
  const absl::Status fetched =
      FetchWithChunk3Damaged(prompt_->streams[3].size() / 2);
  EXPECT_EQ(fetched.code(), absl::StatusCode::kDataLoss);
  EXPECT_NE(fetched.message().find("chunk 3"), std::string::npos) << fetched;
}

// Layer by layer, over the GPU tier, the shared CPU tier and gRPC: each
// layer is signalled once, in order, and when its event has passed that
// layer of every chunk holds its values.
TEST_F(GpuFetchTest, LayerByLayerSignalsEachLayerWhenItIsThere) {
  const size_t n = prompt_->keys.size();
  StartGpuNode(3);
  PutPrompt(n);
  const uint32_t layers = prompt_->shape.layers;
  for (Transport transport : {Transport::kAuto, Transport::kGrpc}) {
    std::unique_ptr<PrefixFetcher> fetcher = Fetcher(transport);
    DeviceBlocks blocks(*prompt_, n);
    std::vector<uint32_t> signalled;
    transfer::GpuDecodeSinkOptions options;
    options.on_layer = [&](uint32_t layer, CUevent_st* ready) {
      signalled.push_back(layer);
      ASSERT_EQ(cudaEventSynchronize(ready), cudaSuccess);
      blocks.ExpectLayerDecoded(layer);
    };
    std::unique_ptr<transfer::GpuDecodeSink> sink = blocks.Sink(options);
    absl::StatusOr<FetchReport> report = fetcher->Fetch(prompt_->keys, *sink);
    ASSERT_TRUE(report.ok()) << report.status();
    if (transport == Transport::kAuto) {
      EXPECT_GE(report->gpu_tier_chunks, 3u);
      EXPECT_GT(report->shared_memory_chunks, 0u);
    } else {
      EXPECT_EQ(report->grpc_chunks, n);
    }
    ASSERT_EQ(signalled.size(), layers);
    for (uint32_t l = 0; l < layers; ++l) EXPECT_EQ(signalled[l], l);
    blocks.ExpectDecoded();
    EXPECT_GT(sink->first_batch_ms(), 0);

    // The same sink, reset to the default order, restores into fresh blocks
    // without signalling.
    DeviceBlocks again(*prompt_, n);
    ASSERT_TRUE(sink->Reset(codec::gpu::KvLayout::Contiguous(
                                prompt_->shape.layers, prompt_->shape.kv_heads,
                                prompt_->shape.head_dim, prompt_->shape.dtype),
                            again.refs(), nullptr)
                    .ok());
    ASSERT_TRUE(fetcher->Fetch(prompt_->keys, *sink).ok());
    EXPECT_EQ(signalled.size(), layers);
    again.ExpectDecoded();
  }
}

TEST_F(GpuFetchTest, LayerByLayerNamesACorruptChunk) {
  StartDaemon();
  PutPrompt(3);
  uint32_t signalled = 0;
  transfer::GpuDecodeSinkOptions options;
  options.on_layer = [&](uint32_t, CUevent_st*) { ++signalled; };
  // A byte in the chunk's last layer: found by its checksum at the end.
  const absl::Status fetched =
      FetchWithChunk3Damaged(prompt_->streams[3].size() - 10, options);
  EXPECT_EQ(fetched.code(), absl::StatusCode::kDataLoss);
  EXPECT_NE(fetched.message().find("chunk 3"), std::string::npos) << fetched;
  EXPECT_EQ(signalled, prompt_->shape.layers);
}

}  // namespace
}  // namespace kvcache
