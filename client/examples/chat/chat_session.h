// A chat session's KV kept in kvcache between turns: the worker stores a
// conversation's KV after a turn, drops it, and restores it on the next turn
// instead of recomputing the history.
//
// Store cuts the sequence's KV into chunks of key_space.chunk_tokens tokens,
// encodes each with the codec and puts them pinned for the session's TTL,
// keyed by the conversation's token ids (client/chunk_key.h). The partial
// tail chunk is stored too, so that restoring exactly the stored history
// (what the next turn does: restore the history, prefill the new user
// message) brings every token back. A chunk key covers the chunk's own
// tokens, so once the conversation grows past the tail, the full chunk gets a
// new key; the next Store writes it and unpins the old tail, leaving it to
// the daemon's LRU. Chunks already stored by an earlier turn are re-pinned,
// not re-sent.
//
// Restore looks up the longest cached prefix of the given tokens, fetches and
// decodes it into an empty sequence, and says how many tokens came back; the
// caller prefills the rest. Failures of the store (daemon unreachable, a chunk
// evicted between Lookup and Get, a damaged chunk, a chunk of the wrong shape)
// are not errors: the sequence is left empty, the result says why, and the
// caller recomputes. A cache must never be the reason a turn fails.
//
// Threading: a ChatSession drives one worker thread's PagedKvCache, so it is
// used by that thread only; the ChunkStore it borrows (one node or a
// cluster) may be shared.
#ifndef KVCACHE_CLIENT_EXAMPLES_CHAT_CHAT_SESSION_H_
#define KVCACHE_CLIENT_EXAMPLES_CHAT_CHAT_SESSION_H_

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <utility>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "absl/types/span.h"
#include "client/chunk_key.h"
#include "client/chunk_store.h"
#include "client/examples/chat/llama_model.h"
#include "client/examples/chat/paged_kv_cache.h"
#include "client/profile_store.h"
#include "codec/codec.h"

namespace kvcache::chat {

// The SHA-256 of a file, in lowercase hex; NOT_FOUND if it cannot be read.
absl::StatusOr<std::string> FileSha256Hex(const std::string& path);

// The key space of a model's KV as the chat worker caches it.
// The model id is the SHA-256 of the model file, so only identical
// weights share chunks whatever the files are called. The namespace ends in
// the codec level: a session stored lossily is never served to a worker that
// asked for lossless (the bitstream would decode, but to other values).
// NOT_FOUND if the file cannot be read.
absl::StatusOr<KeySpace> ChatKeySpace(const std::string& checkpoint_path,
                                      const LlamaConfig& config,
                                      uint32_t chunk_tokens, codec::Level level,
                                      absl::string_view name_space = "chat");

struct ChatSessionOptions {
  codec::Level level = codec::kDefaultLevel;
  // The model's profile, which the transform levels (codec::LevelNeedsProfile)
  // encode with; must outlive the session.
  const codec::ModelProfile* profile = nullptr;
  // Where chunks naming another profile find theirs (a worker that stored
  // them may have had an older one); may be null. Must outlive the session.
  ProfileStore* profiles = nullptr;
  // How long a stored turn stays pinned: the time a user may take to reply.
  absl::Duration pin_ttl = absl::Minutes(10);
};

struct StoreStats {
  int tokens = 0;         // tokens whose KV the daemon now holds
  int chunks_sent = 0;    // chunks encoded and put
  int chunks_kept = 0;    // chunks an earlier turn stored, re-pinned
  size_t raw_bytes = 0;   // fp16 size of the chunks sent
  size_t sent_bytes = 0;  // their encoded size
  absl::Duration encode_time;
  absl::Duration put_time;  // lookup, pin and put
};

struct RestoreStats {
  int tokens = 0;  // restored into the sequence; the caller prefills the rest
  // Why nothing was restored although the daemon was asked: its error, or
  // the codec's. OK on a hit and on a plain miss.
  absl::Status fallback;
  int chunks = 0;
  size_t fetched_bytes = 0;  // encoded bytes received
  size_t raw_bytes = 0;      // fp16 size of what they decoded to
  absl::Duration lookup_time;
  absl::Duration get_time;
  absl::Duration decode_time;  // decode and import into the paged cache

  absl::Duration total_time() const {
    return lookup_time + get_time + decode_time;
  }
};

class ChatSession {
 public:
  // INVALID_ARGUMENT if the key space does not describe the cache's KV
  // (layers, kv heads, head dim, fp16, no tensor parallelism) or its chunk
  // size is zero. The cache and client must outlive the session.
  static absl::StatusOr<ChatSession> Create(PagedKvCache* cache,
                                            ChunkStore* client,
                                            const KeySpace& key_space,
                                            const ChatSessionOptions& options);

  const KeySpace& key_space() const { return key_space_; }
  const ChatSessionOptions& options() const { return options_; }

  // Stores the KV of the first tokens.size() positions of `seq`, whose token
  // ids are `tokens`. INVALID_ARGUMENT if there are no tokens or more than
  // the sequence holds; the client's error if the daemon refuses (chunks
  // before the failing one may then be stored).
  absl::StatusOr<StoreStats> Store(SequenceId seq,
                                   absl::Span<const int32_t> tokens);

  // Restores the longest cached prefix of `tokens` into `seq`, which must be
  // empty (FAILED_PRECONDITION otherwise; NOT_FOUND for an unknown
  // sequence). Every other failure is reported in RestoreStats::fallback
  // with the sequence left empty.
  absl::StatusOr<RestoreStats> Restore(SequenceId seq,
                                       absl::Span<const int32_t> tokens);

 private:
  ChatSession(PagedKvCache* cache, ChunkStore* client, KeySpace key_space,
              const ChatSessionOptions& options)
      : cache_(cache),
        client_(client),
        key_space_(std::move(key_space)),
        options_(options) {}

  // Fetches keys[0, chunks) and imports them at positions 0...; on error the
  // sequence may hold part of them.
  absl::Status Fetch(SequenceId seq, absl::Span<const ChunkKey> keys,
                     size_t chunks, int total_tokens, RestoreStats& stats);

  PagedKvCache* cache_;
  ChunkStore* client_;
  KeySpace key_space_;
  ChatSessionOptions options_;
  // The partial tail chunk the last Store put, to unpin once superseded.
  std::optional<ChunkKey> stored_tail_;
};

}  // namespace kvcache::chat

#endif  // KVCACHE_CLIENT_EXAMPLES_CHAT_CHAT_SESSION_H_
