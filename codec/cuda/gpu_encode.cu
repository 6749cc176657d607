// Batch encoder, bit-exact with codec::EncodeChunk. Stages, each one launch
// over the whole batch; every order-dependent sum runs in the order the CPU
// encoder uses (one thread per sum), everything else in parallel:
//   SetupKernel      plane table (sets, scale offsets), choice bits cleared
//   StatsKernel      one thread per quantization set: Stats in CPU order
//   PlaneStepKernel  per-channel planes: sum of variances, in set order
//   FitKernel        per set: step and levels; levels max per plane
//   PlaneBitsKernel  integer width per plane, scratch offsets
//   AffineKernel     per set: stored offset/step (the scales section)
//   QuantizeKernel   every value to its integer
//   UnitKernel       a CTA per (plane, channel group): histograms, raw/delta
//                    choice per token group, symbol streams, tables
//   LayoutKernel     per chunk: table and block offsets
//   RansEncodeKernel a warp per block, lanes = rANS lanes, words emitted in
//                    the CPU's order through ballots
//   DirectoryKernel  block offsets, header, plane descriptors, choice bits
//   CopyKernels      tables and blocks into the output stream
//   RawCrcKernel, FinishKernel: checksum, stream length.
#include <algorithm>
#include <cstring>
#include <cub/block/block_scan.cuh>
#include <vector>

#include "codec/byte_io.h"
#include "codec/cuda/crc32c_math.h"
#include "codec/cuda/device_common.cuh"
#include "codec/format.h"
#include "codec/group_layout.h"
#include "codec/levels.h"
#include "codec/quant_math.h"
#include "codec/rans_math.h"

