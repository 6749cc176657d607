#include "codec/quantize.h"

#if defined(__x86_64__)
#include <cpuid.h>
#include <immintrin.h>
#endif

#include <algorithm>
#include <vector>

#include "codec/byte_io.h"
#include "codec/transform_math.h"

namespace kvcache::codec::internal {
namespace {

// Fits the map for a set and appends its stored form to `out`.
Affine Fit(float center, float step, int bits, DType dtype, std::string* out) {
  const StoredAffine a = FitAffine(center, step, bits, dtype);
  ByteWriter w(out);
  w.U16(a.offset_bits);
  w.U16(a.step_bits);
  return a.map;
}

// One row of a channel group: out[c] = Dequantize({offset[c], step[c]}, q[c]).
template <DType kType>
void DequantizeRow(const float* offset, const float* step, const uint16_t* q,
                   uint32_t width, uint16_t* out) {
  for (uint32_t c = 0; c < width; ++c) {
    out[c] = Dequantize({offset[c], step[c]}, q[c], kType);
  }
}

#if defined(__x86_64__)
// The same for fp16, eight values at a time: a multiply then an add (never
// fused, as the format requires), rounded to fp16 by the F16C instruction,
// which rounds to nearest-even exactly as FloatToHalf does for every
// non-NaN value. Eight values holding a NaN take the scalar path, so NaN
// payloads match the CPU and GPU reference too.
__attribute__((target("avx2,f16c"))) void DequantizeRowF16C(const float* offset,
                                                            const float* step,
                                                            const uint16_t* q,
                                                            uint32_t width,
                                                            uint16_t* out) {
  uint32_t c = 0;
  for (; c + 8 <= width; c += 8) {
    const __m128i qi = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q + c));
    const __m256 qf = _mm256_cvtepi32_ps(_mm256_cvtepu16_epi32(qi));
    const __m256 v =
        _mm256_add_ps(_mm256_loadu_ps(offset + c),
                      _mm256_mul_ps(qf, _mm256_loadu_ps(step + c)));
    if (_mm256_movemask_ps(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)) != 0) {
      DequantizeRow<DType::kFloat16>(offset + c, step + c, q + c, 8, out + c);
      continue;
    }
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + c),
                     _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
  }
  DequantizeRow<DType::kFloat16>(offset + c, step + c, q + c, width - c,
                                 out + c);
}

// Converts fp16 values eight at a time while none is Inf or NaN (F16C
// would quiet a signalling NaN's payload, which HalfToFloat keeps); returns
// how many it converted.
__attribute__((target("avx2,f16c"))) size_t HalfsToFloatF16C(
    const uint16_t* src, size_t n, float* x) {
  size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m128i h =
        _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i));
    const __m128i exponent = _mm_and_si128(h, _mm_set1_epi16(0x7C00));
    if (_mm_movemask_epi8(_mm_cmpeq_epi16(exponent, _mm_set1_epi16(0x7C00))) !=
        0) {
      break;
    }
    _mm256_storeu_ps(x + i, _mm256_cvtph_ps(h));
  }
  return i;
}

// Rounds floats to fp16 eight at a time until eight hold a NaN (whose
// canonical form the scalar path writes); returns how many it converted.
__attribute__((target("avx2,f16c"))) size_t FloatsToHalfsF16C(const float* x,
                                                              size_t n,
                                                              uint16_t* out) {
  size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 v = _mm256_loadu_ps(x + i);
    if (_mm256_movemask_ps(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)) != 0) break;
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i),
                     _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
  }
  return i;
}

bool HaveF16C() {
  // CPUID leaf 1, ECX bit 29; clang before 16 cannot ask for "f16c" by name.
  static const bool have = [] {
    unsigned eax, ebx, ecx, edx;
    return __builtin_cpu_supports("avx2") &&
           __get_cpuid(1, &eax, &ebx, &ecx, &edx) && (ecx & bit_F16C) != 0;
  }();
  return have;
}
#endif

}  // namespace

void FloatsToValues(const float* x, size_t n, DType dtype, uint16_t* out) {
  size_t i = 0;
#if defined(__x86_64__)
  if (dtype == DType::kFloat16 && HaveF16C()) i = FloatsToHalfsF16C(x, n, out);
#endif
  for (; i < n; ++i) out[i] = RoundCoefficientSum(x[i], dtype);
}

Affine ReadAffine(absl::string_view scales, size_t index, DType dtype) {
  const auto* p = reinterpret_cast<const uint8_t*>(scales.data()) + 4 * index;
  return {ToFloat(LoadU16(p), dtype), ToFloat(LoadU16(p + 2), dtype)};
}

