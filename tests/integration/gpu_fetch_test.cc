// The worker's read path from a node with a GPU tier, on a real GPU: chunks
// held in the node's device memory are decoded in place through CUDA IPC,
// the rest come from its shared CPU tier, and every restored value matches
// the CPU decoder's. Run by tests/gpu/run.sh with --kvcached=<binary>.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <memory>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "client/host_decode_sink.h"
#include "tests/testing/fetch_fixture.h"
#include "transfer/gpu_decode_sink.h"

namespace kvcache {
namespace {

using codec::gpu::KvChunkRef;
using codec::gpu::KvLayout;

// Device buffers for a prompt's first `n` chunks, contiguous per chunk.
class DeviceBlocks {
 public:
  DeviceBlocks(const testing::Prompt& prompt, size_t n)
      : prompt_(prompt), values_per_chunk_(prompt.shape.NumValues()) {
    EXPECT_EQ(cudaMalloc(&values_, 2 * values_per_chunk_ * n), cudaSuccess);
    EXPECT_EQ(cudaMemset(values_, 0xFF, 2 * values_per_chunk_ * n),
              cudaSuccess);
    for (size_t i = 0; i < n; ++i) {
      KvChunkRef ref;
      ref.tokens = prompt.shape.tokens;
      ref.values = values_ + i * values_per_chunk_;
      refs_.push_back(ref);
    }
  }
  ~DeviceBlocks() { cudaFree(values_); }

  std::unique_ptr<transfer::GpuDecodeSink> Sink() {
    const codec::ChunkShape& shape = prompt_.shape;
    absl::StatusOr<std::unique_ptr<transfer::GpuDecodeSink>> sink =
        transfer::GpuDecodeSink::Create(
            KvLayout::Contiguous(shape.layers, shape.kv_heads, shape.head_dim,
                                 shape.dtype),
            refs_, nullptr);
    EXPECT_TRUE(sink.ok()) << sink.status();
    return sink.ok() ? std::move(*sink) : nullptr;
  }

  // Copies the restored values back and compares them with the CPU
  // decoder's.
  void ExpectDecoded() const {
    std::vector<uint16_t> host(values_per_chunk_);
    for (size_t i = 0; i < refs_.size(); ++i) {
      ASSERT_EQ(cudaMemcpy(host.data(), refs_[i].values, 2 * host.size(),
                           cudaMemcpyDeviceToHost),
                cudaSuccess);
      EXPECT_EQ(host, prompt_.decoded[i]) << "chunk " << i;
    }
  }

 private:
  const testing::Prompt& prompt_;
  const uint64_t values_per_chunk_;
  uint16_t* values_ = nullptr;
  std::vector<KvChunkRef> refs_;
};

class GpuFetchTest : public testing::FetchFixture {
 protected:
  // A node whose GPU tier holds `gpu_chunks` of the prompt's chunks.
  void StartGpuNode(size_t gpu_chunks) {
    uint64_t largest = 0;
    for (const std::string& s : prompt_->streams) {
      largest = std::max<uint64_t>(largest, s.size());
    }
    const uint64_t block = (largest + 4095) / 4096 * 4096;
    StartDaemon(
        {absl::StrCat("--set=gpu_tier { capacity_bytes: ", gpu_chunks * block,
                      " max_admit_percent: 100 }")});
  }

  FetchReport FetchAll(PrefixFetcher& fetcher, DeviceBlocks& blocks) {
    std::unique_ptr<transfer::GpuDecodeSink> sink = blocks.Sink();
    absl::StatusOr<FetchReport> report = fetcher.Fetch(prompt_->keys, *sink);
    EXPECT_TRUE(report.ok()) << report.status();
    blocks.ExpectDecoded();
    return report.ok() ? *report : FetchReport{};
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
  const FetchReport report = FetchAll(*fetcher, blocks);
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
    const FetchReport report = FetchAll(*fetcher, blocks);
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
  EXPECT_EQ(FetchAll(*fetcher, blocks).grpc_chunks, n);
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
  EXPECT_EQ(FetchAll(*fetcher, blocks).shared_memory_chunks, n);
}

TEST_F(GpuFetchTest, CorruptGpuChunkIsRejectedByIndex) {
  StartGpuNode(16);
  PutPrompt(3);
  std::string damaged = prompt_->streams[3];
  damaged[damaged.size() / 2] ^= 0x10;
  ASSERT_TRUE(client_->Put({{prompt_->keys[3], damaged}}).ok());
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

int main(int argc, char** argv) {
  ::testing::InitGoogleTest(&argc, argv);
  kvcache::testing::FetchFixture::ReadDaemonFlag(argc, argv);
  return RUN_ALL_TESTS();
}
