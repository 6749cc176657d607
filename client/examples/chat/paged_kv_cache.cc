// Paged fp16 KV cache (see paged_kv_cache.h).
#include "client/examples/chat/paged_kv_cache.h"

#include <algorithm>
#include <limits>
#include <utility>

#include "absl/strings/str_cat.h"
#include "codec/half.h"

namespace kvcache::chat {
namespace {

int BlocksFor(int tokens, int block_tokens) {
  return (tokens + block_tokens - 1) / block_tokens;
}

}  // namespace

absl::StatusOr<PagedKvCache> PagedKvCache::Create(const KvCacheShape& shape) {
  if (shape.layers <= 0 || shape.kv_heads <= 0 || shape.head_dim <= 0 ||
      shape.block_tokens <= 0 || shape.num_blocks <= 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "KV cache shape needs positive sizes, got layers=", shape.layers,
        " kv_heads=", shape.kv_heads, " head_dim=", shape.head_dim,
        " block_tokens=", shape.block_tokens,
        " num_blocks=", shape.num_blocks));
  }
  // Pool elements: layers * num_blocks * 2 * block_tokens * kv_dim, each
  // factor < 2^31, so checking the running product against the limit before
  // each multiplication avoids overflow.
  const size_t factors[] = {static_cast<size_t>(shape.layers),
                            static_cast<size_t>(shape.num_blocks),
                            2,
                            static_cast<size_t>(shape.block_tokens),
                            static_cast<size_t>(shape.kv_heads),
                            static_cast<size_t>(shape.head_dim)};
  const size_t limit =
      std::numeric_limits<size_t>::max() / 2 / sizeof(uint16_t);
  size_t elements = 1;
  for (size_t factor : factors) {
    if (elements > limit / factor) {
      return absl::ResourceExhaustedError("KV cache pool size overflows");
    }
    elements *= factor;
  }
  return PagedKvCache(shape);
}

PagedKvCache::PagedKvCache(const KvCacheShape& shape)
    : shape_(shape),
      pool_(static_cast<size_t>(shape.layers) * shape.num_blocks * 2 *
            shape.block_tokens * shape.kv_dim()) {
  // Reversed so that a fresh cache hands out blocks 0, 1, 2, ...
  free_list_.reserve(shape.num_blocks);
  for (int32_t b = shape.num_blocks - 1; b >= 0; --b) free_list_.push_back(b);
}

SequenceId PagedKvCache::CreateSequence() {
  const SequenceId id = next_id_++;
  sequences_.emplace(id, Sequence{});
  return id;
}

absl::Status PagedKvCache::FreeSequence(SequenceId seq) {
  absl::Status status = Truncate(seq, 0);
  if (!status.ok()) return status;
  sequences_.erase(seq);
  return absl::OkStatus();
}

absl::StatusOr<const PagedKvCache::Sequence*> PagedKvCache::Find(
    SequenceId seq) const {
  auto it = sequences_.find(seq);
  if (it == sequences_.end()) {
    return absl::NotFoundError(absl::StrCat("no KV cache sequence ", seq));
  }
  return &it->second;
}

absl::StatusOr<PagedKvCache::Sequence*> PagedKvCache::Find(SequenceId seq) {
  absl::StatusOr<const Sequence*> found = std::as_const(*this).Find(seq);
  if (!found.ok()) return found.status();
  return const_cast<Sequence*>(*found);
}

absl::StatusOr<int> PagedKvCache::Length(SequenceId seq) const {
  absl::StatusOr<const Sequence*> sequence = Find(seq);
  if (!sequence.ok()) return sequence.status();
  return (*sequence)->length;
}

absl::StatusOr<absl::Span<const int32_t>> PagedKvCache::BlockTable(
    SequenceId seq) const {
  absl::StatusOr<const Sequence*> sequence = Find(seq);
  if (!sequence.ok()) return sequence.status();
  return absl::Span<const int32_t>((*sequence)->blocks);
}

