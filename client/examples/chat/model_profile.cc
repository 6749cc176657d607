#include "client/examples/chat/model_profile.h"

#include <algorithm>
#include <cmath>
#include <random>
#include <vector>

#include "absl/strings/str_cat.h"
#include "client/examples/chat/paged_kv_cache.h"
#include "client/examples/chat/sampler.h"
#include "codec/calibrate.h"
#include "codec/half.h"
#include "codec/levels.h"
#include "codec/transform.h"

namespace kvcache::chat {
namespace {

// Tokens a Prefill call takes at a time: bounds its activations.
constexpr int kPrefillTokens = 512;

// A cache holding one sequence's KV.
struct CachedSequence {
  PagedKvCache cache;
  SequenceId seq;
};

// A fresh cache sized for `tokens`, with `kv` (a chunk of ExportChunk's
// layout) imported as its sequence's first tokens, or `prefill` run through
// the model when kv is empty. With `queries`, the prefill's queries after
// RoPE go there, [layer][token][heads * head_dim] as PrefillTrace has them.
absl::StatusOr<CachedSequence> NewSequence(
    const LlamaModel& model, int tokens, absl::Span<const uint16_t> kv,
    absl::Span<const int32_t> prefill,
    std::vector<uint16_t>* queries = nullptr) {
  absl::StatusOr<PagedKvCache> cache =
      PagedKvCache::Create(model.CacheShape(16, tokens / 16 + 1));
  if (!cache.ok()) return cache.status();
  CachedSequence s{*std::move(cache), 0};
  s.seq = s.cache.CreateSequence();
  if (!kv.empty()) {
    if (absl::Status st = s.cache.ImportChunk(s.seq, 0, kv); !st.ok()) {
      return st;
    }
  }
  const LlamaConfig& c = model.config();
  if (queries != nullptr) queries->resize(c.layers * prefill.size() * c.dim);
  for (size_t t0 = 0; t0 < prefill.size(); t0 += kPrefillTokens) {
    const absl::Span<const int32_t> part = prefill.subspan(t0, kPrefillTokens);
    PrefillTrace trace;
    absl::StatusOr<std::vector<float>> logits =
        model.Prefill(&s.cache, s.seq, part, LogitsFor::kLastToken,
                      queries != nullptr ? &trace : nullptr);
    if (!logits.ok()) return logits.status();
    if (queries == nullptr) continue;
    const size_t rows = part.size() * c.dim;
    for (int l = 0; l < c.layers; ++l) {
      std::copy_n(trace.queries.begin() + l * rows, rows,
                  queries->begin() + (l * prefill.size() + t0) * c.dim);
    }
  }
  return s;
}

// The model's log-probabilities at each of `scored`, run after what `s`
// holds.
absl::StatusOr<std::vector<std::vector<double>>> ScoredDistributions(
    const LlamaModel& model, CachedSequence& s,
    absl::Span<const int32_t> scored) {
  absl::StatusOr<std::vector<float>> logits =
      model.Prefill(&s.cache, s.seq, scored, LogitsFor::kEveryToken);
  if (!logits.ok()) return logits.status();
  const size_t vocab = model.config().vocab_size;
  std::vector<std::vector<double>> rows;
  for (size_t i = 0; i < scored.size(); ++i) {
    rows.push_back(
        LogSoftmax(absl::MakeConstSpan(*logits).subspan(i * vocab, vocab)));
  }
  return rows;
}

// Adds each head's sensitivity on one document (`tokens`, at least
// history + scored long) to sum[head], heads in ModelProfile::Head order.
absl::Status AddSensitivities(const LlamaModel& model,
                              absl::Span<const int32_t> tokens,
                              const CalibrationOptions& options,
                              std::mt19937_64& rng, std::vector<double>& sum) {
  const int history = options.sensitivity_history;
  const absl::Span<const int32_t> scored =
      tokens.subspan(history, options.sensitivity_scored);
  const int total = history + options.sensitivity_scored;
  absl::StatusOr<CachedSequence> clean =
      NewSequence(model, total, {}, tokens.subspan(0, history));
  if (!clean.ok()) return clean.status();
  absl::StatusOr<std::vector<uint16_t>> kv =
      clean->cache.ExportChunk(clean->seq, 0, history);
  if (!kv.ok()) return kv.status();
  absl::StatusOr<std::vector<std::vector<double>>> reference =
      ScoredDistributions(model, *clean, scored);
  if (!reference.ok()) return reference.status();

  const LlamaConfig& c = model.config();
  const size_t row = c.kv_dim();
  const size_t dim = c.head_dim();
  const size_t first = codec::internal::ExactTokens(0, history);
  const size_t count = (history - first) * dim;
  for (size_t head = 0; head < sum.size(); ++head) {
    // Head `head` of plane `head / kv_heads` at token t, channel i.
    std::vector<uint16_t> noisy = *kv;
    const size_t plane = head / c.kv_heads;
    auto at = [&](size_t t, size_t i) -> uint16_t& {
      return noisy[(plane * history + t) * row + (head % c.kv_heads) * dim + i];
    };
    double mean = 0, square = 0;
    for (size_t t = first; t < static_cast<size_t>(history); ++t) {
      for (size_t i = 0; i < dim; ++i) {
        const double x = codec::HalfToFloat(at(t, i));
        mean += x / count;
        square += x * x / count;
      }
    }
    const double sigma =
        options.sensitivity_noise * std::sqrt(square - mean * mean);
    std::normal_distribution<double> noise(0, sigma);
    for (size_t t = first; t < static_cast<size_t>(history); ++t) {
      for (size_t i = 0; i < dim; ++i) {
        at(t, i) = codec::FloatToHalf(
            static_cast<float>(codec::HalfToFloat(at(t, i)) + noise(rng)));
      }
    }
    absl::StatusOr<CachedSequence> restored =
        NewSequence(model, total, noisy, {});
    if (!restored.ok()) return restored.status();
    absl::StatusOr<std::vector<std::vector<double>>> got =
        ScoredDistributions(model, *restored, scored);
    if (!got.ok()) return got.status();
    double kl = 0;
    for (size_t i = 0; i < got->size(); ++i) {
      kl += Kl((*reference)[i], (*got)[i]) / got->size();
    }
    sum[head] += kl / (sigma * sigma);
  }
  return absl::OkStatus();
}

// Every kQueryStride-th query position weighs the key components it reads,
// through kKeySamples keys drawn from its attention row.
constexpr int kQueryStride = 4;
constexpr int kKeySamples = 8;
// A component's weight stays within these multiples of its head's average.
constexpr float kMinWeight = 0.01f;
constexpr float kMaxWeight = 100.0f;

// What the queries that read each KV head's keys weigh in its channels.
// An error e in a key (RoPE undone) moves the score of query q by u.e, where
// u is q turned into that key's frame (RoPE undone at the key's position),
// and the model pays for it in proportion to the attention the key gets;
// so per key head this sums mass / kKeySamples * u u^T over the queries of
// its group, with keys drawn by stratified sampling of each attention row
// and mass the share of the row they stand for. Keys at the exactly stored
// positions are left out: they carry no error.
class QueryMoments {
 public:
  // `rope` gives the model's shape and RoPE (the profile's fields).
  explicit QueryMoments(const codec::ModelProfile& rope)
      : rope_(rope),
        moments_(
            size_t{rope.layers} * rope.kv_heads * rope.head_dim * rope.head_dim,
            0.0) {}

