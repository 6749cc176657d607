#include "cluster/stored_key.h"

#include <openssl/evp.h>

#include "absl/strings/str_cat.h"

namespace kvcache::cluster {

std::string StoredKey(absl::string_view name_space, absl::string_view key) {
  if (name_space.empty()) return std::string(key);
  // Length-prefixed, so no (namespace, key) pair can pose as another.
  const std::string input = absl::StrCat(
      "kvcache stored key v1", name_space.size(), ":", name_space, key);
  unsigned char digest[EVP_MAX_MD_SIZE];
  unsigned int size = 0;
  EVP_Digest(input.data(), input.size(), digest, &size, EVP_sha256(), nullptr);
  return std::string(reinterpret_cast<const char*>(digest), size);
}

}  // namespace kvcache::cluster
