// Quantization of one (layer, K/V) plane to unsigned integers and back.
// Keys get one affine map per channel (their outlier channels get their own
// range); values get one per (token group, channel group), which tracks
// per-token magnitude while costing only 4 bytes per group.
#ifndef KVCACHE_CODEC_QUANTIZE_H_
#define KVCACHE_CODEC_QUANTIZE_H_

#include <cstdint>
#include <string>

#include "absl/strings/string_view.h"
#include "absl/types/span.h"
#include "codec/format.h"
#include "codec/quant_math.h"

namespace kvcache::codec::internal {

// Affine map `index` of a scale section (4 bytes each: offset, step).
Affine ReadAffine(absl::string_view scales, size_t index, DType dtype);

// x[i] = ToFloat(src[i], dtype) for i < n (F16C where the CPU has it).
void ValuesToFloat(const uint16_t* src, size_t n, DType dtype, float* x);

// out[i] = x[i] rounded to the dtype (nearest-even), NaN as the dtype's
// canonical quiet NaN (RoundCoefficientSum), for i < n; F16C where the CPU
// has it.
void FloatsToValues(const float* x, size_t n, DType dtype, uint16_t* out);

// Replaces q (tokens x channels, row-major) with the integers for plane
// values `src` (same layout) and appends the plane's scale section
// (ScaleBytes(h, *spec) bytes). The quantization step is `relative_step`
// times the spread of the values (rms deviation from the mean); spec->bits
// is set to the width the integers need. For kIdentity, q is a copy of src.
void QuantizePlane(const Header& h, float relative_step, PlaneSpec* spec,
                   const uint16_t* src, uint16_t* q, std::string* scales);

// QuantizePlane for values already in float (x, tokens x channels). In
// per-channel mode, channel_steps (one per channel, or empty) replaces
// relative_step times the spread. With drop_quiet_channels (per-channel
// mode only), channels whose variance is under step^2 / 12 get offset and
// step 0, so all their integers are 0.
void QuantizeFloats(const Header& h, float relative_step,
                    absl::Span<const float> channel_steps,
                    bool drop_quiet_channels, PlaneSpec* spec, const float* x,
                    uint16_t* q, std::string* scales);

// Writes channel group `cg` of a plane: integers q (tokens x channel_group,
// row-major) become values in out (tokens x channels). `plane_scales` is the
// plane's scale section.
void DequantizeGroup(const Header& h, const PlaneSpec& spec,
                     absl::string_view plane_scales, uint32_t cg,
                     const uint16_t* q, uint16_t* out);

}  // namespace kvcache::codec::internal

#endif  // KVCACHE_CODEC_QUANTIZE_H_
