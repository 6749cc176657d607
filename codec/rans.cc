#include "codec/rans.h"

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cstring>

#include "absl/strings/str_cat.h"

namespace kvcache::codec::rans {
namespace {

using internal::ByteReader;
using internal::LoadU16;
using internal::LoadU32;

// Every symbol of a power-of-two alphabet equally likely.
Frequencies Uniform(uint32_t alphabet) {
  Frequencies f{};
  std::fill(f.begin(), f.begin() + alphabet,
            static_cast<uint16_t>(kProbScale / alphabet));
  return f;
}

// Writes the symbol of state x to *out and returns the state after it,
// before any refill. lut entries are laid out as in Decoder::lut_.
inline uint32_t TakeSymbol(const uint32_t* lut, uint32_t x, uint8_t* out) {
  const uint32_t e = lut[x & (kProbScale - 1)];
  *out = static_cast<uint8_t>(e);
  return DecodeAdvance(x, (e >> 8 & 0xFFF) + 1, e >> 20);
}

// One symbol of one lane: returns the lane's next state, advancing *p past
// the word it took, if any. The caller guarantees a word is there.
inline uint32_t DecodeSymbol(const uint32_t* lut, uint32_t x, const uint8_t** p,
                             uint8_t* out) {
  x = TakeSymbol(lut, x, out);
  // Whether a lane refills is close to a coin flip on well-compressed data,
  // so a branch here would mispredict about every other symbol: shift and
  // mask instead.
  const uint32_t refill = x < kStateLow;
  const uint32_t word = LoadU16(*p) & (0u - refill);
  *p += 2 * refill;
  return x << (refill << 4) | word;
}

// A block being decoded.
struct Cursor {
  const uint32_t* lut;
  int lanes;
  uint32_t state[kLanes];
  const uint8_t* p;  // Next word.
  const uint8_t* end;
  uint8_t* out;
  size_t n;
  size_t i = 0;  // Symbols decoded.

