// Storing and restoring a chat session's KV through kvcache (see
// chat_session.h).
#include "client/examples/chat/chat_session.h"

#include <openssl/evp.h>

#include <algorithm>
#include <fstream>
#include <memory>
#include <utility>
#include <vector>

#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"

namespace kvcache::chat {

// Read in pieces, so that a checkpoint of many gigabytes is not held in
// memory twice.
absl::StatusOr<std::string> FileSha256Hex(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot open ", path));
  std::unique_ptr<EVP_MD_CTX, decltype(&EVP_MD_CTX_free)> ctx(EVP_MD_CTX_new(),
                                                              &EVP_MD_CTX_free);
  EVP_DigestInit_ex(ctx.get(), EVP_sha256(), nullptr);
  std::vector<char> buffer(1 << 20);
  while (in) {
    in.read(buffer.data(), buffer.size());
    EVP_DigestUpdate(ctx.get(), buffer.data(), in.gcount());
  }
  if (in.bad()) return absl::NotFoundError(absl::StrCat("cannot read ", path));
  unsigned char digest[EVP_MAX_MD_SIZE];
  unsigned int size = 0;
  EVP_DigestFinal_ex(ctx.get(), digest, &size);
  return absl::BytesToHexString(
      absl::string_view(reinterpret_cast<const char*>(digest), size));
}

absl::StatusOr<KeySpace> ChatKeySpace(const std::string& checkpoint_path,
                                      const LlamaConfig& config,
                                      uint32_t chunk_tokens, codec::Level level,
                                      absl::string_view name_space) {
  absl::StatusOr<std::string> sha = FileSha256Hex(checkpoint_path);
  if (!sha.ok()) return sha.status();
  KeySpace space;
  space.name_space = absl::StrCat(name_space, "/", codec::LevelName(level));
  space.model_id = absl::StrCat("sha256:", *sha);
  space.dtype = "float16";
  space.layers = config.layers;
  space.kv_heads = config.kv_heads;
  space.head_dim = config.head_dim();
  space.chunk_tokens = chunk_tokens;
  return space;
}

absl::StatusOr<ChatSession> ChatSession::Create(
    PagedKvCache* cache, ChunkStore* client, const KeySpace& key_space,
    const ChatSessionOptions& options) {
  const KvCacheShape& shape = cache->shape();
  if (key_space.layers != static_cast<uint32_t>(shape.layers) ||
      key_space.kv_heads != static_cast<uint32_t>(shape.kv_heads) ||
      key_space.head_dim != static_cast<uint32_t>(shape.head_dim) ||
      key_space.dtype != "float16" || key_space.tp_size != 1 ||
      key_space.chunk_tokens == 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "key space (", key_space.layers, " layers, ", key_space.kv_heads,
        " kv heads x ", key_space.head_dim, ", ", key_space.dtype, ", tp ",
        key_space.tp_size, ", ", key_space.chunk_tokens,
        "-token chunks) does not describe a cache of ", shape.layers,
        " layers, ", shape.kv_heads, " kv heads x ", shape.head_dim,
        " fp16 in chunks of at least one token"));
  }
  return ChatSession(cache, client, key_space, options);
}

absl::StatusOr<StoreStats> ChatSession::Store(
    SequenceId seq, absl::Span<const int32_t> tokens) {
  absl::StatusOr<int> length = cache_->Length(seq);
  if (!length.ok()) return length.status();
  if (tokens.empty() || tokens.size() > static_cast<size_t>(*length)) {
    return absl::InvalidArgumentError(
        absl::StrCat("cannot store ", tokens.size(), " tokens of a ", *length,
                     "-token sequence"));
  }
  absl::StatusOr<std::vector<ChunkKey>> keys =
      ChunkKeysForTokens(key_space_, tokens);
  if (!keys.ok()) return keys.status();

  StoreStats stats;
  absl::Time start = absl::Now();
  // An earlier turn's chunks are still there (pinned): extend their pins
  // rather than encode and send them again.
  absl::StatusOr<LookupResult> cached = client_->Lookup(*keys);
  if (!cached.ok()) return cached.status();
  size_t kept = cached->prefix_chunks;
  if (kept > 0) {
    absl::StatusOr<absl::Time> pinned =
        client_->Pin(absl::MakeConstSpan(*keys).first(kept), options_.pin_ttl);
    // NOT_FOUND: evicted since the lookup; send them all again.
    if (absl::IsNotFound(pinned.status())) {
      kept = 0;
    } else if (!pinned.ok()) {
      return pinned.status();
    }
  }
  stats.put_time += absl::Now() - start;

  start = absl::Now();
  const int chunk_tokens = static_cast<int>(key_space_.chunk_tokens);
  const int total = static_cast<int>(tokens.size());
  codec::ChunkShape shape;
  shape.layers = cache_->shape().layers;
  shape.kv_heads = cache_->shape().kv_heads;
  shape.head_dim = cache_->shape().head_dim;
  std::vector<std::string> encoded;
  for (size_t i = kept; i < keys->size(); ++i) {
    const int begin = static_cast<int>(i) * chunk_tokens;
    const int end = std::min(total, begin + chunk_tokens);
    absl::StatusOr<std::vector<uint16_t>> chunk =
        cache_->ExportChunk(seq, begin, end);
    if (!chunk.ok()) return chunk.status();
    shape.tokens = end - begin;
    codec::EncodeOptions encode_options;
    encode_options.profile = options_.profile;
    encode_options.first_position = static_cast<uint32_t>(begin);
    absl::StatusOr<std::string> bits =
        codec::EncodeChunk(shape, *chunk, options_.level, encode_options);
    if (!bits.ok()) return bits.status();
    stats.raw_bytes += shape.RawBytes();
    stats.sent_bytes += bits->size();
    encoded.push_back(*std::move(bits));
  }
  stats.encode_time = absl::Now() - start;

  start = absl::Now();
  if (!encoded.empty()) {
    PutOptions put_options;
    put_options.pin_ttl = options_.pin_ttl;
    if (absl::Status status =
            client_->Put(PromptChunks(*keys, kept, encoded), put_options);
        !status.ok()) {
      return status;
    }
  }
  // The previous turn's tail is now inside a longer chunk with another key.
  // Unpinned, not deleted: a regenerated reply may still want it, and LRU
  // drops it otherwise. NOT_FOUND (already gone) is fine.
  const bool has_tail = total % chunk_tokens != 0;
  if (stored_tail_.has_value() &&
      std::find(keys->begin(), keys->end(), *stored_tail_) == keys->end()) {
    client_->Unpin({*stored_tail_}).IgnoreError();
  }
  stored_tail_.reset();
  if (has_tail) stored_tail_ = keys->back();
  stats.put_time += absl::Now() - start;

  stats.tokens = total;
  stats.chunks_sent = static_cast<int>(encoded.size());
  stats.chunks_kept = static_cast<int>(kept);
  return stats;
}

