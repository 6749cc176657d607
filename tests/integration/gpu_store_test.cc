// The worker's write path on a real GPU: chunks of real KV in device
// blocks (contiguous or paged) are encoded on the GPU and put into a real
// kvcached in the background; what the node holds is byte for byte what
// the CPU encoder makes of the same values. Run by tests/gpu/run.sh with
// --kvcached=<binary>.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <csignal>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/notification.h"
#include "codec/cuda/test_util.h"
#include "tests/testing/fetch_fixture.h"
#include "transfer/gpu_storer.h"

namespace kvcache {
namespace {

using codec::gpu::KvChunkRef;
using codec::gpu::KvLayout;
using transfer::ChunkFromDevice;
using transfer::GpuStorer;
using transfer::GpuStorerOptions;
using transfer::StoreReport;

// A ChunkStore whose puts wait until the test opens it.
class GatedStore : public ChunkStore {
 public:
  explicit GatedStore(std::shared_ptr<ChunkStore> inner)
      : inner_(std::move(inner)) {}
  void Open() { open_.Notify(); }
  bool put_started() const { return put_started_.HasBeenNotified(); }

  absl::StatusOr<LookupResult> Lookup(
      absl::Span<const ChunkKey> keys) override {
    return inner_->Lookup(keys);
  }
  absl::Status Put(absl::Span<const ChunkToPut> chunks,
                   const PutOptions& options) override {
    if (!put_started_.HasBeenNotified()) put_started_.Notify();
    open_.WaitForNotification();
    return inner_->Put(chunks, options);
  }
  absl::StatusOr<std::vector<FetchedChunk>> Get(
      absl::Span<const ChunkKey> keys) override {
    return inner_->Get(keys);
  }
  absl::StatusOr<uint32_t> Delete(absl::Span<const ChunkKey> keys) override {
    return inner_->Delete(keys);
  }
  absl::StatusOr<absl::Time> Pin(absl::Span<const ChunkKey> keys,
                                 absl::Duration ttl) override {
    return inner_->Pin(keys, ttl);
  }
  absl::Status Unpin(absl::Span<const ChunkKey> keys) override {
    return inner_->Unpin(keys);
  }

 private:
  std::shared_ptr<ChunkStore> inner_;
  absl::Notification open_;
  absl::Notification put_started_;
};

class GpuStoreTest : public testing::FetchFixture {
 protected:
  void SetUp() override {
    FetchFixture::SetUp();
    StartDaemon();
    const codec::ChunkShape& shape = prompt_->shape;
    contiguous_ = KvLayout::Contiguous(shape.layers, shape.kv_heads,
                                       shape.head_dim, shape.dtype);
    for (const std::vector<uint16_t>& values : prompt_->decoded) {
      absl::StatusOr<std::string> stream =
          codec::EncodeChunk(shape, values, codec::Level::kDefault);
      ASSERT_TRUE(stream.ok()) << stream.status();
      cpu_streams_.push_back(*std::move(stream));
    }
  }
  void TearDown() override { cudaFree(device_); }

  // The prompt's decoded values in device memory, chunk after chunk.
  std::vector<KvChunkRef> UploadContiguous() {
    const uint64_t per_chunk = prompt_->shape.NumValues();
    const size_t n = prompt_->decoded.size();
    EXPECT_EQ(cudaMalloc(&device_, 2 * per_chunk * n), cudaSuccess);
    std::vector<KvChunkRef> refs(n);
    for (size_t i = 0; i < n; ++i) {
      refs[i].tokens = prompt_->shape.tokens;
      refs[i].values = static_cast<uint16_t*>(device_) + i * per_chunk;
      EXPECT_EQ(cudaMemcpy(refs[i].values, prompt_->decoded[i].data(),
                           2 * per_chunk, cudaMemcpyHostToDevice),
                cudaSuccess);
    }
    return refs;
  }

  std::vector<ChunkFromDevice> Chunks(const std::vector<KvChunkRef>& refs) {
    std::vector<ChunkFromDevice> chunks;
    for (size_t i = 0; i < refs.size(); ++i) {
      ChunkFromDevice c{prompt_->keys[i], std::nullopt, refs[i]};
      if (i > 0) c.parent = prompt_->keys[i - 1];
      chunks.push_back(c);
    }
    return chunks;
  }

  std::unique_ptr<GpuStorer> Storer(std::shared_ptr<ChunkStore> store,
                                    const KvLayout& layout,
                                    uint32_t batch_chunks = 3) {
    GpuStorerOptions options;
    options.chunk_tokens = prompt_->shape.tokens;
    options.batch_chunks = batch_chunks;
    absl::StatusOr<std::unique_ptr<GpuStorer>> storer =
        GpuStorer::Create(std::move(store), layout, options);
    EXPECT_TRUE(storer.ok()) << storer.status();
    return storer.ok() ? std::move(*storer) : nullptr;
  }

