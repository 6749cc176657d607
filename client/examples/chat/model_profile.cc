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
// the model when kv is empty.
absl::StatusOr<CachedSequence> NewSequence(const LlamaModel& model, int tokens,
                                           absl::Span<const uint16_t> kv,
                                           absl::Span<const int32_t> prefill) {
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
  for (size_t t0 = 0; t0 < prefill.size(); t0 += kPrefillTokens) {
    absl::StatusOr<std::vector<float>> logits =
        model.Prefill(&s.cache, s.seq, prefill.subspan(t0, kPrefillTokens));
    if (!logits.ok()) return logits.status();
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
  codec::ProfileCalibrator calibrator(
      c.layers, c.kv_heads, c.head_dim(), codec::RopeLayout::kAdjacentPairs,
      codec::RopeInverseFrequencies(c.rope_theta, c.head_dim()));
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
    absl::StatusOr<PagedKvCache> cache =
        PagedKvCache::Create(model.CacheShape(16, n / 16 + 1));
    if (!cache.ok()) return cache.status();
    const SequenceId seq = cache->CreateSequence();
    for (int t0 = 0; t0 < n; t0 += kPrefillTokens) {
      const int count = std::min(kPrefillTokens, n - t0);
      absl::StatusOr<std::vector<float>> logits = model.Prefill(
          &*cache, seq, absl::MakeConstSpan(tokens).subspan(t0, count));
      if (!logits.ok()) return logits.status();
    }
    absl::StatusOr<std::vector<uint16_t>> kv = cache->ExportChunk(seq, 0, n);
    if (!kv.ok()) return kv.status();
    codec::ChunkShape shape;
    shape.layers = c.layers;
    shape.tokens = n;
    shape.kv_heads = c.kv_heads;
    shape.head_dim = c.head_dim();
    if (absl::Status st = calibrator.Add(shape, *kv, 0); !st.ok()) return st;
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
  if (absl::Status st = codec::FinishProfile(&*profile); !st.ok()) return st;
  return profile;
}

}  // namespace kvcache::chat
