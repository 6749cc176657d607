// Error measures for lossy codecs on real caches: relative L2 of K and V,
// and of attention outputs softmax(q K^T / sqrt(d)) V computed with the
// dump's real queries (causal, grouped-query mapping): at every position of
// a dump of up to 512 tokens, at 512 evenly spaced ones of a longer dump.
//
// Thread-safe: functions keep no state.
#ifndef KVCACHE_CODEC_METRICS_H_
#define KVCACHE_CODEC_METRICS_H_

#include <cstdint>
#include <vector>

#include "absl/types/span.h"
#include "codec/kv_dump.h"

namespace kvcache::codec {

struct KvErrors {
  double key = 0;    // ||K' - K|| / ||K|| over all layers.
  double value = 0;  // Same for V.
  double attention = 0;
  std::vector<double> key_by_layer, value_by_layer, attention_by_layer;
};

// Compares `decoded` (same layout and tokens as dump.kv) with the dump.
KvErrors MeasureErrors(const KvDump& dump, absl::Span<const uint16_t> decoded);

}  // namespace kvcache::codec

#endif  // KVCACHE_CODEC_METRICS_H_
