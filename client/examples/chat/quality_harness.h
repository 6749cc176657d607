// What restoring KV through kvcache does to a model's answers, per codec
// level (and per KIVI bit width beside them): conversations run once with
// the KV kept in the worker (the reference), then once per variant with the
// KV stored after every segment and restored before the next, and the
// model's next-token distributions are compared position by position.
//
// A conversation is a list of segments, each a prompt (prefilled) and tokens
// that are teacher-forced and scored:
//  - a document: its first H tokens, stored; then 16 more tokens of it as the
//    prompt and the next tokens of the real text scored;
//  - a chat: ChatML turns whose user messages are questions from Python's
//    FAQ and whose scored tokens are the model's own greedy replies (the
//    reference run generates them), stored and restored between turns, so
//    errors accumulate over turns as they would in a real session.
// Segment 0 is never scored: nothing has been restored yet.
//
// Codec levels go through a real kvcached (ChatSession: encode, put, get,
// decode); KIVI variants quantize the stored chunks in place, which is what
// a restore of them would give, and count KIVI's packed size.
//
// Not thread-safe; runs on the calling thread (BLAS uses every core).
#ifndef KVCACHE_CLIENT_EXAMPLES_CHAT_QUALITY_HARNESS_H_
#define KVCACHE_CLIENT_EXAMPLES_CHAT_QUALITY_HARNESS_H_

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "client/chunk_store.h"
#include "client/examples/chat/llama_model.h"
#include "client/examples/chat/real_text.h"
#include "client/examples/model/bpe_tokenizer.h"
#include "client/examples/model/chat_template.h"
#include "codec/cachegen_ref.h"
#include "codec/codec.h"

namespace kvcache::chat {

struct Segment {
  std::vector<int32_t> prompt;  // prefilled; not empty after segment 0
  std::vector<int32_t> scored;  // teacher-forced and scored
};

struct Conversation {
  std::string name;
  bool chat = false;  // scored tokens are the model's greedy replies
  std::vector<Segment> segments;
};

struct DocumentOptions {
  int count = 24;
  // Document i stores history_tokens[i % size] tokens.
  std::vector<int> history_tokens = {1024, 2048, 3072, 4096};
  int prompt_tokens = 16;
  int scored_tokens = 128;
};

// The first documents of `documents` long enough for their history, prompt
// and scored tokens, in order. NOT_FOUND if too few are.
absl::StatusOr<std::vector<Conversation>> DocumentConversations(
    const model::BpeTokenizer& tokenizer, absl::Span<const Document> documents,
    const DocumentOptions& options);

struct ChatOptions {
  int count = 12;
  int turns = 3;          // user messages per chat
  int reply_tokens = 96;  // most tokens of a reply, its end marker included
};

// Chat i asks FAQ questions [i * turns, (i + 1) * turns); the model answers
// each greedily (uncached), up to reply_tokens or its end-of-message token.
// NOT_FOUND if there are too few questions.
absl::StatusOr<std::vector<Conversation>> ChatConversations(
    const LlamaModel& model, const model::BpeTokenizer& tokenizer,
    const model::ChatMlTemplate& chat_template,
    absl::Span<const std::string> questions, const ChatOptions& options);

// How a conversation's KV travels between segments.
struct Variant {
  std::string name;  // as tables print it
  std::string key;   // as a command line names it
  std::optional<codec::Level> level;  // through kvcached
  int kivi_bits = 0;                  // or KIVI, in place
  // or CacheGen's coder (codec/cachegen_ref.h), in place
  std::optional<codec::CacheGenConfig> cachegen;
};

// Every codec level, then KIVI 8, 4 and 2 bits, then CacheGen's reference
// coder at each of codec::CacheGenSettings().
std::vector<Variant> DefaultVariants();

struct VariantResult {
  std::string name;
  size_t restored_bytes = 0;  // what the restores fetched
  size_t raw_bytes = 0;       // their size in fp16
  int positions = 0;          // scored positions
  int top1_same = 0;          // where the top token equals the reference's
  int rows_identical = 0;     // where every logit has the reference's bits
  std::vector<double> kl;     // KL(reference || restored) per position, nats
  // Negative log-likelihood sums over real text (documents' positions).
  int text_positions = 0;
  double text_nll = 0;
  double text_nll_reference = 0;
  // Chats: replies whose greedy decoding would be the reference's, and the
  // first position where it would differ (the reply's length if none).
  int replies = 0;
  int replies_identical = 0;
  double first_difference_sum = 0;
  double reply_tokens_sum = 0;

  double Ratio() const {
    return restored_bytes ? static_cast<double>(raw_bytes) / restored_bytes : 0;
  }
  double Top1() const { return positions ? double(top1_same) / positions : 0; }
  double MeanKl() const;
  double KlQuantile(double q) const;
  double Perplexity() const;           // restored, real text
  double PerplexityReference() const;  // recomputed, real text
};

class QualityHarness {
 public:
  // `store` and `model` must outlive the harness; `model_path` names the
  // model's file for its key space.
  // `profile`, which the transform levels need, must outlive the harness
  // too.
  QualityHarness(const LlamaModel& model, std::string model_path,
                 ChunkStore* store, uint32_t chunk_tokens,
                 const codec::ModelProfile* profile = nullptr)
      : model_(model),
        model_path_(std::move(model_path)),
        store_(store),
        chunk_tokens_(chunk_tokens),
        profile_(profile) {}

  // Runs every conversation for the reference and each variant. Stored
  // chunks are deleted after each conversation. Errors: the model's, the
  // store's, or INTERNAL if a restore came back short.
  absl::StatusOr<std::vector<VariantResult>> Run(
      absl::Span<const Conversation> conversations,
      absl::Span<const Variant> variants);

 private:
  // What the reference run gives: the logits at each scored position of
  // each segment, each [scored][vocab], and the KV after segment 0, which
  // every variant starts from (nothing is restored before it).
  struct ReferenceRun {
    std::vector<std::vector<float>> logits;
    std::vector<uint16_t> first_segment_kv;
  };
  absl::StatusOr<ReferenceRun> Reference(const Conversation& conversation);
  absl::Status RunVariant(const Conversation& conversation,
                          const Variant& variant, const ReferenceRun& reference,
                          VariantResult& result);

  const LlamaModel& model_;
  std::string model_path_;
  ChunkStore* store_;
  uint32_t chunk_tokens_;
  const codec::ModelProfile* profile_;
};

}  // namespace kvcache::chat

#endif  // KVCACHE_CLIENT_EXAMPLES_CHAT_QUALITY_HARNESS_H_
