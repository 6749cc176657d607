// Where a channel group's integers go in its symbol streams (FORMAT.md,
// sections 4 and 5): byte planes, zigzag deltas, and how many token rows
// each stream holds. Shared by the CPU coder and the CUDA kernels.
#ifndef KVCACHE_CODEC_GROUP_LAYOUT_H_
#define KVCACHE_CODEC_GROUP_LAYOUT_H_

#include <cstdint>

#include "codec/hd.h"

namespace kvcache::codec::internal {

// Number of byte planes a `bits`-wide integer is split into.
KVCACHE_HD inline int BytePlanes(int bits) { return bits > 8 ? 2 : 1; }
// Alphabet size of byte plane `k` (0 = high byte when there are two).
KVCACHE_HD inline uint32_t Alphabet(int bits, int k) {
  if (bits <= 8) return 1u << bits;
  return k == 0 ? 1u << (bits - 8) : 256u;
}
// Byte plane k of integer v: the high byte first when there are two.
KVCACHE_HD inline uint8_t PlaneByte(uint32_t v, int planes, int k) {
  return static_cast<uint8_t>(planes == 2 && k == 0 ? v >> 8 : v);
}

KVCACHE_HD inline uint32_t Mask(uint32_t bits) { return (1u << bits) - 1; }

// Wrapped difference mapped to small unsigned numbers: 0, -1, 1, -2, ...
// Wrapping keeps the alphabet at 2^bits and stays exact.
KVCACHE_HD inline uint32_t ZigZag(uint32_t diff, uint32_t bits) {
  const uint32_t d = diff & Mask(bits);
  const uint32_t neg = d >> (bits - 1);  // Top bit set: negative.
  return ((d << 1) ^ (0u - neg)) & Mask(bits);
}
KVCACHE_HD inline uint32_t UnZigZag(uint32_t z) {
  return (z >> 1) ^ (0u - (z & 1));
}

// Token rows held by a channel group's raw and delta streams.
struct StreamRows {
  uint32_t raw;
  uint32_t delta;
};

// Rows of token groups [0, g) when `delta_groups` of them are delta-coded.
// Every group before the last has token_group rows: a raw group puts all
// of them in the raw stream, a delta group only its anchor.
KVCACHE_HD inline StreamRows RowsBefore(uint32_t g, uint32_t delta_groups,
                                        uint32_t token_group) {
  return {g + (token_group - 1) * (g - delta_groups),
          (token_group - 1) * delta_groups};
}

// Rows of all token groups, given the delta groups before the last one and
// the last one's choice bit.
KVCACHE_HD inline StreamRows RowsOfAll(uint32_t tokens, uint32_t token_group,
                                       uint32_t token_groups,
                                       uint32_t delta_groups_before_last,
                                       bool last_is_delta) {
  StreamRows r =
      RowsBefore(token_groups - 1, delta_groups_before_last, token_group);
  const uint32_t last_rows = tokens - (token_groups - 1) * token_group;
  r.raw += last_is_delta ? 1 : last_rows;
  r.delta += last_is_delta ? last_rows - 1 : 0;
  return r;
}

}  // namespace kvcache::codec::internal

#endif  // KVCACHE_CODEC_GROUP_LAYOUT_H_
