#include "codec/transform.h"

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <vector>

#include "codec/byte_io.h"
#include "codec/quantize.h"

namespace kvcache::codec::internal {
namespace {

// out[k] = sum over i of basis_t[i][k] * x[i], i increasing, each step one
// fused multiply-add: ForwardComponent for every component at once.
void ForwardHead(const float* basis_t, const float* x, uint32_t d, float* out) {
  for (uint32_t k = 0; k < d; ++k) out[k] = 0.0f;
  for (uint32_t i = 0; i < d; ++i) {
    const float* row = basis_t + size_t{i} * d;
    for (uint32_t k = 0; k < d; ++k) out[k] = FmaRn(row[k], x[i], out[k]);
  }
}

// acc[i] += sum over kept components k (increasing) of basis[k][i] * c[k].
void InverseHead(const float* basis, const float* coeff, const uint32_t* kept,
                 uint32_t kept_count, uint32_t d, float* acc) {
  for (uint32_t n = 0; n < kept_count; ++n) {
    const uint32_t k = kept[n];
    const float* row = basis + size_t{k} * d;
    for (uint32_t i = 0; i < d; ++i) acc[i] = FmaRn(row[i], coeff[k], acc[i]);
  }
}

#if defined(__x86_64__)
bool HaveFma() {
  static const bool have =
      __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return have;
}

// The two loops above eight lanes at a time; the same fused operations in
// the same order per element, so the same bits. Up to eight vectors of
// outputs advance together, so that the multiply-adds' latency overlaps.
constexpr uint32_t kVectors = 8;

// out[0, 8n) += rows[j][0, 8n) * scale[j] for j < count (row j at
// rows + offsets[j]), j increasing, for n <= kVectors vectors.
__attribute__((target("avx2,fma"))) inline void FmaRows(
    const float* rows, const uint32_t* offsets, const float* scales,
    uint32_t count, uint32_t n, float* out) {
  __m256 acc[kVectors];
  for (uint32_t v = 0; v < n; ++v) acc[v] = _mm256_loadu_ps(out + 8 * v);
  for (uint32_t j = 0; j < count; ++j) {
    const float* row = rows + offsets[j];
    const __m256 s = _mm256_set1_ps(scales[j]);
    for (uint32_t v = 0; v < n; ++v) {
      acc[v] = _mm256_fmadd_ps(_mm256_loadu_ps(row + 8 * v), s, acc[v]);
    }
  }
  for (uint32_t v = 0; v < n; ++v) _mm256_storeu_ps(out + 8 * v, acc[v]);
}

__attribute__((target("avx2,fma"))) void ForwardHeadFma(const float* basis_t,
                                                        const float* x,
                                                        uint32_t d,
                                                        float* out) {
  uint32_t offsets[kMaxProfileHeadDim];
  for (uint32_t i = 0; i < d; ++i) offsets[i] = i * d;
  for (uint32_t k = 0; k < d; ++k) out[k] = 0.0f;
  for (uint32_t k = 0; k < d; k += 8 * kVectors) {
    FmaRows(basis_t + k, offsets, x, d, std::min(kVectors, (d - k) / 8),
            out + k);
  }
}

__attribute__((target("avx2,fma"))) void InverseHeadFma(
    const float* basis, const float* coeff, const uint32_t* kept,
    uint32_t kept_count, uint32_t d, float* acc) {
  uint32_t offsets[kMaxProfileHeadDim];
  float scales[kMaxProfileHeadDim];
  for (uint32_t n = 0; n < kept_count; ++n) {
    offsets[n] = kept[n] * d;
    scales[n] = coeff[kept[n]];
  }
  for (uint32_t i = 0; i < d; i += 8 * kVectors) {
    FmaRows(basis + i, offsets, scales, kept_count,
            std::min(kVectors, (d - i) / 8), acc + i);
  }
}
#endif

// The head loops, eight lanes at a time where the CPU can.
class HeadKernels {
 public:
  explicit HeadKernels(uint32_t d) : d_(d) {
#if defined(__x86_64__)
    fma_ = d % 8 == 0 && HaveFma();
#endif
  }
  void Forward(const float* basis_t, const float* x, float* out) const {
#if defined(__x86_64__)
    if (fma_) return ForwardHeadFma(basis_t, x, d_, out);
#endif
    ForwardHead(basis_t, x, d_, out);
  }
  void Inverse(const float* basis, const float* coeff, const uint32_t* kept,
               uint32_t kept_count, float* acc) const {
#if defined(__x86_64__)
    if (fma_) return InverseHeadFma(basis, coeff, kept, kept_count, d_, acc);
#endif
    InverseHead(basis, coeff, kept, kept_count, d_, acc);
  }