absl::Status PagedKvCache::Extend(SequenceId seq, int tokens) {
  absl::StatusOr<Sequence*> found = Find(seq);
  if (!found.ok()) return found.status();
  Sequence& sequence = **found;
  if (tokens < 0 ||
      tokens > std::numeric_limits<int>::max() - sequence.length) {
    return absl::InvalidArgumentError(
        absl::StrCat("cannot extend a sequence by ", tokens, " tokens"));
  }
  const int needed = BlocksFor(sequence.length + tokens, shape_.block_tokens) -
                     static_cast<int>(sequence.blocks.size());
  if (needed > free_blocks()) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "KV cache needs ", needed, " more blocks, ", free_blocks(), " free"));
  }
  for (int i = 0; i < needed; ++i) {
    sequence.blocks.push_back(free_list_.back());
    free_list_.pop_back();
  }
  sequence.length += tokens;
  return absl::OkStatus();
}

absl::Status PagedKvCache::Truncate(SequenceId seq, int length) {
  absl::StatusOr<Sequence*> found = Find(seq);
  if (!found.ok()) return found.status();
  Sequence& sequence = **found;
  if (length < 0 || length > sequence.length) {
    return absl::OutOfRangeError(absl::StrCat(
        "cannot truncate a ", sequence.length, "-token sequence to ", length));
  }
  const size_t keep = BlocksFor(length, shape_.block_tokens);
  while (sequence.blocks.size() > keep) {
    free_list_.push_back(sequence.blocks.back());
    sequence.blocks.pop_back();
  }
  sequence.length = length;
  return absl::OkStatus();
}

size_t PagedKvCache::Offset(int layer, int32_t block, int kv, int slot) const {
  return ((((static_cast<size_t>(layer) * shape_.num_blocks + block) * 2 + kv) *
               shape_.block_tokens +
           slot) *
          shape_.kv_dim());
}

size_t PagedKvCache::TokenOffset(const Sequence& sequence, int layer, int kv,
                                 int pos) const {
  return Offset(layer, sequence.blocks[pos / shape_.block_tokens], kv,
                pos % shape_.block_tokens);
}

absl::Status PagedKvCache::Write(SequenceId seq, int layer, int begin,
                                 int count, absl::Span<const float> keys,
                                 absl::Span<const float> values) {
  absl::StatusOr<const Sequence*> found = Find(seq);
  if (!found.ok()) return found.status();
  const Sequence& sequence = **found;
  if (layer < 0 || layer >= shape_.layers || begin < 0 || count < 0 ||
      count > sequence.length - begin) {
    return absl::OutOfRangeError(absl::StrCat(
        "KV write of layer ", layer, " tokens [", begin, ", +", count,
        ") outside a ", sequence.length, "-token sequence"));
  }
  const int kv_dim = shape_.kv_dim();
  const size_t floats = static_cast<size_t>(count) * kv_dim;
  if (keys.size() != floats || values.size() != floats) {
    return absl::InvalidArgumentError(absl::StrCat(
        "KV write of ", count, " tokens needs ", floats, " floats each, got ",
        keys.size(), " and ", values.size()));
  }
  const absl::Span<const float> sources[2] = {keys, values};
  for (int kv = 0; kv < 2; ++kv) {
    for (int t = 0; t < count; ++t) {
      uint16_t* dst = &pool_[TokenOffset(sequence, layer, kv, begin + t)];
      const float* src = &sources[kv][static_cast<size_t>(t) * kv_dim];
      for (int i = 0; i < kv_dim; ++i) dst[i] = codec::FloatToHalf(src[i]);
    }
  }
  return absl::OkStatus();
}

