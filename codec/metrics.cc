#include "codec/metrics.h"

#include <algorithm>
#include <cmath>

#include "codec/half.h"

namespace kvcache::codec {
namespace {

struct SumSq {
  double err = 0, ref = 0;
  void Add(double want, double got) {
    err += (got - want) * (got - want);
    ref += want * want;
  }
  double Relative() const { return ref > 0 ? std::sqrt(err / ref) : 0.0; }
};

// Query positions whose attention outputs are compared: every one in a
// short dump; in a long one, kMaxQueries evenly spaced ones ending at the
// last token, since the cost grows with the square of the length and the
// error's statistics do not need them all.
constexpr uint32_t kMaxQueries = 512;

std::vector<uint32_t> QueryPositions(uint32_t tokens) {
  const uint32_t count = std::min(tokens, kMaxQueries);
  std::vector<uint32_t> positions(count);
  for (uint32_t i = 0; i < count; ++i) {
    positions[i] =
        tokens - 1 -
        static_cast<uint32_t>(uint64_t{count - 1 - i} * tokens / count);
  }
  return positions;
}

// Causal attention outputs for one layer at the given query positions:
// [position][head][head_dim].
std::vector<float> Attention(const KvDump& d, const std::vector<float>& kv,
                             uint32_t layer,
                             const std::vector<uint32_t>& positions) {
  const ChunkShape& s = d.shape;
  const uint32_t dim = s.head_dim, row = s.kv_heads * dim;
  const uint32_t group = d.heads / s.kv_heads;
  const float* keys = &kv[(size_t{layer} * 2) * s.tokens * row];
  const float* values = keys + size_t{s.tokens} * row;
  const float scale = 1.0f / std::sqrt(static_cast<float>(dim));
  std::vector<float> out(positions.size() * d.heads * dim, 0.0f);
  std::vector<float> logits(s.tokens);
  for (size_t p = 0; p < positions.size(); ++p) {
    const uint32_t t = positions[p];
    for (uint32_t head = 0; head < d.heads; ++head) {
      const uint16_t* q =
          &d.queries[((size_t{layer} * s.tokens + t) * d.heads + head) * dim];
      const uint32_t kvh = head / group;
      float peak = -INFINITY;
      for (uint32_t u = 0; u <= t; ++u) {
        const float* k = keys + size_t{u} * row + kvh * dim;
        float dot = 0;
        for (uint32_t i = 0; i < dim; ++i) dot += HalfToFloat(q[i]) * k[i];
        logits[u] = dot * scale;
        peak = std::max(peak, logits[u]);
      }
      float total = 0;
      for (uint32_t u = 0; u <= t; ++u) {
        logits[u] = std::exp(logits[u] - peak);
        total += logits[u];
      }
      float* o = &out[(p * d.heads + head) * dim];
      for (uint32_t u = 0; u <= t; ++u) {
        const float* v = values + size_t{u} * row + kvh * dim;
        const float w = logits[u] / total;
        for (uint32_t i = 0; i < dim; ++i) o[i] += w * v[i];
      }
    }
  }
  return out;
}

}  // namespace

KvErrors MeasureErrors(const KvDump& dump, absl::Span<const uint16_t> decoded) {
  const ChunkShape& s = dump.shape;
  const size_t plane = size_t{s.tokens} * s.kv_heads * s.head_dim;
  std::vector<float> ref(dump.kv.size()), got(decoded.size());
  for (size_t i = 0; i < ref.size(); ++i) {
    ref[i] = HalfToFloat(dump.kv[i]);
    got[i] = HalfToFloat(decoded[i]);
  }
  const std::vector<uint32_t> positions = QueryPositions(s.tokens);
  KvErrors e;
  SumSq key, value, attention;
  for (uint32_t l = 0; l < s.layers; ++l) {
    SumSq lk, lv, la;
    for (size_t i = 0; i < plane; ++i) {
      const size_t k = 2 * l * plane + i, v = k + plane;
      lk.Add(ref[k], got[k]);
      lv.Add(ref[v], got[v]);
      key.Add(ref[k], got[k]);
      value.Add(ref[v], got[v]);
    }
    const std::vector<float> want = Attention(dump, ref, l, positions);
    const std::vector<float> have = Attention(dump, got, l, positions);
    for (size_t i = 0; i < want.size(); ++i) {
      la.Add(want[i], have[i]);
      attention.Add(want[i], have[i]);
    }
    e.key_by_layer.push_back(lk.Relative());
    e.value_by_layer.push_back(lv.Relative());
    e.attention_by_layer.push_back(la.Relative());
  }
  e.key = key.Relative();
  e.value = value.Relative();
  e.attention = attention.Relative();
  return e;
}

}  // namespace kvcache::codec
