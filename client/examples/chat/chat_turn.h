// One chat turn on top of LlamaModel: restore the history's KV through a
// ChatSession (or not), prefill what is left of the prompt, score a fixed
// continuation and generate the reply. Shared by the chat worker, the restore
// benchmark and the tests, so all three measure the same loop.
//
// Threading: as LlamaModel and PagedKvCache; one thread per cache.
#ifndef KVCACHE_CLIENT_EXAMPLES_CHAT_CHAT_TURN_H_
#define KVCACHE_CLIENT_EXAMPLES_CHAT_CHAT_TURN_H_

#include <cstdint>
#include <optional>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "absl/types/span.h"
#include "client/examples/chat/chat_session.h"
#include "client/examples/chat/llama_model.h"
#include "client/examples/chat/paged_kv_cache.h"
#include "client/examples/chat/sampler.h"

namespace kvcache::chat {

// Draws up to `count` tokens, starting from `logits` (the model's output for
// the sequence's last token) and feeding each one back, so that on return the
// sequence holds the KV of all of them and `logits` predicts the next token.
// Stops early after drawing `stop_token`, which is returned too. Temperature
// 0 is greedy. The model's or sampler's errors otherwise.
absl::StatusOr<std::vector<int32_t>> Generate(
    const LlamaModel& model, PagedKvCache* cache, SequenceId seq, int count,
    Sampler& sampler, double temperature, std::vector<float>& logits,
    std::optional<int32_t> stop_token = std::nullopt);

// How the model scores a fixed continuation of the sequence.
struct ContinuationScore {
  // Mean negative log-likelihood in nats per token (exp of it: perplexity).
  double mean_nll = 0;
  // The model's top token at each position (teacher-forced), to compare two
  // runs' predictions without one early difference changing all later input.
  std::vector<int32_t> predicted;
};

// Scores `continuation` following the sequence, given `logits` for its last
// token, and appends the KV of all but the continuation's last token.
// INVALID_ARGUMENT for an empty continuation.
absl::StatusOr<ContinuationScore> ScoreContinuation(
    const LlamaModel& model, PagedKvCache* cache, SequenceId seq,
    absl::Span<const float> logits, absl::Span<const int32_t> continuation);

struct TurnSpec {
  // The conversation so far (its KV may be in kvcache) and the new user
  // message; the prompt is their concatenation.
  std::vector<int32_t> history;
  std::vector<int32_t> user;
  // Scored after the prompt when not empty (see ScoreContinuation).
  std::vector<int32_t> continuation;
  int reply_tokens = 0;
  std::optional<int32_t> stop_token;  // ends a reply early (see Generate)
  double temperature = 0;             // 0: greedy
  uint64_t seed = 0;
};

struct TurnOutcome {
  SequenceId seq = 0;  // holds the prompt and the reply; the caller frees it
  RestoreStats restore;
  int recomputed_tokens = 0;        // prompt tokens prefilled
  absl::Duration prefill_time;      // of those
  std::vector<float> first_logits;  // after the prompt: the reply's first
  ContinuationScore continuation;
  std::vector<int32_t> reply;
};

// Runs a turn in a new sequence of `cache`: restores the longest cached
// prefix of the history through `session` (none if null), prefills the rest
// of the prompt, scores the continuation (then drops its KV again) and
// generates the reply. INVALID_ARGUMENT for an empty user message; the model's
// errors otherwise, with the sequence freed.
absl::StatusOr<TurnOutcome> RunTurn(const LlamaModel& model,
                                    PagedKvCache* cache, ChatSession* session,
                                    const TurnSpec& spec);

// Runs a turn on `seq`, which already holds the history's KV: what a worker
// that kept the KV does, to compare with one that restored it. Prefills the
// user message, scores the continuation and generates; the outcome's
// sequence is `seq` and restore.tokens the history's length.
// FAILED_PRECONDITION unless `seq` holds exactly the history's tokens;
// otherwise as RunTurn, except that `seq` is not freed on error.
absl::StatusOr<TurnOutcome> ContinueTurn(const LlamaModel& model,
                                         PagedKvCache* cache, SequenceId seq,
                                         const TurnSpec& spec);

}  // namespace kvcache::chat

#endif  // KVCACHE_CLIENT_EXAMPLES_CHAT_CHAT_TURN_H_
