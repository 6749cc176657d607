#include "codec/cachegen_ref.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "codec/byte_io.h"
#include "codec/crc32c.h"
#include "codec/quant_math.h"
#include "codec/rans.h"

namespace kvcache::codec {
namespace {

using internal::ByteReader;
using internal::ByteWriter;
using internal::FromFloat;
using internal::ToFloat;

// Stream layout, every integer little-endian:
//   header (kHeaderBytes):
//     "CGRF", u8 version, u8 dtype, u16 group_tokens,
//     u32 layers, u32 tokens, u32 kv_heads, u32 head_dim,
//     u16 anchor_bins, u16 delta_bins[3], u64 tables_bytes (two u32, low
//     first)
//   scales: u16 per (layer, K/V, token), in the chunk's dtype: the token's
//     anchor scale if it is an anchor, its delta scale otherwise
//   tables (tables_bytes): per (layer, K/V, channel), the anchor stream's
//     table then the delta stream's (rans::WriteTable)
//   payload: per stream in the same order: nothing for an empty or
//     single-symbol table, the symbols as bytes for a stored table, else a
//     varint byte count and one rANS block
//   CRC32C of everything before it (u32)
// A stream's symbols are its channel's integers plus C, in token order.
constexpr char kMagic[4] = {'C', 'G', 'R', 'F'};
constexpr uint8_t kVersion = 1;
constexpr size_t kHeaderBytes = 40;
constexpr size_t kCrcBytes = 4;

// rANS blocks decoded per rans::DecodeBlocks call; each holds a decoder
// whose lookup table is 16 KiB.
constexpr size_t kDecodeBatch = 64;

bool ValidBins(uint32_t bins) {
  return bins >= 4 && bins <= 256 && bins % 2 == 0;
}

bool ValidConfig(const CacheGenConfig& c) {
  return c.group_tokens >= 1 && c.group_tokens <= 0xFFFF &&
         ValidBins(c.anchor_bins) &&
         std::all_of(c.delta_bins.begin(), c.delta_bins.end(), ValidBins);
}

// Largest integer magnitude with `bins` bins (CacheGen's "bins // 2 - 1").
int MaxLevel(uint32_t bins) { return static_cast<int>(bins / 2 - 1); }

// Smallest power of two holding the 2C + 1 symbols of `bins`.
uint32_t Alphabet(uint32_t bins) {
  uint32_t a = 1;
  while (a < bins - 1) a <<= 1;
  return a;
}

// Layer l is in third 3l / layers.
uint32_t DeltaBins(const CacheGenConfig& c, uint32_t layer, uint32_t layers) {
  return c.delta_bins[uint64_t{layer} * 3 / layers];
}

uint16_t MaxFinite(DType dtype) {
  return dtype == DType::kFloat16 ? 0x7BFF : 0x7F7F;
}

// The stored scale for a vector whose largest magnitude is `peak` (>= 0):
// the dtype's nearest value at or above it, so no element clips, capped at
// the largest finite value. Two bytes per token, where CacheGen's released
// encoder keeps fp32 maxima.
uint16_t ScaleBits(float peak, DType dtype) {
  const uint16_t max_finite = MaxFinite(dtype);
  if (!(peak < ToFloat(max_finite, dtype))) return max_finite;
  uint16_t bits = FromFloat(peak, dtype);
  if (ToFloat(bits, dtype) < peak) ++bits;  // Next value up; peak >= 0.
  return bits;
}

float Peak(const float* x, size_t n) {
  float peak = 0;
  for (size_t i = 0; i < n; ++i) peak = std::max(peak, std::fabs(x[i]));
  return peak;
}

// Quantizes x[0, n) to symbols q + c, q = round(x / step) in [-c, c], and
// writes each reconstruction q * step to recon (when not null). Symbols go
// to sym[0], sym[stride], ... (the channel-major stream buffers).
void QuantizeVector(const float* x, size_t n, float step, int c, uint8_t* sym,
                    size_t stride, float* recon) {
  const float inv = step > 0 ? 1.0f / step : 0.0f;
  const float limit = static_cast<float>(c);
  for (size_t i = 0; i < n; ++i) {
    float q = std::round(x[i] * inv);
    q = q > limit ? limit : q < -limit ? -limit : q;
    if (q != q) q = 0;  // NaN input.
    sym[i * stride] = static_cast<uint8_t>(static_cast<int>(q) + c);
    if (recon != nullptr) recon[i] = q * step;
  }
}

// Appends one stream's table to `tables` and its coded symbols to `payload`.
void WriteStream(const uint8_t* syms, size_t n, uint32_t alphabet,
                 std::string* tables, std::string* payload,
                 std::string* scratch) {
  rans::Histogram counts{};
  for (size_t i = 0; i < n; ++i) ++counts[syms[i]];
  const rans::Table table = rans::WriteTable(counts, alphabet, tables);
  switch (table.kind) {
    case rans::TableKind::kEmpty:
    case rans::TableKind::kSingle:
      return;  // The table says it all.
    case rans::TableKind::kStored:
      payload->append(reinterpret_cast<const char*>(syms), n);
      return;
    case rans::TableKind::kUniform:
    case rans::TableKind::kExplicit:
      break;
  }
  scratch->clear();
  rans::Encoder(table.freqs).EncodeBlock(syms, n, scratch);
  ByteWriter(payload).Varint(static_cast<uint32_t>(scratch->size()));
  payload->append(*scratch);
}

struct Layout {
  ChunkShape shape;
  CacheGenConfig config;
  absl::string_view scales;
  absl::string_view tables;
  absl::string_view payload;
};

absl::StatusOr<Layout> ParseStream(absl::string_view stream) {
  if (stream.size() < kHeaderBytes + kCrcBytes) {
    return absl::DataLossError("CacheGen stream too short");
  }
  ByteReader in(stream);
  absl::string_view magic;
  uint8_t version = 0, dtype = 0;
  uint16_t group_tokens = 0, anchor_bins = 0, delta_bins[3] = {};
  uint32_t tables_lo = 0, tables_hi = 0;
  Layout l;
  // The size check above covers every fixed field, so these reads succeed.
  in.Bytes(4, &magic);
  in.U8(&version);
  in.U8(&dtype);
  in.U16(&group_tokens);
  in.U32(&l.shape.layers);
  in.U32(&l.shape.tokens);
  in.U32(&l.shape.kv_heads);
  in.U32(&l.shape.head_dim);
  in.U16(&anchor_bins);
  for (uint16_t& b : delta_bins) in.U16(&b);
  in.U32(&tables_lo);
  in.U32(&tables_hi);
  if (magic != absl::string_view(kMagic, 4) || version != kVersion) {
    return absl::DataLossError("not a CacheGen stream");
  }
  if (dtype > static_cast<uint8_t>(DType::kBFloat16)) {
    return absl::DataLossError("bad dtype");
  }
  l.shape.dtype = static_cast<DType>(dtype);
  l.config.group_tokens = group_tokens;
  l.config.anchor_bins = anchor_bins;
  for (int i = 0; i < 3; ++i) l.config.delta_bins[i] = delta_bins[i];
  if (!ShapeWithinLimits(l.shape) || !ValidConfig(l.config)) {
    return absl::DataLossError("bad CacheGen header");
  }
  const uint64_t scales_bytes = 2 * uint64_t{l.shape.layers} * 2 *
                                l.shape.tokens;  // < 2^39: no overflow.
  const uint64_t tables_bytes = uint64_t{tables_hi} << 32 | tables_lo;
  const uint64_t body = stream.size() - kCrcBytes - kHeaderBytes;
  if (scales_bytes > body || tables_bytes > body - scales_bytes) {
    return absl::DataLossError("CacheGen stream truncated");
  }
  const uint32_t crc =
      internal::LoadU32(reinterpret_cast<const uint8_t*>(stream.data()) +
                        stream.size() - kCrcBytes);
  if (Crc32c(stream.substr(0, stream.size() - kCrcBytes)) != crc) {
    return absl::DataLossError("CacheGen stream checksum mismatch");
  }
  l.scales = stream.substr(kHeaderBytes, scales_bytes);
  l.tables = stream.substr(kHeaderBytes + scales_bytes, tables_bytes);
  l.payload = stream.substr(kHeaderBytes + scales_bytes + tables_bytes,
                            body - scales_bytes - tables_bytes);
  return l;
}

// Reads the streams of one plane and decodes their rANS blocks, a batch at
// a time, so that one batch of decoders (and their lookup tables) serves
// every plane.
class PlaneReader {
 public:
  PlaneReader(absl::string_view tables, absl::string_view payload)
      : tables_(tables), payload_(payload) {}

