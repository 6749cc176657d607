#include "codec/calibrate.h"

#include <cblas.h>

#include <algorithm>
#include <cmath>
#include <utility>

#include "absl/strings/str_cat.h"
#include "codec/quantize.h"
#include "codec/transform.h"

// LAPACK's symmetric eigensolver (OpenBLAS ships it; Debian has no LAPACKE
// header for it).
extern "C" void dsyev_(const char* jobz, const char* uplo, const int* n,
                       double* a, const int* lda, double* w, double* work,
                       const int* lwork, int* info);

namespace kvcache::codec {

std::vector<double> RopeInverseFrequencies(double theta, uint32_t head_dim) {
  std::vector<double> f(head_dim / 2);
  for (uint32_t j = 0; j < f.size(); ++j) {
    f[j] = 1.0 / std::pow(theta, 2.0 * j / head_dim);
  }
  return f;
}

ProfileCalibrator::ProfileCalibrator(uint32_t layers, uint32_t kv_heads,
                                     uint32_t head_dim, RopeLayout rope,
                                     std::vector<double> inv_freq) {
  shape_.layers = layers;
  shape_.kv_heads = kv_heads;
  shape_.head_dim = head_dim;
  shape_.rope = rope;
  shape_.rope_inv_freq = std::move(inv_freq);
  sum_.assign(shape_.Heads() * head_dim, 0.0);
  outer_.assign(shape_.Heads() * head_dim * head_dim, 0.0);
}

absl::Status ProfileCalibrator::Add(const ChunkShape& shape,
                                    absl::Span<const uint16_t> values,
                                    uint32_t first_position) {
  if (shape.layers != shape_.layers || shape.kv_heads != shape_.kv_heads ||
      shape.head_dim != shape_.head_dim || values.size() != shape.NumValues()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "calibration KV of shape ", shape.layers, "x", shape.kv_heads, "x",
        shape.head_dim, " for a profile of ", shape_.layers, "x",
        shape_.kv_heads, "x", shape_.head_dim));
  }
  const uint32_t d = shape.head_dim;
  const uint32_t row = shape.kv_heads * d;
  const uint32_t pairs = d / 2;
  std::vector<internal::SinCos> rope;
  if (shape_.rope != RopeLayout::kNone) {
    rope = internal::RopeTable(shape_, first_position, shape.tokens);
  }
  std::vector<float> x(row);
  std::vector<double> samples(size_t{shape.tokens} * d);
  for (uint32_t l = 0; l < shape.layers; ++l) {
    for (int kv = 0; kv < 2; ++kv) {
      const uint16_t* plane =
          values.data() + (size_t{l} * 2 + kv) * shape.tokens * row;
      for (uint32_t head = 0; head < shape.kv_heads; ++head) {
        for (uint32_t t = 0; t < shape.tokens; ++t) {
          internal::ValuesToFloat(plane + size_t{t} * row + head * d, d,
                                  shape.dtype, x.data());
          if (kv == 0 && !rope.empty()) {
            internal::RotateHead(shape_, rope.data() + size_t{t} * pairs,
                                 /*undo=*/true, x.data());
          }
          std::copy(x.begin(), x.begin() + d, samples.begin() + size_t{t} * d);
        }
        const size_t index = shape_.Head(l, kv == 1, head);
        double* sum = sum_.data() + index * d;
        for (uint32_t t = 0; t < shape.tokens; ++t) {
          for (uint32_t i = 0; i < d; ++i) sum[i] += samples[size_t{t} * d + i];
        }
        cblas_dsyrk(CblasRowMajor, CblasUpper, CblasTrans, d, shape.tokens, 1.0,
                    samples.data(), d, 1.0, outer_.data() + index * d * d, d);
      }
    }
  }
  tokens_ += shape.tokens;
  return absl::OkStatus();
}

absl::StatusOr<ModelProfile> ProfileCalibrator::Finish() const {
  const uint32_t d = shape_.head_dim;
  if (tokens_ < d) {
    return absl::FailedPreconditionError(absl::StrCat(
        "calibration needs at least ", d, " tokens, has ", tokens_));
  }
  ModelProfile p = shape_;
  p.mean.resize(p.Heads() * d);
  p.basis.resize(p.Heads() * d * d);
  p.variance.resize(p.Heads() * d);
  const double n = static_cast<double>(tokens_);
  const int dim = static_cast<int>(d);
  std::vector<double> cov(size_t{d} * d), eigenvalues(d);
  int lwork = -1, info = 0;
  double work_size = 0;
  dsyev_("V", "L", &dim, cov.data(), &dim, eigenvalues.data(), &work_size,
         &lwork, &info);
  lwork = static_cast<int>(work_size);
  std::vector<double> work(lwork);
  for (size_t h = 0; h < p.Heads(); ++h) {
    const double* sum = sum_.data() + h * d;
    const double* outer = outer_.data() + h * d * d;
    for (uint32_t i = 0; i < d; ++i) {
      p.mean[h * d + i] = static_cast<float>(sum[i] / n);
      // The upper triangle in row-major order is LAPACK's lower triangle
      // in column-major order.
      for (uint32_t j = i; j < d; ++j) {
        cov[size_t{i} * d + j] =
            outer[size_t{i} * d + j] / n - (sum[i] / n) * (sum[j] / n);
      }
    }
    dsyev_("V", "L", &dim, cov.data(), &dim, eigenvalues.data(), work.data(),
           &lwork, &info);
    if (info != 0) {
      return absl::InternalError(absl::StrCat("eigensolver failed: ", info));
    }
    // Eigenvalues come in increasing order, eigenvector j in column j
    // (contiguous in column-major order): component k is the (d-1-k)-th.
    for (uint32_t k = 0; k < d; ++k) {
      const uint32_t j = d - 1 - k;
      p.variance[h * d + k] = static_cast<float>(std::max(0.0, eigenvalues[j]));
      for (uint32_t i = 0; i < d; ++i) {
        p.basis[(h * d + k) * d + i] =
            static_cast<float>(cov[size_t{j} * d + i]);
      }
    }
    for (uint32_t k = 1; k < d; ++k) {
      p.variance[h * d + k] =
          std::min(p.variance[h * d + k], p.variance[h * d + k - 1]);
    }
  }
  if (absl::Status st = FinishProfile(&p); !st.ok()) return st;
  return p;
}

}  // namespace kvcache::codec
