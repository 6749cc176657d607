// A model profile: what the transform levels (format v3) know about one
// model's KV before they see a chunk. Per (layer, K/V, KV head) it holds the
// mean of the head's channels and an orthonormal basis of them ordered by
// decreasing variance (principal components of calibration KV, keys taken
// with RoPE undone), and the model's RoPE, which the codec undoes before the
// transform and re-applies after it.
//
// A profile is immutable once made and named by its content: its id is the
// first 16 bytes of the SHA-256 of its serialized form, and every v3 chunk
// records the id of the profile it was encoded with. It travels as bytes
// (SerializeProfile / ParseProfile), e.g. stored in kvcache under the
// model's namespace.
//
// Thread-safety: a ModelProfile is a value; const access from any number of
// threads is safe.
#ifndef KVCACHE_CODEC_PROFILE_H_
#define KVCACHE_CODEC_PROFILE_H_

#include <array>
#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace kvcache::codec {

using ProfileId = std::array<uint8_t, 16>;

// Lowercase hex of an id (32 characters).
std::string ProfileIdHex(const ProfileId& id);

// Which channels RoPE rotates together in a head of head_dim channels.
enum class RopeLayout : uint8_t {
  kNone = 0,           // keys carry no rotary embedding
  kAdjacentPairs = 1,  // (2j, 2j+1): GGUF / llama.cpp order
  kHalves = 2,         // (j, j + head_dim/2): Hugging Face order
};

struct ModelProfile {
  uint32_t layers = 0;
  uint32_t kv_heads = 0;
  uint32_t head_dim = 0;
  RopeLayout rope = RopeLayout::kNone;
  // Angle per position of pair j, radians (head_dim / 2 entries; empty for
  // kNone). Stored, not derived from a base, so that every decoder rotates
  // by the same numbers.
  std::vector<double> rope_inv_freq;
  // Per head, indexed by Head(layer, is_value, kv_head):
  std::vector<float> mean;      // [head][dim]
  std::vector<float> basis;     // [head][component][dim], rows orthonormal
  std::vector<float> variance;  // [head][component], decreasing
  // What an error costs the model, measured by running it (the chat
  // example's CalibrateModelProfile); both empty when not measured (kvcodec
  // calibrate works from dumps alone), and then the transform levels fall
  // back to one relative step per plane. Serialized only when present
  // (profile version 2).
  // Per head, mean KL divergence of the model's next-token distributions
  // (nats) per unit of noise variance added to every channel of the head.
  std::vector<float> sensitivity;  // [head]
  // Per head and component, how much more than the head's average an error
  // in that component costs (mean 1 over a head's components): for keys,
  // the share of the reading queries' attention-weighted energy along the
  // component; 1 for values.
  std::vector<float> component_weight;  // [head][component]
  // Set by ParseProfile and FinishProfile; not part of the content.
  ProfileId id{};

  size_t Heads() const { return size_t{layers} * 2 * kv_heads; }
  size_t Head(uint32_t layer, bool is_value, uint32_t kv_head) const {
    return (size_t{layer} * 2 + (is_value ? 1 : 0)) * kv_heads + kv_head;
  }
  const float* Mean(size_t head) const { return mean.data() + head * head_dim; }
  const float* Basis(size_t head) const {
    return basis.data() + head * head_dim * head_dim;
  }
};

// Largest head_dim a profile may have (the transform keeps a head in
// registers and shared memory).
inline constexpr uint32_t kMaxProfileHeadDim = 256;

// The serialized form (FORMAT.md, "Model profiles"). Deterministic: equal
// profiles give equal bytes.
std::string SerializeProfile(const ModelProfile& profile);

// Checks sizes, finite values, positive sensitivities and orthonormality of
// the bases, then sets
// profile->id. InvalidArgument if anything is off.
absl::Status FinishProfile(ModelProfile* profile);

// Parses and checks serialized bytes; the id is computed from them.
// DataLoss for malformed bytes.
absl::StatusOr<ModelProfile> ParseProfile(absl::string_view bytes);

// Reads and parses a profile file (kvcodec calibrate writes them): NotFound
// if it cannot be read, else as ParseProfile, the path in the message.
absl::StatusOr<ModelProfile> ReadProfileFile(const std::string& path);

}  // namespace kvcache::codec

#endif  // KVCACHE_CODEC_PROFILE_H_
