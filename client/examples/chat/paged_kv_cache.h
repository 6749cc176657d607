// The reference worker's KV cache, paged the way vLLM keeps it.
//
// Each layer owns a pool of fixed-size blocks,
//   pool[layer][block][K or V][slot within block][kv_head][head_dim],
// of fp16 values (uint16_t bit patterns). A sequence is a block table
// (logical block i -> physical block) plus a length in tokens, so sequences
// grow without copying and freed blocks are reused by any sequence.
//
// Keys are stored after RoPE, as an engine caches them. Writes round fp32 to
// fp16 and reads widen back to fp32, so the model's attention consumes
// exactly the values that an external store (kvcache) would hold: a prefix
// exported from one cache and imported into another continues bit-identically.
//
// Chunks exchanged with kvcache are contiguous fp16
//   chunk[layer][K or V][token][kv_heads * head_dim],
// the codec's chunk layout.
//
// Not thread-safe: one worker thread owns a cache.
#ifndef KVCACHE_CLIENT_EXAMPLES_CHAT_PAGED_KV_CACHE_H_
#define KVCACHE_CLIENT_EXAMPLES_CHAT_PAGED_KV_CACHE_H_

#include <cstdint>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"

namespace kvcache::chat {

struct KvCacheShape {
  int layers = 0;
  int kv_heads = 0;
  int head_dim = 0;
  int block_tokens = 16;  // tokens per block
  int num_blocks = 0;     // blocks per layer pool

  int kv_dim() const { return kv_heads * head_dim; }
};

using SequenceId = int64_t;

class PagedKvCache {
 public:
  // INVALID_ARGUMENT unless every field is positive; RESOURCE_EXHAUSTED if
  // the pools would not fit in memory's addressable size.
  static absl::StatusOr<PagedKvCache> Create(const KvCacheShape& shape);

  const KvCacheShape& shape() const { return shape_; }
  int free_blocks() const { return static_cast<int>(free_list_.size()); }

  // A new, empty sequence.
  SequenceId CreateSequence();
  // Returns the sequence's blocks to the pool; NOT_FOUND if unknown.
  absl::Status FreeSequence(SequenceId seq);

  // Length in tokens; NOT_FOUND if unknown.
  absl::StatusOr<int> Length(SequenceId seq) const;
  // Logical block i -> physical block; NOT_FOUND if unknown.
  absl::StatusOr<absl::Span<const int32_t>> BlockTable(SequenceId seq) const;

  // Grows the sequence by `tokens` positions (contents undefined until
  // written), allocating blocks as needed. RESOURCE_EXHAUSTED, with nothing
  // changed, if the pool has too few free blocks.
  absl::Status Extend(SequenceId seq, int tokens);
  // Shrinks the sequence to `length` tokens and frees the blocks it no
  // longer uses; Truncate(seq, 0) resets it. OUT_OF_RANGE if `length`
  // exceeds the current length.
  absl::Status Truncate(SequenceId seq, int length);

  // Writes the keys and values of tokens [begin, begin + count) of one
  // layer, each given as [count][kv_dim] floats and rounded to fp16.
  // OUT_OF_RANGE unless the positions are within Length(seq);
  // INVALID_ARGUMENT if a span's size is not count * kv_dim.
  absl::Status Write(SequenceId seq, int layer, int begin, int count,
                     absl::Span<const float> keys,
                     absl::Span<const float> values);
  // Widens positions [0, end) of one layer into contiguous fp32
  // keys[end][kv_dim] and values[end][kv_dim], the form attention scans.
  // Same errors as Write.
  absl::Status Gather(SequenceId seq, int layer, int end,
                      absl::Span<float> keys, absl::Span<float> values) const;

  // Tokens [begin, end) as one chunk[layer][K or V][token][kv_dim] of fp16.
  // OUT_OF_RANGE unless 0 <= begin <= end <= Length(seq).
  absl::StatusOr<std::vector<uint16_t>> ExportChunk(SequenceId seq, int begin,
                                                    int end) const;
  // Writes a chunk (layout as ExportChunk; its token count is implied by its
  // size) at positions starting at `begin`, extending the sequence if the
  // chunk runs past its end. `begin` may not exceed Length(seq): a sequence
  // has no holes. INVALID_ARGUMENT if the size is not a whole number of
  // tokens; RESOURCE_EXHAUSTED, with nothing changed, if blocks run out.
  absl::Status ImportChunk(SequenceId seq, int begin,
                           absl::Span<const uint16_t> chunk);

 private:
  struct Sequence {
    int length = 0;
    std::vector<int32_t> blocks;
  };

  explicit PagedKvCache(const KvCacheShape& shape);

  absl::StatusOr<Sequence*> Find(SequenceId seq);
  absl::StatusOr<const Sequence*> Find(SequenceId seq) const;
  // Offset into pool_ of (layer, physical block, K=0/V=1, slot).
  size_t Offset(int layer, int32_t block, int kv, int slot) const;
  // Where token `pos` of `sequence` lives for (layer, K=0/V=1).
  size_t TokenOffset(const Sequence& sequence, int layer, int kv,
                     int pos) const;

  KvCacheShape shape_;
  std::vector<uint16_t> pool_;
  // Free physical blocks; allocation pops from the back.
  std::vector<int32_t> free_list_;
  absl::flat_hash_map<SequenceId, Sequence> sequences_;
  SequenceId next_id_ = 0;
};

}  // namespace kvcache::chat

#endif  // KVCACHE_CLIENT_EXAMPLES_CHAT_PAGED_KV_CACHE_H_
