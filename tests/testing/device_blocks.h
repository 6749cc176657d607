// A worker's GPU blocks for a prompt's first chunks, contiguous per chunk,
// for the GPU fetch tests: a GpuDecodeSink into them, and a check of what
// landed there against the CPU decoder. Allocated on the current device.
#ifndef KVCACHE_TESTS_TESTING_DEVICE_BLOCKS_H_
#define KVCACHE_TESTS_TESTING_DEVICE_BLOCKS_H_

#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "tests/testing/fetch_fixture.h"
#include "transfer/gpu_decode_sink.h"

namespace kvcache::testing {

class DeviceBlocks {
 public:
  DeviceBlocks(const Prompt& prompt, size_t n)
      : prompt_(prompt), values_per_chunk_(prompt.shape.NumValues()) {
    EXPECT_EQ(cudaMalloc(&values_, 2 * values_per_chunk_ * n), cudaSuccess);
    EXPECT_EQ(cudaMemset(values_, 0xFF, 2 * values_per_chunk_ * n),
              cudaSuccess);
    for (size_t i = 0; i < n; ++i) {
      codec::gpu::KvChunkRef ref;
      ref.tokens = prompt.shape.tokens;
      ref.values = values_ + i * values_per_chunk_;
      refs_.push_back(ref);
    }
  }
  ~DeviceBlocks() { cudaFree(values_); }

  std::unique_ptr<transfer::GpuDecodeSink> Sink(
      transfer::GpuDecodeSinkOptions options = {}) {
    const codec::ChunkShape& shape = prompt_.shape;
    absl::StatusOr<std::unique_ptr<transfer::GpuDecodeSink>> sink =
        transfer::GpuDecodeSink::Create(
            codec::gpu::KvLayout::Contiguous(shape.layers, shape.kv_heads,
                                             shape.head_dim, shape.dtype),
            refs_, nullptr, options);
    EXPECT_TRUE(sink.ok()) << sink.status();
    return sink.ok() ? std::move(*sink) : nullptr;
  }

  // Fetches the prompt's chunks into the blocks through `fetcher` and
  // checks every value; the fetch's report, or an empty one on failure.
  FetchReport FetchAndCheck(PrefixFetcher& fetcher) {
    std::unique_ptr<transfer::GpuDecodeSink> sink = Sink();
    absl::StatusOr<FetchReport> report = fetcher.Fetch(
        absl::MakeConstSpan(prompt_.keys).first(refs_.size()), *sink);
    EXPECT_TRUE(report.ok()) << report.status();
    ExpectDecoded();
    return report.ok() ? *report : FetchReport{};
  }

  // Copies layer `layer` of each chunk back and compares it with the CPU
  // decoder's.
  void ExpectLayerDecoded(uint32_t layer) const {
    const uint64_t per_layer = values_per_chunk_ / prompt_.shape.layers;
    ExpectValues(layer * per_layer, per_layer, absl::StrCat(" layer ", layer));
  }

  const std::vector<codec::gpu::KvChunkRef>& refs() const { return refs_; }

  // Copies the restored values back and compares them with the CPU
  // decoder's.
  void ExpectDecoded() const { ExpectValues(0, values_per_chunk_, ""); }

 private:
  // Compares values [first, first + count) of every chunk with the CPU
  // decoder's; `what` names the part in a failure.
  void ExpectValues(uint64_t first, uint64_t count,
                    const std::string& what) const {
    std::vector<uint16_t> host(count);
    for (size_t i = 0; i < refs_.size(); ++i) {
      ASSERT_EQ(cudaMemcpy(host.data(), refs_[i].values + first, 2 * count,
                           cudaMemcpyDeviceToHost),
                cudaSuccess);
      if (!std::equal(host.begin(), host.end(),
                      prompt_.decoded[i].begin() + first)) {
        ADD_FAILURE() << "chunk " << i << what
                      << " differs from the CPU decoder's";
        return;
      }
    }
  }

  const Prompt& prompt_;
  const uint64_t values_per_chunk_;
  uint16_t* values_ = nullptr;
  std::vector<codec::gpu::KvChunkRef> refs_;
};

// The kvcached flag for a GPU tier on `device` that holds `chunks` of the
// prompt's chunks.
inline std::string GpuTierFlag(const Prompt& prompt, size_t chunks,
                               int device = 0) {
  uint64_t largest = 0;
  for (const std::string& s : prompt.streams) {
    largest = std::max<uint64_t>(largest, s.size());
  }
  const uint64_t block = (largest + 4095) / 4096 * 4096;
  return absl::StrCat("--set=gpu_tier { capacity_bytes: ", chunks * block,
                      " max_admit_percent: 100 device: ", device, " }");
}

}  // namespace kvcache::testing

#endif  // KVCACHE_TESTS_TESTING_DEVICE_BLOCKS_H_
