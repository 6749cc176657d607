// Batch decoder. Stages, each one launch over the whole batch:
//   1. ParseKernel (a CTA per chunk): header and section checks, plane
//      offsets, scales as floats, choice bits with running popcounts, the
//      frequency tables' offsets (one thread chasing precomputed table ends)
//      and one descriptor per rANS block (its table, symbol count and place
//      in the symbol scratch).
//   2. RawCrcKernel: CRC32C of every stream, many threads per stream.
//   3. FinalizeKernel: per-chunk status (header, then checksum, then table
//      errors, the CPU decoder's order) and a prefix sum of block counts.
//   4. RansKernel: a persistent grid of warps, one rANS block per warp at a
//      time, lanes = rANS lanes, slot->symbol table in shared memory.
//   5. ReconstructKernel: anchors and deltas, byte planes, affine dequant,
//      stored straight into the destination layout.
//   6. Transform streams (format v3) instead: RopeKernel (each chunk's RoPE
//      angles) and TransformKernel (components to values, FORMAT.md
//      "Transform", in the CPU decoder's order of operations).
// Every offset comes from validated header fields or is checked before use,
// so a corrupt stream only sets its status.
#include <algorithm>
#include <cub/block/block_scan.cuh>
#include <vector>

#include "codec/byte_io.h"
#include "codec/cuda/crc32c_math.h"
#include "codec/cuda/device_common.cuh"
#include "codec/format.h"
#include "codec/group_layout.h"
#include "codec/quant_math.h"
#include "codec/rans_math.h"
#include "codec/transform_math.h"

