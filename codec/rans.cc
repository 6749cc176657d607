#include "codec/rans.h"

#include <algorithm>

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

}  // namespace

Frequencies WriteTable(const Histogram& counts, uint32_t alphabet,
                       std::string* out) {
  Frequencies freqs;
  const TableChoice t = ChooseTable(counts.data(), alphabet, freqs.data());
  const size_t at = out->size();
  out->resize(at + t.bytes);
  WriteTableBytes(t, freqs.data(), reinterpret_cast<uint8_t*>(&(*out)[at]));
  return freqs;
}

absl::Status ReadTable(ByteReader* in, uint32_t alphabet, Frequencies* freqs) {
  freqs->fill(0);
  uint8_t kind;
  if (!in->U8(&kind)) return absl::DataLossError("truncated table");
  switch (static_cast<TableKind>(kind)) {
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
  // Words come out in reverse decode order; collect, then flip.
  std::vector<uint16_t> words;
  words.reserve(n + kLanes);
  const size_t steps = (n + lanes - 1) / lanes;
  for (size_t step = steps; step-- > 0;) {
    const size_t base = step * lanes;
    const int active = static_cast<int>(std::min<size_t>(lanes, n - base));
    for (int lane = active - 1; lane >= 0; --lane) {
      const Sym& s = syms_[syms[base + lane]];
      uint32_t x = state[lane];
      if (EncodeEmits(x, s.freq)) {
        words.push_back(static_cast<uint16_t>(x));
        x >>= 16;
      }
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
  out->resize(base + 4 * lanes + 2 * words.size());
  auto* p = reinterpret_cast<uint8_t*>(&(*out)[base]);
  for (int lane = 0; lane < lanes; ++lane) {
    for (int b = 0; b < 4; ++b)
      *p++ = static_cast<uint8_t>(state[lane] >> 8 * b);
  }
  for (size_t i = words.size(); i-- > 0;) {
    *p++ = static_cast<uint8_t>(words[i]);
    *p++ = static_cast<uint8_t>(words[i] >> 8);
  }
}

void Decoder::Reset(const Frequencies& freqs) {
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
  const int lanes = LanesFor(n);
  if (block.size() < 4 * static_cast<size_t>(lanes) || block.size() % 2 != 0) {
    return absl::DataLossError("bad rANS block size");
  }
  const auto* p = reinterpret_cast<const uint8_t*>(block.data());
  const uint8_t* const end = p + block.size();
  uint32_t state[kLanes];
  for (int lane = 0; lane < lanes; ++lane, p += 4) {
    state[lane] = LoadU32(p);
    if (state[lane] < kStateLow) return absl::DataLossError("bad rANS state");
  }
  const uint32_t* lut = lut_.data();
  const size_t full_steps = n / lanes;
  size_t i = 0;
  for (size_t step = 0; step < full_steps && end - p >= 2 * lanes; ++step) {
    // At most one word per lane per step, so no bounds checks needed.
    for (int lane = 0; lane < lanes; ++lane, ++i) {
      uint32_t x = state[lane];
      const uint32_t e = lut[x & (kProbScale - 1)];
      out[i] = static_cast<uint8_t>(e);
      x = DecodeAdvance(x, (e >> 8 & 0xFFF) + 1, e >> 20);
      const uint32_t refill = x < kStateLow;
      const uint32_t word = LoadU16(p);
      x = refill ? (x << 16 | word) : x;
      p += 2 * refill;
      state[lane] = x;
    }
  }
  // Tail: the last partial step, and any step near the end of the words.
  for (; i < n; ++i) {
    const int lane = static_cast<int>(i % lanes);
    uint32_t x = state[lane];
    const uint32_t e = lut[x & (kProbScale - 1)];
    out[i] = static_cast<uint8_t>(e);
    x = DecodeAdvance(x, (e >> 8 & 0xFFF) + 1, e >> 20);
    if (x < kStateLow) {
      if (p == end) return absl::DataLossError("rANS block overrun");
      x = x << 16 | LoadU16(p);
      p += 2;
    }
    state[lane] = x;
  }
  if (p != end) return absl::DataLossError("rANS block has trailing words");
  for (int lane = 0; lane < lanes; ++lane) {
    if (state[lane] != kStateLow) {
      return absl::DataLossError("rANS block final state mismatch");
    }
  }
  return absl::OkStatus();
}

}  // namespace kvcache::codec::rans
