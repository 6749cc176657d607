// Greedy and temperature sampling, token NLL, KL divergence (see sampler.h).
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

std::vector<double> LogSoftmax(absl::Span<const float> logits) {
  const float max = *std::max_element(logits.begin(), logits.end());
  double sum = 0;
  for (float x : logits) sum += std::exp(double{x} - max);
  const double log_sum = std::log(sum) + max;
  std::vector<double> out(logits.size());
  for (size_t i = 0; i < logits.size(); ++i) out[i] = logits[i] - log_sum;
  return out;
}

double Kl(absl::Span<const double> log_p, absl::Span<const double> log_q) {
  double kl = 0;
  for (size_t i = 0; i < log_p.size(); ++i) {
    kl += std::exp(log_p[i]) * (log_p[i] - log_q[i]);
  }
  return std::max(0.0, kl);  // rounding can make an exact match -1e-17
}

}  // namespace kvcache::chat
