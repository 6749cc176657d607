// A worker's own model profile (codec/profile.h) for the codec's transform
// levels, calibrated from the KV its model computes over calibration text
// (real_text.h's calibration set, never the text the levels are judged on).
//
// Not thread-safe; runs on the calling thread (BLAS uses every core).
#ifndef KVCACHE_CLIENT_EXAMPLES_CHAT_MODEL_PROFILE_H_
#define KVCACHE_CLIENT_EXAMPLES_CHAT_MODEL_PROFILE_H_

#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "client/examples/chat/llama_model.h"
#include "client/examples/chat/real_text.h"
#include "client/examples/model/bpe_tokenizer.h"
#include "codec/profile.h"

namespace kvcache::chat {

struct CalibrationOptions {
  int tokens = 8192;               // KV tokens to calibrate on, in all
  int tokens_per_document = 2048;  // taken from the start of each document
  // Sensitivities (ModelProfile::sensitivity): on each of the first
  // sensitivity_documents documents long enough, for each head, Gaussian
  // noise of sensitivity_noise times the head's spread is added to that
  // head of the KV of the first sensitivity_history tokens (the exactly
  // stored leading tokens left alone), and the model's distributions over
  // the next sensitivity_scored tokens are compared with the clean run's.
  // 0 documents: not measured.
  int sensitivity_documents = 2;
  int sensitivity_history = 1024;
  int sensitivity_scored = 64;
  double sensitivity_noise = 0.05;
};

// Runs the documents, in order, through the model until options.tokens
// tokens of KV are collected, and makes the profile of that KV (RoPE as the
// model applies it), with the model's sensitivities measured as
// options say and, with them, the key components' weights from the queries
// that read them over the same KV (ModelProfile::component_weight).
// NOT_FOUND if the documents hold too few tokens.
absl::StatusOr<codec::ModelProfile> CalibrateModelProfile(
    const LlamaModel& model, const model::BpeTokenizer& tokenizer,
    absl::Span<const Document> documents, const CalibrationOptions& options);

}  // namespace kvcache::chat

#endif  // KVCACHE_CLIENT_EXAMPLES_CHAT_MODEL_PROFILE_H_
