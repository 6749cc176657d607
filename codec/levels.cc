#include "codec/levels.h"

#include <array>
#include <cmath>

#include "absl/strings/str_cat.h"

namespace kvcache::codec {
namespace {

struct LevelInfo {
  Level level;
  absl::string_view name;
  float key_step;    // Relative step for keys in later layers.
  float value_step;  // Relative step for values in later layers.
  float early;       // Step multiplier for the first quarter of the layers.
  bool transform = false;  // Quantizes the profile's components.
  // Transform levels with a profile's sensitivities: the mean KL divergence
  // (nats) per next-token distribution the level aims to add.
  float target_kl = 0;
};

// Tuned on the real dumps against KIVI at equal size; see README.md.
// A transform level is a KL target where its profile has sensitivities
// (the model's own measure of what an error costs); without them its
// relative steps are a target for each plane's relative RMS error
// (step / sqrt(12)). Both tuned on SmolLM2's perplexity, see README.md.
constexpr std::array<LevelInfo, 9> kLevels = {{
    {Level::kLossless, "lossless", 0, 0, 1},
    {Level::kNearLossless, "near-lossless", 0.011f, 0.019f, 1},
    {Level::kHigh, "high", 0.22f, 0.22f, 1},
    {Level::kDefault, "default", 1.1f, 1.1f, 0.6f},
    {Level::kCompact, "compact", 1.5f, 1.5f, 0.6f},
    {Level::kTiny, "tiny", 2.2f, 2.2f, 0.6f},
    {Level::kProfileFine, "profile-fine", 0.4f, 0.3f, 0.5f, true, 0.0025f},
    {Level::kProfileBalanced, "profile-balanced", 0.7f, 0.9f, 0.5f, true,
     0.004f},
    {Level::kProfileSmall, "profile-small", 1.4f, 1.0f, 0.5f, true, 0.014f},
}};

const LevelInfo* Find(Level level) {
  for (const LevelInfo& info : kLevels) {
    if (info.level == level) return &info;
  }
  return nullptr;
}

}  // namespace

absl::string_view LevelName(Level level) {
  const LevelInfo* info = Find(level);
  return info ? info->name : "unknown";
}

absl::StatusOr<Level> ParseLevel(absl::string_view name) {
  for (const LevelInfo& info : kLevels) {
    if (info.name == name) return info.level;
  }
  std::string names;
  for (const LevelInfo& info : kLevels) {
    absl::StrAppend(&names, names.empty() ? "" : ", ", info.name);
  }
  return absl::InvalidArgumentError(
      absl::StrCat("unknown level \"", name, "\"; expected one of ", names));
}

bool LevelNeedsProfile(Level level) {
  const LevelInfo* info = Find(level);
  return info != nullptr && info->transform;
}

namespace internal {

std::vector<PlanePolicy> PlanePoliciesFor(Level level, uint32_t layers,
                                          const ModelProfile* profile) {
  const LevelInfo* info = Find(level);
  std::vector<PlanePolicy> policies(size_t{layers} * 2);
  if (info == nullptr || level == Level::kLossless) return policies;
  // FinishProfile guarantees both arrays whole; the sizes are checked again
  // so that a profile built by hand cannot index past them.
  if (info->transform && profile != nullptr && profile->layers == layers &&
      profile->sensitivity.size() == profile->Heads() &&
      profile->component_weight.size() ==
          profile->Heads() * profile->head_dim) {
    const double head_kl = double{info->target_kl} / profile->Heads();
    const uint32_t d = profile->head_dim;
    for (size_t p = 0; p < policies.size(); ++p) {
      policies[p].mode = ScaleMode::kPerChannel;
      for (uint32_t h = 0; h < profile->kv_heads; ++h) {
        const size_t head = p * profile->kv_heads + h;
        const double s = profile->sensitivity[head];
        for (uint32_t k = 0; k < d; ++k) {
          const double w = profile->component_weight[head * d + k];
          policies[p].channel_steps.push_back(
              static_cast<float>(std::sqrt(12 * head_kl / (s * w))));
        }
      }
    }
    return policies;
  }
  const uint32_t early = (layers + 3) / 4;
  for (uint32_t l = 0; l < layers; ++l) {
    const float scale = l < early ? info->early : 1.0f;
    policies[2 * l] = {ScaleMode::kPerChannel, info->key_step * scale};
    policies[2 * l + 1] = {
        info->transform ? ScaleMode::kPerChannel : ScaleMode::kPerGroup,
        info->value_step * scale};
  }
  return policies;
}

}  // namespace internal
}  // namespace kvcache::codec