  // Whether a whole step (one symbol per lane) remains, with a word for
  // every lane that may need one, so it runs without bounds checks.
  bool CanStep() const {
    return n - i >= static_cast<size_t>(lanes) && end - p >= 2 * lanes;
  }
};

absl::Status Open(const uint32_t* lut, absl::string_view block, uint8_t* out,
                  size_t n, Cursor* c) {
  c->lut = lut;
  c->lanes = LanesFor(n);
  if (block.size() < 4 * static_cast<size_t>(c->lanes) ||
      block.size() % 2 != 0) {
    return absl::DataLossError("bad rANS block size");
  }
  c->p = reinterpret_cast<const uint8_t*>(block.data());
  c->end = c->p + block.size();
  for (int lane = 0; lane < c->lanes; ++lane, c->p += 4) {
    c->state[lane] = LoadU32(c->p);
    if (c->state[lane] < kStateLow) {
      return absl::DataLossError("bad rANS state");
    }
  }
  c->out = out;
  c->n = n;
  return absl::OkStatus();
}

void StepScalar(Cursor& c) {
  for (int lane = 0; lane < c.lanes; ++lane, ++c.i) {
    c.state[lane] = DecodeSymbol(c.lut, c.state[lane], &c.p, c.out + c.i);
  }
}

#if defined(__x86_64__)
// For each refill mask of eight lanes, the word each lane takes: lane j
// takes the k-th next word, k = the refilling lanes before it.
struct RefillPermutes {
  alignas(32) uint32_t word_of_lane[256][8];
};
constexpr RefillPermutes MakeRefillPermutes() {
  RefillPermutes r{};
  for (uint32_t mask = 0; mask < 256; ++mask) {
    uint32_t k = 0;
    for (int lane = 0; lane < 8; ++lane) {
      r.word_of_lane[mask][lane] = k;
      k += mask >> lane & 1;
    }
  }
  return r;
}
constexpr RefillPermutes kRefillPermutes = MakeRefillPermutes();

// StepScalar, eight lanes at a time (any lanes past a multiple of eight one
// by one), taking words in the same lane order.
__attribute__((target("avx2,popcnt"))) inline void StepAvx2(Cursor& c) {
  const __m256i slot_mask = _mm256_set1_epi32(kProbScale - 1);
  const __m256i one = _mm256_set1_epi32(1);
  const __m256i zero = _mm256_setzero_si256();
  // Byte 0 (the symbol) of each entry, packed into the low 4 bytes of each
  // 128-bit half.
  const __m256i pick_symbols = _mm256_setr_epi8(
      0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, 0, 4, 8, 12,
      -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1);
  const int vector_lanes = c.lanes / 8 * 8;
  // 2 * lanes bytes remain at the step's start and each group of eight
  // takes at most 16, so every 16-byte load below stays in the block.
  for (int lane = 0; lane < vector_lanes; lane += 8, c.i += 8) {
    auto* at = reinterpret_cast<__m256i*>(c.state + lane);
    __m256i x = _mm256_loadu_si256(at);
    const __m256i e = _mm256_i32gather_epi32(
        reinterpret_cast<const int*>(c.lut), _mm256_and_si256(x, slot_mask), 4);
    const __m256i freq = _mm256_add_epi32(
        _mm256_and_si256(_mm256_srli_epi32(e, 8), slot_mask), one);
    x = _mm256_add_epi32(
        _mm256_mullo_epi32(freq, _mm256_srli_epi32(x, kProbBits)),
        _mm256_srli_epi32(e, 20));
    const __m256i refill = _mm256_cmpeq_epi32(_mm256_srli_epi32(x, 16), zero);
    const uint32_t mask =
        static_cast<uint32_t>(_mm256_movemask_ps(_mm256_castsi256_ps(refill)));
    const __m256i words = _mm256_permutevar8x32_epi32(
        _mm256_cvtepu16_epi32(
            _mm_loadu_si128(reinterpret_cast<const __m128i*>(c.p))),
        _mm256_load_si256(reinterpret_cast<const __m256i*>(
            kRefillPermutes.word_of_lane[mask])));
    x = _mm256_blendv_epi8(x, _mm256_or_si256(_mm256_slli_epi32(x, 16), words),
                           refill);
    c.p += 2 * __builtin_popcount(mask);
    _mm256_storeu_si256(at, x);
    const __m256i syms = _mm256_shuffle_epi8(e, pick_symbols);
    const uint64_t eight =
        uint64_t{static_cast<uint32_t>(
            _mm_cvtsi128_si32(_mm256_extracti128_si256(syms, 1)))}
            << 32 |
        static_cast<uint32_t>(_mm_cvtsi128_si32(_mm256_castsi256_si128(syms)));
    std::memcpy(c.out + c.i, &eight, 8);
  }
  for (int lane = vector_lanes; lane < c.lanes; ++lane, ++c.i) {
    c.state[lane] = DecodeSymbol(c.lut, c.state[lane], &c.p, c.out + c.i);
  }
}

// Whole steps of blocks c[0, k), k <= 2, alternating: a block's steps form
// one chain of dependent loads (where the next words are depends on the
// refills before), which a second, independent block's steps fill in.
__attribute__((target("avx2,popcnt"))) void RunAvx2(Cursor* c, size_t k) {
  if (k == 2) {
    while (c[0].CanStep() && c[1].CanStep()) {
      StepAvx2(c[0]);
      StepAvx2(c[1]);
    }
  }
  for (size_t j = 0; j < k; ++j) {
    while (c[j].CanStep()) StepAvx2(c[j]);
  }
}

bool HasAvx2() {
  static const bool has =
      __builtin_cpu_supports("avx2") && __builtin_cpu_supports("popcnt");
  return has;
}
#endif

void Run(Cursor* c, size_t k) {
#if defined(__x86_64__)
  if (HasAvx2()) return RunAvx2(c, k);
#endif
  for (size_t j = 0; j < k; ++j) {
    while (c[j].CanStep()) StepScalar(c[j]);
  }
}

// The last partial step and any step near the end of the words, with
// bounds checks; then the checks that the block ended where it should.
absl::Status Finish(Cursor& c) {
  for (; c.i < c.n; ++c.i) {
    const int lane = static_cast<int>(c.i % c.lanes);
    uint32_t x = TakeSymbol(c.lut, c.state[lane], c.out + c.i);
    if (x < kStateLow) {
      if (c.p == c.end) return absl::DataLossError("rANS block overrun");
      x = x << 16 | LoadU16(c.p);
      c.p += 2;
    }
    c.state[lane] = x;
  }
  if (c.p != c.end) {
    return absl::DataLossError("rANS block has trailing words");
  }
  for (int lane = 0; lane < c.lanes; ++lane) {
    if (c.state[lane] != kStateLow) {
      return absl::DataLossError("rANS block final state mismatch");
    }
  }
  return absl::OkStatus();
}

}  // namespace

Table WriteTable(const Histogram& counts, uint32_t alphabet, std::string* out) {
  Table table;
  const TableChoice t =
      ChooseTable(counts.data(), alphabet, table.freqs.data());
  table.kind = t.kind;
  const size_t at = out->size();
  out->resize(at + t.bytes);
  WriteTableBytes(t, table.freqs.data(),
                  reinterpret_cast<uint8_t*>(&(*out)[at]));
  return table;
}

absl::Status ReadTable(ByteReader* in, uint32_t alphabet, Table* table) {
  Frequencies* freqs = &table->freqs;
  freqs->fill(0);
  uint8_t kind;
  if (!in->U8(&kind)) return absl::DataLossError("truncated table");
  table->kind = static_cast<TableKind>(kind);
  switch (table->kind) {
    case TableKind::kEmpty:
      return absl::OkStatus();
    case TableKind::kSingle: {
      uint8_t s;
      if (!in->U8(&s)) return absl::DataLossError("truncated table");
      if (s >= alphabet) return absl::DataLossError("table symbol too large");
      (*freqs)[s] = kProbScale;
      return absl::OkStatus();
    }
    case TableKind::kUniform:
      *freqs = Uniform(alphabet);
      return absl::OkStatus();
    case TableKind::kStored:
      if (alphabet != 256) {
        return absl::DataLossError("stored table for a sub-byte alphabet");
      }
      *freqs = Uniform(alphabet);
      return absl::OkStatus();
    case TableKind::kExplicit: {
      uint8_t first, last;
      if (!in->U8(&first) || !in->U8(&last)) {
        return absl::DataLossError("truncated table");
      }
      if (first > last || last >= alphabet) {
        return absl::DataLossError("bad table symbol range");
      }
      uint32_t sum = 0;
      for (int s = first; s <= last; ++s) {
        uint32_t f;
        if (!in->Varint(&f)) return absl::DataLossError("truncated table");
        if (f > kProbScale) return absl::DataLossError("table frequency");
        (*freqs)[s] = static_cast<uint16_t>(f);
        sum += f;
      }
      if (sum != kProbScale) {
        return absl::DataLossError(
            absl::StrCat("table frequencies sum to ", sum));
      }
      return absl::OkStatus();
    }
  }
  return absl::DataLossError(absl::StrCat("unknown table kind ", kind));
}

Encoder::Encoder(const Frequencies& freqs) {
  uint32_t start = 0;
  for (int s = 0; s < 256; ++s) {
    const uint32_t f = freqs[s];
    syms_[s].freq = f;
    syms_[s].start = start;
    syms_[s].reciprocal =
        f > 1 ? ~uint64_t{0} / f + 1 : 0;  // ceil(2^64 / f), f not 2^64.
    start += f;
  }
}

void Encoder::EncodeBlock(const uint8_t* syms, size_t n,
                          std::string* out) const {
  const int lanes = LanesFor(n);
  uint32_t state[kLanes];
  std::fill(state, state + kLanes, kStateLow);
  // Words come out in reverse decode order; collect, then flip. A symbol
  // emits at most one word.
  std::vector<uint16_t> words(n);
  size_t emitted = 0;
  const size_t steps = (n + lanes - 1) / lanes;
  for (size_t step = steps; step-- > 0;) {
    const size_t base = step * lanes;
    const int active = static_cast<int>(std::min<size_t>(lanes, n - base));
    for (int lane = active - 1; lane >= 0; --lane) {
      const Sym& s = syms_[syms[base + lane]];
      uint32_t x = state[lane];
      // As in decoding, a branch on emitting would mispredict often.
      const uint32_t emit = EncodeEmits(x, s.freq);
      words[emitted] = static_cast<uint16_t>(x);
      emitted += emit;
      x >>= emit << 4;
      // x / f by multiply-high: exact because x < 2^32 and f <= 2^12.
      const uint32_t q =
          s.freq > 1
              ? static_cast<uint32_t>(
                    (static_cast<unsigned __int128>(x) * s.reciprocal) >> 64)
              : x;
      state[lane] = EncodeAdvance(x, q, s.freq, s.start);
    }
  }
  const size_t base = out->size();
  out->resize(base + 4 * lanes + 2 * emitted);
  auto* p = reinterpret_cast<uint8_t*>(&(*out)[base]);
  for (int lane = 0; lane < lanes; ++lane) {
    for (int b = 0; b < 4; ++b)
      *p++ = static_cast<uint8_t>(state[lane] >> 8 * b);
  }
  for (size_t i = emitted; i-- > 0;) {
    *p++ = static_cast<uint8_t>(words[i]);
    *p++ = static_cast<uint8_t>(words[i] >> 8);
  }
}

void Decoder::Reset(const Frequencies& freqs) {
  if (lut_ == nullptr) lut_.reset(new uint32_t[kProbScale]);
  uint32_t start = 0;
  for (uint32_t s = 0; s < 256; ++s) {
    const uint32_t f = freqs[s];
    for (uint32_t k = 0; k < f; ++k) {
      lut_[start + k] = s | (f - 1) << 8 | k << 20;
    }
    start += f;
  }
}

absl::Status Decoder::DecodeBlock(absl::string_view block, uint8_t* out,
                                  size_t n) const {
  const BlockJob job{this, block, out, n};
  return DecodeBlocks(absl::MakeConstSpan(&job, 1));
}

absl::Status DecodeBlocks(absl::Span<const BlockJob> jobs) {
  for (size_t j = 0; j < jobs.size(); j += 2) {
    const size_t k = std::min<size_t>(2, jobs.size() - j);
    Cursor c[2];
    for (size_t x = 0; x < k; ++x) {
      const BlockJob& job = jobs[j + x];
      if (absl::Status st =
              Open(job.decoder->lut_.get(), job.block, job.out, job.n, &c[x]);
          !st.ok()) {
        return st;
      }
    }
    Run(c, k);
    for (size_t x = 0; x < k; ++x) {
      if (absl::Status st = Finish(c[x]); !st.ok()) return st;
    }
  }
  return absl::OkStatus();
}

}  // namespace kvcache::codec::rans
