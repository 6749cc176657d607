// What an inference worker needs from kvcache, whether one node
// (KvCacheClient) or a cluster (ClusterClient) answers: a worker written
// against ChunkStore runs on either.
//
// Every call returns an absl::Status whose code is the node's (NOT_FOUND for
// a key it does not hold, INVALID_ARGUMENT for a malformed request,
// DATA_LOSS for a chunk that arrived damaged, UNAVAILABLE or
// DEADLINE_EXCEEDED when it cannot be reached) and whose message says what
// went wrong. Implementations are thread-safe.
#ifndef KVCACHE_CLIENT_CHUNK_STORE_H_
#define KVCACHE_CLIENT_CHUNK_STORE_H_

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "absl/types/span.h"
#include "client/chunk_key.h"
#include "kvcache/v1/kvcache.pb.h"

namespace kvcache {

// One chunk to store.
struct ChunkToPut {
  ChunkKey key;
  absl::string_view bytes;  // borrowed for the duration of the call
  // The chunk this one extends in its prompt (keys[i - 1] of
  // ChunkKeysForTokens); none for a prompt's first chunk. The node evicts
  // a prefix's later chunks before the ones they extend.
  std::optional<ChunkKey> parent;
};

// Chunks keys[first, first + bytes.size()) of a prompt, chunk i holding
// bytes[i - first] and naming keys[i - 1] as its parent, ready for Put.
std::vector<ChunkToPut> PromptChunks(absl::Span<const ChunkKey> keys,
                                     size_t first,
                                     absl::Span<const std::string> bytes);

struct PutOptions {
  // If positive, the chunks are stored pinned for this long (chat sessions).
  absl::Duration pin_ttl = absl::ZeroDuration();
  // A key the node already holds keeps its first copy unless this is set
  // (PutHeader.replace).
  bool replace = false;
};

// A fetched chunk: its bytes and where the node kept it.
struct FetchedChunk {
  ChunkKey key;
  std::string bytes;
  v1::Tier tier = v1::TIER_UNSPECIFIED;
};

struct LookupResult {
  // keys[0, prefix_chunks) are cached.
  size_t prefix_chunks = 0;
  std::vector<v1::ChunkInfo> chunks;  // one per cached prefix chunk
};

class ChunkStore {
 public:
  virtual ~ChunkStore() = default;

  // How much of `keys` (a prompt's chunk keys, in order) is cached.
  virtual absl::StatusOr<LookupResult> Lookup(
      absl::Span<const ChunkKey> keys) = 0;

  // Stores the chunks, each checksummed (CRC32C) and verified by the node
  // before it becomes visible. On error, some chunks may have been stored.
  virtual absl::Status Put(absl::Span<const ChunkToPut> chunks,
                           const PutOptions& options = {}) = 0;

  // Fetches the chunks, verifying each one's CRC32C. NOT_FOUND if any key is
  // absent (the message names which); DATA_LOSS if a chunk arrived damaged.
  virtual absl::StatusOr<std::vector<FetchedChunk>> Get(
      absl::Span<const ChunkKey> keys) = 0;

  // Removes the chunks; returns how many were present.
  virtual absl::StatusOr<uint32_t> Delete(absl::Span<const ChunkKey> keys) = 0;

  // Pins the chunks for `ttl` (capped by the node); returns when the first
  // pin lapses. NOT_FOUND if a key is absent.
  virtual absl::StatusOr<absl::Time> Pin(absl::Span<const ChunkKey> keys,
                                         absl::Duration ttl) = 0;
  virtual absl::Status Unpin(absl::Span<const ChunkKey> keys) = 0;
};

}  // namespace kvcache

#endif  // KVCACHE_CLIENT_CHUNK_STORE_H_
