// Choosing the next token from logits, scoring a given one, and comparing
// two next-token distributions.
//
// Sampling is deterministic for a seed on every platform: the generator is
// std::mt19937_64 (its output is fixed by the standard) and uniforms are made
// from its raw bits rather than by std::uniform_real_distribution, whose
// algorithm is left to the library.
#ifndef KVCACHE_CLIENT_EXAMPLES_CHAT_SAMPLER_H_
#define KVCACHE_CLIENT_EXAMPLES_CHAT_SAMPLER_H_

#include <cstdint>
#include <random>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"

namespace kvcache::chat {

// The highest logit's index, the lowest one on ties. INVALID_ARGUMENT if
// `logits` is empty.
absl::StatusOr<int32_t> ArgMax(absl::Span<const float> logits);

// -log softmax(logits / temperature)[token], in nats, computed stably in
// double. INVALID_ARGUMENT for a token outside the logits or a temperature
// that is not positive.
absl::StatusOr<double> TokenNll(absl::Span<const float> logits, int32_t token,
                                double temperature = 1.0);

// log softmax(logits), computed stably in double.
std::vector<double> LogSoftmax(absl::Span<const float> logits);

// KL(p || q) in nats from two log-probability vectors of equal size.
double Kl(absl::Span<const double> log_p, absl::Span<const double> log_q);

class Sampler {
 public:
  explicit Sampler(uint64_t seed) : rng_(seed) {}

  // Draws from softmax(logits / temperature); temperature 0 means greedy
  // (ArgMax, consuming no randomness). INVALID_ARGUMENT for empty logits or
  // a negative or NaN temperature.
  absl::StatusOr<int32_t> Sample(absl::Span<const float> logits,
                                 double temperature);

 private:
  std::mt19937_64 rng_;
};

}  // namespace kvcache::chat

#endif  // KVCACHE_CLIENT_EXAMPLES_CHAT_SAMPLER_H_