absl::StatusOr<RestoreStats> ChatSession::Restore(
    SequenceId seq, absl::Span<const int32_t> tokens) {
  absl::StatusOr<int> length = cache_->Length(seq);
  if (!length.ok()) return length.status();
  if (*length != 0) {
    return absl::FailedPreconditionError(absl::StrCat(
        "restore needs an empty sequence; this one has ", *length, " tokens"));
  }
  RestoreStats stats;
  if (tokens.empty()) return stats;
  absl::StatusOr<std::vector<ChunkKey>> keys =
      ChunkKeysForTokens(key_space_, tokens);
  if (!keys.ok()) return keys.status();

  const absl::Time start = absl::Now();
  absl::StatusOr<LookupResult> cached = client_->Lookup(*keys);
  stats.lookup_time = absl::Now() - start;
  if (!cached.ok()) {
    stats.fallback = cached.status();
    return stats;
  }
  if (cached->prefix_chunks == 0) return stats;

  const int tokens_cached = std::min(
      static_cast<int>(tokens.size()),
      static_cast<int>(cached->prefix_chunks * key_space_.chunk_tokens));
  stats.fallback =
      Fetch(seq, *keys, cached->prefix_chunks, tokens_cached, stats);
  if (stats.fallback.ok()) {
    stats.tokens = tokens_cached;
    stats.chunks = static_cast<int>(cached->prefix_chunks);
  } else {
    // All or nothing: what was imported before the failure is sound, but a
    // caller that asked for a restore and got an error should not have to
    // reason about half of one.
    cache_->Truncate(seq, 0).IgnoreError();
  }
  return stats;
}

absl::Status ChatSession::Fetch(SequenceId seq, absl::Span<const ChunkKey> keys,
                                size_t chunks, int total_tokens,
                                RestoreStats& stats) {
  absl::Time start = absl::Now();
  absl::StatusOr<std::vector<FetchedChunk>> fetched =
      client_->Get(keys.first(chunks));
  stats.get_time = absl::Now() - start;
  if (!fetched.ok()) return fetched.status();

  start = absl::Now();
  const KvCacheShape& cache_shape = cache_->shape();
  const int chunk_tokens = static_cast<int>(key_space_.chunk_tokens);
  codec::ChunkShape want;
  want.layers = cache_shape.layers;
  want.kv_heads = cache_shape.kv_heads;
  want.head_dim = cache_shape.head_dim;
  std::vector<uint16_t> values;
  for (size_t i = 0; i < fetched->size(); ++i) {
    const std::string& bytes = (*fetched)[i].bytes;
    const int begin = static_cast<int>(i) * chunk_tokens;
    want.tokens = std::min(total_tokens - begin, chunk_tokens);
    absl::StatusOr<codec::StreamSummary> summary = codec::PeekSummary(bytes);
    if (!summary.ok()) return summary.status();
    const codec::ChunkShape* shape = &summary->shape;
    // A well-formed chunk of another shape under this key is as wrong as a
    // damaged one: importing it would misplace every value after it.
    if (!(*shape == want)) {
      return absl::DataLossError(
          absl::StrCat("chunk ", i, " holds ", shape->layers, "x",
                       shape->tokens, "x", shape->kv_heads, "x",
                       shape->head_dim, " values, expected ", want.layers, "x",
                       want.tokens, "x", want.kv_heads, "x", want.head_dim));
    }
    values.resize(shape->NumValues());
    // A chunk stored with another profile than this worker's brings that
    // profile's id; the profile comes from kvcache.
    const codec::ModelProfile* profile = options_.profile;
    std::shared_ptr<const codec::ModelProfile> fetched_profile;
    if (summary->profile_id.has_value() &&
        (profile == nullptr || profile->id != *summary->profile_id) &&
        options_.profiles != nullptr) {
      absl::StatusOr<std::shared_ptr<const codec::ModelProfile>> got =
          options_.profiles->Get(*summary->profile_id);
      if (!got.ok()) return got.status();
      fetched_profile = *std::move(got);
      profile = fetched_profile.get();
    }
    if (absl::Status status =
            codec::DecodeChunk(bytes, absl::MakeSpan(values), profile);
        !status.ok()) {
      return status;
    }
    if (absl::Status status = cache_->ImportChunk(seq, begin, values);
        !status.ok()) {
      return status;
    }
    stats.fetched_bytes += bytes.size();
    stats.raw_bytes += shape->RawBytes();
  }
  stats.decode_time = absl::Now() - start;
  return absl::OkStatus();
}

}  // namespace kvcache::chat
