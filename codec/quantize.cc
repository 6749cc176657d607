#include "codec/quantize.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "codec/byte_io.h"

namespace kvcache::codec::internal {
namespace {

struct Affine {
  float offset;
  float step;
};

// Relative precision of a stored offset, used to widen the integer range so
// rounding the offset can never push a value out of it.
float OffsetPrecision(DType dtype) {
  return dtype == DType::kFloat16 ? 1.0f / 2048 : 1.0f / 256;
}

// Integers needed to cover [center - dev, center + dev] with `step`, plus
// margin for the rounding of the stored offset and step.
float LevelsNeeded(float center, float dev, float step, DType dtype) {
  if (!(step > 0)) return 1;
  const float offset = std::fabs(center) + dev;
  return 2 * dev / step + 2 * offset * OffsetPrecision(dtype) / step + 4;
}

// Stores offset = center - 2^(bits-1) * step (so the center maps to the
// middle integer and raw symbols of every channel pool around the same
// value), appends both 16-bit patterns and returns the map as stored.
Affine Fit(float center, float step, int bits, DType dtype, std::string* out) {
  uint16_t step_bits = 0;
  if (std::isfinite(step) && step > 0) step_bits = FromFloat(step, dtype);
  const float s = ToFloat(step_bits, dtype);
  const float half = static_cast<float>(1u << (bits - 1));
  uint16_t offset_bits = FromFloat(center - half * s, dtype);
  if (!std::isfinite(ToFloat(offset_bits, dtype))) offset_bits = 0;
  ByteWriter w(out);
  w.U16(offset_bits);
  w.U16(step_bits);
  return {ToFloat(offset_bits, dtype), s};
}

class Quantizer {
 public:
  Quantizer(Affine a, int bits)
      : offset_(a.offset),
        inv_step_(a.step > 0 && std::isfinite(a.step) ? 1.0f / a.step : 0.0f),
        max_q_(static_cast<float>((1u << bits) - 1)) {}

  uint16_t operator()(float x) const {
    float v = (x - offset_) * inv_step_ + 0.5f;
    // Written so NaN lands on 0: the cast below must see a valid range.
    v = v >= 0.0f ? v : 0.0f;
    v = v <= max_q_ ? v : max_q_;
    return static_cast<uint16_t>(v);
  }

