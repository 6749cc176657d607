// Greedy and temperature sampling, token NLL (see sampler.h).
#include "client/examples/chat/sampler.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"

namespace kvcache::chat {
namespace {

// exp((logits[i] - max) / temperature) for every i: probabilities up to
// their sum, the largest exactly 1 so that the sum cannot overflow.
struct Unnormalised {
  std::vector<double> weights;
  double sum = 0;
  double max_logit = 0;
};

Unnormalised ScaledExp(absl::Span<const float> logits, double temperature) {
  Unnormalised u;
  u.max_logit = *std::max_element(logits.begin(), logits.end());
  u.weights.resize(logits.size());
  for (size_t i = 0; i < logits.size(); ++i) {
    u.weights[i] = std::exp((logits[i] - u.max_logit) / temperature);
    u.sum += u.weights[i];
  }
  return u;
}

}  // namespace

absl::StatusOr<int32_t> ArgMax(absl::Span<const float> logits) {
  if (logits.empty()) return absl::InvalidArgumentError("no logits");
  return static_cast<int32_t>(std::max_element(logits.begin(), logits.end()) -
                              logits.begin());
}

absl::StatusOr<double> TokenNll(absl::Span<const float> logits, int32_t token,
                                double temperature) {
  if (token < 0 || static_cast<size_t>(token) >= logits.size()) {
    return absl::InvalidArgumentError(
        absl::StrCat("token ", token, " outside ", logits.size(), " logits"));
  }
  if (!(temperature > 0)) {
    return absl::InvalidArgumentError(
        absl::StrCat("temperature ", temperature, " is not positive"));
  }
  const Unnormalised u = ScaledExp(logits, temperature);
  return std::log(u.sum) - (logits[token] - u.max_logit) / temperature;
}

absl::StatusOr<int32_t> Sampler::Sample(absl::Span<const float> logits,
                                        double temperature) {
  if (!(temperature >= 0)) {
    return absl::InvalidArgumentError(
        absl::StrCat("temperature ", temperature, " is negative or NaN"));
  }
  if (temperature == 0 || logits.empty()) return ArgMax(logits);
  const Unnormalised u = ScaledExp(logits, temperature);
  const std::vector<double>& weights = u.weights;
  // A uniform in [0, 1) from the top 53 bits.
  const double uniform = static_cast<double>(rng_() >> 11) * 0x1p-53;
  double target = uniform * u.sum;
  for (size_t i = 0; i < weights.size(); ++i) {
    target -= weights[i];
    if (target < 0) return static_cast<int32_t>(i);
  }
  // Rounding left a sliver past the last weight: take the last token that
  // has any probability.
  size_t last = weights.size() - 1;
  while (weights[last] == 0) --last;
  return static_cast<int32_t>(last);
}

}  // namespace kvcache::chat