  // The node holds chunks [0, n) exactly as the CPU encoder writes them.
  void ExpectStoredAsCpuEncodes(size_t n) {
    std::vector<ChunkKey> keys(prompt_->keys.begin(),
                               prompt_->keys.begin() + n);
    absl::StatusOr<std::vector<FetchedChunk>> got = client_->Get(keys);
    ASSERT_TRUE(got.ok()) << got.status();
    for (size_t i = 0; i < n; ++i) {
      EXPECT_TRUE((*got)[i].bytes == cpu_streams_[i]) << "chunk " << i;
    }
  }

  KvLayout contiguous_;
  std::vector<std::string> cpu_streams_;
  void* device_ = nullptr;
};

TEST_F(GpuStoreTest, StoredChunksAreTheCpuEncodersBytes) {
  const size_t n = prompt_->keys.size();
  std::unique_ptr<GpuStorer> storer = Storer(client_, contiguous_);
  absl::StatusOr<GpuStorer::Ticket> ticket =
      storer->Store(Chunks(UploadContiguous()), nullptr);
  ASSERT_TRUE(ticket.ok()) << ticket.status();
  absl::StatusOr<StoreReport> report = storer->Wait(*ticket);
  ASSERT_TRUE(report.ok()) << report.status();
  EXPECT_EQ(report->chunks, n);
  EXPECT_EQ(report->raw_bytes, n * prompt_->shape.RawBytes());
  uint64_t cpu_bytes = 0;
  for (const std::string& s : cpu_streams_) cpu_bytes += s.size();
  EXPECT_EQ(report->stored_bytes, cpu_bytes);
  absl::StatusOr<LookupResult> lookup = client_->Lookup(prompt_->keys);
  ASSERT_TRUE(lookup.ok()) << lookup.status();
  EXPECT_EQ(lookup->prefix_chunks, n);
  ExpectStoredAsCpuEncodes(n);
  // A ticket is waited once.
  EXPECT_EQ(storer->Wait(*ticket).status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST_F(GpuStoreTest, PagedBlocksAreReadThroughTheBlockTable) {
  const codec::ChunkShape& shape = prompt_->shape;
  const size_t n = prompt_->keys.size();
  constexpr uint32_t kBlockTokens = 16;
  const uint32_t per_chunk = shape.tokens / kBlockTokens;
  const uint32_t num_blocks = n * per_chunk + 1;
  // Block ids run backwards, so a table ignored would read the wrong KV.
  std::vector<int32_t> table(n * per_chunk);
  for (size_t b = 0; b < table.size(); ++b) table[b] = num_blocks - 1 - b;
  int32_t* device_table = nullptr;
  ASSERT_EQ(cudaMalloc(&device_table, 4 * table.size()), cudaSuccess);
  ASSERT_EQ(cudaMemcpy(device_table, table.data(), 4 * table.size(),
                       cudaMemcpyHostToDevice),
            cudaSuccess);
  const uint64_t cache_values = uint64_t{shape.layers} * num_blocks * 2 *
                                kBlockTokens * shape.kv_heads * shape.head_dim;
  ASSERT_EQ(cudaMalloc(&device_, 2 * cache_values), cudaSuccess);
  const KvLayout layout = KvLayout::PagedLayerMajor(
      static_cast<uint16_t*>(device_), num_blocks, kBlockTokens, shape.layers,
      shape.kv_heads, shape.head_dim, shape.dtype);
  std::vector<uint16_t> cache(cache_values, 0xFFFF);
  const uint32_t channels = layout.Channels();
  const uint64_t layer_elems = cache_values / shape.layers;
  std::vector<KvChunkRef> refs(n);
  for (size_t i = 0; i < n; ++i) {
    refs[i].tokens = shape.tokens;
    refs[i].block_ids = device_table;
    refs[i].first_slot = i * shape.tokens;
    const uint16_t* from = prompt_->decoded[i].data();
    for (uint32_t p = 0; p < 2 * shape.layers; ++p) {
      for (uint32_t t = 0; t < shape.tokens; ++t, from += channels) {
        const uint64_t row =
            codec::gpu::PagedRow(table, p, refs[i].first_slot + t, kBlockTokens,
                                 channels, layer_elems);
        std::copy(from, from + channels, cache.begin() + row);
      }
    }
  }
  ASSERT_EQ(cudaMemcpy(device_, cache.data(), 2 * cache_values,
                       cudaMemcpyHostToDevice),
            cudaSuccess);
  std::unique_ptr<GpuStorer> storer = Storer(client_, layout);
  absl::StatusOr<GpuStorer::Ticket> ticket =
      storer->Store(Chunks(refs), nullptr);
  ASSERT_TRUE(ticket.ok()) << ticket.status();
  absl::StatusOr<StoreReport> report = storer->Wait(*ticket);
  ASSERT_TRUE(report.ok()) << report.status();
  EXPECT_EQ(report->chunks, n);
  ExpectStoredAsCpuEncodes(n);

  // A block id outside the cache fails its chunk; the chunks before it are
  // stored, none after it.
  ASSERT_EQ(client_->Delete(prompt_->keys).status(), absl::OkStatus());
  const int32_t bad = num_blocks + 7;
  ASSERT_EQ(
      cudaMemcpy(device_table + 4 * per_chunk, &bad, 4, cudaMemcpyHostToDevice),
      cudaSuccess);
  ticket = storer->Store(Chunks(refs), nullptr);
  ASSERT_TRUE(ticket.ok()) << ticket.status();
  report = storer->Wait(*ticket);
  EXPECT_EQ(report.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(report.status().message().find("chunk 4 "), std::string::npos)
      << report.status();
  absl::StatusOr<LookupResult> lookup = client_->Lookup(prompt_->keys);
  ASSERT_TRUE(lookup.ok()) << lookup.status();
  // Batches of 3: chunk 3, ahead of chunk 4 in its batch, went too.
  EXPECT_EQ(lookup->prefix_chunks, 4u);
  ExpectStoredAsCpuEncodes(4);
  for (size_t i = 4; i < n; ++i) {
    EXPECT_EQ(client_->Get({prompt_->keys[i]}).status().code(),
              absl::StatusCode::kNotFound)
        << "chunk " << i;
  }
  cudaFree(device_table);
}

TEST_F(GpuStoreTest, StoreReturnsBeforeThePutsAndWaitWaitsForThem) {
  const size_t n = prompt_->keys.size();
  auto gated = std::make_shared<GatedStore>(client_);
  // One slot for several batches: each batch's copy down frees it, so Store
  // does not wait for the puts.
  GpuStorerOptions options;
  options.chunk_tokens = prompt_->shape.tokens;
  options.batch_chunks = 4;
  options.slots = 1;
  ASSERT_GT(n, 2 * options.batch_chunks);
  absl::StatusOr<std::unique_ptr<GpuStorer>> storer =
      GpuStorer::Create(gated, contiguous_, options);
  ASSERT_TRUE(storer.ok()) << storer.status();
  absl::StatusOr<GpuStorer::Ticket> ticket =
      (*storer)->Store(Chunks(UploadContiguous()), nullptr);
  ASSERT_TRUE(ticket.ok()) << ticket.status();
  // Store has returned, and no put is through.
  absl::StatusOr<LookupResult> lookup = client_->Lookup(prompt_->keys);
  ASSERT_TRUE(lookup.ok()) << lookup.status();
  EXPECT_EQ(lookup->prefix_chunks, 0u);
  gated->Open();
  absl::StatusOr<StoreReport> report = (*storer)->Wait(*ticket);
  ASSERT_TRUE(report.ok()) << report.status();
  EXPECT_EQ(report->chunks, n);
  EXPECT_TRUE(gated->put_started());
  ExpectStoredAsCpuEncodes(n);
}

TEST_F(GpuStoreTest, BadRequestsAndADeadNodeAreErrors) {
  std::unique_ptr<GpuStorer> storer = Storer(client_, contiguous_);
  std::vector<KvChunkRef> refs = UploadContiguous();
  // Longer than the storer's chunks.
  std::vector<ChunkFromDevice> chunks = Chunks(refs);
  chunks[1].source.tokens = prompt_->shape.tokens + 1;
  EXPECT_EQ(storer->Store(chunks, nullptr).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(storer->Wait(12345).status().code(),
            absl::StatusCode::kInvalidArgument);
  // The node is gone: the put's error comes back from Wait.
  daemon_->Signal(SIGKILL);
  (void)daemon_->WaitForExit(absl::Seconds(10));
  absl::StatusOr<GpuStorer::Ticket> ticket =
      storer->Store(Chunks(refs), nullptr);
  ASSERT_TRUE(ticket.ok()) << ticket.status();
  absl::StatusOr<StoreReport> report = storer->Wait(*ticket);
  EXPECT_EQ(report.status().code(), absl::StatusCode::kUnavailable)
      << report.status();
}

}  // namespace
}  // namespace kvcache