 private:
  float offset_;
  float inv_step_;
  float max_q_;
};

// Mean, standard deviation and largest deviation from the mean of a set.
struct Stats {
  double sum = 0, sum_sq = 0;
  float lo = std::numeric_limits<float>::infinity();
  float hi = -std::numeric_limits<float>::infinity();
  uint32_t n = 0;
  void Add(float x) {
    sum += x;
    sum_sq += double{x} * x;
    lo = std::min(lo, x);
    hi = std::max(hi, x);
    ++n;
  }
  float Mean() const { return n ? static_cast<float>(sum / n) : 0.0f; }
  double Variance() const {
    return n ? std::max(0.0, sum_sq / n - (sum / n) * (sum / n)) : 0.0;
  }
  float MaxDev() const {
    const float m = Mean();
    return n ? std::max(hi - m, m - lo) : 0.0f;
  }
};

// Smallest integer width whose range holds `levels` integers.
uint8_t BitsFor(float levels) {
  uint8_t bits = 1;
  while (bits < 16 && static_cast<float>(1u << bits) < levels) ++bits;
  return bits;
}

Affine ReadAffine(absl::string_view scales, size_t index, DType dtype) {
  const auto* p = reinterpret_cast<const uint8_t*>(scales.data()) + 4 * index;
  return {ToFloat(LoadU16(p), dtype), ToFloat(LoadU16(p + 2), dtype)};
}

template <DType kType>
void DequantizeGroupT(const Header& h, const PlaneSpec& spec,
                      absl::string_view scales, uint32_t cg, const uint16_t* q,
                      uint16_t* out) {
  const uint32_t width = h.channel_group;
  const uint32_t row = h.Channels();
  const uint32_t c0 = cg * width;
  std::vector<float> offset(width), step(width);
  for (uint32_t tg = 0, t0 = 0; t0 < h.shape.tokens;
       ++tg, t0 += h.token_group) {
    const uint32_t t1 = std::min(h.shape.tokens, t0 + h.token_group);
    if (spec.mode == ScaleMode::kPerChannel) {
      if (tg == 0) {
        for (uint32_t c = 0; c < width; ++c) {
          const Affine a = ReadAffine(scales, c0 + c, kType);
          offset[c] = a.offset;
          step[c] = a.step;
        }
      }
    } else {
      const Affine a =
          ReadAffine(scales, size_t{tg} * h.ChannelGroups() + cg, kType);
      std::fill(offset.begin(), offset.end(), a.offset);
      std::fill(step.begin(), step.end(), a.step);
    }
    for (uint32_t t = t0; t < t1; ++t) {
      const uint16_t* qr = q + size_t{t} * width;
      uint16_t* o = out + size_t{t} * row + c0;
      for (uint32_t c = 0; c < width; ++c) {
        const float v = offset[c] + static_cast<float>(qr[c]) * step[c];
        o[c] = kType == DType::kFloat16 ? FloatToHalf(v) : FloatToBFloat16(v);
      }
    }
  }
}

}  // namespace

void QuantizePlane(const Header& h, float relative_step, PlaneSpec* spec,
                   const uint16_t* src, uint16_t* q, std::string* scales) {
  const uint32_t row = h.Channels();
  const uint32_t tokens = h.shape.tokens;
  const DType dtype = h.shape.dtype;
  if (spec->mode == ScaleMode::kIdentity) {
    spec->bits = 16;
    std::copy(src, src + size_t{tokens} * row, q);
    return;
  }
  std::vector<float> x(size_t{tokens} * row);
  for (size_t i = 0; i < x.size(); ++i) x[i] = ToFloat(src[i], dtype);
  // The sets sharing one affine map: channels, or (token group, channel
  // group) tiles.
  const bool per_channel = spec->mode == ScaleMode::kPerChannel;
  const uint32_t width = h.channel_group;
  const uint32_t groups =
      per_channel ? row : h.TokenGroups() * h.ChannelGroups();
  auto set_of = [&](uint32_t t, uint32_t c) {
    return per_channel ? c
                       : (t / h.token_group) * h.ChannelGroups() + c / width;
  };
  std::vector<Stats> stats(groups);
  for (uint32_t t = 0; t < tokens; ++t) {
    for (uint32_t c = 0; c < row; ++c)
      stats[set_of(t, c)].Add(x[size_t{t} * row + c]);
  }
  // Keys share one step across the plane: equal distortion per channel is
  // what minimizes squared error at a given rate, and outlier channels only
  // widen their own integer range. Values scale per tile, tracking how
  // token magnitudes vary.
  double plane_var = 0;
  for (const Stats& st : stats) plane_var += st.Variance();
  const float plane_step =
      relative_step * static_cast<float>(std::sqrt(plane_var / groups));
  std::vector<float> step(groups);
  float levels = 1;
  for (uint32_t g = 0; g < groups; ++g) {
    step[g] = per_channel
                  ? plane_step
                  : relative_step *
                        static_cast<float>(std::sqrt(stats[g].Variance()));
    if (!std::isfinite(step[g])) step[g] = 0;
    const float need =
        LevelsNeeded(stats[g].Mean(), stats[g].MaxDev(), step[g], dtype);
    // Past 16 bits the step grows instead, so the widest set still fits.
    if (need > 65535) step[g] *= need / 65535;
    levels = std::max(levels, std::min(need, 65535.0f));
  }
  spec->bits = BitsFor(levels);
  std::vector<Quantizer> quant;
  quant.reserve(groups);
  for (uint32_t g = 0; g < groups; ++g) {
    quant.emplace_back(Fit(stats[g].Mean(), step[g], spec->bits, dtype, scales),
                       spec->bits);
  }
  for (uint32_t t = 0; t < tokens; ++t) {
    for (uint32_t c = 0; c < row; ++c) {
      const size_t i = size_t{t} * row + c;
      q[i] = quant[set_of(t, c)](x[i]);
    }
  }
}

void DequantizeGroup(const Header& h, const PlaneSpec& spec,
                     absl::string_view plane_scales, uint32_t cg,
                     const uint16_t* q, uint16_t* out) {
  if (spec.mode == ScaleMode::kIdentity) {
    const uint32_t width = h.channel_group;
    for (uint32_t t = 0; t < h.shape.tokens; ++t) {
      std::copy(q + size_t{t} * width, q + size_t{t + 1} * width,
                out + size_t{t} * h.Channels() + size_t{cg} * width);
    }
    return;
  }
  if (h.shape.dtype == DType::kFloat16) {
    DequantizeGroupT<DType::kFloat16>(h, spec, plane_scales, cg, q, out);
  } else {
    DequantizeGroupT<DType::kBFloat16>(h, spec, plane_scales, cg, q, out);
  }
}

}  // namespace kvcache::codec::internal
