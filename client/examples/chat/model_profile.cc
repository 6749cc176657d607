#include "client/examples/chat/model_profile.h"

#include <algorithm>
#include <vector>

#include "absl/strings/str_cat.h"
#include "client/examples/chat/paged_kv_cache.h"
#include "codec/calibrate.h"

namespace kvcache::chat {
namespace {

// Tokens a Prefill call takes at a time: bounds its activations.
constexpr int kPrefillTokens = 512;

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
  return calibrator.Finish();
}

}  // namespace kvcache::chat