void ValuesToFloat(const uint16_t* src, size_t n, DType dtype, float* x) {
  size_t i = 0;
#if defined(__x86_64__)
  if (dtype == DType::kFloat16 && HaveF16C()) i = HalfsToFloatF16C(src, n, x);
#endif
  for (; i < n; ++i) x[i] = ToFloat(src[i], dtype);
}

namespace {

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
#if defined(__x86_64__)
      if (kType == DType::kFloat16 && HaveF16C()) {
        DequantizeRowF16C(offset.data(), step.data(), qr, width, o);
        continue;
      }
#endif
      DequantizeRow<kType>(offset.data(), step.data(), qr, width, o);
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
  ValuesToFloat(src, x.size(), dtype, x.data());
  QuantizeFloats(h, relative_step, /*channel_steps=*/{},
                 /*drop_quiet_channels=*/false, spec, x.data(), q, scales);
}

void QuantizeFloats(const Header& h, float relative_step,
                    absl::Span<const float> channel_steps,
                    bool drop_quiet_channels, PlaneSpec* spec, const float* x,
                    uint16_t* q, std::string* scales) {
  const uint32_t row = h.Channels();
  const uint32_t tokens = h.shape.tokens;
  const DType dtype = h.shape.dtype;
  // The sets sharing one affine map: channels, or (token group, channel
  // group) tiles.
  const bool per_channel = spec->mode == ScaleMode::kPerChannel;
  const uint32_t width = h.channel_group;
  const uint32_t groups =
      per_channel ? row : h.TokenGroups() * h.ChannelGroups();
  // Calls fn(set, i) for every value i, token by token and channel by
  // channel: the order the statistics must be summed in. Loops, not a
  // per-value division, find each value's set.
  auto for_each_value = [&](auto fn) {
    for (uint32_t t = 0; t < tokens; ++t) {
      const size_t row_start = size_t{t} * row;
      if (per_channel) {
        for (uint32_t c = 0; c < row; ++c) fn(c, row_start + c);
        continue;
      }
      const uint32_t first_set = (t / h.token_group) * h.ChannelGroups();
      for (uint32_t cg = 0, c = 0; cg < h.ChannelGroups(); ++cg) {
        for (const uint32_t end = c + width; c < end; ++c) {
          fn(first_set + cg, row_start + c);
        }
      }
    }
  };
  std::vector<Stats> stats(groups);
  for_each_value([&](uint32_t set, size_t i) { stats[set].Add(x[i]); });
  // Keys share one step across the plane (unless channel_steps weigh the
  // channels): equal distortion per channel is what minimizes squared error
  // at a given rate, and outlier channels only widen their own integer
  // range. Values scale per tile, tracking how token magnitudes vary.
  double plane_var = 0;
  for (const Stats& st : stats) plane_var += st.Variance();
  const float plane_step = SpreadStep(relative_step, plane_var / groups);
  auto channel_step = [&](uint32_t c) {
    return channel_steps.empty() ? plane_step : channel_steps[c];
  };
  // A channel whose spread is under the step's own rounding noise
  // (step^2 / 12) costs more to code than it removes: with
  // drop_quiet_channels it is left out (offset and step 0), which is
  // reverse water-filling for a uniform quantizer.
  std::vector<bool> dropped(groups, false);
  std::vector<float> step(groups);
  float levels = 1;
  for (uint32_t g = 0; g < groups; ++g) {
    if (drop_quiet_channels && per_channel &&
        stats[g].Variance() < double{channel_step(g)} * channel_step(g) / 12) {
      dropped[g] = true;
      continue;
    }
    const SetFit fit =
        FitSet(stats[g],
               per_channel ? channel_step(g)
                           : SpreadStep(relative_step, stats[g].Variance()),
               dtype);
    step[g] = fit.step;
    levels = levels < fit.levels ? fit.levels : levels;
  }
  spec->bits = BitsFor(levels);
  std::vector<Quantizer> quant;
  quant.reserve(groups);
  for (uint32_t g = 0; g < groups; ++g) {
    if (dropped[g]) {
      ByteWriter(scales).U32(0);
      quant.emplace_back(Affine{0.0f, 0.0f}, spec->bits);
      continue;
    }
    quant.emplace_back(Fit(stats[g].Mean(), step[g], spec->bits, dtype, scales),
                       spec->bits);
  }
  for_each_value([&](uint32_t set, size_t i) { q[i] = quant[set](x[i]); });
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
