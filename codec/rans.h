// Interleaved rANS entropy coder over a byte alphabet, laid out so a GPU warp
// can decode one block: up to 32 lanes share one 16-bit word stream, lane i
// of L codes symbols i, i + L, i + 2L, ... of the block. See FORMAT.md,
// "Blocks".
//
// State is 32 bits, kept in [2^16, 2^32); renormalisation moves one 16-bit
// word at a time, so each symbol reads or writes at most one word and the
// decoder needs no inner loop. Probabilities are scaled to 2^12.
//
// Tables are normalised with integer arithmetic and a fixed tie order, so any
// encoder (CPU or GPU) given the same histogram produces the same bytes.
//
// Thread-safety: Encoder and Decoder are immutable after construction and may
// be shared across threads.
#ifndef KVCACHE_CODEC_RANS_H_
#define KVCACHE_CODEC_RANS_H_

#include <array>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/string_view.h"
#include "absl/types/span.h"
#include "codec/byte_io.h"
#include "codec/rans_math.h"

namespace kvcache::codec::rans {

using Histogram = std::array<uint32_t, 256>;
// Normalised frequencies: all zero (empty stream) or summing to kProbScale.
using Frequencies = std::array<uint16_t, 256>;

// Scales `counts` so the result sums to kProbScale and every present symbol
// keeps frequency >= 1. Returns all zeros when `counts` is all zero.
inline Frequencies Normalize(const Histogram& counts) {
  Frequencies freqs;
  Normalize(counts.data(), freqs.data());
  return freqs;
}

// A stream's table: how its blocks are coded and, unless they are stored,
// the frequencies of its symbols.
struct Table {
  TableKind kind = TableKind::kEmpty;
  Frequencies freqs{};

  bool stored() const { return kind == TableKind::kStored; }
};

// Picks the cheapest table kind for `counts` (symbols < `alphabet`, a power
// of two), appends its encoding to `out` and returns it.
Table WriteTable(const Histogram& counts, uint32_t alphabet, std::string* out);

// Parses one table. Fails if it is malformed, if its frequencies do not sum
// to kProbScale, if it gives probability to a symbol >= `alphabet` (a power
// of two, at most 256), or if it stores symbols that are not bytes.
absl::Status ReadTable(internal::ByteReader* in, uint32_t alphabet,
                       Table* table);

class Encoder {
 public:
  // `freqs` must be non-empty (sum to kProbScale).
  explicit Encoder(const Frequencies& freqs);

  // Appends one block coding syms[0, n) to `out`. Every symbol must have a
  // nonzero frequency.
  void EncodeBlock(const uint8_t* syms, size_t n, std::string* out) const;

 private:
  struct Sym {
    uint64_t reciprocal;  // ceil(2^64 / freq) for freq > 1; unused for 1.
    uint32_t freq;
    uint32_t start;
  };
  std::array<Sym, 256> syms_;
};

struct BlockJob;

class Decoder {
 public:
  Decoder() = default;
  // `freqs` must be non-empty (sum to kProbScale).
  explicit Decoder(const Frequencies& freqs) : Decoder() { Reset(freqs); }

  // Switches to another table, reusing the lookup buffer (the first call
  // allocates it).
  void Reset(const Frequencies& freqs);

  // Decodes exactly n symbols from `block` into out[0, n). Fails, without
  // reading outside `block`, unless the block is well formed and ends with
  // every lane back at the encoder's initial state, all words consumed.
  absl::Status DecodeBlock(absl::string_view block, uint8_t* out,
                           size_t n) const;

 private:
  friend absl::Status DecodeBlocks(absl::Span<const BlockJob> jobs);

  // Indexed by state & (kProbScale - 1): symbol in bits 0-7, freq - 1 in
  // bits 8-19, slot - start in bits 20-31. One load per decoded symbol.
  // Every entry is written by Reset (frequencies sum to kProbScale), so it
  // is never zero-filled.
  std::unique_ptr<uint32_t[]> lut_;
};

// One block to decode: n symbols from `block` into out[0, n), with
// `decoder`'s table.
struct BlockJob {
  const Decoder* decoder;
  absl::string_view block;
  uint8_t* out;
  size_t n;
};

// Decodes every job as Decoder::DecodeBlock would, two blocks at a time so
// that one block's dependent loads overlap the other's; returns the first
// error. Cheaper than one call per block whenever there are several.
absl::Status DecodeBlocks(absl::Span<const BlockJob> jobs);

}  // namespace kvcache::codec::rans

#endif  // KVCACHE_CODEC_RANS_H_
