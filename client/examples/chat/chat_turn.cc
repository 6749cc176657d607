// A chat turn: restore, prefill, score, generate (see chat_turn.h).
#include "client/examples/chat/chat_turn.h"

#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"

namespace kvcache::chat {

absl::StatusOr<std::vector<int32_t>> Generate(
    const LlamaModel& model, PagedKvCache* cache, SequenceId seq, int count,
    Sampler& sampler, double temperature, std::vector<float>& logits,
    std::optional<int32_t> stop_token) {
  std::vector<int32_t> tokens;
  tokens.reserve(count);
  for (int i = 0; i < count; ++i) {
    absl::StatusOr<int32_t> next = sampler.Sample(logits, temperature);
    if (!next.ok()) return next.status();
    absl::StatusOr<std::vector<float>> after =
        model.Prefill(cache, seq, {*next});
    if (!after.ok()) return after.status();
    logits = *std::move(after);
    tokens.push_back(*next);
    if (*next == stop_token) break;
  }
  return tokens;
}

absl::StatusOr<ContinuationScore> ScoreContinuation(
    const LlamaModel& model, PagedKvCache* cache, SequenceId seq,
    absl::Span<const float> logits, absl::Span<const int32_t> continuation) {
  if (continuation.empty()) {
    return absl::InvalidArgumentError("no continuation to score");
  }
  const size_t n = continuation.size();
  std::vector<float> rows(logits.begin(), logits.end());
  if (n > 1) {
    // Row i + 1 of these logits predicts continuation[i + 1].
    absl::StatusOr<std::vector<float>> more = model.Prefill(
        cache, seq, continuation.first(n - 1), LogitsFor::kEveryToken);
    if (!more.ok()) return more.status();
    rows.insert(rows.end(), more->begin(), more->end());
  }
  const size_t vocab = logits.size();
  ContinuationScore score;
  double total = 0;
  for (size_t i = 0; i < n; ++i) {
    const absl::Span<const float> row =
        absl::MakeConstSpan(rows).subspan(i * vocab, vocab);
    absl::StatusOr<double> nll = TokenNll(row, continuation[i]);
    if (!nll.ok()) return nll.status();
    total += *nll;
    score.predicted.push_back(*ArgMax(row));
  }
  score.mean_nll = total / n;
  return score;
}

namespace {

// Everything after the restore; the caller frees the sequence on error.
absl::Status FinishTurn(const LlamaModel& model, PagedKvCache* cache,
                        const TurnSpec& spec, TurnOutcome& outcome) {
  std::vector<int32_t> prompt = spec.history;
  prompt.insert(prompt.end(), spec.user.begin(), spec.user.end());
  const absl::Span<const int32_t> rest =
      absl::MakeConstSpan(prompt).subspan(outcome.restore.tokens);
  outcome.recomputed_tokens = static_cast<int>(rest.size());
  const absl::Time start = absl::Now();
  absl::StatusOr<std::vector<float>> logits =
      model.Prefill(cache, outcome.seq, rest);
  outcome.prefill_time = absl::Now() - start;
  if (!logits.ok()) return logits.status();
  outcome.first_logits = *logits;

  if (!spec.continuation.empty()) {
    absl::StatusOr<ContinuationScore> score = ScoreContinuation(
        model, cache, outcome.seq, *logits, spec.continuation);
    if (!score.ok()) return score.status();
    outcome.continuation = *std::move(score);
    if (absl::Status status =
            cache->Truncate(outcome.seq, static_cast<int>(prompt.size()));
        !status.ok()) {
      return status;
    }
  }
  Sampler sampler(spec.seed);
  absl::StatusOr<std::vector<int32_t>> reply =
      Generate(model, cache, outcome.seq, spec.reply_tokens, sampler,
               spec.temperature, *logits, spec.stop_token);
  if (!reply.ok()) return reply.status();
  outcome.reply = *std::move(reply);
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<TurnOutcome> ContinueTurn(const LlamaModel& model,
                                         PagedKvCache* cache, SequenceId seq,
                                         const TurnSpec& spec) {
  if (spec.user.empty()) {
    return absl::InvalidArgumentError("a turn needs a user message");
  }
  absl::StatusOr<int> length = cache->Length(seq);
  if (!length.ok()) return length.status();
  if (*length != static_cast<int>(spec.history.size())) {
    return absl::FailedPreconditionError(
        absl::StrCat("the sequence holds ", *length, " tokens, the history ",
                     spec.history.size()));
  }
  TurnOutcome outcome;
  outcome.seq = seq;
  outcome.restore.tokens = *length;
  if (absl::Status status = FinishTurn(model, cache, spec, outcome);
      !status.ok()) {
    return status;
  }
  return outcome;
}

absl::StatusOr<TurnOutcome> RunTurn(const LlamaModel& model,
                                    PagedKvCache* cache, ChatSession* session,
                                    const TurnSpec& spec) {
  // Only the history is restored, so the user message is what the forward
  // pass that yields the first reply logits runs on.
  if (spec.user.empty()) {
    return absl::InvalidArgumentError("a turn needs a user message");
  }
  TurnOutcome outcome;
  outcome.seq = cache->CreateSequence();
  if (session != nullptr && !spec.history.empty()) {
    absl::StatusOr<RestoreStats> restored =
        session->Restore(outcome.seq, spec.history);
    if (!restored.ok()) {
      cache->FreeSequence(outcome.seq).IgnoreError();
      return restored.status();
    }
    outcome.restore = *std::move(restored);
  }
  if (absl::Status status = FinishTurn(model, cache, spec, outcome);
      !status.ok()) {
    cache->FreeSequence(outcome.seq).IgnoreError();
    return status;
  }
  return outcome;
}

}  // namespace kvcache::chat
