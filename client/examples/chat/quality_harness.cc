// Restore quality per variant (see quality_harness.h).
#include "client/examples/chat/quality_harness.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "client/chunk_key.h"
#include "client/examples/chat/chat_session.h"
#include "client/examples/chat/chat_turn.h"
#include "client/examples/chat/paged_kv_cache.h"
#include "client/examples/chat/sampler.h"
#include "codec/kivi.h"

namespace kvcache::chat {
namespace {

// What restoring a chunk coded by an in-place variant (KIVI or CacheGen)
// gives, and its coded size.
absl::StatusOr<codec::KiviResult> RoundTripInPlace(
    const Variant& variant, const codec::ChunkShape& shape,
    absl::Span<const uint16_t> values) {
  if (!variant.cachegen.has_value()) {
    return codec::KiviRoundTrip(shape, values, variant.kivi_bits);
  }
  absl::StatusOr<std::string> stream =
      codec::CacheGenEncode(shape, values, *variant.cachegen);
  if (!stream.ok()) return stream.status();
  codec::KiviResult result;
  result.decoded.resize(values.size());
  if (absl::Status st =
          codec::CacheGenDecode(*stream, absl::MakeSpan(result.decoded));
      !st.ok()) {
    return st;
  }
  result.bytes = stream->size();
  return result;
}

// Room for the conversation, twice over.
absl::StatusOr<PagedKvCache> CacheFor(const LlamaModel& model,
                                      const Conversation& conversation) {
  size_t tokens = 0;
  for (const Segment& s : conversation.segments) {
    tokens += s.prompt.size() + s.scored.size();
  }
  constexpr int kBlockTokens = 16;
  return PagedKvCache::Create(model.CacheShape(
      kBlockTokens, static_cast<int>(2 * tokens / kBlockTokens + 8)));
}

// Prefills a segment into `seq`: the prompt, then the scored tokens
// teacher-forced. Returns the logits that predicted each scored token,
// [scored][vocab].
absl::StatusOr<std::vector<float>> RunSegment(const LlamaModel& model,
                                              PagedKvCache* cache,
                                              SequenceId seq,
                                              const Segment& segment) {
  const size_t vocab = model.config().vocab_size;
  std::vector<float> predicting;
  if (!segment.prompt.empty()) {
    absl::StatusOr<std::vector<float>> last =
        model.Prefill(cache, seq, segment.prompt);
    if (!last.ok()) return last.status();
    predicting = *std::move(last);
  }
  if (segment.scored.empty()) return std::vector<float>();
  if (predicting.empty()) {
    return absl::InvalidArgumentError(
        "scored tokens need a prompt before them");
  }
  absl::StatusOr<std::vector<float>> rows =
      model.Prefill(cache, seq, segment.scored, LogitsFor::kEveryToken);
  if (!rows.ok()) return rows.status();
  // Row j of `rows` predicts scored token j + 1; the last row predicts what
  // follows the segment and is dropped.
  predicting.insert(predicting.end(), rows->begin(), rows->end() - vocab);
  return predicting;
}

}  // namespace

absl::StatusOr<std::vector<Conversation>> DocumentConversations(
    const model::BpeTokenizer& tokenizer, absl::Span<const Document> documents,
    const DocumentOptions& options) {
  std::vector<Conversation> out;
  for (const Document& document : documents) {
    if (static_cast<int>(out.size()) == options.count) break;
    const int history =
        options.history_tokens[out.size() % options.history_tokens.size()];
    const size_t needed =
        history + options.prompt_tokens + options.scored_tokens;
    absl::StatusOr<std::vector<int32_t>> ids = tokenizer.Encode(document.text);
    if (!ids.ok()) return ids.status();
    if (ids->size() < needed) continue;
    const auto slice = [&](size_t begin, size_t end) {
      return std::vector<int32_t>(ids->begin() + begin, ids->begin() + end);
    };
    const size_t scored_from = history + options.prompt_tokens;
    Conversation c;
    c.name = absl::StrCat(document.path, " (", history, " tokens)");
    c.segments.push_back({slice(0, history), {}});
    c.segments.push_back(
        {slice(history, scored_from), slice(scored_from, needed)});
    out.push_back(std::move(c));
  }
  if (static_cast<int>(out.size()) < options.count) {
    return absl::NotFoundError(
        absl::StrCat("only ", out.size(), " of ", documents.size(),
                     " documents are long enough; ", options.count, " wanted"));
  }
  return out;
}

absl::StatusOr<std::vector<Conversation>> ChatConversations(
    const LlamaModel& model, const model::BpeTokenizer& tokenizer,
    const model::ChatMlTemplate& chat_template,
    absl::Span<const std::string> questions, const ChatOptions& options) {
  const size_t needed = static_cast<size_t>(options.count) * options.turns;
  if (questions.size() < needed) {
    return absl::NotFoundError(absl::StrCat(needed, " questions needed, ",
                                            questions.size(), " available"));
  }
  absl::StatusOr<int32_t> end_of_message =
      tokenizer.TokenId(model::ChatMlTemplate::kEndOfMessage);
  if (!end_of_message.ok()) return end_of_message.status();
  const int max_prompt = 512;  // a generous bound for one question
  absl::StatusOr<PagedKvCache> cache = PagedKvCache::Create(model.CacheShape(
      16, options.turns * (max_prompt + options.reply_tokens) / 16 + 8));
  if (!cache.ok()) return cache.status();

  std::vector<Conversation> out;
  for (int i = 0; i < options.count; ++i) {
    Conversation c;
    c.name = absl::StrCat("chat ", i, ": ", questions[i * options.turns]);
    c.chat = true;
    const SequenceId seq = cache->CreateSequence();
    bool reply_closed = false;
    for (int turn = 0; turn < options.turns; ++turn) {
      absl::StatusOr<std::vector<int32_t>> prompt =
          tokenizer.Encode(chat_template.TurnPrompt(
              {"user", questions[i * options.turns + turn]}, turn == 0,
              reply_closed));
      if (!prompt.ok()) return prompt.status();
      absl::StatusOr<std::vector<float>> logits =
          model.Prefill(&*cache, seq, *prompt);
      if (!logits.ok()) return logits.status();
      Sampler greedy(/*seed=*/0);
      absl::StatusOr<std::vector<int32_t>> reply =
          Generate(model, &*cache, seq, options.reply_tokens, greedy,
                   /*temperature=*/0, *logits, *end_of_message);
      if (!reply.ok()) return reply.status();
      Segment segment{*std::move(prompt), *std::move(reply)};
      reply_closed = segment.scored.back() == *end_of_message;
      c.segments.push_back(std::move(segment));
    }
    cache->FreeSequence(seq).IgnoreError();
    out.push_back(std::move(c));
  }
  return out;
}

std::vector<Variant> DefaultVariants() {
  std::vector<Variant> variants;
  for (codec::Level level :
       {codec::Level::kLossless, codec::Level::kNearLossless,
        codec::Level::kHigh, codec::Level::kDefault, codec::Level::kCompact,
        codec::Level::kTiny, codec::Level::kProfileFine,
        codec::Level::kProfileBalanced, codec::Level::kProfileSmall}) {
    const std::string name(codec::LevelName(level));
    variants.push_back({name, name, level});
  }
  for (int bits : {8, 4, 2}) {
    variants.push_back({absl::StrCat("KIVI ", bits, "-bit"),
                        absl::StrCat("kivi", bits), std::nullopt, bits});
  }
  for (const codec::CacheGenConfig& config : codec::CacheGenSettings()) {
    const auto& b = config.delta_bins;
    variants.push_back(
        {absl::StrCat("CacheGen ref ", b[0], "/", b[1], "/", b[2]),
         absl::StrCat("cachegen", b[0], "-", b[1], "-", b[2]), std::nullopt, 0,
         config});
  }
  return variants;
}

double VariantResult::MeanKl() const {
  double sum = 0;
  for (double k : kl) sum += k;
  return kl.empty() ? 0 : sum / kl.size();
}

double VariantResult::KlQuantile(double q) const {
  if (kl.empty()) return 0;
  std::vector<double> sorted = kl;
  std::sort(sorted.begin(), sorted.end());
  return sorted[std::min(sorted.size() - 1,
                         static_cast<size_t>(q * sorted.size()))];
}

double VariantResult::Perplexity() const {
  return text_positions ? std::exp(text_nll / text_positions) : 0;
}

double VariantResult::PerplexityReference() const {
  return text_positions ? std::exp(text_nll_reference / text_positions) : 0;
}

absl::StatusOr<std::vector<VariantResult>> QualityHarness::Run(
    absl::Span<const Conversation> conversations,
    absl::Span<const Variant> variants) {
  std::vector<VariantResult> results(variants.size());
  for (size_t v = 0; v < variants.size(); ++v) {
    results[v].name = variants[v].name;
  }
  for (const Conversation& conversation : conversations) {
    absl::StatusOr<ReferenceRun> reference = Reference(conversation);
    if (!reference.ok()) return reference.status();
    for (size_t v = 0; v < variants.size(); ++v) {
      if (absl::Status s =
              RunVariant(conversation, variants[v], *reference, results[v]);
          !s.ok()) {
        return absl::Status(
            s.code(), absl::StrCat(conversation.name, ", ", variants[v].name,
                                   ": ", s.message()));
      }
    }
  }
  return results;
}

absl::StatusOr<QualityHarness::ReferenceRun> QualityHarness::Reference(
    const Conversation& conversation) {
  absl::StatusOr<PagedKvCache> cache = CacheFor(model_, conversation);
  if (!cache.ok()) return cache.status();
  const SequenceId seq = cache->CreateSequence();
  ReferenceRun out;
  for (const Segment& segment : conversation.segments) {
    absl::StatusOr<std::vector<float>> rows =
        RunSegment(model_, &*cache, seq, segment);
    if (!rows.ok()) return rows.status();
    out.logits.push_back(*std::move(rows));
    if (out.logits.size() == 1) {
      absl::StatusOr<std::vector<uint16_t>> kv =
          cache->ExportChunk(seq, 0, *cache->Length(seq));
      if (!kv.ok()) return kv.status();
      out.first_segment_kv = *std::move(kv);
    }
  }
  return out;
}

absl::Status QualityHarness::RunVariant(const Conversation& conversation,
                                        const Variant& variant,
                                        const ReferenceRun& reference,
                                        VariantResult& result) {
  absl::StatusOr<PagedKvCache> cache = CacheFor(model_, conversation);
  if (!cache.ok()) return cache.status();
  const size_t vocab = model_.config().vocab_size;
  std::optional<ChatSession> session;
  std::vector<ChunkKey> stored_keys;  // to delete at the end
  if (variant.level.has_value()) {
    absl::StatusOr<KeySpace> space = ChatKeySpace(
        model_path_, model_.config(), chunk_tokens_, *variant.level, "quality");
    if (!space.ok()) return space.status();
    ChatSessionOptions options;
    options.level = *variant.level;
    options.profile = profile_;
    absl::StatusOr<ChatSession> created =
        ChatSession::Create(&*cache, store_, *space, options);
    if (!created.ok()) return created.status();
    session.emplace(*std::move(created));
  }
  // KIVI: the size of each stored chunk, and how many leading chunks are
  // already quantized (a store re-sends only the rest, as ChatSession does).
  std::vector<size_t> kivi_bytes;
  size_t kivi_full_chunks = 0;
  codec::ChunkShape shape;
  shape.layers = model_.config().layers;
  shape.kv_heads = model_.config().kv_heads;
  shape.head_dim = model_.config().head_dim();

  // Segment 0 runs as in the reference: start from its KV.
  SequenceId seq = cache->CreateSequence();
  if (absl::Status st = cache->ImportChunk(seq, 0, reference.first_segment_kv);
      !st.ok()) {
    return st;
  }
  const Segment& first = conversation.segments[0];
  std::vector<int32_t> tokens = first.prompt;  // the sequence's tokens
  tokens.insert(tokens.end(), first.scored.begin(), first.scored.end());
  for (size_t s = 1; s < conversation.segments.size(); ++s) {
    const Segment& segment = conversation.segments[s];
    if (session.has_value()) {
      // Store, drop, restore: the next turn starts from kvcache.
      absl::StatusOr<StoreStats> stored = session->Store(seq, tokens);
      if (!stored.ok()) return stored.status();
      cache->FreeSequence(seq).IgnoreError();
      seq = cache->CreateSequence();
      absl::StatusOr<RestoreStats> restored = session->Restore(seq, tokens);
      if (!restored.ok()) return restored.status();
      if (!restored->fallback.ok()) return restored->fallback;
      if (restored->tokens != static_cast<int>(tokens.size())) {
        return absl::InternalError(absl::StrCat(
            "restored ", restored->tokens, " of ", tokens.size(), " tokens"));
      }
      result.restored_bytes += restored->fetched_bytes;
      result.raw_bytes += restored->raw_bytes;
      absl::StatusOr<std::vector<ChunkKey>> keys =
          ChunkKeysForTokens(session->key_space(), tokens);
      if (!keys.ok()) return keys.status();
      stored_keys.insert(stored_keys.end(), keys->begin(), keys->end());
    } else {
      // KIVI or CacheGen: what a store would send, coded and decoded in
      // place.
      const size_t chunk = chunk_tokens_;
      const size_t chunks = (tokens.size() + chunk - 1) / chunk;
      kivi_bytes.resize(chunks);
      for (size_t c = kivi_full_chunks; c < chunks; ++c) {
        const int begin = static_cast<int>(c * chunk);
        const int end =
            static_cast<int>(std::min(tokens.size(), (c + 1) * chunk));
        absl::StatusOr<std::vector<uint16_t>> values =
            cache->ExportChunk(seq, begin, end);
        if (!values.ok()) return values.status();
        shape.tokens = end - begin;
        absl::StatusOr<codec::KiviResult> coded =
            RoundTripInPlace(variant, shape, *values);
        if (!coded.ok()) return coded.status();
        if (absl::Status st = cache->ImportChunk(seq, begin, coded->decoded);
            !st.ok()) {
          return st;
        }
        kivi_bytes[c] = coded->bytes;
      }
      kivi_full_chunks = tokens.size() / chunk;
      for (size_t b : kivi_bytes) result.restored_bytes += b;
      shape.tokens = static_cast<uint32_t>(tokens.size());
      result.raw_bytes += shape.RawBytes();
    }

    absl::StatusOr<std::vector<float>> rows =
        RunSegment(model_, &*cache, seq, segment);
    if (!rows.ok()) return rows.status();
    tokens.insert(tokens.end(), segment.prompt.begin(), segment.prompt.end());
    tokens.insert(tokens.end(), segment.scored.begin(), segment.scored.end());

    const std::vector<float>& want = reference.logits[s];
    size_t first_difference = segment.scored.size();
    for (size_t j = 0; j < segment.scored.size(); ++j) {
      const absl::Span<const float> got_row(rows->data() + j * vocab, vocab);
      const absl::Span<const float> want_row(want.data() + j * vocab, vocab);
      const std::vector<double> log_got = LogSoftmax(got_row);
      const std::vector<double> log_want = LogSoftmax(want_row);
      result.kl.push_back(Kl(log_want, log_got));
      const int32_t top_got = *ArgMax(got_row), top_want = *ArgMax(want_row);
      ++result.positions;
      result.top1_same += top_got == top_want;
      result.rows_identical += std::memcmp(got_row.data(), want_row.data(),
                                           vocab * sizeof(float)) == 0;
      // A reply is the model's greedy choice at every position, so greedy
      // decoding from the restored KV would follow it until the first
      // position where the restored and recomputed top tokens differ.
      if (top_got != top_want) {
        first_difference = std::min(first_difference, j);
      }
      if (!conversation.chat) {
        ++result.text_positions;
        result.text_nll -= log_got[segment.scored[j]];
        result.text_nll_reference -= log_want[segment.scored[j]];
      }
    }
    if (conversation.chat) {
      ++result.replies;
      result.replies_identical += first_difference == segment.scored.size();
      result.first_difference_sum += first_difference;
      result.reply_tokens_sum += segment.scored.size();
    }
  }
  if (!stored_keys.empty()) {
    absl::StatusOr<uint32_t> deleted = store_->Delete(stored_keys);
    if (!deleted.ok() && !absl::IsNotFound(deleted.status())) {
      return deleted.status();
    }
  }
  return absl::OkStatus();
}

}  // namespace kvcache::chat
