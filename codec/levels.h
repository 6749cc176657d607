// What each compression level means for each (layer, K/V) plane.
#ifndef KVCACHE_CODEC_LEVELS_H_
#define KVCACHE_CODEC_LEVELS_H_

#include <vector>

#include "codec/codec.h"
#include "codec/format.h"
#include "codec/profile.h"

namespace kvcache::codec::internal {

// How the encoder quantizes one (layer, K/V) plane at a level.
struct PlanePolicy {
  ScaleMode mode = ScaleMode::kIdentity;
  float relative_step = 0;  // Step / spread of the values; see QuantizePlane.
  // When not empty, per channel (a transform's component) the step itself,
  // whatever the chunk's spread.
  std::vector<float> channel_steps;
};

// Returns one policy per (layer, K/V), K first. Early layers get finer
// steps (more bits): their errors propagate through every later layer.
//
// A transform level with a profile that has sensitivities instead
// allocates the level's distortion target across heads and components:
// component c of head h gets the absolute step that adds an equal share of
// the target's KL divergence to every head (sensitivity * step^2 / 12,
// averaged over the head's components with their weights), and within a
// head the same to every component (weight * step^2 equal). That is where
// the rate that a given total distortion costs is smallest (equal
// slopes).
std::vector<PlanePolicy> PlanePoliciesFor(
    Level level, uint32_t layers, const ModelProfile* profile = nullptr);

// Transform levels store the tokens at the first kExactPositions positions
// of a sequence exactly: models park a large share of their attention there
// (attention sinks; on SmolLM2 a third of it on position 0), so their
// errors cost far more than other tokens'. Returns how many of a chunk's
// leading tokens that is.
inline constexpr uint32_t kExactPositions = 4;
inline uint32_t ExactTokens(uint32_t first_position, uint32_t tokens) {
  if (first_position >= kExactPositions) return 0;
  const uint32_t n = kExactPositions - first_position;
  return n < tokens ? n : tokens;
}

}  // namespace kvcache::codec::internal

#endif  // KVCACHE_CODEC_LEVELS_H_