  // One sequence from position 0: its KV (ExportChunk's layout) and its
  // queries after RoPE ([layer][token][heads * head_dim], PrefillTrace's).
  void Add(absl::Span<const uint16_t> kv, absl::Span<const uint16_t> queries,
           uint32_t tokens, uint32_t heads) {
    const uint32_t d = rope_.head_dim, kv_heads = rope_.kv_heads;
    const uint32_t row = kv_heads * d, pairs = d / 2;
    const std::vector<codec::internal::SinCos> angles =
        codec::internal::RopeTable(rope_, 0, tokens);
    const uint32_t exact = codec::internal::ExactTokens(0, tokens);
    const float scale = 1.0f / std::sqrt(static_cast<float>(d));
    std::vector<float> keys(size_t{tokens} * d), q(d), u(d);
    std::vector<double> weight(tokens);
    for (uint32_t l = 0; l < rope_.layers; ++l) {
      for (uint32_t h = 0; h < kv_heads; ++h) {
        const uint16_t* plane = kv.data() + size_t{2} * l * tokens * row;
        for (uint32_t n = 0; n < tokens; ++n) {
          for (uint32_t i = 0; i < d; ++i) {
            keys[size_t{n} * d + i] =
                codec::HalfToFloat(plane[size_t{n} * row + h * d + i]);
          }
        }
        double* moment = moments_.data() + (size_t{l} * kv_heads + h) * d * d;
        for (uint32_t g = h * (heads / kv_heads);
             g < (h + 1) * (heads / kv_heads); ++g) {
          for (uint32_t m = exact; m < tokens; m += kQueryStride) {
            const uint16_t* qm =
                queries.data() + (size_t{l} * tokens + m) * heads * d + g * d;
            for (uint32_t i = 0; i < d; ++i) q[i] = codec::HalfToFloat(qm[i]);
            double max = -1e300;
            for (uint32_t n = 0; n <= m; ++n) {
              float dot = 0;
              for (uint32_t i = 0; i < d; ++i) {
                dot += q[i] * keys[size_t{n} * d + i];
              }
              weight[n] = dot * scale;
              max = std::max(max, weight[n]);
            }
            double total = 0, readable = 0;
            for (uint32_t n = 0; n <= m; ++n) {
              weight[n] = std::exp(weight[n] - max);
              total += weight[n];
              if (n >= exact) readable += weight[n];
            }
            if (readable <= 0) continue;
            const double mass = readable / total / kKeySamples;
            // Stratified draws: the keys where the running sum of the
            // readable weights crosses (j + 0.5) / kKeySamples of it.
            double running = 0;
            uint32_t n = exact;
            for (int j = 0; j < kKeySamples; ++j) {
              const double target = (j + 0.5) / kKeySamples * readable;
              while (n < m && running + weight[n] < target)
                running += weight[n++];
              u = q;
              codec::internal::RotateHead(rope_,
                                          angles.data() + size_t{n} * pairs,
                                          /*undo=*/true, u.data());
              for (uint32_t a = 0; a < d; ++a) {
                for (uint32_t b = 0; b < d; ++b) {
                  moment[a * d + b] += mass * u[a] * u[b];
                }
              }
            }
          }
        }
      }
    }
  }

