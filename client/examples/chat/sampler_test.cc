// Tests of greedy and temperature sampling and of the token NLL.
#include "client/examples/chat/sampler.h"

#include <cmath>
#include <vector>

#include "gtest/gtest.h"

namespace kvcache::chat {
namespace {

TEST(SamplerTest, ArgMaxTakesTheFirstHighest) {
  const std::vector<float> logits = {0.5f, 3.0f, -1.0f, 3.0f};
  EXPECT_EQ(*ArgMax(logits), 1);
  EXPECT_FALSE(ArgMax({}).ok());
}

TEST(SamplerTest, TokenNllIsMinusLogSoftmax) {
  const std::vector<float> logits = {1.0f, 2.0f, 3.0f};
  const double z = std::exp(1.0) + std::exp(2.0) + std::exp(3.0);
  EXPECT_NEAR(*TokenNll(logits, 0), -std::log(std::exp(1.0) / z), 1e-12);
  // Temperature divides the logits before the softmax.
  const double zt = std::exp(2.0) + std::exp(4.0) + std::exp(6.0);
  EXPECT_NEAR(*TokenNll(logits, 2, 0.5), -std::log(std::exp(6.0) / zt), 1e-12);
  // Stable for logits whose exp overflows.
  const std::vector<float> huge = {1000.0f, 1000.0f};
  EXPECT_NEAR(*TokenNll(huge, 1), std::log(2.0), 1e-12);
  EXPECT_FALSE(TokenNll(logits, 3).ok());
  EXPECT_FALSE(TokenNll(logits, -1).ok());
  EXPECT_FALSE(TokenNll(logits, 0, 0.0).ok());
}

TEST(SamplerTest, ZeroTemperatureIsGreedy) {
  Sampler sampler(7);
  const std::vector<float> logits = {0.1f, 0.2f, 5.0f, 0.3f};
  for (int i = 0; i < 10; ++i) EXPECT_EQ(*sampler.Sample(logits, 0.0), 2);
  EXPECT_FALSE(sampler.Sample(logits, -1.0).ok());
  EXPECT_FALSE(sampler.Sample(logits, std::nan("")).ok());
}

TEST(SamplerTest, SameSeedSameTokens) {
  const std::vector<float> logits = {0.0f, 0.5f, 1.0f, 1.5f, 2.0f};
  Sampler a(42), b(42), c(43);
  std::vector<int32_t> from_a, from_b, from_c;
  for (int i = 0; i < 200; ++i) {
    from_a.push_back(*a.Sample(logits, 1.0));
    from_b.push_back(*b.Sample(logits, 1.0));
    from_c.push_back(*c.Sample(logits, 1.0));
  }
  EXPECT_EQ(from_a, from_b);
  EXPECT_NE(from_a, from_c);
}

TEST(SamplerTest, FrequenciesFollowTheTemperedSoftmax) {
  const std::vector<float> logits = {0.0f, 1.0f, 2.0f, -30.0f};
  const double temperature = 0.7;
  Sampler sampler(1);
  constexpr int kDraws = 40000;
  std::vector<int> counts(logits.size());
  for (int i = 0; i < kDraws; ++i)
    ++counts[*sampler.Sample(logits, temperature)];
  for (size_t i = 0; i < logits.size(); ++i) {
    const double p = std::exp(-*TokenNll(logits, i, temperature));
    // Five standard deviations of a binomial count.
    const double sigma = std::sqrt(kDraws * p * (1 - p));
    EXPECT_NEAR(counts[i], kDraws * p, 5 * sigma + 1) << "token " << i;
  }
}

}  // namespace
}  // namespace kvcache::chat
