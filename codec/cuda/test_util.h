// Host helpers for the GPU codec's test and benchmark: device buffers,
// chunks made from the real dumps, and batch runners that stage streams
// and values on the device.
#ifndef KVCACHE_CODEC_CUDA_TEST_UTIL_H_
#define KVCACHE_CODEC_CUDA_TEST_UTIL_H_

#include <cuda_runtime.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <utility>
#include <vector>

#include "codec/codec.h"
#include "codec/cuda/gpu_codec.h"
#include "codec/kv_dump.h"
#include "codec/quant_math.h"

namespace kvcache::codec::gpu {

// Aborts with the CUDA error: tests and the benchmark cannot go on without
// the device.
#define KVCACHE_CUDA_OR_DIE(expr)                                        \
  do {                                                                   \
    const cudaError_t kvcache_err = (expr);                              \
    if (kvcache_err != cudaSuccess) {                                    \
      std::fprintf(stderr, "%s:%d: %s: %s\n", __FILE__, __LINE__, #expr, \
                   cudaGetErrorString(kvcache_err));                     \
      std::abort();                                                      \
    }                                                                    \
  } while (0)

class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  explicit DeviceBuffer(uint64_t bytes) : bytes_(bytes) {
    if (bytes) KVCACHE_CUDA_OR_DIE(cudaMalloc(&ptr_, bytes));
  }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  DeviceBuffer(DeviceBuffer&& o) noexcept : ptr_(o.ptr_), bytes_(o.bytes_) {
    o.ptr_ = nullptr;
    o.bytes_ = 0;
  }
  DeviceBuffer& operator=(DeviceBuffer&& o) noexcept {
    std::swap(ptr_, o.ptr_);
    std::swap(bytes_, o.bytes_);
    return *this;
  }
  ~DeviceBuffer() {
    if (ptr_) cudaFree(ptr_);
  }
  template <typename T = uint8_t>
  T* get() const {
    return static_cast<T*>(ptr_);
  }
  uint64_t bytes() const { return bytes_; }

 private:
  void* ptr_ = nullptr;
  uint64_t bytes_ = 0;
};

inline bool HaveGpu() {
  int n = 0;
  return cudaGetDeviceCount(&n) == cudaSuccess && n > 0;
}

// The same values in bf16 (fp16 -> float -> bf16, round to nearest-even).
inline std::vector<uint16_t> ToBFloat16(const std::vector<uint16_t>& fp16) {
  std::vector<uint16_t> out(fp16.size());
  for (size_t i = 0; i < fp16.size(); ++i) {
    out[i] = FloatToBFloat16(HalfToFloat(fp16[i]));
  }
  return out;
}

// One 256-token chunk of Llama-3-8B's KV: 32 layers, 8 KV heads, head dim
// 128, fp16 (32 MiB).
inline constexpr ChunkShape kLlama8B{32, 256, 8, 128, DType::kFloat16};

// A chunk of `shape` filled from a dump by tiling: layer l, token t,
// channel c read the dump's layer l % L, token (t0 + t) % T, channel c % C.
inline std::vector<uint16_t> TiledChunk(const KvDump& d, const ChunkShape& s,
                                        uint32_t t0) {
  const ChunkShape& ds = d.shape;
  const uint32_t row = s.kv_heads * s.head_dim;
  const uint32_t drow = ds.kv_heads * ds.head_dim;
  std::vector<uint16_t> out(s.NumValues());
  size_t i = 0;
  for (uint32_t l = 0; l < s.layers; ++l) {
    for (uint32_t kv = 0; kv < 2; ++kv) {
      for (uint32_t t = 0; t < s.tokens; ++t) {
        const uint16_t* src =
            d.kv.data() + ((size_t{l % ds.layers} * 2 + kv) * ds.tokens +
                           (t0 + t) % ds.tokens) *
                              drow;
        for (uint32_t c = 0; c < row; ++c) out[i++] = src[c % drow];
      }
    }
  }
  if (s.dtype == DType::kBFloat16) out = ToBFloat16(out);
  return out;
}

// Uploads streams back to back into one buffer, each `skew` bytes past the
// previous one's end (to exercise unaligned streams), and makes one job per
// stream; the caller fills in each job's destination.
struct StagedStreams {
  DeviceBuffer bytes;
  std::vector<DecodeJob> jobs;
};
inline StagedStreams StageStreams(const std::vector<std::string>& streams,
                                  uint64_t skew) {
  StagedStreams st;
  uint64_t total = 0;
  std::vector<uint64_t> at;
  for (const std::string& s : streams) {
    at.push_back(total);
    total += s.size() + skew;
  }
  st.bytes = DeviceBuffer(total + 1);
  for (size_t i = 0; i < streams.size(); ++i) {
    KVCACHE_CUDA_OR_DIE(cudaMemcpy(st.bytes.get() + at[i], streams[i].data(),
                                   streams[i].size(), cudaMemcpyHostToDevice));
    DecodeJob job;
    job.stream = st.bytes.get() + at[i];
    job.stream_bytes = streams[i].size();
    st.jobs.push_back(job);
  }
  return st;
}

// First element of (plane p = 2 * layer + kv, slot) in a layer-major paged
// cache [layers][blocks][K,V][block_tokens][channels] with block table
// `table`, computed apart from KvLayout's strides.
inline uint64_t PagedRow(const std::vector<int32_t>& table, uint32_t p,
                         uint32_t slot, uint32_t block_tokens,
                         uint32_t channels, uint64_t layer_elems) {
  const uint64_t block = static_cast<uint64_t>(table[slot / block_tokens]);
  return p / 2 * layer_elems +
         ((block * 2 + p % 2) * block_tokens + slot % block_tokens) * channels;
}

}  // namespace kvcache::codec::gpu

#endif  // KVCACHE_CODEC_CUDA_TEST_UTIL_H_
