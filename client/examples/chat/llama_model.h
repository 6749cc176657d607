// A llama2.c checkpoint and its fp32 CPU forward pass, for the reference
// chat worker.
//
// The model keeps no per-sequence state: every token's keys (after RoPE) and
// values go into a PagedKvCache, and attention reads them back from there as
// the fp16 values the cache holds. So what kvcache stores and restores is all
// a worker needs to continue a conversation, and a restored prefix gives the
// same logits as the original one, bit for bit.
//
// The math follows llama2.c (and kvdump.py, the numpy reference the dumps in
// shared/kvdata came from): RMSNorm with eps 1e-5, RoPE rotating adjacent
// pairs with theta 10000 per head, grouped-query attention where query head h
// reads KV head h / (heads / kv_heads), SwiGLU feed-forward, and a classifier
// shared with the embedding unless the header's vocab_size is negative.
#ifndef KVCACHE_CLIENT_EXAMPLES_CHAT_LLAMA_MODEL_H_
#define KVCACHE_CLIENT_EXAMPLES_CHAT_LLAMA_MODEL_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "client/examples/chat/paged_kv_cache.h"

namespace kvcache::chat {

// The checkpoint header, with vocab_size's sign decoded.
struct LlamaConfig {
  int dim = 0;
  int hidden_dim = 0;
  int layers = 0;
  int heads = 0;
  int kv_heads = 0;
  int vocab_size = 0;
  int seq_len = 0;  // the longest context the model was trained for
  bool shared_classifier = true;

  int head_dim() const { return dim / heads; }
  int kv_dim() const { return kv_heads * head_dim(); }
};

// Which positions of a Prefill get logits.
enum class LogitsFor { kLastToken, kEveryToken };

// Immutable once loaded; Prefill is const, so threads may share a model as
// long as each uses its own cache.
class LlamaModel {
 public:
  // Reads a llama2.c checkpoint: 7 little-endian int32 (dim, hidden_dim,
  // n_layers, n_heads, n_kv_heads, vocab_size, seq_len) and then the float32
  // weights. NOT_FOUND if the file cannot be opened; INVALID_ARGUMENT, naming
  // the problem, if the header is implausible or the file size does not
  // match it exactly (truncated, padded, or not a checkpoint).
  static absl::StatusOr<LlamaModel> Load(const std::string& path);

  LlamaModel(LlamaModel&&) = default;
  LlamaModel& operator=(LlamaModel&&) = default;

  const LlamaConfig& config() const { return config_; }

  // The cache shape this model reads and writes, for the given paging.
  KvCacheShape CacheShape(int block_tokens, int num_blocks) const;

  // Runs `tokens` at the positions following those already in `seq`,
  // appending their KV to the cache, and returns logits as
  // [rows][vocab_size]: one row for the last token or one per token.
  // INVALID_ARGUMENT for no tokens, a token outside the vocabulary or a cache
  // of another shape; OUT_OF_RANGE past seq_len; the cache's errors (unknown
  // sequence, no free blocks) otherwise. On error the sequence is unchanged.
  //
  // Each output is computed the same way however the tokens are batched, so
  // one Prefill of n tokens and n calls of one token give identical bits.
  absl::StatusOr<std::vector<float>> Prefill(
      PagedKvCache* cache, SequenceId seq, absl::Span<const int32_t> tokens,
      LogitsFor logits_for = LogitsFor::kLastToken) const;

 private:
  // Offsets of each tensor in the weights, which follow the header; per-layer
  // tensors are stacked.
  struct Tensors {
    size_t embedding = 0;
    size_t rms_att = 0;
    size_t wq = 0;
    size_t wk = 0;
    size_t wv = 0;
    size_t wo = 0;
    size_t rms_ffn = 0;
    size_t w1 = 0;
    size_t w2 = 0;
    size_t w3 = 0;
    size_t rms_final = 0;
    size_t classifier = 0;
    size_t end = 0;  // floats after the header in all
  };

  // Where each tensor of a checkpoint with this header starts.
  static Tensors Layout(const LlamaConfig& config);

  LlamaModel(const LlamaConfig& config, std::vector<float> weights);

  // Layer `layer`'s slice of a stacked tensor of `per_layer` floats a layer.
  const float* LayerTensor(size_t offset, int layer, size_t per_layer) const {
    return weights_.data() + offset + per_layer * layer;
  }
  // The forward pass proper, once the cache has room for the tokens.
  absl::StatusOr<std::vector<float>> Run(PagedKvCache* cache, SequenceId seq,
                                         int start,
                                         absl::Span<const int32_t> tokens,
                                         LogitsFor logits_for) const;

  LlamaConfig config_;
  std::vector<float> weights_;
  Tensors tensors_;
  // RoPE frequency of each pair within a head: 10000^(-2j / head_dim).
  std::vector<double> rope_freq_;
};

// llama2.c's beginning-of-sequence token.
inline constexpr int32_t kBosToken = 1;

// The tokens a model read while generating `generated` from BOS: BOS, then
// every generated token but the last, so that position p's logits predict
// generated[p].
inline std::vector<int32_t> ReplayInputs(absl::Span<const int32_t> generated) {
  std::vector<int32_t> inputs = {kBosToken};
  if (!generated.empty()) {
    inputs.insert(inputs.end(), generated.begin(), generated.end() - 1);
  }
  return inputs;
}

}  // namespace kvcache::chat

#endif  // KVCACHE_CLIENT_EXAMPLES_CHAT_LLAMA_MODEL_H_
