// A Llama-architecture model and its fp32 CPU forward pass, for the
// reference chat worker: a llama2.c checkpoint (stories260K) or a GGUF file
// (SmolLM2-135M-Instruct, the reference workload), whose quantized weights
// are widened to fp32 at load.
//
// The model keeps no per-sequence state: every token's keys (after RoPE) and
// values go into a PagedKvCache, and attention reads them back from there as
// the fp16 values the cache holds. So what kvcache stores and restores is all
// a worker needs to continue a conversation, and a restored prefix gives the
// same logits as the original one, bit for bit.
//
// The math follows llama2.c (and kvdump.py, the numpy reference the dumps in
// shared/kvdata came from; for GGUF, llama.cpp's "llama" architecture):
// RMSNorm, RoPE rotating adjacent pairs of each head, grouped-query attention
// where query head h reads KV head h / (heads / kv_heads), SwiGLU
// feed-forward, and a classifier shared with the embedding unless the file
// has its own. Matrix products run on OpenBLAS (threaded).
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
  float rms_eps = 1e-5f;
  double rope_theta = 10000.0;

  int head_dim() const { return dim / heads; }
  int kv_dim() const { return kv_heads * head_dim(); }
};

// Which positions of a Prefill get logits.
enum class LogitsFor { kLastToken, kEveryToken };

// What a Prefill can record besides logits.
struct PrefillTrace {
  // The queries after RoPE of the call's tokens, [layer][token][heads *
  // head_dim] in fp16: with the cache's keys, what attention reads, so that
  // codec errors can be measured where they matter.
  std::vector<uint16_t> queries;
};

// Immutable once loaded; Prefill is const, so threads may share a model as
// long as each uses its own cache.
class LlamaModel {
 public:
  // Reads a GGUF file (it starts with "GGUF") or a llama2.c checkpoint.
  //
  // GGUF: architecture "llama", hyperparameters from its llama.* metadata,
  // every tensor dequantized to fp32. The GGUF reader's errors for a damaged
  // file; UNIMPLEMENTED for another architecture or partial RoPE;
  // INVALID_ARGUMENT if a tensor is missing or has the wrong shape.
  //
  // llama2.c: 7 little-endian int32 (dim, hidden_dim, n_layers, n_heads,
  // n_kv_heads, vocab_size, seq_len) and then the float32 weights.
  // INVALID_ARGUMENT, naming the problem, if the header is implausible or the
  // file size does not match it exactly (truncated, padded, or not a
  // checkpoint).
  //
  // NOT_FOUND if the file cannot be opened.
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
  // The same calls on the same cache contents give the same bits, so a
  // worker that restores a prefix losslessly and continues it matches one
  // that kept the prefix, bit for bit. How tokens are batched can change
  // the last bits (BLAS picks its kernels by matrix size): one Prefill of n
  // tokens and n calls of one token agree to rounding, not to the bit.
  absl::StatusOr<std::vector<float>> Prefill(
      PagedKvCache* cache, SequenceId seq, absl::Span<const int32_t> tokens,
      LogitsFor logits_for = LogitsFor::kLastToken,
      PrefillTrace* trace = nullptr) const;

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

  // Where each tensor starts; llama2.c checkpoints also hold a legacy RoPE
  // table, which is skipped.
  static Tensors Layout(const LlamaConfig& config, bool legacy_rope_table);

  static absl::StatusOr<LlamaModel> LoadLlama2c(const std::string& path);
  static absl::StatusOr<LlamaModel> LoadGguf(const std::string& path);

  LlamaModel(const LlamaConfig& config, const Tensors& tensors,
             std::vector<float> weights);

  // Layer `layer`'s slice of a stacked tensor of `per_layer` floats a layer.
  const float* LayerTensor(size_t offset, int layer, size_t per_layer) const {
    return weights_.data() + offset + per_layer * layer;
  }
  // The forward pass proper, once the cache has room for the tokens.
  absl::StatusOr<std::vector<float>> Run(PagedKvCache* cache, SequenceId seq,
                                         int start,
                                         absl::Span<const int32_t> tokens,
                                         LogitsFor logits_for,
                                         PrefillTrace* trace) const;

  LlamaConfig config_;
  std::vector<float> weights_;
  Tensors tensors_;
  // RoPE frequency of each pair within a head: theta^(-2j / head_dim).
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
