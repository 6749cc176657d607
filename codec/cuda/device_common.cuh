// Internals shared by the CUDA decoder and encoder: layout addressing,
// job upload, checksum launch, workspace carving and error plumbing.
#ifndef KVCACHE_CODEC_CUDA_DEVICE_COMMON_CUH_
#define KVCACHE_CODEC_CUDA_DEVICE_COMMON_CUH_

#include <cuda_runtime.h>

#include <cstdint>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "codec/cuda/gpu_codec.h"

namespace kvcache::codec::gpu::internal {

inline constexpr int kWarp = 32;

// KvLayout as kernels take it, by value.
struct DeviceLayout {
  bool paged;
  uint32_t layers;
  uint32_t kv_heads;
  uint32_t head_dim;
  uint32_t channels;
  DType dtype;
  uint16_t* const* layer_bases;
  uint16_t* base;
  int64_t layer_stride;
  int64_t block_stride;
  int64_t kv_stride;
  int64_t token_stride;
  uint32_t block_tokens;
  uint32_t num_blocks;
};

inline DeviceLayout ToDevice(const KvLayout& l) {
  return {l.kind == KvLayout::Kind::kPaged,
          l.layers,
          l.kv_heads,
          l.head_dim,
          l.Channels(),
          l.dtype,
          l.layer_bases,
          l.base,
          l.layer_stride,
          l.block_stride,
          l.kv_stride,
          l.token_stride,
          l.block_tokens,
          l.num_blocks};
}

// Values per thread in the kernels that walk a chunk's elements: eight (one
// 16-byte access) when a token's channels come in whole eights, else one.
inline int VecFor(const KvLayout& layout) {
  return layout.Channels() % 8 == 0 ? 8 : 1;
}

// Where chunk element (plane p = 2 * layer + kv, token t, channel c) lives.
__device__ inline uint16_t* ElementPtr(const DeviceLayout& l, uint16_t* values,
                                       const int32_t* block_ids,
                                       uint32_t first_slot, uint32_t tokens,
                                       uint32_t p, uint32_t t, uint32_t c) {
  if (!l.paged) {
    return values + (static_cast<uint64_t>(p) * tokens + t) * l.channels + c;
  }
  const uint32_t layer = p >> 1, kv = p & 1;
  const uint64_t slot = uint64_t{first_slot} + t;
  const int64_t block = block_ids[slot / l.block_tokens];
  uint16_t* base = l.layer_bases != nullptr ? l.layer_bases[layer]
                                            : l.base + layer * l.layer_stride;
  return base + block * l.block_stride + kv * l.kv_stride +
         static_cast<int64_t>(slot % l.block_tokens) * l.token_stride + c;
}

// Whether every block id a chunk's tokens use is inside the cache; threads
// of one CTA share the work, the result is the same in all of them.
__device__ inline bool BlockIdsValid(const DeviceLayout& l,
                                     const int32_t* block_ids,
                                     uint32_t first_slot, uint32_t tokens) {
  if (!l.paged) return true;
  const uint64_t first = first_slot / l.block_tokens;
  const uint64_t last = (uint64_t{first_slot} + tokens - 1) / l.block_tokens;
  int bad = 0;
  for (uint64_t b = first + threadIdx.x; b <= last; b += blockDim.x) {
    const int32_t id = block_ids[b];
    bad |= id < 0 || static_cast<uint32_t>(id) >= l.num_blocks;
  }
  return __syncthreads_or(bad) == 0;
}

__device__ inline uint32_t LaneMaskLt() {
  return (1u << (threadIdx.x & 31)) - 1;
}

// Uploads host items to a device array through kernel parameters, so the
// copy is ordered on the stream without pinned staging or a host wait.
template <typename T, int kPerLaunch>
struct ItemSlice {
  T items[kPerLaunch];
  uint32_t first;
  uint32_t count;
};

template <typename T, int kPerLaunch>
__global__ void StoreItemsKernel(ItemSlice<T, kPerLaunch> slice, T* dst) {
  for (uint32_t i = threadIdx.x; i < slice.count; i += blockDim.x) {
    dst[slice.first + i] = slice.items[i];
  }
}

// Parameter space is 4 KB on every driver; slices stay under it.
template <typename T>
inline constexpr int kItemsPerLaunch = (4000 - 8) / sizeof(T);

template <typename T>
cudaError_t StoreItems(const T* host, uint32_t n, T* dst, cudaStream_t s) {
  constexpr int kPer = kItemsPerLaunch<T>;
  static_assert(kPer >= 1, "item too large for kernel parameters");
  for (uint32_t first = 0; first < n; first += kPer) {
    ItemSlice<T, kPer> slice;
    slice.first = first;
    slice.count = n - first < kPer ? n - first : kPer;
    for (uint32_t i = 0; i < slice.count; ++i) slice.items[i] = host[first + i];
    StoreItemsKernel<T, kPer><<<1, 128, 0, s>>>(slice, dst);
  }
  return cudaGetLastError();
}

// One message for the checksum kernel: its CRC32C without initial value or
// final xor is XORed into *raw (which must start at zero).
struct CrcJob {
  const uint8_t* data;
  uint64_t len;
  uint32_t* raw;
};

// Bytes one checksum thread covers.
inline constexpr uint32_t kCrcSegment = 1024;

// Enqueues the raw CRCs of jobs[0, n) (device array). max_len bounds every
// job's len and sizes the grid.
cudaError_t LaunchRawCrc(const CrcJob* jobs, uint32_t n, uint64_t max_len,
                         cudaStream_t s);

// The x^(2^k) table in device memory, for FinishCrc.
const uint32_t* DevicePowerTable();

// Carves aligned regions out of a workspace; with a null base it only sums
// sizes.
class Carver {
 public:
  explicit Carver(void* base) : base_(static_cast<uint8_t*>(base)) {}
  template <typename T>
  T* Take(uint64_t count) {
    used_ = (used_ + 255) & ~uint64_t{255};
    T* p = base_ ? reinterpret_cast<T*>(base_ + used_) : nullptr;
    used_ += count * sizeof(T);
    return p;
  }
  uint64_t used() const { return used_; }

 private:
  uint8_t* base_;
  uint64_t used_ = 0;
};

// Checks what both directions require of a layout and of one chunk's place.
absl::Status CheckLayout(const KvLayout& layout);
absl::Status CheckChunkRef(const KvLayout& layout, const KvChunkRef& ref);
// Values of a chunk of `tokens` tokens in `layout`.
inline uint64_t ChunkValues(const KvLayout& l, uint32_t tokens) {
  return uint64_t{l.layers} * 2 * tokens * l.Channels();
}

inline absl::Status CudaStatus(cudaError_t e, const char* what) {
  if (e == cudaSuccess) return absl::OkStatus();
  return absl::InternalError(absl::StrCat(what, ": ", cudaGetErrorString(e)));
}

// Multiprocessors of the current device, for persistent grids.
int MultiprocessorCount();

}  // namespace kvcache::codec::gpu::internal

#endif  // KVCACHE_CODEC_CUDA_DEVICE_COMMON_CUH_
