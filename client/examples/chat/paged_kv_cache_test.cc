// Tests of the paged KV cache: block accounting, fp16 writes and reads, and
// chunk export/import across caches of different paging.
#include "client/examples/chat/paged_kv_cache.h"

#include <cstdint>
#include <random>
#include <vector>

#include "codec/half.h"
#include "gtest/gtest.h"

namespace kvcache::chat {
namespace {

KvCacheShape SmallShape(int block_tokens, int num_blocks) {
  KvCacheShape shape;
  shape.layers = 3;
  shape.kv_heads = 2;
  shape.head_dim = 4;
  shape.block_tokens = block_tokens;
  shape.num_blocks = num_blocks;
  return shape;
}

// A chunk of `tokens` tokens of arbitrary fp16 bit patterns, NaNs included:
// import and export must move bits, not values.
std::vector<uint16_t> RandomChunk(const KvCacheShape& shape, int tokens,
                                  uint32_t seed) {
  std::mt19937 rng(seed);
  std::vector<uint16_t> chunk(static_cast<size_t>(shape.layers) * 2 * tokens *
                              shape.kv_dim());
  for (uint16_t& v : chunk) v = static_cast<uint16_t>(rng());
  return chunk;
}

TEST(PagedKvCacheTest, RejectsEmptyShapes) {
  EXPECT_FALSE(PagedKvCache::Create(SmallShape(0, 4)).ok());
  EXPECT_FALSE(PagedKvCache::Create(SmallShape(4, 0)).ok());
  KvCacheShape shape = SmallShape(4, 4);
  shape.head_dim = -1;
  EXPECT_FALSE(PagedKvCache::Create(shape).ok());
}

TEST(PagedKvCacheTest, AllocatesAndFreesWholeBlocks) {
  PagedKvCache cache = *PagedKvCache::Create(SmallShape(4, 5));
  const SequenceId a = cache.CreateSequence();
  const SequenceId b = cache.CreateSequence();
  ASSERT_TRUE(cache.Extend(a, 5).ok());  // 2 blocks
  ASSERT_TRUE(cache.Extend(b, 4).ok());  // 1 block
  ASSERT_TRUE(cache.Extend(a, 3).ok());  // still 2 blocks
  EXPECT_EQ(*cache.Length(a), 8);
  EXPECT_EQ(cache.BlockTable(a)->size(), 2u);
  EXPECT_EQ(cache.free_blocks(), 2);

  // Too long: refused and nothing changes.
  EXPECT_EQ(cache.Extend(b, 9).code(), absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(*cache.Length(b), 4);
  EXPECT_EQ(cache.free_blocks(), 2);

  ASSERT_TRUE(cache.Truncate(a, 4).ok());
  EXPECT_EQ(*cache.Length(a), 4);
  EXPECT_EQ(cache.BlockTable(a)->size(), 1u);
  EXPECT_EQ(cache.free_blocks(), 3);
  EXPECT_EQ(cache.Truncate(a, 5).code(), absl::StatusCode::kOutOfRange);
  ASSERT_TRUE(cache.Truncate(a, 0).ok());
  EXPECT_TRUE(cache.BlockTable(a)->empty());

  ASSERT_TRUE(cache.FreeSequence(b).ok());
  EXPECT_EQ(cache.free_blocks(), 5);
  EXPECT_EQ(cache.Length(b).status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(cache.FreeSequence(b).code(), absl::StatusCode::kNotFound);
}

TEST(PagedKvCacheTest, WritesRoundToFp16AndGatherReadsBack) {
  const KvCacheShape shape = SmallShape(2, 4);
  PagedKvCache cache = *PagedKvCache::Create(shape);
  const SequenceId seq = cache.CreateSequence();
  ASSERT_TRUE(cache.Extend(seq, 3).ok());
  const int kv_dim = shape.kv_dim();
  std::vector<float> keys(3 * kv_dim), values(3 * kv_dim);
  for (int i = 0; i < 3 * kv_dim; ++i) {
    keys[i] = 0.1f * i;
    values[i] = -1.0f / (i + 1);
  }
  ASSERT_TRUE(cache.Write(seq, 1, 0, 3, keys, values).ok());

  std::vector<float> got_keys(3 * kv_dim), got_values(3 * kv_dim);
  ASSERT_TRUE(cache
                  .Gather(seq, 1, 3, absl::MakeSpan(got_keys),
                          absl::MakeSpan(got_values))
                  .ok());
  for (int i = 0; i < 3 * kv_dim; ++i) {
    EXPECT_EQ(got_keys[i], codec::HalfToFloat(codec::FloatToHalf(keys[i])));
    EXPECT_EQ(got_values[i], codec::HalfToFloat(codec::FloatToHalf(values[i])));
  }

  // Out of the sequence, or spans of the wrong size.
  EXPECT_EQ(cache.Write(seq, 1, 2, 2, keys, values).code(),
            absl::StatusCode::kOutOfRange);
  EXPECT_EQ(cache.Write(seq, 3, 0, 3, keys, values).code(),
            absl::StatusCode::kOutOfRange);
  EXPECT_EQ(cache.Write(seq, 0, 0, 2, keys, values).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(cache
                .Gather(seq, 0, 4, absl::MakeSpan(got_keys),
                        absl::MakeSpan(got_values))
                .code(),
            absl::StatusCode::kOutOfRange);
}

// Export from one cache and import into another with a different block size
// and a fragmented block table: the bytes survive exactly.
TEST(PagedKvCacheTest, ChunksRoundTripBitExactAcrossPagings) {
  const KvCacheShape shape = SmallShape(4, 16);
  PagedKvCache source = *PagedKvCache::Create(shape);
  const SequenceId src = source.CreateSequence();
  const std::vector<uint16_t> all = RandomChunk(shape, 30, 1);
  ASSERT_TRUE(source.ImportChunk(src, 0, all).ok());
  EXPECT_EQ(*source.Length(src), 30);
  EXPECT_EQ(*source.ExportChunk(src, 0, 30), all);

  KvCacheShape other_shape = shape;
  other_shape.block_tokens = 3;
  other_shape.num_blocks = 40;
  PagedKvCache target = *PagedKvCache::Create(other_shape);
  const SequenceId filler = target.CreateSequence();
  const SequenceId dst = target.CreateSequence();
  // Import in uneven chunks while a second sequence takes blocks in between,
  // so dst's blocks are not contiguous.
  const int bounds[] = {0, 7, 8, 20, 30};
  for (int i = 0; i + 1 < 5; ++i) {
    ASSERT_TRUE(target.Extend(filler, 3).ok());
    std::vector<uint16_t> chunk =
        *source.ExportChunk(src, bounds[i], bounds[i + 1]);
    ASSERT_TRUE(target.ImportChunk(dst, bounds[i], chunk).ok());
  }
  absl::Span<const int32_t> table = *target.BlockTable(dst);
  bool contiguous = true;
  for (size_t i = 1; i < table.size(); ++i) {
    contiguous &= table[i] == table[i - 1] + 1;
  }
  EXPECT_FALSE(contiguous);
  EXPECT_EQ(*target.ExportChunk(dst, 0, 30), all);
  EXPECT_EQ(*target.ExportChunk(dst, 8, 20), *source.ExportChunk(src, 8, 20));

  // Overwriting a middle range changes only that range.
  const std::vector<uint16_t> patch = RandomChunk(shape, 5, 2);
  ASSERT_TRUE(target.ImportChunk(dst, 10, patch).ok());
  EXPECT_EQ(*target.ExportChunk(dst, 10, 15), patch);
  EXPECT_EQ(*target.ExportChunk(dst, 0, 10), *source.ExportChunk(src, 0, 10));
  EXPECT_EQ(*target.ExportChunk(dst, 15, 30), *source.ExportChunk(src, 15, 30));
  EXPECT_EQ(*target.Length(dst), 30);
}

TEST(PagedKvCacheTest, RejectsBadChunks) {
  const KvCacheShape shape = SmallShape(4, 2);
  PagedKvCache cache = *PagedKvCache::Create(shape);
  const SequenceId seq = cache.CreateSequence();
  std::vector<uint16_t> chunk = RandomChunk(shape, 2, 3);
  EXPECT_EQ(cache.ImportChunk(seq, 1, chunk).code(),
            absl::StatusCode::kOutOfRange);  // would leave a hole
  chunk.pop_back();
  EXPECT_EQ(cache.ImportChunk(seq, 0, chunk).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(cache.ImportChunk(seq, 0, RandomChunk(shape, 9, 4)).code(),
            absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(*cache.Length(seq), 0);
  EXPECT_EQ(cache.free_blocks(), 2);
  EXPECT_EQ(cache.ExportChunk(seq, 0, 1).status().code(),
            absl::StatusCode::kOutOfRange);
  EXPECT_TRUE(cache.ExportChunk(seq, 0, 0)->empty());
}

}  // namespace
}  // namespace kvcache::chat