  // Reads one stream of n symbols into out[0, n); rANS blocks are decoded by
  // the time Flush returns.
  absl::Status Read(uint32_t alphabet, size_t n, uint8_t* out) {
    rans::Table table;
    if (absl::Status st = rans::ReadTable(&tables_, alphabet, &table);
        !st.ok()) {
      return st;
    }
    if ((table.kind == rans::TableKind::kEmpty) != (n == 0)) {
      return absl::DataLossError("table does not match stream size");
    }
    switch (table.kind) {
      case rans::TableKind::kEmpty:
        return absl::OkStatus();
      case rans::TableKind::kSingle: {
        const auto it = std::find(table.freqs.begin(), table.freqs.end(),
                                  static_cast<uint16_t>(rans::kProbScale));
        std::fill(out, out + n, static_cast<uint8_t>(it - table.freqs.begin()));
        return absl::OkStatus();
      }
      case rans::TableKind::kStored: {
        absl::string_view bytes;
        if (!payload_.Bytes(n, &bytes)) {
          return absl::DataLossError("stored stream truncated");
        }
        std::memcpy(out, bytes.data(), n);
        return absl::OkStatus();
      }
      case rans::TableKind::kUniform:
      case rans::TableKind::kExplicit:
        break;
    }
    uint32_t size;
    absl::string_view block;
    if (!payload_.Varint(&size) || !payload_.Bytes(size, &block)) {
      return absl::DataLossError("rANS block truncated");
    }
    if (jobs_.size() == kDecodeBatch) {
      if (absl::Status st = Flush(); !st.ok()) return st;
    }
    rans::Decoder& decoder = decoders_[jobs_.size()];
    decoder.Reset(table.freqs);
    jobs_.push_back({&decoder, block, out, n});
    return absl::OkStatus();
  }

