// Makes a model profile (profile.h) from calibration KV: per (layer, K/V,
// KV head), the mean and the eigenvectors of the covariance of the head's
// channels, keys with RoPE undone first exactly as the encoder undoes it.
//
// Not thread-safe; one calibrator per thread.
#ifndef KVCACHE_CODEC_CALIBRATE_H_
#define KVCACHE_CODEC_CALIBRATE_H_

#include <cstdint>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "codec/codec.h"
#include "codec/profile.h"

namespace kvcache::codec {

// theta^(-2j / head_dim) for j < head_dim / 2: the angles per position of
// standard RoPE with base theta.
std::vector<double> RopeInverseFrequencies(double theta, uint32_t head_dim);

class ProfileCalibrator {
 public:
  // inv_freq: head_dim / 2 entries, or empty when rope is kNone.
  ProfileCalibrator(uint32_t layers, uint32_t kv_heads, uint32_t head_dim,
                    RopeLayout rope, std::vector<double> inv_freq);

  // Adds a sequence's KV (shape.NumValues() values in the chunk layout of
  // codec.h) whose first token is at first_position. InvalidArgument if the
  // shape differs from the calibrator's.
  absl::Status Add(const ChunkShape& shape, absl::Span<const uint16_t> values,
                   uint32_t first_position);

  uint64_t tokens() const { return tokens_; }

  // The profile of everything added. FailedPrecondition with fewer tokens
  // than head_dim (the covariance would be singular).
  absl::StatusOr<ModelProfile> Finish() const;

 private:
  ModelProfile shape_;  // Shape and RoPE only.
  // Per head: sum of its channel vectors and of their outer products.
  std::vector<double> sum_;    // [head][dim]
  std::vector<double> outer_;  // [head][dim][dim], upper triangle used
  uint64_t tokens_ = 0;
};

}  // namespace kvcache::codec

#endif  // KVCACHE_CODEC_CALIBRATE_H_