 private:
  uint32_t d_;
  bool fma_ = false;
};

}  // namespace

void RotateHead(const ModelProfile& p, const SinCos* angles, bool undo,
                float* head) {
  const bool halves = p.rope == RopeLayout::kHalves;
  for (uint32_t j = 0; j < p.head_dim / 2; ++j) {
    float* a = head + RopeFirst(halves, j);
    float* b = head + RopeSecond(halves, j, p.head_dim);
    if (undo) {
      RopeUndo(angles[j], a, b);
    } else {
      RopeApply(angles[j], a, b);
    }
  }
}

std::vector<SinCos> RopeTable(const ModelProfile& profile,
                              uint32_t first_position, uint32_t tokens) {
  const size_t pairs = profile.rope_inv_freq.size();
  std::vector<SinCos> table(size_t{tokens} * pairs);
  for (uint32_t t = 0; t < tokens; ++t) {
    for (size_t j = 0; j < pairs; ++j) {
      table[t * pairs + j] =
          RopeAngle(first_position + t, profile.rope_inv_freq[j]);
    }
  }
  return table;
}

void ForwardPlane(const Header& h, const TransformPlane& plane,
                  const uint16_t* src, float* coeff) {
  const ModelProfile& p = *plane.profile;
  const uint32_t d = p.head_dim;
  const uint32_t row = h.Channels();
  const uint32_t pairs = d / 2;
  const HeadKernels kernels(d);
  std::vector<float> x(row), centered(d), basis_t(size_t{d} * d);
  for (uint32_t head = 0; head < h.shape.kv_heads; ++head) {
    const size_t index = p.Head(plane.layer, plane.is_value, head);
    const float* basis = p.Basis(index);
    const float* mean = p.Mean(index);
    for (uint32_t k = 0; k < d; ++k) {
      for (uint32_t i = 0; i < d; ++i) basis_t[i * d + k] = basis[k * d + i];
    }
    for (uint32_t t = 0; t < h.shape.tokens; ++t) {
      ValuesToFloat(src + size_t{t} * row + head * d, d, h.shape.dtype,
                    x.data());
      if (!plane.rope.empty()) {
        RotateHead(p, plane.rope.data() + size_t{t} * pairs, /*undo=*/true,
                   x.data());
      }
      for (uint32_t i = 0; i < d; ++i) centered[i] = AddRn(x[i], -mean[i]);
      kernels.Forward(basis_t.data(), centered.data(),
                      coeff + size_t{t} * row + head * d);
    }
  }
}

void ReconstructGroup(const Header& h, const TransformPlane& plane,
                      absl::string_view plane_scales, uint32_t cg,
                      const uint16_t* q, uint16_t* out) {
  const ModelProfile& p = *plane.profile;
  const uint32_t d = p.head_dim;
  const uint32_t width = h.channel_group;
  const uint32_t row = h.Channels();
  const uint32_t pairs = d / 2;
  const DType dtype = h.shape.dtype;
  const HeadKernels kernels(d);
  std::vector<float> offset(width), step(width), coeff(width), acc(d);
  std::vector<uint32_t> kept(width);
  std::vector<uint32_t> kept_count(width / d, 0);
  for (uint32_t c = 0; c < width; ++c) {
    const Affine a = ReadAffine(plane_scales, size_t{cg} * width + c, dtype);
    offset[c] = a.offset;
    step[c] = a.step;
    // A component stored with step 0 is not in the sum (FORMAT.md).
    if (a.step != 0.0f) {
      const uint32_t group_head = c / d;
      kept[group_head * d + kept_count[group_head]++] = c % d;
    }
  }
  for (uint32_t t = 0; t < h.shape.tokens; ++t) {
    const uint16_t* qr = q + size_t{t} * width;
    for (uint32_t c = 0; c < width; ++c) {
      coeff[c] = AddRn(offset[c], MulRn(static_cast<float>(qr[c]), step[c]));
    }
    for (uint32_t gh = 0; gh < width / d; ++gh) {
      const uint32_t head = cg * (width / d) + gh;
      const size_t index = p.Head(plane.layer, plane.is_value, head);
      const float* mean = p.Mean(index);
      for (uint32_t i = 0; i < d; ++i) acc[i] = mean[i];
      kernels.Inverse(p.Basis(index), coeff.data() + size_t{gh} * d,
                      kept.data() + size_t{gh} * d, kept_count[gh], acc.data());
      if (!plane.rope.empty()) {
        RotateHead(p, plane.rope.data() + size_t{t} * pairs, /*undo=*/false,
                   acc.data());
      }
      FloatsToValues(acc.data(), d, dtype,
                     out + size_t{t} * row + size_t{head} * d);
    }
  }
}

}  // namespace kvcache::codec::internal