namespace kvcache::codec::gpu {
namespace internal {
namespace {

using codec::internal::Alphabet;
using codec::internal::BytePlanes;
using codec::internal::Header;
using codec::internal::kChecksumBytes;
using codec::internal::kFixedHeaderBytes;
using codec::internal::PlaneByte;
using codec::internal::Quantizer;
using codec::internal::ScaleMode;
using codec::internal::Stats;
using codec::internal::ToFloat;
using codec::internal::ZigZag;

constexpr int kThreads = 256;
constexpr int kRansWarps = 4;
constexpr uint32_t kGroupTile = 256;  // Token groups UnitKernel holds at once.
// An explicit table: 3 bytes and at most 256 frequencies below 2^14.
constexpr uint32_t kTableStride = 3 + 256 * 2;
// The words count of a block whose symbols are stored as they are.
constexpr uint32_t kStoredBlock = 0xFFFFFFFF;

// Per plane, in the workspace.
struct PlaneEnc {
  uint32_t mode;  // ScaleMode.
  float relative_step;
  uint32_t sets;  // Affine maps (quantization sets).
  uint32_t first_set;
  uint32_t levels;  // Bits of the float max of the sets' levels.
  float plane_step;
  uint32_t bits;
  uint32_t first_symbol;
};

// Per (plane, channel group), in the workspace. Streams in stream order.
struct UnitEnc {
  uint32_t raw;    // Symbols per byte plane of the raw stream.
  uint32_t delta;  // ... and of the delta stream.
  uint32_t base;   // First scratch symbol.
  uint32_t streams;
  uint32_t table_bytes[4];
  uint32_t blocks[4];
  uint32_t table_off;    // In the tables section.
  uint32_t first_block;  // In the chunk.
  uint32_t stored;       // Bit s: stream s keeps its symbols as they are.
};

// One chunk as the kernels see it; the host fills it.
struct EncChunk {
  uint16_t* values;
  const int32_t* block_ids;
  uint32_t tokens;
  uint32_t first_slot;
  uint8_t* out;
  uint64_t capacity;
  int32_t initial_status;
  uint32_t channel_group;
  uint32_t channel_groups;
  uint32_t token_groups;
  uint32_t scales_off;  // Fixed section offsets in the stream.
  uint32_t choices_off;
  uint32_t tables_off;
  uint32_t block_cap;
  // Workspace.
  PlaneEnc* planes;
  Stats* stats;
  float* steps;
  Quantizer* quant;
  uint16_t* q;  // Integers, [plane][token][channel].
  uint32_t* choice_words;
  UnitEnc* units;
  uint32_t* freqs;  // Per stream: freq << 16 | start of 256 symbols.
  uint8_t* tables;  // Per stream: its table, kTableStride apart.
  uint8_t* symbols;
  uint4* blocks;  // Per block: first symbol, symbols, words (or
                  // kStoredBlock), bytes.
  uint32_t* block_starts;
  uint8_t* staging;  // Block b at 2 * first symbol + 128 * b.
};

// What the kernels learn of a chunk.
struct EncState {
  uint32_t tables_bytes;
  uint32_t num_blocks;
  uint32_t payload_bytes;
  uint64_t total_bytes;
};

// Batch-wide parameters.
struct EncParams {
  DeviceLayout layout;
  const uint2* policies;  // Per plane: mode, relative step bits.
  uint32_t token_group;
  uint32_t block_symbols;
  uint8_t level;
};

__device__ inline const uint16_t* Row(const EncParams& prm, const EncChunk& c,
                                      uint32_t p, uint32_t t) {
  return ElementPtr(prm.layout, c.values, c.block_ids, c.first_slot, c.tokens,
                    p, t, 0);
}

__device__ inline Header MakeHeader(const EncParams& prm, const EncChunk& c) {
  Header h;
  h.shape.layers = prm.layout.layers;
  h.shape.tokens = c.tokens;
  h.shape.kv_heads = prm.layout.kv_heads;
  h.shape.head_dim = prm.layout.head_dim;
  h.shape.dtype = prm.layout.dtype;
  h.level = prm.level;
  h.token_group = prm.token_group;
  h.channel_group = c.channel_group;
  h.block_symbols = prm.block_symbols;
  return h;
}

__global__ __launch_bounds__(kThreads) void SetupKernel(const EncChunk* chunks,
                                                        EncParams prm,
                                                        int32_t* status) {
  using Scan = cub::BlockScan<uint32_t, kThreads>;
  __shared__ typename Scan::TempStorage scan_tmp;
  const EncChunk c = chunks[blockIdx.x];
  const uint32_t planes = 2 * prm.layout.layers;
  uint32_t first_set = 0;
  for (uint32_t first = 0; first < planes; first += kThreads) {
    const uint32_t p = first + threadIdx.x;
    uint32_t mode = 0, sets = 0;
    if (p < planes) {
      mode = prm.policies[p].x;
      sets = mode == static_cast<uint32_t>(ScaleMode::kPerChannel)
                 ? prm.layout.channels
             : mode == static_cast<uint32_t>(ScaleMode::kPerGroup)
                 ? c.token_groups * c.channel_groups
                 : 0;
    }
    uint32_t off, sum;
    Scan(scan_tmp).ExclusiveSum(sets, off, sum);
    __syncthreads();
    if (p < planes) {
      c.planes[p] = PlaneEnc{mode,
                             __uint_as_float(prm.policies[p].y),
                             sets,
                             first_set + off,
                             __float_as_uint(1.0f),
                             0.0f,
                             16,
                             0};
    }
    first_set += sum;
  }
  const uint64_t words =
      (uint64_t{planes} * c.channel_groups * c.token_groups + 31) / 32;
  for (uint64_t w = threadIdx.x; w < words; w += kThreads) {
    c.choice_words[w] = 0;
  }
  const bool ids_ok =
      BlockIdsValid(prm.layout, c.block_ids, c.first_slot, c.tokens);
  if (threadIdx.x == 0) {
    status[blockIdx.x] = ids_ok ? c.initial_status : kBadDestination;
  }
}

// Threads of grid (sets / kThreads, planes, chunks): set s of plane p.
struct SetThread {
  uint32_t i, p, s;
  __device__ SetThread()
      : i(blockIdx.z), p(blockIdx.y), s(blockIdx.x * kThreads + threadIdx.x) {}
};

__global__ __launch_bounds__(kThreads) void StatsKernel(const EncChunk* chunks,
                                                        EncParams prm,
                                                        const int32_t* status) {
  const SetThread th;
  if (status[th.i] != kOk) return;
  const EncChunk& c = chunks[th.i];
  const PlaneEnc pl = c.planes[th.p];
  if (th.s >= pl.sets) return;
  const DType dtype = prm.layout.dtype;
  Stats st;
  if (pl.mode == static_cast<uint32_t>(ScaleMode::kPerChannel)) {
    for (uint32_t t = 0; t < c.tokens; ++t) {
      st.Add(ToFloat(Row(prm, c, th.p, t)[th.s], dtype));
    }
  } else {
    // Tokens of the group in order, channels of the group in order.
    const uint32_t g = th.s / c.channel_groups;
    const uint32_t c0 = (th.s - g * c.channel_groups) * c.channel_group;
    const uint32_t t1 = min(c.tokens, (g + 1) * prm.token_group);
    for (uint32_t t = g * prm.token_group; t < t1; ++t) {
      const uint16_t* row = Row(prm, c, th.p, t) + c0;
      for (uint32_t x = 0; x < c.channel_group; ++x) {
        st.Add(ToFloat(row[x], dtype));
      }
    }
  }
  c.stats[pl.first_set + th.s] = st;
}

__global__ void PlaneStepKernel(const EncChunk* chunks, const int32_t* status,
                                uint32_t planes) {
  const uint32_t i = blockIdx.y, p = blockIdx.x * blockDim.x + threadIdx.x;
  if (status[i] != kOk || p >= planes) return;
  PlaneEnc& pl = chunks[i].planes[p];
  if (pl.mode != static_cast<uint32_t>(ScaleMode::kPerChannel)) return;
  const Stats* stats = chunks[i].stats + pl.first_set;
  double var = 0;
  for (uint32_t s = 0; s < pl.sets; ++s) {
    var = codec::internal::AddRn(var, stats[s].Variance());
  }
  pl.plane_step = codec::internal::SpreadStep(pl.relative_step, var / pl.sets);
}

__global__ __launch_bounds__(kThreads) void FitKernel(const EncChunk* chunks,
                                                      EncParams prm,
                                                      const int32_t* status) {
  const SetThread th;
  if (status[th.i] != kOk) return;
  const EncChunk& c = chunks[th.i];
  PlaneEnc& pl = c.planes[th.p];
  if (th.s >= pl.sets) return;
  const Stats& st = c.stats[pl.first_set + th.s];
  const float step =
      pl.mode == static_cast<uint32_t>(ScaleMode::kPerChannel)
          ? pl.plane_step
          : codec::internal::SpreadStep(pl.relative_step, st.Variance());
  const codec::internal::SetFit fit =
      codec::internal::FitSet(st, step, prm.layout.dtype);
  c.steps[pl.first_set + th.s] = fit.step;
  // The CPU's running max skips NaN and never goes below 1, so only larger
  // values matter; positive floats order like their bit patterns.
  if (fit.levels > 1.0f) atomicMax(&pl.levels, __float_as_uint(fit.levels));
}

__global__ __launch_bounds__(kThreads) void PlaneBitsKernel(
    const EncChunk* chunks, EncParams prm, const int32_t* status) {
  using Scan = cub::BlockScan<uint32_t, kThreads>;
  __shared__ typename Scan::TempStorage scan_tmp;
  if (status[blockIdx.x] != kOk) return;
  const EncChunk& c = chunks[blockIdx.x];
  const uint32_t planes = 2 * prm.layout.layers;
  const uint32_t plane_values = c.tokens * prm.layout.channels;
  uint32_t first_symbol = 0;
  for (uint32_t first = 0; first < planes; first += kThreads) {
    const uint32_t p = first + threadIdx.x;
    uint32_t bits = 16;
    if (p < planes && c.planes[p].mode != 0) {
      bits = codec::internal::BitsFor(__uint_as_float(c.planes[p].levels));
    }
    uint32_t off, sum;
    Scan(scan_tmp).ExclusiveSum(
        p < planes ? plane_values * BytePlanes(bits) : 0, off, sum);
    __syncthreads();
    if (p < planes) {
      c.planes[p].bits = bits;
      c.planes[p].first_symbol = first_symbol + off;
    }
    first_symbol += sum;
  }
}

__global__ __launch_bounds__(kThreads) void AffineKernel(
    const EncChunk* chunks, EncParams prm, const int32_t* status) {
  const SetThread th;
  if (status[th.i] != kOk) return;
  const EncChunk& c = chunks[th.i];
  const PlaneEnc pl = c.planes[th.p];
  if (th.s >= pl.sets) return;
  const uint32_t set = pl.first_set + th.s;
  const codec::internal::StoredAffine a = codec::internal::FitAffine(
      c.stats[set].Mean(), c.steps[set], pl.bits, prm.layout.dtype);
  uint8_t* out = c.out + c.scales_off + 4 * uint64_t{set};
  out[0] = static_cast<uint8_t>(a.offset_bits);
  out[1] = static_cast<uint8_t>(a.offset_bits >> 8);
  out[2] = static_cast<uint8_t>(a.step_bits);
  out[3] = static_cast<uint8_t>(a.step_bits >> 8);
  c.quant[set] = Quantizer(a.map, pl.bits);
}

// kVec channels of one token of plane blockIdx.y of chunk blockIdx.z.
template <int kVec>
__global__ __launch_bounds__(kThreads) void QuantizeKernel(
    const EncChunk* chunks, EncParams prm, const int32_t* status) {
  const uint32_t i = blockIdx.z, p = blockIdx.y;
  if (status[i] != kOk) return;
  const EncChunk& c = chunks[i];
  const uint32_t channels = prm.layout.channels;
  const uint32_t vecs = channels / kVec;
  const uint32_t w = blockIdx.x * kThreads + threadIdx.x;
  if (w >= c.tokens * vecs) return;
  const uint32_t t = w / vecs;
  const uint32_t c0 = (w - t * vecs) * kVec;
  const PlaneEnc pl = c.planes[p];
  const uint16_t* src = Row(prm, c, p, t) + c0;
  uint16_t v[kVec];
  if (kVec == 8 && (reinterpret_cast<uintptr_t>(src) & 15) == 0) {
    const uint4 x = *reinterpret_cast<const uint4*>(src);
    const uint32_t words[4] = {x.x, x.y, x.z, x.w};
    for (int e = 0; e < kVec; ++e) {
      v[e] = static_cast<uint16_t>(words[e / 2] >> (16 * (e % 2)));
    }
  } else {
    for (int e = 0; e < kVec; ++e) v[e] = src[e];
  }
  if (pl.mode != static_cast<uint32_t>(ScaleMode::kIdentity)) {
    const bool per_channel =
        pl.mode == static_cast<uint32_t>(ScaleMode::kPerChannel);
    const uint32_t group_set = t / prm.token_group * c.channel_groups;
    for (int e = 0; e < kVec; ++e) {
      const uint32_t ch = c0 + e;
      const uint32_t set = per_channel ? ch : group_set + ch / c.channel_group;
      v[e] = c.quant[pl.first_set + set](ToFloat(v[e], prm.layout.dtype));
    }
  }
  uint16_t* dst = c.q + (uint64_t{p} * c.tokens + t) * channels + c0;
  if (kVec == 8) {
    uint32_t words[4];
    for (int e = 0; e < 4; ++e) {
      words[e] = uint32_t{v[2 * e]} | uint32_t{v[2 * e + 1]} << 16;
    }
    *reinterpret_cast<uint4*>(dst) =
        make_uint4(words[0], words[1], words[2], words[3]);
  } else {
    for (int e = 0; e < kVec; ++e) dst[e] = v[e];
  }
}

// Adds `cost` to sums[slot] through a per-thread running sum, flushed when
// the slot changes: elements of one group come to a thread in runs.
struct RunningSum {
  uint32_t slot = ~0u;
  uint64_t sum = 0;
  __device__ void Add(unsigned long long* sums, uint32_t s, uint64_t v) {
    if (s != slot) Flush(sums);
    slot = s;
    sum += v;
  }
  __device__ void Flush(unsigned long long* sums) {
    if (slot != ~0u && sum != 0) atomicAdd(&sums[slot], sum);
    slot = ~0u;
    sum = 0;
  }
};

// rans::Normalize and rans::ChooseTable, with the same results, computed by
// a whole CTA: thread s owns symbol s. One thread running them alone over
// 256 symbols (64-bit divisions, fixed-point logs, local arrays) would hold
// its CTA for most of its time.
class BlockTables {
 public:
  static_assert(kThreads == 256, "one thread per symbol");

