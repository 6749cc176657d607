#include "codec/group_coder.h"

#include <algorithm>
#include <array>

namespace kvcache::codec::internal {
namespace {

enum Mode { kRaw = 0, kDelta = 1 };

struct Range {
  uint32_t t0, t1;
};
Range GroupTokens(const Header& h, uint32_t tg) {
  const uint32_t t0 = tg * h.token_group;
  return {t0, std::min(h.shape.tokens, t0 + h.token_group)};
}

// Symbol counts of a stream. Quantized streams repeat symbols a lot, and one
// table would make each increment wait for the previous one to the same
// entry; four tables, summed at the end, keep four in flight.
rans::Histogram CountSymbols(const std::vector<uint8_t>& symbols) {
  uint32_t partial[4][256] = {};
  size_t i = 0;
  for (; i + 4 <= symbols.size(); i += 4) {
    ++partial[0][symbols[i]];
    ++partial[1][symbols[i + 1]];
    ++partial[2][symbols[i + 2]];
    ++partial[3][symbols[i + 3]];
  }
  for (; i < symbols.size(); ++i) ++partial[0][symbols[i]];
  rans::Histogram counts;
  for (int b = 0; b < 256; ++b) {
    counts[b] = partial[0][b] + partial[1][b] + partial[2][b] + partial[3][b];
  }
  return counts;
}

}  // namespace

std::array<size_t, 2> StreamSizes(const GroupView& v,
                                  absl::string_view choices) {
  const Header& h = *v.header;
  const uint32_t groups = h.TokenGroups();
  const uint64_t end = v.first_choice + groups - 1;
  const uint32_t delta_before_last =
      CountChoiceBits(choices, v.first_choice, groups - 1);
  const StreamRows rows = RowsOfAll(h.shape.tokens, h.token_group, groups,
                                    delta_before_last, ChoiceBit(choices, end));
  return {size_t{rows.raw} * h.channel_group,
          size_t{rows.delta} * h.channel_group};
}

void GroupEncoder::Encode(const GroupView& v, const uint16_t* q,
                          std::vector<uint8_t>* choices, std::string* tables,
                          std::string* payload,
                          std::vector<uint32_t>* block_ends) {
  const Header& h = *v.header;
  const uint32_t row = h.Channels();
  const uint32_t width = h.channel_group;
  const uint32_t c0 = v.cg * width;
  const int planes = BytePlanes(v.bits);
  const uint32_t tokens = h.shape.tokens;

  // Pass 1: delta of every non-anchor integer, and histograms of both
  // codings as if every group used it.
  delta_.resize(size_t{tokens} * width);
  rans::Histogram hist[2][2] = {};
  for (uint32_t tg = 0; tg < h.TokenGroups(); ++tg) {
    const Range r = GroupTokens(h, tg);
    const uint16_t* anchor = q + size_t{r.t0} * row + c0;
    for (uint32_t t = r.t0 + 1; t < r.t1; ++t) {
      const uint16_t* qr = q + size_t{t} * row + c0;
      uint16_t* d = &delta_[size_t{t} * width];
      for (uint32_t c = 0; c < width; ++c) {
        d[c] = static_cast<uint16_t>(ZigZag(qr[c] - anchor[c], v.bits));
        for (int k = 0; k < planes; ++k) {
          ++hist[kRaw][k][PlaneByte(qr[c], planes, k)];
          ++hist[kDelta][k][PlaneByte(d[c], planes, k)];
        }
      }
    }
  }
  // Pass 2: per group, keep the coding with the lower estimated size.
  uint32_t cost[2][2][256];
  for (int m = 0; m < 2; ++m) {
    for (int k = 0; k < planes; ++k) {
      const rans::Frequencies f = rans::Normalize(hist[m][k]);
      for (int s = 0; s < 256; ++s) {
        cost[m][k][s] = f[s] ? rans::SymbolCost(f[s]) : 0;
      }
    }
  }
  for (auto& mode : syms_) {
    for (auto& plane : mode) plane.clear();
  }
  for (uint32_t tg = 0; tg < h.TokenGroups(); ++tg) {
    const Range r = GroupTokens(h, tg);
    uint64_t raw_cost = 0, delta_cost = 0;
    for (uint32_t t = r.t0 + 1; t < r.t1; ++t) {
      const uint16_t* qr = q + size_t{t} * row + c0;
      const uint16_t* d = &delta_[size_t{t} * width];
      for (uint32_t c = 0; c < width; ++c) {
        for (int k = 0; k < planes; ++k) {
          raw_cost += cost[kRaw][k][PlaneByte(qr[c], planes, k)];
          delta_cost += cost[kDelta][k][PlaneByte(d[c], planes, k)];
        }
      }
    }
    const bool use_delta = delta_cost < raw_cost;
    if (use_delta) {
      const uint64_t bit = v.first_choice + tg;
      (*choices)[bit >> 3] |= static_cast<uint8_t>(1u << (bit & 7));
    }
    // Pass 3: gather the symbols in stream order.
    for (uint32_t t = r.t0; t < r.t1; ++t) {
      const bool delta_row = use_delta && t > r.t0;
      const uint16_t* src =
          delta_row ? &delta_[size_t{t} * width] : q + size_t{t} * row + c0;
      for (int k = 0; k < planes; ++k) {
        auto& out = syms_[delta_row ? kDelta : kRaw][k];
        const size_t start = out.size();
        out.resize(start + width);
        uint8_t* dst = out.data() + start;
        for (uint32_t c = 0; c < width; ++c) {
          dst[c] = PlaneByte(src[c], planes, k);
        }
      }
    }
  }
  for (int m = 0; m < 2; ++m) {
    for (int k = 0; k < planes; ++k) {
      const std::vector<uint8_t>& s = syms_[m][k];
      const rans::Histogram counts = CountSymbols(s);
      const rans::Table table =
          rans::WriteTable(counts, Alphabet(v.bits, k), tables);
      if (s.empty()) continue;
      const rans::Encoder enc(table.freqs);
      for (size_t i = 0; i < s.size(); i += h.block_symbols) {
        const size_t n = std::min<size_t>(h.block_symbols, s.size() - i);
        if (table.stored()) {
          payload->append(reinterpret_cast<const char*>(s.data() + i), n);
        } else {
          enc.EncodeBlock(s.data() + i, n, payload);
        }
        block_ends->push_back(static_cast<uint32_t>(payload->size()));
      }
    }
  }
}

absl::Status BlockCursor::Next(absl::string_view* block) {
  if ((index_ + 1) * 4 > directory_.size()) {
    return absl::DataLossError("block directory too short");
  }
  const uint32_t end =
      LoadU32(reinterpret_cast<const uint8_t*>(directory_.data()) + 4 * index_);
  if (end < last_end_ || end > payload_.size()) {
    return absl::DataLossError("bad block offset");
  }
  *block = payload_.substr(last_end_, end - last_end_);
  last_end_ = end;
  ++index_;
  return absl::OkStatus();
}

absl::Status GroupDecoder::Decode(absl::Span<const GroupView> views,
                                  absl::string_view choices, ByteReader* tables,
                                  BlockCursor* blocks,
                                  absl::Span<uint16_t* const> q) {
  if (views.size() > kMaxGroups || q.size() != views.size()) {
    return absl::InternalError("bad channel group batch");
  }
  jobs_.clear();
  for (size_t j = 0; j < views.size(); ++j) {
    if (absl::Status st = Read(j, views[j], choices, tables, blocks);
        !st.ok()) {
      return st;
    }
  }
  if (absl::Status st = rans::DecodeBlocks(jobs_); !st.ok()) return st;
  for (size_t j = 0; j < views.size(); ++j) {
    Assemble(j, views[j], choices, q[j]);
  }
  return absl::OkStatus();
}

absl::Status GroupDecoder::Read(size_t j, const GroupView& v,
                                absl::string_view choices, ByteReader* tables,
                                BlockCursor* blocks) {
  const Header& h = *v.header;
  const std::array<size_t, 2> sizes = StreamSizes(v, choices);
  for (int m = 0; m < 2; ++m) {
    for (int k = 0; k < BytePlanes(v.bits); ++k) {
      rans::Table table;
      if (absl::Status st =
              rans::ReadTable(tables, Alphabet(v.bits, k), &table);
          !st.ok()) {
        return st;
      }
      if ((table.kind == rans::TableKind::kEmpty) != (sizes[m] == 0)) {
        return absl::DataLossError("table does not match stream size");
      }
      // Stored symbols are read where they are: a stream's blocks are
      // consecutive in the payload.
      std::vector<uint8_t>& s = syms_[j][m][k];
      rans::Decoder& decoder = decoders_[(j * 2 + m) * 2 + k];
      if (!table.stored()) {
        s.resize(sizes[m]);
        next_[j][m][k] = s.data();
        decoder.Reset(table.freqs);
      }
      for (size_t i = 0; i < sizes[m]; i += h.block_symbols) {
        const size_t n = std::min<size_t>(h.block_symbols, sizes[m] - i);
        absl::string_view block;
        if (absl::Status st = blocks->Next(&block); !st.ok()) return st;
        if (!table.stored()) {
          jobs_.push_back({&decoder, block, s.data() + i, n});
        } else if (block.size() != n) {
          return absl::DataLossError("stored block has the wrong size");
        } else if (i == 0) {
          next_[j][m][k] = reinterpret_cast<const uint8_t*>(block.data());
        }
      }
    }
  }
  return absl::OkStatus();
}

void GroupDecoder::Assemble(size_t j, const GroupView& v,
                            absl::string_view choices, uint16_t* q) {
  // Integers in stream order (the inverse of pass 3 above).
  const Header& h = *v.header;
  const uint32_t width = h.channel_group;
  const int planes = BytePlanes(v.bits);
  const uint32_t mask = Mask(v.bits);
  const uint8_t* next[2][2] = {{next_[j][0][0], next_[j][0][1]},
                               {next_[j][1][0], next_[j][1][1]}};
  auto take = [&](int m, uint16_t* dst) {
    if (planes == 2) {
      for (uint32_t c = 0; c < width; ++c) {
        dst[c] = static_cast<uint16_t>(next[m][0][c] << 8 | next[m][1][c]);
      }
      next[m][1] += width;
    } else {
      std::copy(next[m][0], next[m][0] + width, dst);
    }
    next[m][0] += width;
  };
  for (uint32_t tg = 0; tg < h.TokenGroups(); ++tg) {
    const Range r = GroupTokens(h, tg);
    const bool use_delta = ChoiceBit(choices, v.first_choice + tg);
    uint16_t* anchor = q + size_t{r.t0} * width;
    take(kRaw, anchor);
    for (uint32_t t = r.t0 + 1; t < r.t1; ++t) {
      uint16_t* dst = q + size_t{t} * width;
      if (!use_delta) {
        take(kRaw, dst);
        continue;
      }
      take(kDelta, dst);
      for (uint32_t c = 0; c < width; ++c) {
        dst[c] = static_cast<uint16_t>((anchor[c] + UnZigZag(dst[c])) & mask);
      }
    }
  }
}

}  // namespace kvcache::codec::internal
