// A worker's model profile on SmolLM2-135M-Instruct ($KVCACHE_MODEL), on a
// little of the calibration text: the heads' sensitivities are measured, and
// they are a property of the model (KL per unit of noise variance), not of
// how much noise measured them; the key components are weighted by the
// queries that read them.
#include "client/examples/chat/model_profile.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "client/examples/chat/llama_model.h"
#include "client/examples/chat/real_text.h"
#include "client/examples/chat/test_model.h"
#include "client/examples/model/model_text.h"
#include "codec/profile.h"
#include "gtest/gtest.h"

namespace kvcache::chat {
namespace {

TEST(ModelProfileTest, SensitivitiesAreTheModelsNotTheNoises) {
  absl::StatusOr<TestModel> loaded = LoadTestModel();
  ASSERT_TRUE(loaded.ok()) << loaded.status();
  const LlamaModel* model = &loaded->model;
  const model::ModelText* text = &loaded->text;
  absl::StatusOr<std::vector<Document>> documents =
      LoadDocuments(kPythonDocsRoot, TextSet::kCalibration);
  ASSERT_TRUE(documents.ok()) << documents.status();

  CalibrationOptions options;
  options.tokens = 512;
  options.tokens_per_document = 512;
  options.sensitivity_documents = 1;
  options.sensitivity_history = 256;
  options.sensitivity_scored = 16;
  std::vector<std::vector<float>> measured;
  for (double noise : {0.03, 0.06}) {
    options.sensitivity_noise = noise;
    absl::StatusOr<codec::ModelProfile> profile =
        CalibrateModelProfile(*model, *text->tokenizer, *documents, options);
    ASSERT_TRUE(profile.ok()) << profile.status();
    ASSERT_EQ(profile->sensitivity.size(), profile->Heads());
    // The profile travels with them (version 2) and keeps its id.
    absl::StatusOr<codec::ModelProfile> parsed =
        codec::ParseProfile(codec::SerializeProfile(*profile));
    ASSERT_TRUE(parsed.ok()) << parsed.status();
    EXPECT_EQ(parsed->id, profile->id);
    EXPECT_EQ(parsed->sensitivity, profile->sensitivity);
    measured.push_back(profile->sensitivity);
    // Component weights: 1 for values; for keys, mean 1 over a head's
    // components, the queries' energy gathered in some of them.
    const uint32_t d = profile->head_dim;
    ASSERT_EQ(profile->component_weight.size(), profile->Heads() * d);
    double largest = 0;
    for (uint32_t l = 0; l < profile->layers; ++l) {
      for (bool is_value : {false, true}) {
        const size_t head = profile->Head(l, is_value, 0);
        double sum = 0;
        for (uint32_t k = 0; k < d; ++k) {
          const float w = profile->component_weight[head * d + k];
          sum += w;
          if (is_value) {
            EXPECT_EQ(w, 1.0f);
          }
          largest = std::max<double>(largest, w);
        }
        EXPECT_NEAR(sum / d, 1.0, is_value ? 0 : 0.02) << l;
      }
    }
    EXPECT_GT(largest, 4);
  }
  // KL grows with the square of small noise, so KL / variance is the same
  // at either noise: the per-head ratios centre on 1, where forgetting the
  // division would put them at 4. The heads differ from each other by far
  // more than that.
  std::vector<double> ratios;
  for (size_t p = 0; p < measured[0].size(); ++p) {
    ratios.push_back(measured[1][p] / measured[0][p]);
  }
  std::sort(ratios.begin(), ratios.end());
  const double median = ratios[ratios.size() / 2];
  EXPECT_GT(median, 0.6);
  EXPECT_LT(median, 1.6);
  const auto [least, most] =
      std::minmax_element(measured[0].begin(), measured[0].end());
  EXPECT_GT(*most / *least, 20);
}

}  // namespace
}  // namespace kvcache::chat