absl::Status PagedKvCache::Gather(SequenceId seq, int layer, int end,
                                  absl::Span<float> keys,
                                  absl::Span<float> values) const {
  absl::StatusOr<const Sequence*> found = Find(seq);
  if (!found.ok()) return found.status();
  const Sequence& sequence = **found;
  if (layer < 0 || layer >= shape_.layers || end < 0 || end > sequence.length) {
    return absl::OutOfRangeError(
        absl::StrCat("KV gather of layer ", layer, " tokens [0, ", end,
                     ") outside a ", sequence.length, "-token sequence"));
  }
  const int kv_dim = shape_.kv_dim();
  const size_t floats = static_cast<size_t>(end) * kv_dim;
  if (keys.size() < floats || values.size() < floats) {
    return absl::InvalidArgumentError(absl::StrCat(
        "KV gather of ", end, " tokens needs ", floats, " floats each, got ",
        keys.size(), " and ", values.size()));
  }
  const absl::Span<float> targets[2] = {keys, values};
  for (int kv = 0; kv < 2; ++kv) {
    for (int pos = 0; pos < end; ++pos) {
      const uint16_t* src = &pool_[TokenOffset(sequence, layer, kv, pos)];
      float* dst = &targets[kv][static_cast<size_t>(pos) * kv_dim];
      for (int i = 0; i < kv_dim; ++i) dst[i] = codec::HalfToFloat(src[i]);
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<std::vector<uint16_t>> PagedKvCache::ExportChunk(SequenceId seq,
                                                                int begin,
                                                                int end) const {
  absl::StatusOr<const Sequence*> found = Find(seq);
  if (!found.ok()) return found.status();
  const Sequence& sequence = **found;
  if (begin < 0 || begin > end || end > sequence.length) {
    return absl::OutOfRangeError(
        absl::StrCat("cannot export tokens [", begin, ", ", end, ") of a ",
                     sequence.length, "-token sequence"));
  }
  const int kv_dim = shape_.kv_dim();
  std::vector<uint16_t> chunk(static_cast<size_t>(shape_.layers) * 2 *
                              (end - begin) * kv_dim);
  uint16_t* out = chunk.data();
  for (int layer = 0; layer < shape_.layers; ++layer) {
    for (int kv = 0; kv < 2; ++kv) {
      for (int pos = begin; pos < end; ++pos, out += kv_dim) {
        const uint16_t* src = &pool_[TokenOffset(sequence, layer, kv, pos)];
        std::copy(src, src + kv_dim, out);
      }
    }
  }
  return chunk;
}

absl::Status PagedKvCache::ImportChunk(SequenceId seq, int begin,
                                       absl::Span<const uint16_t> chunk) {
  absl::StatusOr<int> length = Length(seq);
  if (!length.ok()) return length.status();
  if (begin < 0 || begin > *length) {
    return absl::OutOfRangeError(
        absl::StrCat("cannot import at token ", begin, " of a ", *length,
                     "-token sequence: a sequence has no holes"));
  }
  const int kv_dim = shape_.kv_dim();
  const size_t token_size = static_cast<size_t>(shape_.layers) * 2 * kv_dim;
  if (chunk.size() % token_size != 0 ||
      chunk.size() / token_size >
          static_cast<size_t>(std::numeric_limits<int>::max() - begin)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "chunk of ", chunk.size(), " fp16 values is not a whole number of ",
        token_size, "-value tokens"));
  }
  const int tokens = static_cast<int>(chunk.size() / token_size);
  const int end = begin + tokens;
  if (end > *length) {
    absl::Status status = Extend(seq, end - *length);
    if (!status.ok()) return status;
  }
  const Sequence& sequence = **Find(seq);
  const uint16_t* in = chunk.data();
  for (int layer = 0; layer < shape_.layers; ++layer) {
    for (int kv = 0; kv < 2; ++kv) {
      for (int pos = begin; pos < end; ++pos, in += kv_dim) {
        std::copy(in, in + kv_dim,
                  &pool_[TokenOffset(sequence, layer, kv, pos)]);
      }
    }
  }
  return absl::OkStatus();
}

}  // namespace kvcache::chat