  // Sets freqs[0, 256) (shared) as rans::Normalize does; returns the total.
  __device__ uint64_t Normalize(const uint32_t* counts, uint16_t* freqs) {
    const uint32_t s = threadIdx.x, count = counts[s];
    const uint64_t total = Sum(count);
    uint32_t f = 0;
    if (count != 0) {
      const uint64_t scaled = uint64_t{count} * rans::kProbScale / total;
      f = scaled > 1 ? static_cast<uint32_t>(scaled) : 1;
    }
    freqs[s] = static_cast<uint16_t>(f);
    if (total == 0) return 0;
    const uint64_t sum = Sum(f);
    // The most frequent symbol, the first of equals: largest count, then
    // smallest symbol.
    const uint64_t most_key = Max(count ? uint64_t{count} << 8 | (255 - s) : 0);
    const uint32_t most = 255 - static_cast<uint32_t>(most_key & 255);
    if (sum <= rans::kProbScale) {
      if (s == most) freqs[s] += static_cast<uint16_t>(rans::kProbScale - sum);
    } else {
      // Overshoot: rare, and order-dependent, so one thread gives back the
      // units as the CPU does.
      __syncthreads();
      if (s == 0) rans::GiveBackOvershoot(static_cast<uint32_t>(sum), freqs);
    }
    __syncthreads();
    return total;
  }

  // Sets freqs[0, 256) (shared) as rans::ChooseTable does; returns its choice.
  __device__ rans::TableChoice Choose(const uint32_t* counts, uint32_t alphabet,
                                      uint16_t* freqs) {
    const uint64_t total = Normalize(counts, freqs);
    const uint32_t s = threadIdx.x, count = counts[s], f = freqs[s];
    rans::TableChoice t;
    if (total == 0) return t;
    const uint32_t first = 255 - static_cast<uint32_t>(Max(f ? 255 - s : 0));
    const uint32_t last = static_cast<uint32_t>(Max(f ? s : 0));
    t.first = static_cast<uint8_t>(first);
    t.last = static_cast<uint8_t>(last);
    if (first == last) {
      t.kind = rans::TableKind::kSingle;
      t.bytes = 2;
      return t;
    }
    const bool in_range = s >= first && s <= last;
    const uint32_t explicit_bytes =
        3 + static_cast<uint32_t>(Sum(in_range ? rans::VarintSize(f) : 0));
    const uint32_t uniform = rans::kProbScale / alphabet;
    const uint64_t explicit_cost =
        Sum(count ? uint64_t{count} * rans::SymbolCost(f) : 0) +
        (uint64_t{explicit_bytes} << 11);
    const uint64_t uniform_cost = total * rans::SymbolCost(uniform) + (1 << 11);
    if (uniform_cost < explicit_cost) {
      freqs[s] = static_cast<uint16_t>(s < alphabet ? uniform : 0);
      __syncthreads();
      t.kind = rans::UniformKind(alphabet);
      t.bytes = 1;
      return t;
    }
    t.kind = rans::TableKind::kExplicit;
    t.bytes = explicit_bytes;
    return t;
  }

