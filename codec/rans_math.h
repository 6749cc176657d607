// The integer arithmetic of the entropy coder that CPU and CUDA code share:
// constants, cost estimates, table normalisation and serialisation, varints
// and the rANS state updates. Everything here is deterministic integer math,
// so any encoder given the same histogram writes the same bytes.
#ifndef KVCACHE_CODEC_RANS_MATH_H_
#define KVCACHE_CODEC_RANS_MATH_H_

#include <cstdint>

#include "codec/hd.h"

namespace kvcache::codec::rans {

inline constexpr int kProbBits = 12;
inline constexpr uint32_t kProbScale = 1u << kProbBits;
inline constexpr int kLanes = 32;  // Most lanes a block uses.
inline constexpr uint32_t kStateLow = 1u << 16;
// Short blocks use fewer lanes, so the 4-byte final state each lane stores
// never costs more than 4 bytes per kSymbolsPerLane symbols.
inline constexpr uint64_t kSymbolsPerLane = 512;
// Longest LEB128 varint a table may hold (32-bit values).
inline constexpr int kMaxVarintBytes = 5;

// Table kinds on the wire (FORMAT.md, "Frequency tables").
enum class TableKind : uint8_t {
  kEmpty = 0,
  kSingle = 1,
  kUniform = 2,  // Every symbol of the stream's alphabet equally likely.
  kExplicit = 3,
  // Byte symbols kept as they are: each block holds its symbols verbatim,
  // no lane states, no rANS (format version 2).
  kStored = 4,
};

// Lanes of a block of n symbols: clamp(n / kSymbolsPerLane, 1, kLanes).
KVCACHE_HD inline int LanesFor(uint64_t n) {
  const uint64_t lanes = n / kSymbolsPerLane;
  return lanes < 1 ? 1 : lanes > kLanes ? kLanes : static_cast<int>(lanes);
}

// Returns 256 * log2(x) rounded down, for x >= 1, using integer arithmetic
// only (so cost estimates, and the decisions they drive, are reproducible).
KVCACHE_HD inline uint32_t Log2Fixed8(uint32_t x) {
#if defined(__CUDA_ARCH__)
  const int whole = 31 - __clz(x);
#else
  const int whole = 31 - __builtin_clz(x);
#endif
  // Mantissa in Q1.31; squaring it doubles the log, so each square that
  // crosses 2.0 yields one more fractional bit.
  uint64_t m = uint64_t{x} << (31 - whole);
  uint32_t frac = 0;
  for (int i = 0; i < 8; ++i) {
    m = (m * m) >> 31;
    frac <<= 1;
    if (m >= (uint64_t{1} << 32)) {
      m >>= 1;
      frac |= 1;
    }
  }
  return static_cast<uint32_t>(whole) << 8 | frac;
}

// Cost in 1/256 bits of one symbol coded with frequency f >= 1.
KVCACHE_HD inline uint32_t SymbolCost(uint32_t f) {
  return (kProbBits << 8) - Log2Fixed8(f);
}

// Returns the cost of coding counts[0, 256) with freqs[0, 256), in 1/256
// bits. Every symbol with a nonzero count must have a nonzero frequency.
KVCACHE_HD inline uint64_t CodedCost(const uint32_t* counts,
                                     const uint16_t* freqs) {
  uint64_t cost = 0;
  for (int s = 0; s < 256; ++s) {
    if (counts[s] == 0) continue;
    cost += uint64_t{counts[s]} * SymbolCost(freqs[s]);
  }
  return cost;
}

// Normalize's last step when raising rare symbols to 1 overshot kProbScale
// (freqs sum to `sum`): takes units back from the largest frequencies first,
// in a fixed (freq desc, symbol asc) order. Symbols at 1 never give units,
// so only the others are ordered (insertion sort: the order is total, so any
// sort gives the same one).
KVCACHE_HD inline void GiveBackOvershoot(uint32_t sum, uint16_t* freqs) {
  uint8_t order[256];
  int n = 0;
  for (int s = 0; s < 256; ++s) {
    if (freqs[s] <= 1) continue;
    int i = n++;
    for (; i > 0 && freqs[order[i - 1]] < freqs[s]; --i)
      order[i] = order[i - 1];
    order[i] = static_cast<uint8_t>(s);
  }
  while (sum > kProbScale) {
    for (int i = 0; i < n && sum > kProbScale; ++i) {
      if (freqs[order[i]] > 1) {
        --freqs[order[i]];
        --sum;
      }
    }
  }
}

// Scales counts[0, 256) into freqs[0, 256) so the result sums to kProbScale
// and every present symbol keeps frequency >= 1; all zeros when counts are.
KVCACHE_HD inline void Normalize(const uint32_t* counts, uint16_t* freqs) {
  uint64_t total = 0;
  for (int s = 0; s < 256; ++s) {
    total += counts[s];
    freqs[s] = 0;
  }
  if (total == 0) return;
  uint32_t sum = 0;
  int most = 0;
  for (int s = 0; s < 256; ++s) {
    if (counts[s] == 0) continue;
    const uint64_t f = uint64_t{counts[s]} * kProbScale / total;
    freqs[s] = static_cast<uint16_t>(f > 1 ? f : 1);
    sum += freqs[s];
    if (counts[s] > counts[most]) most = s;
  }
  if (sum <= kProbScale) {
    // Flooring lost less than one unit per symbol; the most frequent symbol
    // absorbs it at the least relative distortion.
    freqs[most] += static_cast<uint16_t>(kProbScale - sum);
    return;
  }
  GiveBackOvershoot(sum, freqs);
}

KVCACHE_HD inline uint32_t VarintSize(uint32_t v) {
  uint32_t n = 1;
  while (v >= 0x80) {
    v >>= 7;
    ++n;
  }
  return n;
}

// Reads a LEB128 varint from p[0, avail). Returns the bytes it took, or 0 if
// it is truncated, longer than kMaxVarintBytes or overflows 32 bits.
KVCACHE_HD inline int ReadVarint(const uint8_t* p, uint64_t avail,
                                 uint32_t* v) {
  uint32_t result = 0;
  for (int i = 0; i < kMaxVarintBytes; ++i) {
    if (static_cast<uint64_t>(i) >= avail) return 0;
    const uint8_t b = p[i];
    if (i == kMaxVarintBytes - 1 && b > 0x0F) return 0;
    result |= uint32_t{b & 0x7Fu} << (7 * i);
    if (!(b & 0x80)) {
      *v = result;
      return i + 1;
    }
  }
  return 0;
}

// The kind of table for symbols at uniform odds. Over bytes, rANS would
// spend exactly 8 bits a symbol plus the lane states: storing the bytes is
// smaller and decodes as a copy.
KVCACHE_HD inline TableKind UniformKind(uint32_t alphabet) {
  return alphabet == 256 ? TableKind::kStored : TableKind::kUniform;
}

// A table as the encoder stores it: kind, explicit symbol range and size.
struct TableChoice {
  TableKind kind = TableKind::kEmpty;
  uint8_t first = 0;
  uint8_t last = 0;
  uint32_t bytes = 1;  // Serialised size.
};

// Picks the cheapest table kind for counts[0, 256) (symbols < `alphabet`, a
// power of two) and sets freqs[0, 256) to the frequencies the symbols must
// be coded with.
KVCACHE_HD inline TableChoice ChooseTable(const uint32_t* counts,
                                          uint32_t alphabet, uint16_t* freqs) {
  Normalize(counts, freqs);
  TableChoice t;
  int first = 256, last = -1;
  uint64_t total = 0;
  for (int s = 0; s < 256; ++s) {
    total += counts[s];
    if (freqs[s] == 0) continue;
    if (first == 256) first = s;
    last = s;
  }
  if (last < 0) return t;
  t.first = static_cast<uint8_t>(first);
  t.last = static_cast<uint8_t>(last);
  if (first == last) {
    t.kind = TableKind::kSingle;
    t.bytes = 2;
    return t;
  }
  uint32_t explicit_bytes = 3;
  for (int s = first; s <= last; ++s) explicit_bytes += VarintSize(freqs[s]);
  const uint32_t uniform = kProbScale / alphabet;
  const uint64_t explicit_cost =
      CodedCost(counts, freqs) + (uint64_t{explicit_bytes} << 11);
  const uint64_t uniform_cost = total * SymbolCost(uniform) + (1 << 11);
  if (uniform_cost < explicit_cost) {
    for (uint32_t s = 0; s < 256; ++s) {
      freqs[s] = static_cast<uint16_t>(s < alphabet ? uniform : 0);
    }
    t.kind = UniformKind(alphabet);
    t.bytes = 1;
    return t;
  }
  t.kind = TableKind::kExplicit;
  t.bytes = explicit_bytes;
  return t;
}

// Writes the t.bytes bytes of table t (freqs as ChooseTable set them).
KVCACHE_HD inline void WriteTableBytes(const TableChoice& t,
                                       const uint16_t* freqs, uint8_t* out) {
  *out++ = static_cast<uint8_t>(t.kind);
  if (t.kind == TableKind::kSingle) *out = t.first;
  if (t.kind != TableKind::kExplicit) return;
  *out++ = t.first;
  *out++ = t.last;
  for (int s = t.first; s <= t.last; ++s) {
    uint32_t v = freqs[s];
    while (v >= 0x80) {
      *out++ = static_cast<uint8_t>(v | 0x80);
      v >>= 7;
    }
    *out++ = static_cast<uint8_t>(v);
  }
}

// Decoder: the state after taking the symbol of frequency `freq` whose
// cumulative range holds slot x mod M at `slot_offset` past its start,
// before renormalisation.
KVCACHE_HD inline uint32_t DecodeAdvance(uint32_t x, uint32_t freq,
                                         uint32_t slot_offset) {
  return freq * (x >> kProbBits) + slot_offset;
}

// Encoder: whether state x must emit its low 16 bits before coding a symbol
// of frequency `freq`.
KVCACHE_HD inline bool EncodeEmits(uint32_t x, uint32_t freq) {
  return uint64_t{x} >= uint64_t{freq} << (32 - kProbBits);
}

// Encoder: the state after coding a symbol (freq, start) into x, given
// q = x / freq.
KVCACHE_HD inline uint32_t EncodeAdvance(uint32_t x, uint32_t q, uint32_t freq,
                                         uint32_t start) {
  return x + start + q * (kProbScale - freq);
}

}  // namespace kvcache::codec::rans

#endif  // KVCACHE_CODEC_RANS_MATH_H_
