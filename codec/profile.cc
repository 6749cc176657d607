#include "codec/profile.h"

#include <openssl/evp.h>

#include <cmath>
#include <cstring>
#include <fstream>
#include <iterator>

#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "codec/byte_io.h"
#include "codec/codec.h"

namespace kvcache::codec {
namespace {

constexpr char kProfileMagic[4] = {'K', 'V', 'C', 'P'};
// Version 1 has no sensitivities or component weights; version 2 appends
// them.
constexpr uint8_t kProfileVersion = 1;
constexpr uint8_t kProfileVersionWithSensitivity = 2;
constexpr size_t kProfileHeaderBytes = 20;
// How far a basis may be from orthonormal (any entry of B B^T - I): a
// float32 basis of a well-conditioned eigensolver is within 1e-6.
constexpr double kOrthonormalTolerance = 1e-4;

size_t RopePairs(const ModelProfile& p) {
  return p.rope == RopeLayout::kNone ? 0 : p.head_dim / 2;
}

void AppendF32(internal::ByteWriter* w, float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  w->U32(bits);
}

float ReadF32(const char* p) {
  uint32_t bits = internal::LoadU32(reinterpret_cast<const uint8_t*>(p));
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

ProfileId Sha256Prefix(absl::string_view bytes) {
  unsigned char digest[EVP_MAX_MD_SIZE];
  unsigned int size = 0;
  EVP_Digest(bytes.data(), bytes.size(), digest, &size, EVP_sha256(), nullptr);
  ProfileId id;
  std::memcpy(id.data(), digest, id.size());
  return id;
}

// Whether the dimensions and RoPE layout are ones a profile may have: what
// sizes every array, so it is checked before anything is allocated.
bool HeaderInRange(const ModelProfile& p) {
  return p.layers != 0 && p.kv_heads != 0 && p.head_dim != 0 &&
         p.layers <= kMaxLayers &&
         uint64_t{p.kv_heads} * p.head_dim <= kMaxChannels &&
         p.head_dim <= kMaxProfileHeadDim &&
         (p.rope == RopeLayout::kNone || p.rope == RopeLayout::kAdjacentPairs ||
          p.rope == RopeLayout::kHalves);
}

absl::Status CheckProfile(const ModelProfile& p) {
  if (!HeaderInRange(p)) {
    return absl::InvalidArgumentError(
        "profile shape or RoPE layout out of range");
  }
  if (p.rope != RopeLayout::kNone && p.head_dim % 2 != 0) {
    return absl::InvalidArgumentError("RoPE needs an even head_dim");
  }
  const size_t d = p.head_dim;
  if (p.rope_inv_freq.size() != RopePairs(p) ||
      p.mean.size() != p.Heads() * d || p.basis.size() != p.Heads() * d * d ||
      p.variance.size() != p.Heads() * d ||
      (!p.sensitivity.empty() && p.sensitivity.size() != p.Heads()) ||
      p.component_weight.size() !=
          (p.sensitivity.empty() ? 0 : p.Heads() * d)) {
    return absl::InvalidArgumentError("profile arrays do not match its shape");
  }
  for (const std::vector<float>* v : {&p.sensitivity, &p.component_weight}) {
    for (float s : *v) {
      if (!std::isfinite(s) || s <= 0) {
        return absl::InvalidArgumentError(
            "sensitivities and component weights must be finite and "
            "positive");
      }
    }
  }
  for (double f : p.rope_inv_freq) {
    if (!std::isfinite(f) || f < 0) {
      return absl::InvalidArgumentError("bad RoPE frequency");
    }
  }
  for (const std::vector<float>* v : {&p.mean, &p.basis, &p.variance}) {
    for (float f : *v) {
      if (!std::isfinite(f)) {
        return absl::InvalidArgumentError("profile holds a non-finite value");
      }
    }
  }
  for (size_t h = 0; h < p.Heads(); ++h) {
    const float* b = p.Basis(h);
    for (size_t i = 0; i < d; ++i) {
      if (p.variance[h * d + i] < 0 ||
          (i > 0 && p.variance[h * d + i] > p.variance[h * d + i - 1])) {
        return absl::InvalidArgumentError(
            "component variances must be non-negative and decreasing");
      }
      for (size_t j = i; j < d; ++j) {
        double dot = 0;
        for (size_t k = 0; k < d; ++k)
          dot += double{b[i * d + k]} * b[j * d + k];
        if (std::fabs(dot - (i == j ? 1.0 : 0.0)) > kOrthonormalTolerance) {
          return absl::InvalidArgumentError(
              absl::StrCat("basis of head ", h, " is not orthonormal"));
        }
      }
    }
  }
  return absl::OkStatus();
}

}  // namespace

std::string ProfileIdHex(const ProfileId& id) {
  return absl::BytesToHexString(
      absl::string_view(reinterpret_cast<const char*>(id.data()), id.size()));
}

std::string SerializeProfile(const ModelProfile& p) {
  std::string out(kProfileMagic, 4);
  internal::ByteWriter w(&out);
  w.U8(p.sensitivity.empty() ? kProfileVersion
                             : kProfileVersionWithSensitivity);
  w.U8(static_cast<uint8_t>(p.rope));
  w.U16(0);
  w.U32(p.layers);
  w.U32(p.kv_heads);
  w.U32(p.head_dim);
  for (double f : p.rope_inv_freq) {
    uint64_t bits;
    std::memcpy(&bits, &f, 8);
    w.U32(static_cast<uint32_t>(bits));
    w.U32(static_cast<uint32_t>(bits >> 32));
  }
  for (const std::vector<float>* v :
       {&p.mean, &p.basis, &p.variance, &p.sensitivity, &p.component_weight}) {
    for (float f : *v) AppendF32(&w, f);
  }
  return out;
}

absl::Status FinishProfile(ModelProfile* profile) {
  if (absl::Status st = CheckProfile(*profile); !st.ok()) return st;
  profile->id = Sha256Prefix(SerializeProfile(*profile));
  return absl::OkStatus();
}

absl::StatusOr<ModelProfile> ParseProfile(absl::string_view bytes) {
  if (bytes.size() < kProfileHeaderBytes ||
      std::memcmp(bytes.data(), kProfileMagic, 4) != 0) {
    return absl::DataLossError("not a kvcache model profile");
  }
  const auto* b = reinterpret_cast<const uint8_t*>(bytes.data());
  const bool has_sensitivity = b[4] == kProfileVersionWithSensitivity;
  if (b[4] != kProfileVersion && !has_sensitivity) {
    return absl::DataLossError(
        absl::StrCat("unsupported profile version ", b[4]));
  }
  ModelProfile p;
  p.rope = static_cast<RopeLayout>(b[5]);
  p.layers = internal::LoadU32(b + 8);
  p.kv_heads = internal::LoadU32(b + 12);
  p.head_dim = internal::LoadU32(b + 16);
  if (internal::LoadU16(b + 6) != 0 || !HeaderInRange(p)) {
    return absl::DataLossError("profile header out of range");
  }
  // Size everything from the header and compare with what is there before
  // allocating.
  const uint64_t d = p.head_dim;
  const uint64_t floats =
      p.Heads() * (d + d * d + d + (has_sensitivity ? 1 + d : 0));
  const uint64_t expected = kProfileHeaderBytes + 8 * RopePairs(p) + 4 * floats;
  if (bytes.size() != expected) {
    return absl::DataLossError(absl::StrCat(
        "profile is ", bytes.size(), " bytes; its header implies ", expected));
  }
  const char* at = bytes.data() + kProfileHeaderBytes;
  p.rope_inv_freq.resize(RopePairs(p));
  for (double& f : p.rope_inv_freq) {
    const uint64_t bits =
        internal::LoadU32(reinterpret_cast<const uint8_t*>(at)) |
        uint64_t{internal::LoadU32(reinterpret_cast<const uint8_t*>(at + 4))}
            << 32;
    std::memcpy(&f, &bits, 8);
    at += 8;
  }
  p.mean.resize(p.Heads() * d);
  p.basis.resize(p.Heads() * d * d);
  p.variance.resize(p.Heads() * d);
  if (has_sensitivity) {
    p.sensitivity.resize(p.Heads());
    p.component_weight.resize(p.Heads() * d);
  }
  for (std::vector<float>* v :
       {&p.mean, &p.basis, &p.variance, &p.sensitivity, &p.component_weight}) {
    for (float& f : *v) {
      f = ReadF32(at);
      at += 4;
    }
  }
  if (absl::Status st = CheckProfile(p); !st.ok()) {
    return absl::DataLossError(st.message());
  }
  p.id = Sha256Prefix(bytes);
  return p;
}

absl::StatusOr<ModelProfile> ReadProfileFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot read ", path));
  const std::string bytes((std::istreambuf_iterator<char>(in)),
                          std::istreambuf_iterator<char>());
  absl::StatusOr<ModelProfile> profile = ParseProfile(bytes);
  if (!profile.ok()) {
    return absl::Status(profile.status().code(),
                        absl::StrCat(path, ": ", profile.status().message()));
  }
  return profile;
}

}  // namespace kvcache::codec
