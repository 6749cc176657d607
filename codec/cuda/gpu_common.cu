#include "codec/cuda/crc32c_math.h"
#include "codec/cuda/device_common.cuh"

namespace kvcache::codec::gpu {

const char* ChunkErrorName(int32_t code) {
  switch (code) {
    case kOk:
      return "ok";
    case kBadHeader:
      return "bad header";
    case kUnsupported:
      return "unsupported";
    case kShapeMismatch:
      return "shape mismatch";
    case kChecksum:
      return "checksum";
    case kBadTables:
      return "bad tables";
    case kBadBlock:
      return "bad block";
    case kBadDestination:
      return "bad destination";
    case kOutputTooSmall:
      return "output too small";
    case kNeedsProfile:
      return "needs another model profile";
  }
  return "unknown";
}

absl::StatusOr<std::unique_ptr<DeviceProfile>> DeviceProfile::Upload(
    const ModelProfile& profile) {
  // One allocation: angles (8-byte aligned first), means, bases.
  const size_t freq_bytes = 8 * profile.rope_inv_freq.size();
  const size_t mean_bytes = 4 * profile.mean.size();
  const size_t basis_bytes = 4 * profile.basis.size();
  std::unique_ptr<DeviceProfile> p(new DeviceProfile());
  if (absl::Status st = internal::CudaStatus(
          cudaMalloc(&p->memory_, freq_bytes + mean_bytes + basis_bytes + 8),
          "profile allocation");
      !st.ok()) {
    return st;
  }
  auto* bytes = static_cast<uint8_t*>(p->memory_);
  const std::pair<const void*, size_t> parts[] = {
      {profile.rope_inv_freq.data(), freq_bytes},
      {profile.mean.data(), mean_bytes},
      {profile.basis.data(), basis_bytes}};
  size_t at = 0;
  for (const auto& [src, size] : parts) {
    if (absl::Status st = internal::CudaStatus(
            cudaMemcpy(bytes + at, src, size, cudaMemcpyHostToDevice),
            "profile upload");
        !st.ok()) {
      return st;
    }
    at += size;
  }
  p->id_ = profile.id;
  View& v = p->view_;
  std::copy(profile.id.begin(), profile.id.end(), v.id);
  v.layers = profile.layers;
  v.kv_heads = profile.kv_heads;
  v.head_dim = profile.head_dim;
  v.rope = static_cast<uint32_t>(profile.rope);
  v.inv_freq = reinterpret_cast<const double*>(bytes);
  v.mean = reinterpret_cast<const float*>(bytes + freq_bytes);
  v.basis = reinterpret_cast<const float*>(bytes + freq_bytes + mean_bytes);
  return p;
}

DeviceProfile::~DeviceProfile() { cudaFree(memory_); }

KvLayout KvLayout::Contiguous(uint32_t layers, uint32_t kv_heads,
                              uint32_t head_dim, DType dtype) {
  KvLayout l;
  l.layers = layers;
  l.kv_heads = kv_heads;
  l.head_dim = head_dim;
  l.dtype = dtype;
  return l;
}

KvLayout KvLayout::PagedPerLayer(uint16_t* const* layer_bases,
                                 uint32_t num_blocks, uint32_t block_tokens,
                                 uint32_t layers, uint32_t kv_heads,
                                 uint32_t head_dim, DType dtype) {
  KvLayout l = Contiguous(layers, kv_heads, head_dim, dtype);
  l.kind = Kind::kPaged;
  l.layer_bases = layer_bases;
  l.num_blocks = num_blocks;
  l.block_tokens = block_tokens;
  l.token_stride = l.Channels();
  l.kv_stride = int64_t{block_tokens} * l.token_stride;
  l.block_stride = 2 * l.kv_stride;
  return l;
}

KvLayout KvLayout::PagedLayerMajor(uint16_t* base, uint32_t num_blocks,
                                   uint32_t block_tokens, uint32_t layers,
                                   uint32_t kv_heads, uint32_t head_dim,
                                   DType dtype) {
  KvLayout l = PagedPerLayer(nullptr, num_blocks, block_tokens, layers,
                             kv_heads, head_dim, dtype);
  l.base = base;
  l.layer_stride = int64_t{num_blocks} * l.block_stride;
  return l;
}

namespace internal {
namespace {

constexpr int kCrcThreads = 256;
__constant__ PowerTable kPowerTable = MakePowerTable();

// Raw CRC of [p, end) with slicing-by-8 tables in shared memory.
__device__ uint32_t RawCrc(const uint8_t* p, const uint8_t* end,
                           const uint32_t (*tab)[256]) {
  uint32_t c = 0;
  auto bytewise = [&](const uint8_t* stop) {
    for (; p < stop; ++p) c = tab[0][(c ^ *p) & 0xFF] ^ (c >> 8);
  };
  auto step8 = [&](uint32_t lo, uint32_t hi) {
    c ^= lo;
    c = tab[7][c & 0xFF] ^ tab[6][(c >> 8) & 0xFF] ^ tab[5][(c >> 16) & 0xFF] ^
        tab[4][c >> 24] ^ tab[3][hi & 0xFF] ^ tab[2][(hi >> 8) & 0xFF] ^
        tab[1][(hi >> 16) & 0xFF] ^ tab[0][hi >> 24];
  };
  const uint8_t* aligned = reinterpret_cast<const uint8_t*>(
      (reinterpret_cast<uintptr_t>(p) + 15) & ~uintptr_t{15});
  bytewise(aligned < end ? aligned : end);
  // Four 16-byte loads in flight before any is used.
  for (; end - p >= 64; p += 64) {
    uint4 v[4];
    for (int i = 0; i < 4; ++i) v[i] = reinterpret_cast<const uint4*>(p)[i];
    for (int i = 0; i < 4; ++i) {
      step8(v[i].x, v[i].y);
      step8(v[i].z, v[i].w);
    }
  }
  for (; end - p >= 16; p += 16) {
    const uint4 v = *reinterpret_cast<const uint4*>(p);
    step8(v.x, v.y);
    step8(v.z, v.w);
  }
  bytewise(end);
  return c;
}

// Thread s of job blockIdx.y takes bytes [A + s*S, A + (s+1)*S) of the
// message, A = its start rounded down to 16 bytes. Each raw CRC is shifted
// to the end of its warp's span with a table of x^(8*S*k), the warp's XOR to
// the message end, then XORed into the job's accumulator.
__global__ __launch_bounds__(kCrcThreads) void RawCrcKernel(
    const CrcJob* jobs) {
  __shared__ uint32_t tab[8][256];
  __shared__ uint32_t x2n[kPowers];
  __shared__ uint32_t seg_factor[kWarp];
  const CrcJob job = jobs[blockIdx.y];
  // Grids are sized for the longest job; CTAs past this one's end leave.
  if (uint64_t{blockIdx.x} * kCrcThreads * kCrcSegment >= job.len + 16) return;
  const uint32_t tid = threadIdx.x;
  tab[0][tid] = RawCrcByte(0, static_cast<uint8_t>(tid));
  if (tid < kPowers) x2n[tid] = kPowerTable.x2n[tid];
  __syncthreads();
  for (int k = 1; k < 8; ++k) {
    const uint32_t prev = tab[k - 1][tid];
    tab[k][tid] = (prev >> 8) ^ tab[0][prev & 0xFF];
    __syncthreads();
  }
  if (tid < kWarp) seg_factor[tid] = ZeroBytesFactor(x2n, tid * kCrcSegment);
  __syncthreads();

  const uintptr_t start = reinterpret_cast<uintptr_t>(job.data);
  const uintptr_t end = start + job.len;
  const uintptr_t a = start & ~uintptr_t{15};
  const uint64_t seg = uint64_t{blockIdx.x} * kCrcThreads + tid;
  const uintptr_t seg_lo = a + seg * kCrcSegment;
  const uintptr_t warp_lo = a + (seg & ~uint64_t{31}) * kCrcSegment;
  if (job.len == 0 || warp_lo >= end) return;  // Whole warp leaves.
  const uintptr_t lo = seg_lo > start ? seg_lo : start;
  const uintptr_t hi = seg_lo + kCrcSegment < end ? seg_lo + kCrcSegment : end;
  const uintptr_t warp_end =
      warp_lo + kWarp * kCrcSegment < end ? warp_lo + kWarp * kCrcSegment : end;
  uint32_t crc = 0;
  if (lo < hi) {
    crc = RawCrc(reinterpret_cast<const uint8_t*>(lo),
                 reinterpret_cast<const uint8_t*>(hi), tab);
    const uint64_t shift = warp_end - hi;
    crc = MulModP(seg_factor[shift / kCrcSegment], crc);
    if (shift % kCrcSegment) {
      crc = MulModP(ZeroBytesFactor(x2n, shift % kCrcSegment), crc);
    }
  }
  for (int o = 16; o > 0; o >>= 1) crc ^= __shfl_xor_sync(~0u, crc, o);
  if ((tid & 31) == 0 && crc != 0) {
    crc = MulModP(ZeroBytesFactor(x2n, end - warp_end), crc);
    atomicXor(job.raw, crc);
  }
}

}  // namespace

cudaError_t LaunchRawCrc(const CrcJob* jobs, uint32_t n, uint64_t max_len,
                         cudaStream_t s) {
  const uint64_t segs = (max_len + 15) / kCrcSegment + 1;
  const dim3 grid(static_cast<uint32_t>((segs + kCrcThreads - 1) / kCrcThreads),
                  n);
  RawCrcKernel<<<grid, kCrcThreads, 0, s>>>(jobs);
  return cudaGetLastError();
}

const uint32_t* DevicePowerTable() {
  void* p = nullptr;
  cudaGetSymbolAddress(&p, kPowerTable);
  return static_cast<const uint32_t*>(p);
}

absl::Status CheckLayout(const KvLayout& l) {
  if (l.layers == 0 || l.layers > kMaxLayers || l.kv_heads == 0 ||
      l.head_dim == 0 || uint64_t{l.kv_heads} * l.head_dim > kMaxChannels) {
    return absl::InvalidArgumentError("layout shape out of range");
  }
  if (l.dtype != DType::kFloat16 && l.dtype != DType::kBFloat16) {
    return absl::InvalidArgumentError("layout dtype unknown");
  }
  if (l.kind == KvLayout::Kind::kPaged &&
      (l.block_tokens == 0 || l.num_blocks == 0 ||
       (l.layer_bases == nullptr && l.base == nullptr))) {
    return absl::InvalidArgumentError(
        "paged layout needs block_tokens, num_blocks and a base");
  }
  return absl::OkStatus();
}

absl::Status CheckChunkRef(const KvLayout& l, const KvChunkRef& ref) {
  if (ref.tokens == 0 || ref.tokens > kMaxTokens ||
      ChunkValues(l, ref.tokens) > kMaxGpuChunkValues) {
    return absl::InvalidArgumentError(
        absl::StrCat("chunk of ", ref.tokens, " tokens is out of range"));
  }
  if (l.kind == KvLayout::Kind::kContiguous ? ref.values == nullptr
                                            : ref.block_ids == nullptr) {
    return absl::InvalidArgumentError("chunk has no place in the layout");
  }
  return absl::OkStatus();
}

int MultiprocessorCount() {
  int device = 0, sms = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) !=
          cudaSuccess) {
    return 1;
  }
  return sms;
}

}  // namespace internal
}  // namespace kvcache::codec::gpu
