// Chunk keys: the names under which kvcache stores a prompt's KV chunks.
//
// A prompt's tokens are cut into chunks of `chunk_tokens` tokens (the last
// one may be shorter). Chunk i's key chains its whole prefix:
//
//   seed  = SHA-256(namespace, model id, KV layout)     (length-prefixed)
//   key_i = SHA-256(key_{i-1} || token ids of chunk i)  (key_{-1} = seed)
//
// so two prompts that share a prefix share those chunks' keys, and one
// Lookup finds the longest cached prefix. SHA-256 (not a fast hash) because a
// store shared by tenants must not let a crafted collision serve one tenant's
// KV to another. Anything that changes the meaning of the bytes (model,
// dtype, layers, heads, tensor-parallel rank, chunk size) is in the seed.
#ifndef KVCACHE_CLIENT_CHUNK_KEY_H_
#define KVCACHE_CLIENT_CHUNK_KEY_H_

#include <array>
#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/types/span.h"

namespace kvcache {

// A 32-byte chunk key. Cheap to copy; compares by value.
class ChunkKey {
 public:
  static constexpr size_t kSize = 32;

  ChunkKey() : bytes_{} {}
  explicit ChunkKey(const std::array<uint8_t, kSize>& bytes) : bytes_(bytes) {}

  // Parses 64 hex digits; INVALID_ARGUMENT otherwise.
  static absl::StatusOr<ChunkKey> FromHex(absl::string_view hex);
  // Takes exactly kSize raw bytes (as carried in the API); INVALID_ARGUMENT
  // otherwise.
  static absl::StatusOr<ChunkKey> FromBytes(absl::string_view bytes);

  std::string ToHex() const;
  // The raw bytes, as the API carries them.
  absl::string_view AsBytes() const {
    return absl::string_view(reinterpret_cast<const char*>(bytes_.data()),
                             kSize);
  }

  friend bool operator==(const ChunkKey& a, const ChunkKey& b) {
    return a.bytes_ == b.bytes_;
  }
  friend bool operator!=(const ChunkKey& a, const ChunkKey& b) {
    return !(a == b);
  }

 private:
  std::array<uint8_t, kSize> bytes_;
};

// Everything that decides what a chunk's bytes mean. Two workers produce the
// same keys only if every field matches.
struct KeySpace {
  std::string name_space = "default";  // tenant or application
  std::string model_id;                // e.g. "meta-llama/Llama-3.1-8B"
  std::string dtype = "float16";
  uint32_t layers = 0;
  uint32_t kv_heads = 0;
  uint32_t head_dim = 0;
  uint32_t tp_rank = 0;
  uint32_t tp_size = 1;
  uint32_t chunk_tokens = 256;
};

// The keys of all chunks of `tokens`, the last one partial if the length is
// not a multiple of chunk_tokens. INVALID_ARGUMENT if the key space is
// incomplete (no model id, zero chunk_tokens, tp_rank >= tp_size).
absl::StatusOr<std::vector<ChunkKey>> ChunkKeysForTokens(
    const KeySpace& space, absl::Span<const int32_t> tokens);

// A content-addressed key (SHA-256 of the bytes), for chunks an operator
// stores by hand rather than through a prompt's token ids.
ChunkKey ContentKey(absl::string_view bytes);

}  // namespace kvcache

#endif  // KVCACHE_CLIENT_CHUNK_KEY_H_
