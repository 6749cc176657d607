// The C++ client an inference worker (or an operator tool) links to talk to a
// kvcached node.
//
// A KvCacheClient holds one gRPC channel; it is thread-safe and meant to be
// shared. Every call has a deadline (ClientOptions::timeout) and returns an
// absl::Status whose code is the daemon's (NOT_FOUND for a key it does not
// hold, INVALID_ARGUMENT for a malformed request, DATA_LOSS for a chunk that
// arrived damaged, UNAVAILABLE or DEADLINE_EXCEEDED when the node cannot be
// reached) and whose message says what went wrong.
//
// Chunk keys come from ChunkKeysForTokens (client/chunk_key.h).
#ifndef KVCACHE_CLIENT_KVCACHE_CLIENT_H_
#define KVCACHE_CLIENT_KVCACHE_CLIENT_H_

#include <grpcpp/grpcpp.h>

#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "absl/types/span.h"
#include "client/chunk_key.h"
#include "kvcache/v1/kvcache.grpc.pb.h"

namespace kvcache {

struct ClientOptions {
  // host:port of the kvcached node.
  std::string address = "127.0.0.1:50051";
  // Deadline of each call; a Put or Get of many large chunks needs room.
  absl::Duration timeout = absl::Seconds(30);
  // How long Connect waits for the node to answer.
  absl::Duration connect_timeout = absl::Seconds(5);
  // Size of the data messages a Put sends.
  size_t piece_bytes = 1 << 20;
};

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

class KvCacheClient {
 public:
  // Opens a channel and waits until the node answers. UNAVAILABLE (naming the
  // address) if it does not within connect_timeout.
  static absl::StatusOr<std::unique_ptr<KvCacheClient>> Connect(
      const ClientOptions& options);

  // How much of `keys` (a prompt's chunk keys, in order) is cached.
  absl::StatusOr<LookupResult> Lookup(absl::Span<const ChunkKey> keys);

  // For each key on its own (not only a leading prefix): its info if the
  // node holds it, else an entry with only the key set (tier
  // TIER_UNSPECIFIED). Does not count towards the node's hits and misses.
  absl::StatusOr<std::vector<v1::ChunkInfo>> LookupEach(
      absl::Span<const ChunkKey> keys);

  // Stores the chunks in one stream, in order. Each chunk is checksummed
  // (CRC32C) and verified by the node before it becomes visible. On error,
  // chunks before the failing one may have been stored.
  absl::Status Put(absl::Span<const ChunkToPut> chunks,
                   const PutOptions& options = {});

  // Fetches the chunks in one stream, verifying each one's CRC32C. NOT_FOUND
  // if any key is absent (the message names which); DATA_LOSS if a chunk
  // arrived damaged.
  absl::StatusOr<std::vector<FetchedChunk>> Get(
      absl::Span<const ChunkKey> keys);

  // Removes the chunks; returns how many were present.
  absl::StatusOr<uint32_t> Delete(absl::Span<const ChunkKey> keys);

  // Pins the chunks for `ttl` (capped by the node); returns when the first
  // pin lapses. NOT_FOUND if a key is absent.
  absl::StatusOr<absl::Time> Pin(absl::Span<const ChunkKey> keys,
                                 absl::Duration ttl);
  absl::Status Unpin(absl::Span<const ChunkKey> keys);

  absl::StatusOr<v1::StatsResponse> Stats();
  absl::StatusOr<v1::NodeInfoResponse> NodeInfo();
  absl::StatusOr<v1::TierUsageResponse> TierUsage();
  absl::StatusOr<std::string> Config();
  // Stops the node from taking new chunks; returns how many it holds.
  absl::StatusOr<uint64_t> Drain();

  const ClientOptions& options() const { return options_; }

 private:
  KvCacheClient(const ClientOptions& options,
                std::shared_ptr<grpc::Channel> channel);

  // A context carrying the call deadline.
  std::unique_ptr<grpc::ClientContext> NewContext() const;
  // Fills a repeated keys field.
  template <typename Request>
  static void AddKeys(absl::Span<const ChunkKey> keys, Request& request);

  ClientOptions options_;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<v1::KvCache::Stub> data_;
  std::unique_ptr<v1::Admin::Stub> admin_;
};

}  // namespace kvcache

#endif  // KVCACHE_CLIENT_KVCACHE_CLIENT_H_