namespace kvcache::codec::gpu {
namespace internal {
namespace {

using codec::internal::Alphabet;
using codec::internal::BytePlanes;
using codec::internal::Header;
using codec::internal::HeaderCheck;
using codec::internal::kChecksumBytes;
using codec::internal::kFixedHeaderBytes;
using codec::internal::kMagicLE;
using codec::internal::kNoTransform;
using codec::internal::kTransformSectionBytes;
using codec::internal::LoadU16;
using codec::internal::LoadU32;
using codec::internal::PlaneSpec;
using codec::internal::ScaleMode;
using codec::internal::TransformFields;

// One chunk of a batch as the kernels see it; the host fills it.
struct DecodeChunk {
  const uint8_t* stream;
  uint64_t stream_bytes;
  uint16_t* values;
  const int32_t* block_ids;
  uint32_t tokens;
  uint32_t first_slot;
  // Workspace.
  uint4* planes;           // bits | mode << 8, first affine, symbol and stream.
  float2* affines;         // The scales section as (offset, step) floats.
  uint32_t* choice_words;  // Choice bits, 32 per word.
  uint32_t* choice_ranks;  // Set bits in the words before each word.
  uint4* units;            // Per (plane, channel group): a Unit.
  uint32_t* stream_tables;  // Per stream: its table's offset.
  uint4* blocks;            // Table offset, first symbol, symbols, alphabet.
  uint32_t* plane_blocks;   // Each plane's first block, then the total.
  // Decoded streams (group_layout.h order) of the layers a call decodes:
  // symbol i of the chunk at symbols[i - the first plane's first symbol].
  uint8_t* symbols;
  float2* rope;  // Transform streams: [token][pair] (sin, cos).
  uint32_t affine_cap;
  uint32_t unit_cap;
  uint32_t stream_cap;
  uint32_t block_cap;
};

// What ParseKernel learns of a chunk.
struct ChunkState {
  int32_t header_error;
  int32_t table_error;
  uint32_t num_blocks;
  uint32_t tokens;
  uint32_t token_group;
  uint32_t channel_group;
  uint32_t token_groups;
  uint32_t channel_groups;
  uint32_t block_symbols;
  uint32_t scales_off;  // Section offsets from the stream start.
  uint32_t choices_off;
  uint32_t tables_off;
  uint32_t tables_bytes;
  uint32_t dir_off;
  uint32_t payload_off;
  uint32_t payload_bytes;
  // Transform streams (transform != 0): section 2a.
  uint32_t transform;
  uint32_t first_position;
  uint32_t exact_tokens;
  uint32_t exact_off;
};

// The batch's model profile as kernels take it; has == 0 when none.
struct KernelProfile {
  DeviceProfile::View view;
  uint32_t has;
};

constexpr int kParseThreads = 256;
constexpr int kRansWarps = 4;
constexpr int kReconstructThreads = 256;

__device__ inline uint32_t Rank(const DecodeChunk& c, uint64_t i) {
  const uint64_t w = i >> 5;
  return c.choice_ranks[w] + __popc(c.choice_words[w] & ((1u << (i & 31)) - 1));
}
__device__ inline bool Bit(const DecodeChunk& c, uint64_t i) {
  return c.choice_words[i >> 5] >> (i & 31) & 1;
}

// A (plane, channel group) unit: its streams' symbol counts per byte plane
// and where they start in the scratch (raw byte planes, then delta byte
// planes). Stored as a uint4 in DecodeChunk::units.
struct Unit {
  uint32_t raw;
  uint32_t delta;
  uint32_t base;
};
__device__ inline Unit ToUnit(uint4 v) { return {v.x, v.y, v.z}; }

__device__ Unit UnitAt(const DecodeChunk& c, const ChunkState& s, uint32_t u) {
  const uint32_t p = u / s.channel_groups, cg = u % s.channel_groups;
  const uint32_t bits = c.planes[p].x & 0xFF;
  const uint64_t first = uint64_t{u} * s.token_groups;
  const uint64_t last = first + s.token_groups - 1;
  const codec::internal::StreamRows rows =
      codec::internal::RowsOfAll(s.tokens, s.token_group, s.token_groups,
                                 Rank(c, last) - Rank(c, first), Bit(c, last));
  const uint32_t width = s.channel_group;
  return {rows.raw * width, rows.delta * width,
          c.planes[p].z + cg * width * s.tokens * BytePlanes(bits)};
}

__device__ int32_t ParseHeader(const DecodeChunk& c, const DeviceLayout& l,
                               const KernelProfile& profile, Header* h,
                               TransformFields* transform) {
  const uint8_t* p = c.stream;
  if (c.stream_bytes < 4 || LoadU32(p) != kMagicLE ||
      c.stream_bytes < kFixedHeaderBytes) {
    return kBadHeader;
  }
  uint8_t version = 0;
  switch (ReadFixedHeader(p, h, &version)) {
    case HeaderCheck::kOk:
      break;
    case HeaderCheck::kBadVersion:
    case HeaderCheck::kTransform:
      return kUnsupported;
    default:
      return kBadHeader;
  }
  if (h->shape.layers != l.layers || h->shape.kv_heads != l.kv_heads ||
      h->shape.head_dim != l.head_dim || h->shape.dtype != l.dtype ||
      h->shape.tokens != c.tokens) {
    return kShapeMismatch;
  }
  const uint64_t section = kFixedHeaderBytes + 2 * uint64_t{h->Planes()};
  if (c.stream_bytes < section) return kBadHeader;
  *transform = {0, 0};
  if (h->transform_id == kNoTransform) return kOk;
  if (c.stream_bytes < section + kTransformSectionBytes) return kBadHeader;
  const uint8_t* t = c.stream + section;
  if (!codec::internal::ReadTransformFields(t, *h, transform)) {
    return kBadHeader;
  }
  const DeviceProfile::View& v = profile.view;
  bool same = profile.has != 0 && v.layers == h->shape.layers &&
              v.kv_heads == h->shape.kv_heads &&
              v.head_dim == h->shape.head_dim &&
              h->channel_group % v.head_dim == 0;
  for (int b = 0; b < 16 && same; ++b) same = t[b] == v.id[b];
  return same ? kOk : kNeedsProfile;
}

// Window of the tables section ParseKernel works on, and markers of where
// no next table is known inside it.
constexpr uint32_t kWindowBytes = 4096;
constexpr uint16_t kPastWindow = 0xFFFF;
constexpr uint16_t kBadTable = 0xFFFE;

// Where the table that would start at window byte i ends: tables of kinds
// 0 to 2 have fixed sizes, an explicit one ends after the count-th varint,
// found as the count-th byte below 0x80 (term_rank[j]: such bytes before j,
// term_at[k]: the k-th one). Contents are checked later.
__device__ uint16_t NextTable(const uint8_t* win, uint32_t len,
                              const uint16_t* term_rank,
                              const uint16_t* term_at, uint32_t i) {
  switch (static_cast<rans::TableKind>(win[i])) {
    case rans::TableKind::kEmpty:
    case rans::TableKind::kUniform:
    case rans::TableKind::kStored:
      return static_cast<uint16_t>(i + 1);
    case rans::TableKind::kSingle:
      return i + 2 <= len ? static_cast<uint16_t>(i + 2) : kPastWindow;
    case rans::TableKind::kExplicit: {
      if (i + 3 > len) return kPastWindow;
      if (win[i + 1] > win[i + 2]) return kBadTable;
      const uint32_t k = term_rank[i + 3] + (win[i + 2] - win[i + 1]);
      return k < term_rank[len] ? static_cast<uint16_t>(term_at[k] + 1)
                                : kPastWindow;
    }
  }
  return kBadTable;
}

__global__ __launch_bounds__(kParseThreads) void ParseKernel(
    const DecodeChunk* chunks, ChunkState* states, DeviceLayout layout,
    KernelProfile profile) {
  using Scan = cub::BlockScan<uint32_t, kParseThreads>;
  __shared__ typename Scan::TempStorage scan_tmp;
  __shared__ alignas(Header) unsigned char header_storage[sizeof(Header)];
  __shared__ ChunkState s;
  __shared__ int32_t s_err;
  __shared__ uint32_t s_bad_plane;
  __shared__ uint8_t window[kWindowBytes];
  __shared__ uint16_t term_rank[kWindowBytes + 1], term_at[kWindowBytes];
  __shared__ uint16_t next_table[kWindowBytes];
  __shared__ uint32_t s_pos, s_stream;
  __shared__ TransformFields s_transform;
  Header& h = *reinterpret_cast<Header*>(header_storage);
  const DecodeChunk c = chunks[blockIdx.x];
  ChunkState* out = &states[blockIdx.x];
  const uint32_t tid = threadIdx.x;

  if (tid == 0) {
    Header local;
    TransformFields fields;
    s_err = ParseHeader(c, layout, profile, &local, &fields);
    h = local;
    s_transform = fields;
    s_bad_plane = 0;
  }
  __syncthreads();
  if (s_err == kOk &&
      !BlockIdsValid(layout, c.block_ids, c.first_slot, c.tokens) && tid == 0) {
    s_err = kBadDestination;
  }
  __syncthreads();
  if (s_err != kOk) {
    if (tid == 0) out->header_error = s_err;
    return;
  }

  // Plane descriptors: prefix sums give each plane's first affine map and
  // first scratch symbol.
  const uint32_t planes = h.Planes();
  const uint32_t plane_values = h.shape.tokens * h.Channels();
  const uint8_t* desc = c.stream + kFixedHeaderBytes;
  const uint32_t groups = h.ChannelGroups();
  uint32_t affine_total = 0, symbol_total = 0;
  uint64_t stream_total = 0;
  for (uint32_t first = 0; first < planes; first += kParseThreads) {
    const uint32_t p = first + tid;
    uint32_t bits = 0, mode = 0, affines = 0, symbols = 0, streams = 0;
    if (p < planes) {
      bits = desc[2 * p];
      mode = desc[2 * p + 1];
      // Transform streams' planes are all per channel (as ParseSections).
      if (codec::internal::ValidPlane(bits, mode) &&
          (h.transform_id == kNoTransform ||
           mode == static_cast<uint32_t>(ScaleMode::kPerChannel))) {
        const PlaneSpec spec{static_cast<uint8_t>(bits),
                             static_cast<ScaleMode>(mode)};
        affines = static_cast<uint32_t>(ScaleBytes(h, spec) / 4);
        symbols = plane_values * BytePlanes(bits);
        streams = groups * 2 * BytePlanes(bits);
      } else {
        s_bad_plane = 1;
      }
    }
    uint32_t affine_off, symbol_off, stream_off, affine_sum, symbol_sum,
        stream_sum;
    Scan(scan_tmp).ExclusiveSum(affines, affine_off, affine_sum);
    __syncthreads();
    Scan(scan_tmp).ExclusiveSum(symbols, symbol_off, symbol_sum);
    __syncthreads();
    Scan(scan_tmp).ExclusiveSum(streams, stream_off, stream_sum);
    __syncthreads();
    if (p < planes) {
      c.planes[p] =
          make_uint4(bits | mode << 8, affine_total + affine_off,
                     symbol_total + symbol_off,
                     static_cast<uint32_t>(stream_total + stream_off));
    }
    affine_total += affine_sum;
    symbol_total += symbol_sum;
    stream_total += stream_sum;
  }

  // The sections must add up to exactly the stream (as in ParseSections).
  const uint64_t choice_bits = h.ChoiceBits();
  const uint64_t choice_bytes = (choice_bits + 7) / 8;
  if (tid == 0) {
    const bool transform = h.transform_id != kNoTransform;
    const uint64_t exact_off =
        kFixedHeaderBytes + 2 * uint64_t{planes} + kTransformSectionBytes;
    const uint64_t scales_off =
        transform ? exact_off + 2 * uint64_t{s_transform.exact_tokens} *
                                    planes * h.Channels()
                  : kFixedHeaderBytes + 2 * uint64_t{planes};
    const uint64_t choices_off = scales_off + 4 * uint64_t{affine_total};
    const uint64_t tables_off = choices_off + choice_bytes;
    const uint64_t dir_off = tables_off + h.tables_bytes;
    const uint64_t payload_off = dir_off + 4 * uint64_t{h.num_blocks};
    int32_t err = s_bad_plane ? kBadHeader : kOk;
    if (payload_off + h.payload_bytes + kChecksumBytes != c.stream_bytes) {
      err = kBadHeader;
    } else if (choice_bits % 8 != 0 &&
               c.stream[tables_off - 1] >> (choice_bits % 8) != 0) {
      err = kBadHeader;
    }
    s_err = err;
    s = ChunkState{kOk,
                   kOk,
                   h.num_blocks,
                   h.shape.tokens,
                   h.token_group,
                   h.channel_group,
                   h.TokenGroups(),
                   h.ChannelGroups(),
                   h.block_symbols,
                   static_cast<uint32_t>(scales_off),
                   static_cast<uint32_t>(choices_off),
                   static_cast<uint32_t>(tables_off),
                   h.tables_bytes,
                   static_cast<uint32_t>(dir_off),
                   static_cast<uint32_t>(payload_off),
                   h.payload_bytes,
                   transform ? 1u : 0u,
                   s_transform.first_position,
                   s_transform.exact_tokens,
                   static_cast<uint32_t>(exact_off)};
  }
  __syncthreads();
  if (s_err != kOk) {
    if (tid == 0) out->header_error = s_err;
    return;
  }

  // Scales, as the floats reconstruction multiplies with.
  const uint8_t* scales = c.stream + s.scales_off;
  for (uint32_t e = tid; e < affine_total && e < c.affine_cap;
       e += kParseThreads) {
    c.affines[e] = make_float2(
        codec::internal::ToFloat(LoadU16(scales + 4 * e), h.shape.dtype),
        codec::internal::ToFloat(LoadU16(scales + 4 * e + 2), h.shape.dtype));
  }

  // Choice bits as aligned words with running popcounts. Ranks wrap at
  // 2^32; only differences within one channel group are used.
  const uint8_t* choices = c.stream + s.choices_off;
  const uint32_t words = static_cast<uint32_t>((choice_bits + 31) / 32);
  uint32_t rank_total = 0;
  for (uint32_t first = 0; first < words; first += kParseThreads) {
    const uint32_t w = first + tid;
    uint32_t word = 0;
    for (uint32_t b = 0; b < 4 && w < words; ++b) {
      if (4 * uint64_t{w} + b < choice_bytes) {
        word |= uint32_t{choices[4 * w + b]} << (8 * b);
      }
    }
    uint32_t off, sum;
    Scan(scan_tmp).ExclusiveSum(__popc(word), off, sum);
    __syncthreads();
    if (w < words) {
      c.choice_words[w] = word;
      c.choice_ranks[w] = rank_total + off;
    }
    rank_total += sum;
  }
  __syncthreads();

  // Channel groups, then the tables: one thread chases table starts
  // through windows of the section, for which the CTA precomputes where a
  // table starting at each byte would end. Each unit has two tables at
  // least (and each block a 4-byte state), which bounds the arrays.
  const uint32_t units = planes * groups;
  const uint32_t streams = static_cast<uint32_t>(stream_total);
  __shared__ int32_t s_walk_err;
  if (tid == 0) {
    s_walk_err = units > c.unit_cap || stream_total > c.stream_cap ||
                         s.num_blocks > s.payload_bytes / 4 ||
                         s.num_blocks > c.block_cap
                     ? kBadTables
                     : kOk;
    s_pos = 0;
    s_stream = 0;
  }
  __syncthreads();
  if (s_walk_err == kOk) {
    for (uint32_t u = tid; u < units; u += kParseThreads) {
      const Unit x = UnitAt(c, s, u);
      c.units[u] = make_uint4(x.raw, x.delta, x.base, 0);
    }
  }
  const uint8_t* tables = c.stream + s.tables_off;
  constexpr uint32_t kPerThread = kWindowBytes / kParseThreads;
  while (s_walk_err == kOk && s_stream < streams) {
    const uint32_t base = s_pos;
    const uint32_t len = min(kWindowBytes, s.tables_bytes - base);
    for (uint32_t o = tid; o < len; o += kParseThreads) {
      window[o] = tables[base + o];
    }
    __syncthreads();
    const uint32_t i0 = tid * kPerThread;
    uint32_t terms = 0;
    for (uint32_t i = i0; i < i0 + kPerThread && i < len; ++i) {
      terms += window[i] < 0x80;
    }
    uint32_t rank, total;
    Scan(scan_tmp).ExclusiveSum(terms, rank, total);
    for (uint32_t i = i0; i < i0 + kPerThread && i < len; ++i) {
      term_rank[i] = static_cast<uint16_t>(rank);
      if (window[i] < 0x80) term_at[rank++] = static_cast<uint16_t>(i);
    }
    if (tid == 0) term_rank[len] = static_cast<uint16_t>(total);
    __syncthreads();
    for (uint32_t i = tid; i < len; i += kParseThreads) {
      next_table[i] = NextTable(window, len, term_rank, term_at, i);
    }
    __syncthreads();
    if (tid == 0) {
      uint32_t i = 0, st = s_stream;
      int32_t err = kOk;
      for (; st < streams; ++st) {
        if (i == len) {
          // The next table starts past the window: slide, unless the
          // section has ended.
          if (base + len == s.tables_bytes) err = kBadTables;
          break;
        }
        const uint16_t next = next_table[i];
        if (next == kBadTable || (next == kPastWindow && i == 0)) {
          err = kBadTables;  // Malformed, truncated or longer than a window.
          break;
        }
        if (next == kPastWindow) {
          if (base + len == s.tables_bytes) err = kBadTables;
          break;
        }
        c.stream_tables[st] = base + i;
        i = next;
      }
      s_pos = base + i;
      s_stream = st;
      s_walk_err = err;
    }
    __syncthreads();
  }
  if (s_walk_err == kOk && s_pos != s.tables_bytes) s_walk_err = kBadTables;

  // Per stream, in parallel: table checks the chase left, and block
  // descriptors at block offsets from a prefix sum.
  uint32_t blocks_before = 0;
  for (uint32_t first = 0; first < streams && s_walk_err == kOk;
       first += kParseThreads) {
    const uint32_t st = first + tid;
    uint32_t nb = 0, n = 0, sym0 = 0, alphabet = 0, pos = 0;
    uint32_t lo = 0, in_plane = 1;
    bool ok = true;
    if (st < streams) {
      uint32_t hi = planes;  // lo: the plane whose first stream <= st.
      while (hi - lo > 1) {
        const uint32_t mid = (lo + hi) / 2;
        if (c.planes[mid].w <= st) {
          lo = mid;
        } else {
          hi = mid;
        }
      }
      const uint32_t bits = c.planes[lo].x & 0xFF;
      const int bp = BytePlanes(bits);
      in_plane = st - c.planes[lo].w;
      const uint32_t in_unit = in_plane % (2 * bp);
      const Unit unit = ToUnit(c.units[lo * groups + in_plane / (2 * bp)]);
      const uint32_t is_delta = in_unit >> (bp - 1), k = in_unit & (bp - 1);
      n = is_delta ? unit.delta : unit.raw;
      sym0 = unit.base +
             (is_delta ? bp * unit.raw + k * unit.delta : k * unit.raw);
      alphabet = Alphabet(bits, k);
      pos = c.stream_tables[st];
      const uint8_t* t = tables + pos;
      switch (static_cast<rans::TableKind>(t[0])) {
        case rans::TableKind::kEmpty:
          ok = n == 0;
          break;
        case rans::TableKind::kSingle:
          ok = n != 0 && t[1] < alphabet;
          break;
        case rans::TableKind::kUniform:
          ok = n != 0;
          break;
        case rans::TableKind::kStored:
          ok = n != 0 && alphabet == 256;
          break;
        case rans::TableKind::kExplicit:
          ok = n != 0 && t[2] < alphabet;
          break;
        default:
          ok = false;
      }
      nb = (n + s.block_symbols - 1) / s.block_symbols;
    }
    if (!ok) s_walk_err = kBadTables;
    uint32_t off, sum;
    Scan(scan_tmp).ExclusiveSum(nb, off, sum);
    off += blocks_before;
    if (in_plane == 0) c.plane_blocks[lo] = off;
    if (ok && nb != 0 && nb <= s.num_blocks && off <= s.num_blocks - nb) {
      for (uint32_t j = 0; j < nb; ++j) {
        c.blocks[off + j] =
            make_uint4(pos, sym0 + j * s.block_symbols,
                       min(s.block_symbols, n - j * s.block_symbols), alphabet);
      }
    }
    blocks_before += sum;
    __syncthreads();
  }
  if (tid == 0) {
    int32_t err = s_walk_err;
    const uint32_t last_end =
        s.num_blocks == 0
            ? 0
            : LoadU32(c.stream + s.dir_off + 4 * (s.num_blocks - 1));
    if (err == kOk &&
        (blocks_before != s.num_blocks || last_end != s.payload_bytes)) {
      err = kBadTables;
    }
    c.plane_blocks[planes] = blocks_before;
    ChunkState result = s;
    result.table_error = err;
    *out = result;
  }
}

// Planes [first, end) of each chunk of a batch, the part a call decodes.
struct PlaneRange {
  uint32_t first;
  uint32_t end;
};

// Sets each chunk's status (keeping an earlier call's error when `parsed`;
// checking the CRC when `verify`) and the prefix sum of the range's blocks.
__global__ void FinalizeKernel(const DecodeChunk* chunks,
                               const ChunkState* states,
                               const uint32_t* crc_raw, uint32_t n,
                               const uint32_t* powers, int32_t* status,
                               uint32_t* block_prefix, PlaneRange range,
                               bool parsed, bool verify) {
  using Scan = cub::BlockScan<uint32_t, kParseThreads>;
  __shared__ typename Scan::TempStorage scan_tmp;
  __shared__ uint32_t x2n[kPowers];
  if (threadIdx.x < kPowers) x2n[threadIdx.x] = powers[threadIdx.x];
  __syncthreads();
  uint32_t total = 0;
  for (uint32_t first = 0; first < n; first += kParseThreads) {
    const uint32_t i = first + threadIdx.x;
    uint32_t blocks = 0;
    if (i < n) {
      const ChunkState& st = states[i];
      int32_t err = parsed ? status[i] : kOk;
      if (err == kOk) err = st.header_error;
      if (err == kOk && verify) {
        const uint64_t body = chunks[i].stream_bytes - kChecksumBytes;
        const uint32_t stored = LoadU32(chunks[i].stream + body);
        if (FinishCrc(x2n, crc_raw[i], body) != stored) err = kChecksum;
      }
      if (err == kOk) err = st.table_error;
      status[i] = err;
      blocks = err == kOk ? chunks[i].plane_blocks[range.end] -
                                chunks[i].plane_blocks[range.first]
                          : 0;
    }
    uint32_t off, sum;
    Scan(scan_tmp).ExclusiveSum(blocks, off, sum);
    __syncthreads();
    if (i < n) block_prefix[i] = total + off;
    total += sum;
  }
  if (threadIdx.x == 0) block_prefix[n] = total;
}

// Per warp: symbol of each slot, and freq << 16 | start of each symbol.
struct WarpTables {
  uint32_t sym_info[256];
  uint8_t lut[rans::kProbScale];
};

// Fills the warp's tables from the table at tables[pos] (which the walk
// checked for kind, range and extent); validates what the walk left:
// varints and the frequency sum, as rans::ReadTable does. Whole warp.
__device__ bool BuildTable(const uint8_t* tables, uint32_t tables_bytes,
                           uint32_t pos, uint32_t alphabet, WarpTables& wt) {
  const uint32_t lane = threadIdx.x & 31;
  auto* lut_words = reinterpret_cast<uint32_t*>(wt.lut);
  __syncwarp();
  const uint8_t kind = tables[pos];
  if (kind == static_cast<uint8_t>(rans::TableKind::kSingle)) {
    const uint32_t s = tables[pos + 1];
    for (uint32_t w = lane; w < rans::kProbScale / 4; w += kWarp) {
      lut_words[w] = s * 0x01010101u;
    }
    if (lane == 0) wt.sym_info[s] = rans::kProbScale << 16;
    __syncwarp();
    return true;
  }
  if (kind == static_cast<uint8_t>(rans::TableKind::kUniform)) {
    const uint32_t f = rans::kProbScale / alphabet;
    const int shift = __ffs(f) - 1;
    for (uint32_t w = lane; w < rans::kProbScale / 4; w += kWarp) {
      uint32_t v = 0;
      for (uint32_t b = 0; b < 4; ++b) v |= ((4 * w + b) >> shift) << (8 * b);
      lut_words[w] = v;
    }
    for (uint32_t s = lane; s < alphabet; s += kWarp) {
      wt.sym_info[s] = f << 16 | s * f;
    }
    __syncwarp();
    return true;
  }
  // Explicit: varints for symbols first..last.
  const uint32_t first = tables[pos + 1], last = tables[pos + 2];
  const uint32_t count = last - first + 1;
  for (uint32_t s = lane; s < 256; s += kWarp) wt.sym_info[s] = 0;
  __syncwarp();
  bool ok = true;
  uint32_t q = pos + 3, pending = q, done = 0;
  while (done < count) {
    if (q >= tables_bytes) return false;
    const uint32_t i = q + lane;
    const bool term = i < tables_bytes && tables[i] < 0x80;
    const uint32_t mask = __ballot_sync(~0u, term);
    const uint32_t below = mask & LaneMaskLt();
    if (term && done + __popc(below) < count) {
      const uint32_t start = below ? q + (31 - __clz(below)) + 1 : pending;
      uint32_t v = 0;
      const int used =
          rans::ReadVarint(tables + start, tables_bytes - start, &v);
      if (used != static_cast<int>(i - start + 1) || v > rans::kProbScale) {
        ok = false;
      } else {
        wt.sym_info[first + done + __popc(below)] = v;
      }
    }
    if (mask) pending = q + (31 - __clz(mask)) + 1;
    done += __popc(mask);
    q += kWarp;
  }
  if (!__all_sync(~0u, ok)) return false;
  __syncwarp();
  // Cumulative starts: each lane sums 8 symbols, then a warp scan.
  uint32_t f[8], sum = 0;
  for (int j = 0; j < 8; ++j) {
    f[j] = wt.sym_info[8 * lane + j];
    sum += f[j];
  }
  uint32_t incl = sum;
  for (int o = 1; o < kWarp; o <<= 1) {
    const uint32_t v = __shfl_up_sync(~0u, incl, o);
    if (lane >= static_cast<uint32_t>(o)) incl += v;
  }
  if (__shfl_sync(~0u, incl, 31) != rans::kProbScale) return false;
  uint32_t start = incl - sum;
  for (int j = 0; j < 8; ++j) {
    wt.sym_info[8 * lane + j] = f[j] << 16 | start;
    start += f[j];
  }
  __syncwarp();
  for (uint32_t s = first; s <= last; ++s) {
    const uint32_t info = wt.sym_info[s];
    const uint32_t st = info & 0xFFFF;
    for (uint32_t k = lane; k < (info >> 16); k += kWarp) {
      wt.lut[st + k] = static_cast<uint8_t>(s);
    }
  }
  __syncwarp();
  return true;
}

// Decodes block b of chunk c into its scratch symbols. Whole warp; false on
// any corruption (rans::Decoder::DecodeBlock's checks).
__device__ bool DecodeBlock(const DecodeChunk& c, const ChunkState& s,
                            uint32_t b, uint32_t origin, WarpTables& wt) {
  const uint32_t lane = threadIdx.x & 31;
  const uint4 d = c.blocks[b];
  const uint8_t* dir = c.stream + s.dir_off;
  const uint32_t end = LoadU32(dir + 4 * b);
  const uint32_t begin = b ? LoadU32(dir + 4 * (b - 1)) : 0;
  if (end < begin || end > s.payload_bytes) return false;
  const uint32_t m = d.z;
  const uint32_t size = end - begin;
  const uint8_t* block = c.stream + s.payload_off + begin;
  if (c.stream[s.tables_off + d.x] ==
      static_cast<uint8_t>(rans::TableKind::kStored)) {
    if (size != m) return false;
    for (uint32_t k = lane; k < m; k += kWarp) {
      c.symbols[d.y - origin + k] = block[k];
    }
    return true;
  }
  const uint32_t lanes = rans::LanesFor(m);
  if (size < 4 * lanes || size % 2 != 0) return false;
  if (!BuildTable(c.stream + s.tables_off, s.tables_bytes, d.x, d.w, wt)) {
    return false;
  }
  uint32_t x = lane < lanes ? LoadU32(block + 4 * lane) : rans::kStateLow;
  if (__any_sync(~0u, x < rans::kStateLow)) return false;
  const uint8_t* words = block + 4 * lanes;
  const uint32_t num_words = (size - 4 * lanes) / 2;
  const uint32_t lower = LaneMaskLt();
  uint8_t* out = c.symbols + (d.y - origin) + lane;
  uint32_t cur = 0;
  bool overrun = false;
  // One step: every active lane takes a symbol; lanes that need a word take
  // the next ones in lane order, fetched before the table lookups.
  auto step = [&](bool active) {
    const uint32_t ahead =
        cur + lane < num_words ? LoadU16(words + 2 * (cur + lane)) : 0;
    const uint32_t slot = x & (rans::kProbScale - 1);
    const uint32_t sym = wt.lut[slot];
    const uint32_t info = wt.sym_info[sym];
    const uint32_t next =
        rans::DecodeAdvance(x, info >> 16, slot - (info & 0xFFFF));
    const bool need = active && next < rans::kStateLow;
    const uint32_t mask = __ballot_sync(~0u, need);
    const uint32_t rank = __popc(mask & lower);
    const uint32_t word = __shfl_sync(~0u, ahead, rank);
    overrun |= need && cur + rank >= num_words;
    if (active) {
      x = need ? next << 16 | word : next;
      *out = static_cast<uint8_t>(sym);
    }
    out += lanes;
    cur += __popc(mask);
  };
  const uint32_t full_steps = m / lanes;
  const bool lane_active = lane < lanes;
  for (uint32_t k = 0; k < full_steps; ++k) step(lane_active);
  if (full_steps * lanes < m) step(lane < m - full_steps * lanes);
  const bool bad =
      overrun || cur != num_words || (lane < lanes && x != rans::kStateLow);
  return !__any_sync(~0u, bad);
}

__global__ __launch_bounds__(kRansWarps* kWarp) void RansKernel(
    const DecodeChunk* chunks, const ChunkState* states,
    const uint32_t* block_prefix, uint32_t n, int32_t* status,
    uint32_t first_plane) {
  __shared__ WarpTables tables[kRansWarps];
  WarpTables& wt = tables[threadIdx.x / kWarp];
  const uint32_t total = block_prefix[n];
  const uint32_t stride = gridDim.x * kRansWarps;
  for (uint32_t g = blockIdx.x * kRansWarps + threadIdx.x / kWarp; g < total;
       g += stride) {
    uint32_t lo = 0, hi = n;  // block_prefix[lo] <= g < block_prefix[hi]
    while (hi - lo > 1) {
      const uint32_t mid = (lo + hi) / 2;
      if (block_prefix[mid] <= g) {
        lo = mid;
      } else {
        hi = mid;
      }
    }
    const DecodeChunk& c = chunks[lo];
    if (!DecodeBlock(c, states[lo],
                     c.plane_blocks[first_plane] + g - block_prefix[lo],
                     c.planes[first_plane].z, wt) &&
        (threadIdx.x & 31) == 0) {
      atomicCAS(&status[lo], kOk, kBadBlock);
    }
  }
}

// kN (1 or 8) symbols at p, aligned 8-byte loads where possible.
template <int kN>
__device__ inline uint64_t LoadSymbols(const uint8_t* p) {
  if (kN == 8 && (reinterpret_cast<uintptr_t>(p) & 7) == 0) {
    return *reinterpret_cast<const uint64_t*>(p);
  }
  uint64_t v = 0;
  for (int e = 0; e < kN; ++e) v |= uint64_t{p[e]} << (8 * e);
  return v;
}

// kN integers whose byte plane 0 is at p and plane 1 (if any) plane_n
// further.
template <int kN>
__device__ inline void LoadInts(const uint8_t* p, uint32_t plane_n, int planes,
                                uint32_t* q) {
  const uint64_t b0 = LoadSymbols<kN>(p);
  const uint64_t b1 = planes == 2 ? LoadSymbols<kN>(p + plane_n) : 0;
  for (int e = 0; e < kN; ++e) {
    const uint32_t lo = (b0 >> (8 * e)) & 0xFF, hi = (b1 >> (8 * e)) & 0xFF;
    q[e] = planes == 2 ? lo << 8 | hi : lo;
  }
}

// x / d, with a shift when d is a power of two (the usual token group,
// channel group and row widths): a division costs tens of instructions.
__device__ inline uint32_t Div(uint32_t x, uint32_t d) {
  return (d & (d - 1)) == 0 ? x >> (__ffs(d) - 1) : x / d;
}

// Integers of channels [c0, c0 + kN) of token t of plane p, which lie in
// one channel group. `origin`: the first symbol of the planes the call
// decodes (DecodeChunk::symbols).
template <int kN>
__device__ inline void DecodeInts(const DecodeChunk& c, const ChunkState& s,
                                  uint32_t origin, uint32_t p, uint32_t t,
                                  uint32_t c0, uint32_t* q) {
  const uint32_t width = s.channel_group;
  const uint32_t cg = Div(c0, width);
  const uint32_t g = Div(t, s.token_group);
  const uint32_t in_group = t - g * s.token_group;
  const uint32_t bits = c.planes[p].x & 0xFF;
  const int planes_of_int = BytePlanes(bits);
  const uint32_t u = p * s.channel_groups + cg;
  const Unit unit = ToUnit(c.units[u]);
  const uint64_t first = uint64_t{u} * s.token_groups;
  const bool delta_group = Bit(c, first + g);
  const codec::internal::StreamRows before = codec::internal::RowsBefore(
      g, Rank(c, first + g) - Rank(c, first), s.token_group);
  const uint8_t* raw = c.symbols + (unit.base - origin) + (c0 - cg * width);
  if (delta_group && in_group != 0) {
    uint32_t anchor[kN];
    LoadInts<kN>(raw + before.raw * width, unit.raw, planes_of_int, anchor);
    LoadInts<kN>(
        raw + planes_of_int * unit.raw + (before.delta + in_group - 1) * width,
        unit.delta, planes_of_int, q);
    for (int e = 0; e < kN; ++e) {
      q[e] = (anchor[e] + codec::internal::UnZigZag(q[e])) &
             codec::internal::Mask(bits);
    }
  } else {
    const uint32_t row = before.raw + (delta_group ? 0 : in_group);
    LoadInts<kN>(raw + row * width, unit.raw, planes_of_int, q);
  }
}

// Values of channels [c0, c0 + kN) of token t of plane p, which lie in one
// channel group.
template <int kN>
__device__ inline void DecodeValues(const DecodeChunk& c, const ChunkState& s,
                                    DType dtype, uint32_t origin, uint32_t p,
                                    uint32_t t, uint32_t c0, uint16_t* out) {
  const uint4 plane = c.planes[p];
  const auto mode = static_cast<ScaleMode>(plane.x >> 8);
  uint32_t q[kN];
  DecodeInts<kN>(c, s, origin, p, t, c0, q);
  const uint32_t cg = Div(c0, s.channel_group);
  const uint32_t g = Div(t, s.token_group);
  for (int e = 0; e < kN; ++e) {
    if (mode == ScaleMode::kIdentity) {
      out[e] = static_cast<uint16_t>(q[e]);
    } else {
      const float2 a = c.affines[plane.y + (mode == ScaleMode::kPerChannel
                                                ? c0 + e
                                                : g * s.channel_groups + cg)];
      out[e] = codec::internal::Dequantize({a.x, a.y}, q[e], dtype);
    }
  }
}

// One thread: kVec consecutive channels of one token of plane
// first_plane + blockIdx.y of chunk blockIdx.z.
template <int kVec>
__global__ __launch_bounds__(kReconstructThreads) void ReconstructKernel(
    const DecodeChunk* chunks, const ChunkState* states, const int32_t* status,
    DeviceLayout layout, uint32_t first_plane) {
  const uint32_t i = blockIdx.z, p = first_plane + blockIdx.y;
  if (status[i] != kOk || states[i].transform) return;
  const DecodeChunk& c = chunks[i];
  const uint32_t origin = c.planes[first_plane].z;
  const ChunkState& s = states[i];
  const uint32_t vecs = layout.channels / kVec;
  const uint32_t w = blockIdx.x * kReconstructThreads + threadIdx.x;
  if (w >= s.tokens * vecs) return;
  const uint32_t t = Div(w, vecs);
  const uint32_t c0 = (w - t * vecs) * kVec;
  uint16_t out[kVec];
  if (s.channel_group % kVec == 0) {
    DecodeValues<kVec>(c, s, layout.dtype, origin, p, t, c0, out);
  } else {  // Channel groups that split a vector: one channel at a time.
    for (int e = 0; e < kVec; ++e) {
      DecodeValues<1>(c, s, layout.dtype, origin, p, t, c0 + e, out + e);
    }
  }
  uint16_t* dst = ElementPtr(layout, c.values, c.block_ids, c.first_slot,
                             s.tokens, p, t, c0);
  if (kVec == 8 && (reinterpret_cast<uintptr_t>(dst) & 15) == 0) {
    uint32_t v[4];
    for (int e = 0; e < 4; ++e) {
      v[e] = uint32_t{out[2 * e]} | uint32_t{out[2 * e + 1]} << 16;
    }
    *reinterpret_cast<uint4*>(dst) = make_uint4(v[0], v[1], v[2], v[3]);
  } else {
    for (int e = 0; e < kVec; ++e) dst[e] = out[e];
  }
}

// The (sin, cos) of every (token, pair) of each transform chunk, computed
// once per chunk rather than per key plane.
__global__ void RopeKernel(const DecodeChunk* chunks, const ChunkState* states,
                           const int32_t* status, KernelProfile profile) {
  const uint32_t i = blockIdx.y;
  if (status[i] != kOk || !states[i].transform) return;
  const uint32_t pairs = profile.view.head_dim / 2;
  const uint32_t e = blockIdx.x * blockDim.x + threadIdx.x;
  if (e >= states[i].tokens * pairs) return;
  const uint32_t t = e / pairs, j = e - t * pairs;
  const codec::internal::SinCos a = codec::internal::RopeAngle(
      states[i].first_position + t, profile.view.inv_freq[j]);
  chunks[i].rope[e] = make_float2(a.sin, a.cos);
}

// Tokens per TransformKernel block; each thread keeps one accumulator per
// token, so every basis element it loads serves kTransformTile multiply-adds.
constexpr uint32_t kTransformTile = 32;

// Threads of a TransformKernel block: whole heads, up to 256 channels.
__host__ __device__ inline uint32_t HeadsPerTransformBlock(uint32_t head_dim) {
  return head_dim >= 256 ? 1 : 256 / head_dim;
}

// One block: kTransformTile tokens of HeadsPerTransformBlock heads of plane
// first_plane + blockIdx.y of chunk blockIdx.z; one thread per channel.
__global__ __launch_bounds__(256) void TransformKernel(
    const DecodeChunk* chunks, const ChunkState* states, const int32_t* status,
    DeviceLayout layout, KernelProfile profile, uint32_t head_blocks,
    uint32_t first_plane) {
  const uint32_t i = blockIdx.z, p = first_plane + blockIdx.y;
  if (status[i] != kOk || !states[i].transform) return;
  const DecodeChunk& c = chunks[i];
  const ChunkState& s = states[i];
  const uint32_t t0 = (blockIdx.x / head_blocks) * kTransformTile;
  if (t0 >= s.tokens) return;
  const DeviceProfile::View& v = profile.view;
  const uint32_t dim = v.head_dim;
  const uint32_t hpb = HeadsPerTransformBlock(dim);
  const uint32_t tid = threadIdx.x;
  const uint32_t first_head = (blockIdx.x % head_blocks) * hpb;
  const uint32_t head = first_head + tid / dim;
  const uint32_t d = tid % dim;
  const bool active = head < layout.kv_heads;
  const uint32_t ch = head * dim + d;
  const uint32_t tokens = min(kTransformTile, s.tokens - t0);
  const bool is_value = p % 2 == 1;
  // [thread's channel][token]: a thread reads four tokens of a component
  // with one 16-byte load, broadcast to its head's threads.
  __shared__ float4 coeff[256][kTransformTile / 4];
  __shared__ uint8_t kept[256];
  // The tile's coefficients, eight channels of a token per decode where
  // channel groups allow (a decode's lookups cost far more than its
  // symbols); neighbouring threads take neighbouring tokens, so their
  // shared-memory writes fall in different banks.
  const uint32_t first_channel = first_head * dim;
  const uint32_t channels = min(hpb, layout.kv_heads - first_head) * dim;
  const uint32_t vec = s.channel_group % 8 == 0 && dim % 8 == 0 ? 8 : 1;
  const float2* affines = c.affines + c.planes[p].y + first_channel;
  const uint32_t origin = c.planes[first_plane].z;
  float* tile = reinterpret_cast<float*>(coeff);
  for (uint32_t e = tid; e < kTransformTile * (channels / vec);
       e += blockDim.x) {
    const uint32_t t = e % kTransformTile, c0 = e / kTransformTile * vec;
    uint32_t q[8] = {};
    if (t < tokens) {
      if (vec == 8) {
        DecodeInts<8>(c, s, origin, p, t0 + t, first_channel + c0, q);
      } else {
        DecodeInts<1>(c, s, origin, p, t0 + t, first_channel + c0, q);
      }
    }
    for (uint32_t k = 0; k < vec; ++k) {
      const float2 a = affines[c0 + k];
      tile[(c0 + k) * kTransformTile + t] = codec::internal::AddRn(
          a.x, codec::internal::MulRn(static_cast<float>(q[k]), a.y));
    }
  }
  kept[tid] = active && affines[tid].y != 0.0f;
  __syncthreads();
  // Threads past the last head stay for the barriers below.
  const size_t index = size_t{p} * v.kv_heads + (active ? head : 0);
  const float* basis = v.basis + index * dim * dim + d;
  float acc[kTransformTile];
  const float mean = v.mean[index * dim + d];
  for (uint32_t t = 0; t < kTransformTile; ++t) acc[t] = mean;
  const uint32_t first = tid - d;  // This head's first thread.
  for (uint32_t k = 0; k < dim && active; ++k) {
    if (!kept[first + k]) continue;
    const float b = basis[k * dim];
    for (uint32_t q4 = 0; q4 < kTransformTile / 4; ++q4) {
      const float4 x = coeff[first + k][q4];
      acc[4 * q4] = __fmaf_rn(b, x.x, acc[4 * q4]);
      acc[4 * q4 + 1] = __fmaf_rn(b, x.y, acc[4 * q4 + 1]);
      acc[4 * q4 + 2] = __fmaf_rn(b, x.z, acc[4 * q4 + 2]);
      acc[4 * q4 + 3] = __fmaf_rn(b, x.w, acc[4 * q4 + 3]);
    }
  }
  const bool rope = !is_value && v.rope != 0;
  if (rope) {
    // Each pair's other channel belongs to another thread of the head.
    float* mine = reinterpret_cast<float*>(coeff[tid]);
    __syncthreads();
    for (uint32_t t = 0; t < kTransformTile; ++t) mine[t] = acc[t];
    __syncthreads();
    const bool halves = v.rope == static_cast<uint32_t>(RopeLayout::kHalves);
    const uint32_t j = halves ? d % (dim / 2) : d / 2;
    const bool second = halves ? d >= dim / 2 : d % 2 == 1;
    const uint32_t a_ch = first + codec::internal::RopeFirst(halves, j);
    const uint32_t b_ch = first + codec::internal::RopeSecond(halves, j, dim);
    for (uint32_t t = 0; t < tokens && active; ++t) {
      const float2 sc = c.rope[size_t{t0 + t} * (dim / 2) + j];
      float a = reinterpret_cast<const float*>(coeff[a_ch])[t];
      float b = reinterpret_cast<const float*>(coeff[b_ch])[t];
      codec::internal::RopeApply({sc.x, sc.y}, &a, &b);
      acc[t] = second ? b : a;
    }
  }
  if (!active) return;
  const uint8_t* exact = c.stream + s.exact_off +
                         2 * (size_t{p} * s.exact_tokens * layout.channels);
  for (uint32_t t = 0; t < tokens; ++t) {
    const uint32_t token = t0 + t;
    *ElementPtr(layout, c.values, c.block_ids, c.first_slot, s.tokens, p, token,
                ch) =
        token < s.exact_tokens
            ? LoadU16(exact + 2 * (size_t{token} * layout.channels + ch))
            : codec::internal::RoundCoefficientSum(acc[t], layout.dtype);
  }
}

// Device pointers of a batch's workspace, and the host copies of the
// arrays the kernels read.
struct DecodePlan {
  DecodeChunk* chunks = nullptr;
  ChunkState* states = nullptr;
  CrcJob* crc_jobs = nullptr;
  uint32_t* crc_raw = nullptr;
  uint32_t* block_prefix = nullptr;
  std::vector<DecodeChunk> host_chunks;
  std::vector<CrcJob> host_crc_jobs;
  uint64_t bytes = 0;
  uint64_t max_stream_bytes = 0;
  uint64_t max_work = 0;  // Reconstruct threads per plane, largest chunk.
  uint64_t max_tokens = 0;
  LayerRange layers;  // With count set.
};

absl::Status PlanDecode(const KvLayout& layout,
                        absl::Span<const DecodeJob> jobs, void* workspace,
                        int vec, const DeviceProfile* profile,
                        LayerRange layers, DecodePlan* plan) {
  // Room for RoPE angles when transform streams may need them.
  const uint32_t rope_pairs =
      profile != nullptr && profile->view().rope != 0 ? layout.head_dim / 2 : 0;
  if (absl::Status st = CheckLayout(layout); !st.ok()) return st;
  if (layers.count == 0) {
    layers = LayerRange{0, layout.layers, false, true};
  } else if (layers.first >= layout.layers ||
             layers.count > layout.layers - layers.first) {
    return absl::InvalidArgumentError(absl::StrCat(
        "layers ", layers.first, " to ",
        uint64_t{layers.first} + layers.count - 1, " of ", layout.layers));
  }
  plan->layers = layers;
  if (jobs.empty() || jobs.size() > 65535) {
    return absl::InvalidArgumentError("a batch holds 1 to 65535 chunks");
  }
  const uint32_t n = static_cast<uint32_t>(jobs.size());
  Carver carver(workspace);
  plan->chunks = carver.Take<DecodeChunk>(n);
  plan->states = carver.Take<ChunkState>(n);
  plan->crc_jobs = carver.Take<CrcJob>(n);
  plan->crc_raw = carver.Take<uint32_t>(n);
  plan->block_prefix = carver.Take<uint32_t>(n + 1);
  plan->host_chunks.resize(n);
  plan->host_crc_jobs.resize(n);
  for (uint32_t i = 0; i < n; ++i) {
    const DecodeJob& job = jobs[i];
    if (absl::Status st = CheckChunkRef(layout, job.dest); !st.ok()) {
      return st;
    }
    if (job.stream == nullptr || job.stream_bytes >= (uint64_t{1} << 32)) {
      return absl::InvalidArgumentError(
          absl::StrCat("job ", i, ": no stream, or one of 4 GiB or more"));
    }
    const uint64_t sb = job.stream_bytes;
    const uint64_t values = ChunkValues(layout, job.dest.tokens);
    DecodeChunk& c = plan->host_chunks[i];
    c.stream = job.stream;
    c.stream_bytes = sb;
    c.values = job.dest.values;
    c.block_ids = job.dest.block_ids;
    c.tokens = job.dest.tokens;
    c.first_slot = job.dest.first_slot;
    // Capacities follow from the stream length: every section is inside it.
    c.affine_cap = static_cast<uint32_t>(sb / 4 + 1);
    c.unit_cap = static_cast<uint32_t>(std::min<uint64_t>(
        sb / 2, 2 * uint64_t{layout.layers} * layout.Channels()));
    c.stream_cap = static_cast<uint32_t>(std::min<uint64_t>(
        sb, 8 * uint64_t{layout.layers} * layout.Channels()));
    c.block_cap = static_cast<uint32_t>(sb / 8 + 1);
    c.planes = carver.Take<uint4>(2 * layout.layers);
    c.affines = carver.Take<float2>(c.affine_cap);
    c.units = carver.Take<uint4>(c.unit_cap);
    c.stream_tables = carver.Take<uint32_t>(c.stream_cap);
    c.choice_words = carver.Take<uint32_t>(sb / 4 + 2);
    c.choice_ranks = carver.Take<uint32_t>(sb / 4 + 2);
    c.blocks = carver.Take<uint4>(c.block_cap);
    c.plane_blocks = carver.Take<uint32_t>(2 * layout.layers + 1);
    c.symbols = carver.Take<uint8_t>(2 * values / layout.layers * layers.count);
    c.rope = carver.Take<float2>(uint64_t{job.dest.tokens} * rope_pairs);
    plan->host_crc_jobs[i] = {job.stream,
                              sb >= kChecksumBytes ? sb - kChecksumBytes : 0,
                              plan->crc_raw + i};
    plan->max_stream_bytes = std::max(plan->max_stream_bytes, sb);
    plan->max_tokens = std::max<uint64_t>(plan->max_tokens, job.dest.tokens);
    plan->max_work = std::max<uint64_t>(
        plan->max_work, uint64_t{job.dest.tokens} * layout.Channels() / vec);
  }
  plan->bytes = carver.used();
  return absl::OkStatus();
}

absl::Status RunDecode(const KvLayout& layout, absl::Span<const DecodeJob> jobs,
                       void* workspace, uint64_t workspace_bytes,
                       int32_t* status, cudaStream_t s,
                       const DeviceProfile* profile, LayerRange layers) {
  if (workspace == nullptr ||
      reinterpret_cast<uintptr_t>(workspace) % 256 != 0 || status == nullptr) {
    return absl::InvalidArgumentError(
        "workspace (256-byte aligned) and status are required");
  }
  const int vec = VecFor(layout);
  DecodePlan plan;
  if (absl::Status st =
          PlanDecode(layout, jobs, workspace, vec, profile, layers, &plan);
      !st.ok()) {
    return st;
  }
  const LayerRange& range = plan.layers;
  const PlaneRange planes{2 * range.first, 2 * (range.first + range.count)};
  KernelProfile kernel_profile{};
  if (profile != nullptr) kernel_profile = {profile->view(), 1};
  if (plan.bytes > workspace_bytes) {
    return absl::InvalidArgumentError(absl::StrCat(
        "workspace of ", workspace_bytes, " bytes; ", plan.bytes, " needed"));
  }
  const uint32_t n = static_cast<uint32_t>(jobs.size());
  const DeviceLayout dl = ToDevice(layout);
  if (absl::Status st = CudaStatus(
          StoreItems(plan.host_chunks.data(), n, plan.chunks, s), "upload");
      !st.ok()) {
    return st;
  }
  if (range.verify_checksum) {
    if (absl::Status st = CudaStatus(
            StoreItems(plan.host_crc_jobs.data(), n, plan.crc_jobs, s),
            "upload");
        !st.ok()) {
      return st;
    }
    cudaMemsetAsync(plan.crc_raw, 0, n * sizeof(uint32_t), s);
    LaunchRawCrc(plan.crc_jobs, n, plan.max_stream_bytes, s);
  }
  if (!range.parsed) {
    cudaMemsetAsync(plan.states, 0, n * sizeof(ChunkState), s);
    ParseKernel<<<n, kParseThreads, 0, s>>>(plan.chunks, plan.states, dl,
                                            kernel_profile);
  }
  FinalizeKernel<<<1, kParseThreads, 0, s>>>(
      plan.chunks, plan.states, plan.crc_raw, n, DevicePowerTable(), status,
      plan.block_prefix, planes, range.parsed, range.verify_checksum);
  int per_sm = 0;
  cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, RansKernel,
                                                kRansWarps * kWarp, 0);
  RansKernel<<<std::max(per_sm, 1) * MultiprocessorCount(), kRansWarps * kWarp,
               0, s>>>(plan.chunks, plan.states, plan.block_prefix, n, status,
                       planes.first);
  const dim3 grid(
      static_cast<uint32_t>((plan.max_work + kReconstructThreads - 1) /
                            kReconstructThreads),
      planes.end - planes.first, n);
  if (vec == 8) {
    ReconstructKernel<8><<<grid, kReconstructThreads, 0, s>>>(
        plan.chunks, plan.states, status, dl, planes.first);
  } else {
    ReconstructKernel<1><<<grid, kReconstructThreads, 0, s>>>(
        plan.chunks, plan.states, status, dl, planes.first);
  }
  // A profile of another head size fits no chunk of this layout: each
  // transform chunk has failed with kNeedsProfile already.
  if (profile != nullptr && profile->view().head_dim == layout.head_dim) {
    const uint32_t dim = layout.head_dim;
    // The angles stay in the workspace for the calls that follow.
    if (profile->view().rope != 0 && !range.parsed) {
      const uint64_t angles = plan.max_tokens * (dim / 2);
      RopeKernel<<<dim3(static_cast<uint32_t>((angles + 255) / 256), n), 256, 0,
                   s>>>(plan.chunks, plan.states, status, kernel_profile);
    }
    const uint32_t hpb = HeadsPerTransformBlock(dim);
    const uint32_t head_blocks = (layout.kv_heads + hpb - 1) / hpb;
    const uint32_t tiles = static_cast<uint32_t>(
        (plan.max_tokens + kTransformTile - 1) / kTransformTile);
    TransformKernel<<<dim3(tiles * head_blocks, planes.end - planes.first, n),
                      hpb * dim, 0, s>>>(plan.chunks, plan.states, status, dl,
                                         kernel_profile, head_blocks,
                                         planes.first);
  }
  return CudaStatus(cudaGetLastError(), "decode launch");
}

uint64_t DecodeBytes(const KvLayout& layout, absl::Span<const DecodeJob> jobs,
                     const DeviceProfile* profile, LayerRange layers) {
  DecodePlan plan;
  if (!PlanDecode(layout, jobs, nullptr, VecFor(layout), profile, layers, &plan)
           .ok()) {
    return 0;
  }
  return plan.bytes;
}

}  // namespace
}  // namespace internal

uint64_t DecodeWorkspaceBytes(const KvLayout& layout,
                              absl::Span<const DecodeJob> jobs,
                              const DeviceProfile* profile, LayerRange layers) {
  return internal::DecodeBytes(layout, jobs, profile, layers);
}

absl::Status DecodeBatch(const KvLayout& layout,
                         absl::Span<const DecodeJob> jobs, void* workspace,
                         uint64_t workspace_bytes, int32_t* status,
                         Stream stream, const DeviceProfile* profile,
                         LayerRange layers) {
  return internal::RunDecode(layout, jobs, workspace, workspace_bytes, status,
                             stream, profile, layers);
}

}  // namespace kvcache::codec::gpu
