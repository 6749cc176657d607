#include "client/chunk_key.h"

#include <openssl/evp.h>

#include <memory>

#include "absl/status/status.h"
#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"

namespace kvcache {
namespace {

// Incremental SHA-256 through OpenSSL's EVP interface (the low-level SHA256_*
// calls are deprecated in OpenSSL 3).
class Sha256 {
 public:
  Sha256() : ctx_(EVP_MD_CTX_new(), &EVP_MD_CTX_free) {
    EVP_DigestInit_ex(ctx_.get(), EVP_sha256(), nullptr);
  }

  void Update(const void* data, size_t size) {
    EVP_DigestUpdate(ctx_.get(), data, size);
  }
  void UpdateU32(uint32_t v) {
    const uint8_t le[4] = {
        static_cast<uint8_t>(v), static_cast<uint8_t>(v >> 8),
        static_cast<uint8_t>(v >> 16), static_cast<uint8_t>(v >> 24)};
    Update(le, sizeof(le));
  }
  // Length-prefixed, so ("ab", "c") and ("a", "bc") hash differently.
  void UpdateString(absl::string_view s) {
    UpdateU32(static_cast<uint32_t>(s.size()));
    Update(s.data(), s.size());
  }

  ChunkKey Finish() {
    std::array<uint8_t, ChunkKey::kSize> out;
    unsigned int len = 0;
    EVP_DigestFinal_ex(ctx_.get(), out.data(), &len);
    return ChunkKey(out);
  }

 private:
  std::unique_ptr<EVP_MD_CTX, decltype(&EVP_MD_CTX_free)> ctx_;
};

ChunkKey SeedFor(const KeySpace& space) {
  Sha256 h;
  h.UpdateString("kvcache.v1 chunk key seed");
  h.UpdateString(space.name_space);
  h.UpdateString(space.model_id);
  h.UpdateString(space.dtype);
  for (uint32_t v : {space.layers, space.kv_heads, space.head_dim,
                     space.tp_rank, space.tp_size, space.chunk_tokens}) {
    h.UpdateU32(v);
  }
  return h.Finish();
}

}  // namespace

absl::StatusOr<ChunkKey> ChunkKey::FromHex(absl::string_view hex) {
  if (hex.size() != 2 * kSize) {
    return absl::InvalidArgumentError(absl::StrCat(
        "a chunk key is ", 2 * kSize, " hex digits, got ", hex.size()));
  }
  for (char c : hex) {
    if (!absl::ascii_isxdigit(static_cast<unsigned char>(c))) {
      return absl::InvalidArgumentError(
          absl::StrCat("chunk key '", hex, "' is not hexadecimal"));
    }
  }
  return FromBytes(absl::HexStringToBytes(hex));
}

absl::StatusOr<ChunkKey> ChunkKey::FromBytes(absl::string_view bytes) {
  if (bytes.size() != kSize) {
    return absl::InvalidArgumentError(
        absl::StrCat("a chunk key is ", kSize, " bytes, got ", bytes.size()));
  }
  std::array<uint8_t, kSize> raw;
  std::copy(bytes.begin(), bytes.end(), raw.begin());
  return ChunkKey(raw);
}

std::string ChunkKey::ToHex() const {
  return absl::BytesToHexString(AsBytes());
}

ChunkKey ContentKey(absl::string_view bytes) {
  Sha256 h;
  h.Update(bytes.data(), bytes.size());
  return h.Finish();
}

absl::StatusOr<std::vector<ChunkKey>> ChunkKeysForTokens(
    const KeySpace& space, absl::Span<const int32_t> tokens) {
  if (space.model_id.empty()) {
    return absl::InvalidArgumentError("key space needs a model_id");
  }
  if (space.chunk_tokens == 0) {
    return absl::InvalidArgumentError("key space chunk_tokens must be > 0");
  }
  if (space.tp_size == 0 || space.tp_rank >= space.tp_size) {
    return absl::InvalidArgumentError(
        absl::StrCat("key space tp_rank ", space.tp_rank,
                     " is not below tp_size ", space.tp_size));
  }
  std::vector<ChunkKey> keys;
  keys.reserve((tokens.size() + space.chunk_tokens - 1) / space.chunk_tokens);
  ChunkKey previous = SeedFor(space);
  for (size_t begin = 0; begin < tokens.size(); begin += space.chunk_tokens) {
    const absl::Span<const int32_t> chunk =
        tokens.subspan(begin, space.chunk_tokens);
    Sha256 h;
    h.Update(previous.AsBytes().data(), ChunkKey::kSize);
    // The count is hashed too, so a partial chunk never equals a prefix of a
    // full one.
    h.UpdateU32(static_cast<uint32_t>(chunk.size()));
    for (int32_t token : chunk) h.UpdateU32(static_cast<uint32_t>(token));
    previous = h.Finish();
    keys.push_back(previous);
  }
  return keys;
}

}  // namespace kvcache