 private:
  __device__ uint64_t Sum(uint64_t v) {
    return Reduce(v, [](uint64_t a, uint64_t b) { return a + b; });
  }
  __device__ uint64_t Max(uint64_t v) {
    return Reduce(v, [](uint64_t a, uint64_t b) { return a > b ? a : b; });
  }
  // Every thread gets op over all threads' v.
  template <typename Op>
  __device__ uint64_t Reduce(uint64_t v, Op op) {
    for (int o = 16; o > 0; o >>= 1) v = op(v, __shfl_xor_sync(~0u, v, o));
    __syncthreads();  // The previous reduction's reads of partial_ are done.
    if (threadIdx.x % 32 == 0) partial_[threadIdx.x / 32] = v;
    __syncthreads();
    uint64_t r = partial_[0];
    for (int w = 1; w < kThreads / 32; ++w) r = op(r, partial_[w]);
    return r;
  }
  uint64_t partial_[kThreads / 32];
};

// One CTA per (plane, channel group) unit: GroupEncoder::Encode.
__global__ __launch_bounds__(kThreads) void UnitKernel(const EncChunk* chunks,
                                                       EncParams prm,
                                                       const int32_t* status) {
  using Scan = cub::BlockScan<uint32_t, kThreads>;
  __shared__ typename Scan::TempStorage scan_tmp;
  __shared__ uint32_t hist[4][256];  // [mode * 2 + byte plane]
  __shared__ uint32_t cost[4][256];
  __shared__ uint32_t counts[4][256];  // Of the streams.
  __shared__ unsigned long long group_cost[2][kGroupTile];
  __shared__ uint32_t tile_delta[kGroupTile];
  __shared__ uint32_t tile_before[kGroupTile];
  __shared__ uint32_t s_delta_before_last, s_last_delta;
  __shared__ BlockTables tables;
  __shared__ uint16_t freqs[256];
  const uint32_t i = blockIdx.y, u = blockIdx.x, tid = threadIdx.x;
  if (status[i] != kOk) return;
  const EncChunk& c = chunks[i];
  const uint32_t units = 2 * prm.layout.layers * c.channel_groups;
  if (u >= units) return;
  const uint32_t p = u / c.channel_groups, cg = u - p * c.channel_groups;
  const PlaneEnc pl = c.planes[p];
  const uint32_t bits = pl.bits;
  const int bp = BytePlanes(bits);
  const uint32_t width = c.channel_group, tokens = c.tokens;
  const uint32_t channels = prm.layout.channels;
  const uint32_t tg = prm.token_group, groups = c.token_groups;
  const uint16_t* q =
      c.q + uint64_t{p} * tokens * channels + uint64_t{cg} * width;
  const uint64_t first_bit = uint64_t{u} * groups;
  for (uint32_t x = tid; x < 4 * 256; x += kThreads) {
    (&hist[0][0])[x] = 0;
    (&counts[0][0])[x] = 0;
  }
  __syncthreads();

  // Pass 1: histograms of both codings over every non-anchor integer.
  const uint32_t elems = tokens * width;
  for (uint32_t e = tid; e < elems; e += kThreads) {
    const uint32_t t = e / width, x = e - t * width;
    const uint32_t t0 = t / tg * tg;
    if (t == t0) continue;
    const uint32_t v = q[uint64_t{t} * channels + x];
    const uint32_t d = ZigZag(v - q[uint64_t{t0} * channels + x], bits);
    for (int k = 0; k < bp; ++k) {
      atomicAdd(&hist[k][PlaneByte(v, bp, k)], 1);
      atomicAdd(&hist[2 + k][PlaneByte(d, bp, k)], 1);
    }
  }
  __syncthreads();
  for (int h = 0; h < 4; ++h) {
    if ((h & 1) >= bp) continue;
    tables.Normalize(hist[h], freqs);
    cost[h][tid] = freqs[tid] ? rans::SymbolCost(freqs[tid]) : 0;
    __syncthreads();  // Before the next stream overwrites freqs.
  }

  // Pass 2: per token group, delta if its estimated cost is lower.
  for (uint32_t g0 = 0; g0 < groups; g0 += kGroupTile) {
    const uint32_t gn = min(kGroupTile, groups - g0);
    for (uint32_t j = tid; j < gn; j += kThreads) {
      group_cost[0][j] = group_cost[1][j] = 0;
    }
    __syncthreads();
    const uint32_t row0 = g0 * tg;
    const uint32_t rows = min(tokens, (g0 + gn) * tg) - row0;
    RunningSum raw_sum, delta_sum;
    for (uint32_t e = tid; e < rows * width; e += kThreads) {
      const uint32_t t = row0 + e / width, x = e % width;
      const uint32_t t0 = t / tg * tg;
      if (t == t0) continue;
      const uint32_t v = q[uint64_t{t} * channels + x];
      const uint32_t d = ZigZag(v - q[uint64_t{t0} * channels + x], bits);
      uint64_t rc = 0, dc = 0;
      for (int k = 0; k < bp; ++k) {
        rc += cost[k][PlaneByte(v, bp, k)];
        dc += cost[2 + k][PlaneByte(d, bp, k)];
      }
      raw_sum.Add(group_cost[0], t / tg - g0, rc);
      delta_sum.Add(group_cost[1], t / tg - g0, dc);
    }
    raw_sum.Flush(group_cost[0]);
    delta_sum.Flush(group_cost[1]);
    __syncthreads();
    for (uint32_t j = tid; j < gn; j += kThreads) {
      if (group_cost[1][j] < group_cost[0][j]) {
        const uint64_t bit = first_bit + g0 + j;
        atomicOr(&c.choice_words[bit >> 5], 1u << (bit & 31));
      }
    }
    __syncthreads();
  }

  // Stream sizes from this unit's choice bits (read past L1: other CTAs
  // set bits in the same words).
  auto choice = [&](uint32_t g) {
    const uint64_t bit = first_bit + g;
    return __ldcg(&c.choice_words[bit >> 5]) >> (bit & 31) & 1;
  };
  uint32_t before_last = 0;
  for (uint32_t g = tid; g + 1 < groups; g += kThreads)
    before_last += choice(g);
  uint32_t unused, delta_before_last;
  Scan(scan_tmp).ExclusiveSum(before_last, unused, delta_before_last);
  if (tid == 0) {
    s_delta_before_last = delta_before_last;
    s_last_delta = choice(groups - 1);
  }
  __syncthreads();
  const codec::internal::StreamRows all = codec::internal::RowsOfAll(
      tokens, tg, groups, s_delta_before_last, s_last_delta);
  const uint32_t raw_n = all.raw * width, delta_n = all.delta * width;
  const uint32_t base = pl.first_symbol + cg * width * tokens * bp;

  // Pass 3: every integer to its stream position (the decoder's layout).
  uint32_t delta_groups = 0;
  for (uint32_t g0 = 0; g0 < groups; g0 += kGroupTile) {
    const uint32_t gn = min(kGroupTile, groups - g0);
    const uint32_t flag = tid < gn ? choice(g0 + tid) : 0;
    uint32_t before, sum;
    Scan(scan_tmp).ExclusiveSum(flag, before, sum);
    if (tid < gn) {
      tile_delta[tid] = flag;
      tile_before[tid] = delta_groups + before;
    }
    __syncthreads();
    const uint32_t row0 = g0 * tg;
    const uint32_t rows = min(tokens, (g0 + gn) * tg) - row0;
    for (uint32_t e = tid; e < rows * width; e += kThreads) {
      const uint32_t t = row0 + e / width, x = e % width;
      const uint32_t g = t / tg, in_group = t - g * tg;
      const bool delta = tile_delta[g - g0];
      const codec::internal::StreamRows before_g =
          codec::internal::RowsBefore(g, tile_before[g - g0], tg);
      uint32_t v = q[uint64_t{t} * channels + x];
      uint32_t at, plane_n, h;
      if (delta && in_group != 0) {
        v = ZigZag(v - q[uint64_t{g * tg} * channels + x], bits);
        at = base + bp * raw_n + (before_g.delta + in_group - 1) * width + x;
        plane_n = delta_n;
        h = 2;
      } else {
        at = base + (before_g.raw + (delta ? 0 : in_group)) * width + x;
        plane_n = raw_n;
        h = 0;
      }
      for (int k = 0; k < bp; ++k) {
        const uint8_t b = PlaneByte(v, bp, k);
        c.symbols[at + k * plane_n] = b;
        atomicAdd(&counts[h + k][b], 1);
      }
    }
    delta_groups += sum;
    __syncthreads();
  }

  // Tables, one thread per stream, in stream order.
  UnitEnc& unit = c.units[u];
  uint32_t stored = 0;
  for (int h = 0; h < 4; ++h) {
    if ((h & 1) >= bp) continue;
    const uint32_t stream = (h >> 1) * bp + (h & 1);
    const uint32_t n = h >> 1 ? delta_n : raw_n;
    const rans::TableChoice t =
        tables.Choose(counts[h], Alphabet(bits, h & 1), freqs);
    const uint32_t slot = u * 4 + stream;
    uint32_t start;
    Scan(scan_tmp).ExclusiveSum(uint32_t{freqs[tid]}, start);
    c.freqs[uint64_t{slot} * 256 + tid] = uint32_t{freqs[tid]} << 16 | start;
    if (tid == 0) {
      rans::WriteTableBytes(t, freqs, c.tables + uint64_t{slot} * kTableStride);
      unit.table_bytes[stream] = t.bytes;
      unit.blocks[stream] = (n + prm.block_symbols - 1) / prm.block_symbols;
    }
    stored |= uint32_t{t.kind == rans::TableKind::kStored} << stream;
    __syncthreads();  // Before the next stream overwrites freqs.
  }
  if (tid == 0) {
    unit.raw = raw_n;
    unit.delta = delta_n;
    unit.base = base;
    unit.streams = 2 * bp;
    unit.stored = stored;
  }
}

__global__ __launch_bounds__(kThreads) void LayoutKernel(const EncChunk* chunks,
                                                         EncParams prm,
                                                         EncState* states,
                                                         int32_t* status) {
  using Scan = cub::BlockScan<uint32_t, kThreads>;
  __shared__ typename Scan::TempStorage scan_tmp;
  if (status[blockIdx.x] != kOk) return;
  const EncChunk& c = chunks[blockIdx.x];
  const uint32_t units = 2 * prm.layout.layers * c.channel_groups;
  uint32_t table_total = 0, block_total = 0;
  for (uint32_t first = 0; first < units; first += kThreads) {
    const uint32_t u = first + threadIdx.x;
    uint32_t tb = 0, nb = 0;
    if (u < units) {
      const UnitEnc& unit = c.units[u];
      for (uint32_t s = 0; s < unit.streams; ++s) {
        tb += unit.table_bytes[s];
        nb += unit.blocks[s];
      }
    }
    uint32_t tb_off, tb_sum, nb_off, nb_sum;
    Scan(scan_tmp).ExclusiveSum(tb, tb_off, tb_sum);
    __syncthreads();
    Scan(scan_tmp).ExclusiveSum(nb, nb_off, nb_sum);
    __syncthreads();
    if (u < units) {
      c.units[u].table_off = table_total + tb_off;
      c.units[u].first_block = block_total + nb_off;
    }
    table_total += tb_sum;
    block_total += nb_sum;
  }
  if (threadIdx.x == 0) {
    states[blockIdx.x].tables_bytes = table_total;
    states[blockIdx.x].num_blocks = block_total;
  }
}

// Prefix sum of the chunks' block counts (failed chunks count none).
__global__ void BlockPrefixKernel(const EncState* states, const int32_t* status,
                                  uint32_t n, uint32_t* block_prefix) {
  using Scan = cub::BlockScan<uint32_t, kThreads>;
  __shared__ typename Scan::TempStorage scan_tmp;
  uint32_t total = 0;
  for (uint32_t first = 0; first < n; first += kThreads) {
    const uint32_t i = first + threadIdx.x;
    const uint32_t blocks =
        i < n && status[i] == kOk ? states[i].num_blocks : 0;
    uint32_t off, sum;
    Scan(scan_tmp).ExclusiveSum(blocks, off, sum);
    __syncthreads();
    if (i < n) block_prefix[i] = total + off;
    total += sum;
  }
  if (threadIdx.x == 0) block_prefix[n] = total;
}

// Chunk of global block g: block_prefix[i] <= g < block_prefix[i + 1].
__device__ inline uint32_t ChunkOfBlock(const uint32_t* block_prefix,
                                        uint32_t n, uint32_t g) {
  uint32_t lo = 0, hi = n;
  while (hi - lo > 1) {
    const uint32_t mid = (lo + hi) / 2;
    if (block_prefix[mid] <= g) {
      lo = mid;
    } else {
      hi = mid;
    }
  }
  return lo;
}

// Encodes block b of chunk c (rans::Encoder::EncodeBlock): states start at
// 2^16, symbols are taken last to first; each step's emitting lanes write
// their words, in the CPU's push order, backwards from the end of the
// block's word area. Whole warp.
__device__ void EncodeBlock(const EncChunk& c, const EncParams& prm, uint32_t b,
                            uint32_t units, uint32_t* fs) {
  const uint32_t lane = threadIdx.x & 31;
  uint32_t lo = 0, hi = units;  // Unit: first_block <= b.
  while (hi - lo > 1) {
    const uint32_t mid = (lo + hi) / 2;
    if (c.units[mid].first_block <= b) {
      lo = mid;
    } else {
      hi = mid;
    }
  }
  const UnitEnc& unit = c.units[lo];
  uint32_t j = b - unit.first_block, stream = 0;
  while (j >= unit.blocks[stream]) j -= unit.blocks[stream++];
  const int bp = unit.streams / 2;
  const bool delta = stream >= static_cast<uint32_t>(bp);
  const uint32_t k = stream - (delta ? bp : 0);
  const uint32_t n = delta ? unit.delta : unit.raw;
  const uint32_t sym0 =
      unit.base + (delta ? bp * unit.raw + k * unit.delta : k * unit.raw) +
      j * prm.block_symbols;
  const uint32_t m = min(prm.block_symbols, n - j * prm.block_symbols);
  if (unit.stored >> stream & 1) {
    if (lane == 0) c.blocks[b] = make_uint4(sym0, m, kStoredBlock, m);
    return;
  }
  const uint32_t* freqs = c.freqs + (uint64_t{lo} * 4 + stream) * 256;
  __syncwarp();
  for (uint32_t s = lane; s < 256; s += kWarp) fs[s] = freqs[s];
  __syncwarp();
  const uint32_t lanes = rans::LanesFor(m);
  const uint8_t* syms = c.symbols + sym0;
  uint8_t* staging = c.staging + 2 * uint64_t{sym0} + 128 * uint64_t{b};
  uint16_t* words = reinterpret_cast<uint16_t*>(staging + 128);
  const uint32_t above = ~((2u << lane) - 1);  // Lanes after this one.
  uint32_t x = rans::kStateLow, pushed = 0;
  for (uint32_t step = (m + lanes - 1) / lanes; step-- > 0;) {
    const uint32_t at = step * lanes + lane;
    const bool active = lane < lanes && at < m;
    uint32_t info = 0;
    if (active) info = fs[syms[at]];
    const uint32_t freq = info >> 16;
    const bool emit = active && rans::EncodeEmits(x, freq);
    const uint32_t mask = __ballot_sync(~0u, emit);
    if (emit) {
      words[m - 1 - (pushed + __popc(mask & above))] = static_cast<uint16_t>(x);
      x >>= 16;
    }
    if (active) x = rans::EncodeAdvance(x, x / freq, freq, info & 0xFFFF);
    pushed += __popc(mask);
  }
  if (lane < lanes) {
    for (int i = 0; i < 4; ++i) staging[4 * lane + i] = x >> (8 * i);
  }
  if (lane == 0) {
    c.blocks[b] = make_uint4(sym0, m, pushed, 4 * lanes + 2 * pushed);
  }
}

__global__ __launch_bounds__(kRansWarps* kWarp) void RansEncodeKernel(
    const EncChunk* chunks, EncParams prm, const uint32_t* block_prefix,
    uint32_t n) {
  __shared__ uint32_t fs[kRansWarps][256];
  const uint32_t warp = threadIdx.x / kWarp;
  const uint32_t total = block_prefix[n];
  for (uint32_t g = blockIdx.x * kRansWarps + warp; g < total;
       g += gridDim.x * kRansWarps) {
    const uint32_t i = ChunkOfBlock(block_prefix, n, g);
    const EncChunk& c = chunks[i];
    EncodeBlock(c, prm, g - block_prefix[i],
                2 * prm.layout.layers * c.channel_groups, fs[warp]);
  }
}

// Block offsets, then (if the stream fits) directory, header, plane
// descriptors and choice bits.
__global__ __launch_bounds__(kThreads) void DirectoryKernel(
    const EncChunk* chunks, EncParams prm, EncState* states, int32_t* status,
    CrcJob* crc_jobs, uint32_t* crc_raw) {
  using Scan = cub::BlockScan<uint32_t, kThreads>;
  __shared__ typename Scan::TempStorage scan_tmp;
  __shared__ bool s_fits;
  const uint32_t i = blockIdx.x;
  const EncChunk& c = chunks[i];
  if (threadIdx.x == 0) crc_jobs[i] = CrcJob{c.out, 0, crc_raw + i};
  if (status[i] != kOk) return;
  EncState& st = states[i];
  uint64_t payload = 0;
  for (uint32_t first = 0; first < st.num_blocks; first += kThreads) {
    const uint32_t b = first + threadIdx.x;
    const uint32_t size = b < st.num_blocks ? c.blocks[b].w : 0;
    uint32_t off, sum;
    Scan(scan_tmp).ExclusiveSum(size, off, sum);
    __syncthreads();
    if (b < st.num_blocks)
      c.block_starts[b] = static_cast<uint32_t>(payload + off);
    payload += sum;
  }
  const uint64_t dir_off = uint64_t{c.tables_off} + st.tables_bytes;
  const uint64_t payload_off = dir_off + 4 * uint64_t{st.num_blocks};
  const uint64_t total = payload_off + payload + kChecksumBytes;
  if (threadIdx.x == 0) {
    s_fits = payload < (uint64_t{1} << 32) && total <= c.capacity;
    if (s_fits) {
      st.payload_bytes = static_cast<uint32_t>(payload);
      st.total_bytes = total;
      crc_jobs[i].len = total - kChecksumBytes;
    } else {
      status[i] = kOutputTooSmall;
    }
  }
  __syncthreads();
  if (!s_fits) return;
  for (uint32_t b = threadIdx.x; b < st.num_blocks; b += kThreads) {
    const uint32_t end = c.block_starts[b] + c.blocks[b].w;
    uint8_t* d = c.out + dir_off + 4 * uint64_t{b};
    for (int k = 0; k < 4; ++k) d[k] = static_cast<uint8_t>(end >> (8 * k));
  }
  const uint32_t planes = 2 * prm.layout.layers;
  if (threadIdx.x == 0) {
    Header h = MakeHeader(prm, c);
    h.tables_bytes = st.tables_bytes;
    h.num_blocks = st.num_blocks;
    h.payload_bytes = static_cast<uint32_t>(payload);
    codec::internal::WriteFixedHeader(h, c.out);
  }
  for (uint32_t p = threadIdx.x; p < planes; p += kThreads) {
    c.out[kFixedHeaderBytes + 2 * p] = static_cast<uint8_t>(c.planes[p].bits);
    c.out[kFixedHeaderBytes + 2 * p + 1] =
        static_cast<uint8_t>(c.planes[p].mode);
  }
  const uint32_t choice_bytes = c.tables_off - c.choices_off;
  for (uint32_t x = threadIdx.x; x < choice_bytes; x += kThreads) {
    c.out[c.choices_off + x] =
        static_cast<uint8_t>(c.choice_words[x / 4] >> (8 * (x % 4)));
  }
}

// Tables of unit blockIdx.x of chunk blockIdx.y into the stream.
__global__ __launch_bounds__(kThreads) void CopyTablesKernel(
    const EncChunk* chunks, EncParams prm, const int32_t* status) {
  const uint32_t i = blockIdx.y, u = blockIdx.x;
  if (status[i] != kOk) return;
  const EncChunk& c = chunks[i];
  if (u >= 2 * prm.layout.layers * c.channel_groups) return;
  const UnitEnc& unit = c.units[u];
  uint8_t* out = c.out + c.tables_off + unit.table_off;
  for (uint32_t s = 0; s < unit.streams; ++s) {
    const uint8_t* src = c.tables + (uint64_t{u} * 4 + s) * kTableStride;
    for (uint32_t x = threadIdx.x; x < unit.table_bytes[s]; x += kThreads) {
      out[x] = src[x];
    }
    out += unit.table_bytes[s];
  }
}

// Blocks from staging into the stream's payload, a warp per block.
__global__ __launch_bounds__(kRansWarps* kWarp) void CopyBlocksKernel(
    const EncChunk* chunks, const EncState* states, const int32_t* status,
    const uint32_t* block_prefix, uint32_t n) {
  const uint32_t lane = threadIdx.x & 31;
  const uint32_t total = block_prefix[n];
  for (uint32_t g = blockIdx.x * kRansWarps + threadIdx.x / kWarp; g < total;
       g += gridDim.x * kRansWarps) {
    const uint32_t i = ChunkOfBlock(block_prefix, n, g);
    if (status[i] != kOk) continue;
    const EncChunk& c = chunks[i];
    const EncState& st = states[i];
    const uint32_t b = g - block_prefix[i];
    const uint4 blk = c.blocks[b];  // first symbol, symbols, words, bytes
    uint8_t* out = c.out + c.tables_off + st.tables_bytes +
                   4 * uint64_t{st.num_blocks} + c.block_starts[b];
    if (blk.z == kStoredBlock) {
      for (uint32_t x = lane; x < blk.w; x += kWarp) {
        out[x] = c.symbols[blk.x + x];
      }
      continue;
    }
    const uint32_t state_bytes = blk.w - 2 * blk.z;
    const uint8_t* staging =
        c.staging + 2 * uint64_t{blk.x} + 128 * uint64_t{b};
    const uint8_t* words = staging + 128 + 2 * (blk.y - blk.z);
    for (uint32_t x = lane; x < blk.w; x += kWarp) {
      out[x] = x < state_bytes ? staging[x] : words[x - state_bytes];
    }
  }
}

__global__ void FinishKernel(const EncChunk* chunks, const EncState* states,
                             const int32_t* status, const uint32_t* crc_raw,
                             uint32_t n, const uint32_t* powers,
                             uint64_t* out_bytes) {
  const uint32_t i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  if (status[i] != kOk) {
    out_bytes[i] = 0;
    return;
  }
  const uint64_t body = states[i].total_bytes - kChecksumBytes;
  const uint32_t crc = FinishCrc(powers, crc_raw[i], body);
  for (int k = 0; k < 4; ++k) {
    chunks[i].out[body + k] = static_cast<uint8_t>(crc >> (8 * k));
  }
  out_bytes[i] = states[i].total_bytes;
}

// Sizes that depend only on a chunk's shape.
struct EncSizes {
  Header header;  // Without the section sizes.
  uint32_t planes, units, sets, choice_words, block_cap;
  uint64_t fixed_bytes;  // Header to the end of the choice bits.
  uint64_t scales_off, choices_off;
  uint64_t values;
};

EncSizes SizesFor(const KvLayout& layout, uint32_t tokens) {
  EncSizes z;
  Header& h = z.header;
  h.shape = layout.ShapeOf(tokens);
  h.channel_group = codec::internal::PickChannelGroup(h.shape);
  z.planes = h.Planes();
  z.units = z.planes * h.ChannelGroups();
  z.values = ChunkValues(layout, tokens);
  const uint64_t sets_per_plane = std::max<uint64_t>(
      h.Channels(), uint64_t{h.TokenGroups()} * h.ChannelGroups());
  z.sets = static_cast<uint32_t>(sets_per_plane * z.planes);
  z.choice_words = static_cast<uint32_t>((h.ChoiceBits() + 31) / 32);
  // Every stream's blocks: at most one per stream plus one per
  // block_symbols of the (at most two bytes per value) symbols.
  z.block_cap = static_cast<uint32_t>(4 * uint64_t{z.units} +
                                      2 * z.values / h.block_symbols + 4);
  z.scales_off = kFixedHeaderBytes + 2 * uint64_t{z.planes};
  return z;
}

// The fixed part once the level's plane modes are known.
void SetScaleSizes(const std::vector<codec::internal::PlanePolicy>& policies,
                   EncSizes* z) {
  uint64_t scales = 0;
  for (const codec::internal::PlanePolicy& p : policies) {
    scales += codec::internal::ScaleBytes(z->header, {16, p.mode});
  }
  z->choices_off = z->scales_off + scales;
  z->fixed_bytes = z->choices_off + (z->header.ChoiceBits() + 7) / 8;
}

struct EncodePlan {
  EncChunk* chunks = nullptr;
  EncState* states = nullptr;
  uint2* policies = nullptr;
  CrcJob* crc_jobs = nullptr;
  uint32_t* crc_raw = nullptr;
  uint32_t* block_prefix = nullptr;
  std::vector<EncChunk> host_chunks;
  std::vector<uint2> host_policies;
  uint64_t bytes = 0;
  uint64_t max_capacity = 0;
  uint32_t max_sets_per_plane = 0;
  uint32_t max_units = 0;
  uint64_t max_vecs = 0;  // Quantize threads per plane.
};

absl::Status PlanEncode(const KvLayout& layout,
                        absl::Span<const EncodeJob> jobs, Level level,
                        void* workspace, int vec, EncodePlan* plan) {
  if (absl::Status st = CheckLayout(layout); !st.ok()) return st;
  if (jobs.empty() || jobs.size() > 65535) {
    return absl::InvalidArgumentError("a batch holds 1 to 65535 chunks");
  }
  const uint32_t n = static_cast<uint32_t>(jobs.size());
  const std::vector<codec::internal::PlanePolicy> policies =
      codec::internal::PlanePoliciesFor(level, layout.layers);
  Carver carver(workspace);
  plan->chunks = carver.Take<EncChunk>(n);
  plan->states = carver.Take<EncState>(n);
  plan->policies = carver.Take<uint2>(policies.size());
  plan->crc_jobs = carver.Take<CrcJob>(n);
  plan->crc_raw = carver.Take<uint32_t>(n);
  plan->block_prefix = carver.Take<uint32_t>(n + 1);
  for (const codec::internal::PlanePolicy& p : policies) {
    uint32_t step_bits;
    std::memcpy(&step_bits, &p.relative_step, 4);
    plan->host_policies.push_back(
        make_uint2(static_cast<uint32_t>(p.mode), step_bits));
  }
  plan->host_chunks.resize(n);
  for (uint32_t i = 0; i < n; ++i) {
    const EncodeJob& job = jobs[i];
    if (absl::Status st = CheckChunkRef(layout, job.src); !st.ok()) return st;
    if (job.out == nullptr) {
      return absl::InvalidArgumentError(absl::StrCat("job ", i, ": no output"));
    }
    EncSizes z = SizesFor(layout, job.src.tokens);
    SetScaleSizes(policies, &z);
    EncChunk& c = plan->host_chunks[i];
    c.values = job.src.values;
    c.block_ids = job.src.block_ids;
    c.tokens = job.src.tokens;
    c.first_slot = job.src.first_slot;
    c.out = job.out;
    c.capacity = job.out_capacity;
    // The fixed part is written before the stream's size is known.
    c.initial_status = job.out_capacity < z.fixed_bytes ? kOutputTooSmall : kOk;
    c.channel_group = z.header.channel_group;
    c.channel_groups = z.header.ChannelGroups();
    c.token_groups = z.header.TokenGroups();
    c.scales_off = static_cast<uint32_t>(z.scales_off);
    c.choices_off = static_cast<uint32_t>(z.choices_off);
    c.tables_off = static_cast<uint32_t>(z.fixed_bytes);
    c.block_cap = z.block_cap;
    c.planes = carver.Take<PlaneEnc>(z.planes);
    c.stats = carver.Take<Stats>(z.sets);
    c.steps = carver.Take<float>(z.sets);
    c.quant = carver.Take<Quantizer>(z.sets);
    c.q = carver.Take<uint16_t>(z.values);
    c.choice_words = carver.Take<uint32_t>(z.choice_words);
    c.units = carver.Take<UnitEnc>(z.units);
    c.freqs = carver.Take<uint32_t>(uint64_t{z.units} * 4 * 256);
    c.tables = carver.Take<uint8_t>(uint64_t{z.units} * 4 * kTableStride);
    c.symbols = carver.Take<uint8_t>(2 * z.values);
    c.blocks = carver.Take<uint4>(z.block_cap);
    c.block_starts = carver.Take<uint32_t>(z.block_cap);
    c.staging =
        carver.Take<uint8_t>(4 * z.values + 128 * uint64_t{z.block_cap});
    plan->max_capacity = std::max(plan->max_capacity, job.out_capacity);
    plan->max_sets_per_plane =
        std::max(plan->max_sets_per_plane, z.sets / z.planes);
    plan->max_units = std::max(plan->max_units, z.units);
    plan->max_vecs = std::max<uint64_t>(
        plan->max_vecs, uint64_t{c.tokens} * layout.Channels() / vec);
  }
  plan->bytes = carver.used();
  return absl::OkStatus();
}

uint32_t Blocks(uint64_t threads) {
  return static_cast<uint32_t>((threads + kThreads - 1) / kThreads);
}

absl::Status RunEncode(const KvLayout& layout, absl::Span<const EncodeJob> jobs,
                       Level level, void* workspace, uint64_t workspace_bytes,
                       uint64_t* out_bytes, int32_t* status, cudaStream_t s) {
  if (workspace == nullptr ||
      reinterpret_cast<uintptr_t>(workspace) % 256 != 0 || status == nullptr ||
      out_bytes == nullptr) {
    return absl::InvalidArgumentError(
        "workspace (256-byte aligned), out_bytes and status are required");
  }
  if (LevelName(level) == "unknown") {
    return absl::InvalidArgumentError("unknown level");
  }
  if (LevelNeedsProfile(level)) {
    return absl::InvalidArgumentError(
        absl::StrCat("the GPU encoder does not write the transform levels (",
                     LevelName(level), "); encode them with EncodeChunk"));
  }
  const int vec = VecFor(layout);
  EncodePlan plan;
  if (absl::Status st = PlanEncode(layout, jobs, level, workspace, vec, &plan);
      !st.ok()) {
    return st;
  }
  if (plan.bytes > workspace_bytes) {
    return absl::InvalidArgumentError(absl::StrCat(
        "workspace of ", workspace_bytes, " bytes; ", plan.bytes, " needed"));
  }
  const uint32_t n = static_cast<uint32_t>(jobs.size());
  const Header defaults;
  const EncParams prm{ToDevice(layout), plan.policies, defaults.token_group,
                      defaults.block_symbols, static_cast<uint8_t>(level)};
  const uint32_t planes = 2 * layout.layers;
  if (absl::Status st = CudaStatus(
          StoreItems(plan.host_chunks.data(), n, plan.chunks, s), "upload");
      !st.ok()) {
    return st;
  }
  if (absl::Status st = CudaStatus(
          StoreItems(plan.host_policies.data(), planes, plan.policies, s),
          "upload");
      !st.ok()) {
    return st;
  }
  cudaMemsetAsync(plan.crc_raw, 0, n * sizeof(uint32_t), s);
  SetupKernel<<<n, kThreads, 0, s>>>(plan.chunks, prm, status);
  const dim3 per_set(Blocks(plan.max_sets_per_plane), planes, n);
  StatsKernel<<<per_set, kThreads, 0, s>>>(plan.chunks, prm, status);
  PlaneStepKernel<<<dim3((planes + 63) / 64, n), 64, 0, s>>>(plan.chunks,
                                                             status, planes);
  FitKernel<<<per_set, kThreads, 0, s>>>(plan.chunks, prm, status);
  PlaneBitsKernel<<<n, kThreads, 0, s>>>(plan.chunks, prm, status);
  AffineKernel<<<per_set, kThreads, 0, s>>>(plan.chunks, prm, status);
  const dim3 per_value(Blocks(plan.max_vecs), planes, n);
  if (vec == 8) {
    QuantizeKernel<8><<<per_value, kThreads, 0, s>>>(plan.chunks, prm, status);
  } else {
    QuantizeKernel<1><<<per_value, kThreads, 0, s>>>(plan.chunks, prm, status);
  }
  const dim3 per_unit(plan.max_units, n);
  UnitKernel<<<per_unit, kThreads, 0, s>>>(plan.chunks, prm, status);
  LayoutKernel<<<n, kThreads, 0, s>>>(plan.chunks, prm, plan.states, status);
  BlockPrefixKernel<<<1, kThreads, 0, s>>>(plan.states, status, n,
                                           plan.block_prefix);
  int per_sm = 0;
  cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, RansEncodeKernel,
                                                kRansWarps * kWarp, 0);
  const int persistent = std::max(per_sm, 1) * MultiprocessorCount();
  RansEncodeKernel<<<persistent, kRansWarps * kWarp, 0, s>>>(
      plan.chunks, prm, plan.block_prefix, n);
  DirectoryKernel<<<n, kThreads, 0, s>>>(plan.chunks, prm, plan.states, status,
                                         plan.crc_jobs, plan.crc_raw);
  CopyTablesKernel<<<per_unit, kThreads, 0, s>>>(plan.chunks, prm, status);
  CopyBlocksKernel<<<persistent, kRansWarps * kWarp, 0, s>>>(
      plan.chunks, plan.states, status, plan.block_prefix, n);
  LaunchRawCrc(plan.crc_jobs, n, plan.max_capacity, s);
  FinishKernel<<<(n + kThreads - 1) / kThreads, kThreads, 0, s>>>(
      plan.chunks, plan.states, status, plan.crc_raw, n, DevicePowerTable(),
      out_bytes);
  return CudaStatus(cudaGetLastError(), "encode launch");
}

uint64_t EncodeBytes(const KvLayout& layout, absl::Span<const EncodeJob> jobs) {
  EncodePlan plan;
  // The workspace does not depend on the level (sizes assume two byte
  // planes everywhere).
  if (!PlanEncode(layout, jobs, Level::kLossless, nullptr, VecFor(layout),
                  &plan)
           .ok()) {
    return 0;
  }
  return plan.bytes;
}

}  // namespace
}  // namespace internal

