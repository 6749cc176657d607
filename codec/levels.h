// What each compression level means for each (layer, K/V) plane.
#ifndef KVCACHE_CODEC_LEVELS_H_
#define KVCACHE_CODEC_LEVELS_H_

#include <vector>

#include "codec/codec.h"
#include "codec/format.h"

namespace kvcache::codec::internal {

// How the encoder quantizes one (layer, K/V) plane at a level.
struct PlanePolicy {
  ScaleMode mode = ScaleMode::kIdentity;
  float relative_step = 0;  // Step / spread of the values; see QuantizePlane.
};

// Returns one policy per (layer, K/V), K first. Early layers get finer
// steps (more bits): their errors propagate through every later layer.
std::vector<PlanePolicy> PlanePoliciesFor(Level level, uint32_t layers);

}  // namespace kvcache::codec::internal

#endif  // KVCACHE_CODEC_LEVELS_H_