  // ModelProfile::component_weight for `profile` (its bases): for a key
  // head, b^T M b of each component b, over their mean, within
  // [kMinWeight, kMaxWeight]; 1 for values.
  std::vector<float> ComponentWeights(
      const codec::ModelProfile& profile) const {
    const uint32_t d = profile.head_dim;
    std::vector<float> weights(profile.Heads() * d, 1.0f);
    for (uint32_t l = 0; l < profile.layers; ++l) {
      for (uint32_t h = 0; h < profile.kv_heads; ++h) {
        const double* moment =
            moments_.data() + (size_t{l} * profile.kv_heads + h) * d * d;
        const size_t head = profile.Head(l, /*is_value=*/false, h);
        const float* basis = profile.Basis(head);
        std::vector<double> w(d, 0.0);
        double sum = 0;
        for (uint32_t k = 0; k < d; ++k) {
          for (uint32_t a = 0; a < d; ++a) {
            for (uint32_t b = 0; b < d; ++b) {
              w[k] += basis[k * d + a] * moment[a * d + b] * basis[k * d + b];
            }
          }
          sum += w[k];
        }
        if (!(sum > 0)) continue;
        for (uint32_t k = 0; k < d; ++k) {
          weights[head * d + k] = std::clamp(static_cast<float>(w[k] * d / sum),
                                             kMinWeight, kMaxWeight);
        }
      }
    }
    return weights;
  }

