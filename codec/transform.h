// The CPU side of the transform levels (format v3): a plane's heads moved
// into their profile's principal components (keys with RoPE undone first)
// and back. transform_math.h holds the arithmetic the GPU shares.
#ifndef KVCACHE_CODEC_TRANSFORM_H_
#define KVCACHE_CODEC_TRANSFORM_H_

#include <cstdint>
#include <vector>

#include "absl/strings/string_view.h"
#include "absl/types/span.h"
#include "codec/format.h"
#include "codec/profile.h"
#include "codec/transform_math.h"

namespace kvcache::codec::internal {

// One plane's place in a chunk and the rotation its keys carry.
struct TransformPlane {
  const ModelProfile* profile;
  uint32_t layer;
  bool is_value;
  // [token][pair] angles of the chunk's positions; empty for values and for
  // profiles without RoPE.
  absl::Span<const SinCos> rope;
};

// The angles of `tokens` positions from first_position, [token][pair].
std::vector<SinCos> RopeTable(const ModelProfile& profile,
                              uint32_t first_position, uint32_t tokens);

// Undoes (keys before the transform) or re-applies (after it) the
// profile's RoPE on one head of head_dim floats; `angles` holds the token's
// head_dim / 2 pairs' angles.
void RotateHead(const ModelProfile& p, const SinCos* angles, bool undo,
                float* head);

// coeff (tokens x channels, channel = head * head_dim + component) = the
// components of src's heads (tokens x channels of dtype patterns).
void ForwardPlane(const Header& h, const TransformPlane& plane,
                  const uint16_t* src, float* coeff);

// Channel group cg (whole heads) of a plane back to values: integers q
// (tokens x channel_group) through the plane's per-component scales into
// coefficients, the inverse transform, RoPE, rounding to the dtype; written
// to out (tokens x channels).
void ReconstructGroup(const Header& h, const TransformPlane& plane,
                      absl::string_view plane_scales, uint32_t cg,
                      const uint16_t* q, uint16_t* out);

}  // namespace kvcache::codec::internal

#endif  // KVCACHE_CODEC_TRANSFORM_H_