uint64_t MaxEncodedBytes(const ChunkShape& shape) {
  const KvLayout layout = KvLayout::Contiguous(shape.layers, shape.kv_heads,
                                               shape.head_dim, shape.dtype);
  const internal::EncSizes z = internal::SizesFor(layout, shape.tokens);
  const codec::internal::Header& h = z.header;
  // Scales as if every plane had the larger of the two kinds; tables,
  // directory and blocks at their largest.
  const uint64_t scales =
      4 * uint64_t{z.planes} *
      std::max<uint64_t>(h.Channels(),
                         uint64_t{h.TokenGroups()} * h.ChannelGroups());
  return z.scales_off + scales + (h.ChoiceBits() + 7) / 8 +
         uint64_t{z.units} * 4 * internal::kTableStride +
         4 * uint64_t{z.block_cap} + 128 * uint64_t{z.block_cap} +
         4 * z.values + codec::internal::kChecksumBytes;
}

uint64_t EncodeWorkspaceBytes(const KvLayout& layout,
                              absl::Span<const EncodeJob> jobs) {
  return internal::EncodeBytes(layout, jobs);
}

absl::Status EncodeBatch(const KvLayout& layout,
                         absl::Span<const EncodeJob> jobs, Level level,
                         void* workspace, uint64_t workspace_bytes,
                         uint64_t* out_bytes, int32_t* status, Stream stream) {
  return internal::RunEncode(layout, jobs, level, workspace, workspace_bytes,
                             out_bytes, status, stream);
}

}  // namespace kvcache::codec::gpu