  absl::Status Flush() {
    const absl::Status st = rans::DecodeBlocks(jobs_);
    jobs_.clear();
    return st;
  }

  // Whether every table and payload byte was read.
  bool AtEnd() const {
    return tables_.remaining() == 0 && payload_.remaining() == 0;
  }

 private:
  ByteReader tables_;
  ByteReader payload_;
  rans::Decoder decoders_[kDecodeBatch];
  std::vector<rans::BlockJob> jobs_;
};

}  // namespace

std::vector<CacheGenConfig> CacheGenSettings() {
  // Anchors keep 256 bins (8 bits) in every layer: the paper quantizes them
  // more finely than deltas, and their bin count barely moves the result (64
  // bins instead of 256 makes SmolLM2-135M streams 2% smaller). Values use
  // the same thirds as keys, where CacheGen's shipped configuration gives
  // values the finer bins in fewer layers: this errs towards accuracy.
  return {
      {10, 256, {64, 32, 32}},
      {10, 256, {32, 16, 16}},
      {10, 256, {16, 8, 8}},
      {10, 256, {8, 4, 4}},
  };
}

std::string CacheGenSettingName(const CacheGenConfig& config) {
  std::string name =
      absl::StrCat("bins ", config.delta_bins[0], "/", config.delta_bins[1],
                   "/", config.delta_bins[2]);
  if (config.anchor_bins != 256) {
    absl::StrAppend(&name, ", anchors ", config.anchor_bins);
  }
  if (config.group_tokens != 10) {
    absl::StrAppend(&name, ", groups of ", config.group_tokens);
  }
  return name;
}

absl::StatusOr<std::string> CacheGenEncode(const ChunkShape& shape,
                                           absl::Span<const uint16_t> values,
                                           const CacheGenConfig& config) {
  if (!ShapeWithinLimits(shape) || values.size() != shape.NumValues()) {
    return absl::InvalidArgumentError("shape does not match values");
  }
  if (!ValidConfig(config)) {
    return absl::InvalidArgumentError("CacheGen config out of range");
  }
  const uint32_t tokens = shape.tokens;
  const size_t row = size_t{shape.kv_heads} * shape.head_dim;
  const uint32_t g = config.group_tokens;
  const size_t anchors = (tokens + g - 1) / g;
  const size_t deltas = tokens - anchors;
  const int anchor_max = MaxLevel(config.anchor_bins);
  const uint32_t anchor_alphabet = Alphabet(config.anchor_bins);

  std::string scales, tables, payload, scratch;
  scales.reserve(2 * size_t{shape.layers} * 2 * tokens);
  ByteWriter scale_out(&scales);
  std::vector<float> x(row), anchor(row), delta(row);
  std::vector<uint8_t> anchor_syms(row * anchors), delta_syms(row * deltas);
  for (uint32_t layer = 0; layer < shape.layers; ++layer) {
    const uint32_t delta_bins = DeltaBins(config, layer, shape.layers);
    const int delta_max = MaxLevel(delta_bins);
    for (int kv = 0; kv < 2; ++kv) {
      const uint16_t* plane =
          values.data() + (size_t{layer} * 2 + kv) * tokens * row;
      for (size_t group = 0; group < anchors; ++group) {
        const uint32_t t0 = static_cast<uint32_t>(group * g);
        const uint32_t t1 = std::min(tokens, t0 + g);
        for (size_t c = 0; c < row; ++c) {
          x[c] = ToFloat(plane[size_t{t0} * row + c], shape.dtype);
        }
        uint16_t s = ScaleBits(Peak(x.data(), row), shape.dtype);
        scale_out.U16(s);
        QuantizeVector(x.data(), row, ToFloat(s, shape.dtype) / anchor_max,
                       anchor_max, anchor_syms.data() + group, anchors,
                       anchor.data());
        for (uint32_t t = t0 + 1; t < t1; ++t) {
          // Deltas are taken from the anchor as the decoder will see it, so
          // the anchor's quantization error does not carry into its group.
          // The paper does not say which anchor it subtracts; this is the
          // more accurate choice.
          for (size_t c = 0; c < row; ++c) {
            delta[c] =
                ToFloat(plane[size_t{t} * row + c], shape.dtype) - anchor[c];
          }
          s = ScaleBits(Peak(delta.data(), row), shape.dtype);
          scale_out.U16(s);
          QuantizeVector(delta.data(), row, ToFloat(s, shape.dtype) / delta_max,
                         delta_max, delta_syms.data() + (t - 1 - group), deltas,
                         nullptr);
        }
      }
      for (size_t c = 0; c < row; ++c) {
        WriteStream(anchor_syms.data() + c * anchors, anchors, anchor_alphabet,
                    &tables, &payload, &scratch);
        WriteStream(delta_syms.data() + c * deltas, deltas,
                    Alphabet(delta_bins), &tables, &payload, &scratch);
      }
    }
  }

  std::string out;
  out.reserve(kHeaderBytes + scales.size() + tables.size() + payload.size() +
              kCrcBytes);
  ByteWriter w(&out);
  w.Bytes(absl::string_view(kMagic, 4));
  w.U8(kVersion);
  w.U8(static_cast<uint8_t>(shape.dtype));
  w.U16(static_cast<uint16_t>(g));
  w.U32(shape.layers);
  w.U32(shape.tokens);
  w.U32(shape.kv_heads);
  w.U32(shape.head_dim);
  w.U16(static_cast<uint16_t>(config.anchor_bins));
  for (uint32_t b : config.delta_bins) w.U16(static_cast<uint16_t>(b));
  w.U32(static_cast<uint32_t>(tables.size()));
  w.U32(static_cast<uint32_t>(uint64_t{tables.size()} >> 32));
  w.Bytes(scales);
  w.Bytes(tables);
  w.Bytes(payload);
  w.U32(Crc32c(out));
  return out;
}

absl::StatusOr<ChunkShape> CacheGenPeekShape(absl::string_view stream) {
  absl::StatusOr<Layout> l = ParseStream(stream);
  if (!l.ok()) return l.status();
  return l->shape;
}

absl::Status CacheGenDecode(absl::string_view stream,
                            absl::Span<uint16_t> out) {
  absl::StatusOr<Layout> parsed = ParseStream(stream);
  if (!parsed.ok()) return parsed.status();
  const Layout& l = *parsed;
  const ChunkShape& shape = l.shape;
  if (out.size() != shape.NumValues()) {
    return absl::InvalidArgumentError(absl::StrCat("output holds ", out.size(),
                                                   " values, stream has ",
                                                   shape.NumValues()));
  }
  const uint32_t tokens = shape.tokens;
  const size_t row = size_t{shape.kv_heads} * shape.head_dim;
  const uint32_t g = l.config.group_tokens;
  const size_t anchors = (tokens + g - 1) / g;
  const size_t deltas = tokens - anchors;
  const int anchor_max = MaxLevel(l.config.anchor_bins);
  const uint32_t anchor_alphabet = Alphabet(l.config.anchor_bins);
  const uint16_t max_finite = MaxFinite(shape.dtype);

  PlaneReader reader(l.tables, l.payload);
  ByteReader scales(l.scales);
  std::vector<float> anchor(row);
  std::vector<uint8_t> anchor_syms(row * anchors), delta_syms(row * deltas);
  for (uint32_t layer = 0; layer < shape.layers; ++layer) {
    const uint32_t delta_bins = DeltaBins(l.config, layer, shape.layers);
    const int delta_max = MaxLevel(delta_bins);
    for (int kv = 0; kv < 2; ++kv) {
      for (size_t c = 0; c < row; ++c) {
        if (absl::Status st = reader.Read(anchor_alphabet, anchors,
                                          anchor_syms.data() + c * anchors);
            !st.ok()) {
          return st;
        }
        if (absl::Status st = reader.Read(Alphabet(delta_bins), deltas,
                                          delta_syms.data() + c * deltas);
            !st.ok()) {
          return st;
        }
      }
      if (absl::Status st = reader.Flush(); !st.ok()) return st;
      uint16_t* plane = out.data() + (size_t{layer} * 2 + kv) * tokens * row;
      for (size_t group = 0; group < anchors; ++group) {
        const uint32_t t0 = static_cast<uint32_t>(group * g);
        const uint32_t t1 = std::min(tokens, t0 + g);
        for (uint32_t t = t0; t < t1; ++t) {
          uint16_t s = 0;
          // ParseStream sized the section at one scale per token.
          scales.U16(&s);
          if ((s & 0x7FFF) > max_finite || (s & 0x8000) != 0) {
            return absl::DataLossError("bad CacheGen scale");
          }
          uint16_t* dst = plane + size_t{t} * row;
          if (t == t0) {
            const float step = ToFloat(s, shape.dtype) / anchor_max;
            for (size_t c = 0; c < row; ++c) {
              anchor[c] = static_cast<float>(anchor_syms[c * anchors + group] -
                                             anchor_max) *
                          step;
              dst[c] = FromFloat(anchor[c], shape.dtype);
            }
          } else {
            const float step = ToFloat(s, shape.dtype) / delta_max;
            const uint8_t* sym = delta_syms.data() + (t - 1 - group);
            for (size_t c = 0; c < row; ++c) {
              const float d =
                  static_cast<float>(sym[c * deltas] - delta_max) * step;
              dst[c] = FromFloat(anchor[c] + d, shape.dtype);
            }
          }
        }
      }
    }
  }
  if (!reader.AtEnd()) {
    return absl::DataLossError("CacheGen stream has trailing bytes");
  }
  return absl::OkStatus();
}

}  // namespace kvcache::codec