 private:
  const codec::ModelProfile& rope_;
  std::vector<double> moments_;  // [layer][kv_head][d][d]
};

// ModelProfile::sensitivity, averaged over the first documents long
// enough. NOT_FOUND if too few are.
absl::StatusOr<std::vector<float>> Sensitivities(
    const LlamaModel& model, const model::BpeTokenizer& tokenizer,
    absl::Span<const Document> documents, const CalibrationOptions& options) {
  const LlamaConfig& c = model.config();
  std::vector<double> sum(size_t{2} * c.layers * c.kv_heads, 0.0);
  std::mt19937_64 rng(1);  // fixed: equal inputs make equal profiles
  int measured = 0;
  for (const Document& document : documents) {
    if (measured == options.sensitivity_documents) break;
    absl::StatusOr<std::vector<int32_t>> tokens =
        tokenizer.Encode(document.text);
    if (!tokens.ok()) return tokens.status();
    if (tokens->size() < static_cast<size_t>(options.sensitivity_history +
                                             options.sensitivity_scored)) {
      continue;
    }
    if (absl::Status st = AddSensitivities(model, *tokens, options, rng, sum);
        !st.ok()) {
      return st;
    }
    ++measured;
  }
  if (measured < options.sensitivity_documents) {
    return absl::NotFoundError(
        absl::StrCat("calibration text has ", measured, " documents of ",
                     options.sensitivity_history + options.sensitivity_scored,
                     " tokens for sensitivities, of the ",
                     options.sensitivity_documents, " asked for"));
  }
  std::vector<float> sensitivity(sum.size());
  for (size_t p = 0; p < sum.size(); ++p) {
    // A head the model ignores still gets a finite step.
    sensitivity[p] = static_cast<float>(std::max(sum[p] / measured, 1e-12));
  }
  return sensitivity;
}

}  // namespace

absl::StatusOr<codec::ModelProfile> CalibrateModelProfile(
    const LlamaModel& model, const model::BpeTokenizer& tokenizer,
    absl::Span<const Document> documents, const CalibrationOptions& options) {
  const LlamaConfig& c = model.config();
  // LlamaModel rotates adjacent channel pairs, by position / theta^(2j/d).
  codec::ModelProfile rope;
  rope.layers = c.layers;
  rope.kv_heads = c.kv_heads;
  rope.head_dim = c.head_dim();
  rope.rope = codec::RopeLayout::kAdjacentPairs;
  rope.rope_inv_freq =
      codec::RopeInverseFrequencies(c.rope_theta, c.head_dim());
  codec::ProfileCalibrator calibrator(rope.layers, rope.kv_heads, rope.head_dim,
                                      rope.rope, rope.rope_inv_freq);
  QueryMoments query_moments(rope);
  for (const Document& document : documents) {
    if (calibrator.tokens() >= static_cast<uint64_t>(options.tokens)) break;
    absl::StatusOr<std::vector<int32_t>> encoded =
        tokenizer.Encode(document.text);
    if (!encoded.ok()) return encoded.status();
    const std::vector<int32_t>& tokens = *encoded;
    const int n = std::min<int>(
        {static_cast<int>(tokens.size()), options.tokens_per_document,
         options.tokens - static_cast<int>(calibrator.tokens())});
    if (n < c.head_dim()) continue;
    std::vector<uint16_t> queries;
    absl::StatusOr<CachedSequence> sequence = NewSequence(
        model, n, {}, absl::MakeConstSpan(tokens).first(n), &queries);
    if (!sequence.ok()) return sequence.status();
    absl::StatusOr<std::vector<uint16_t>> kv =
        sequence->cache.ExportChunk(sequence->seq, 0, n);
    if (!kv.ok()) return kv.status();
    codec::ChunkShape shape;
    shape.layers = c.layers;
    shape.tokens = n;
    shape.kv_heads = c.kv_heads;
    shape.head_dim = c.head_dim();
    if (absl::Status st = calibrator.Add(shape, *kv, 0); !st.ok()) return st;
    query_moments.Add(*kv, queries, n, c.heads);
  }
  if (calibrator.tokens() < static_cast<uint64_t>(options.tokens)) {
    return absl::NotFoundError(
        absl::StrCat("calibration text gave ", calibrator.tokens(),
                     " tokens of the ", options.tokens, " asked for"));
  }
  absl::StatusOr<codec::ModelProfile> profile = calibrator.Finish();
  if (!profile.ok() || options.sensitivity_documents == 0) return profile;
  absl::StatusOr<std::vector<float>> sensitivity =
      Sensitivities(model, tokenizer, documents, options);
  if (!sensitivity.ok()) return sensitivity.status();
  profile->sensitivity = *std::move(sensitivity);
  profile->component_weight = query_moments.ComponentWeights(*profile);
  if (absl::Status st = codec::FinishProfile(&*profile); !st.ok()) return st;
  return profile;
}

}  // namespace kvcache::chat
