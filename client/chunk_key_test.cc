#include "client/chunk_key.h"

#include <gtest/gtest.h>

#include <numeric>

namespace kvcache {
namespace {

KeySpace TestSpace() {
  KeySpace space;
  space.model_id = "stories260K";
  space.layers = 5;
  space.kv_heads = 4;
  space.head_dim = 8;
  space.chunk_tokens = 4;
  return space;
}

std::vector<int32_t> Iota(int n, int first = 1) {
  std::vector<int32_t> v(n);
  std::iota(v.begin(), v.end(), first);
  return v;
}

std::vector<ChunkKey> Keys(const KeySpace& space,
                           const std::vector<int32_t>& tokens) {
  auto keys = ChunkKeysForTokens(space, tokens);
  EXPECT_TRUE(keys.ok()) << keys.status();
  return keys.value_or(std::vector<ChunkKey>{});
}

TEST(ChunkKeyTest, OneKeyPerChunkWithPartialTail) {
  EXPECT_EQ(Keys(TestSpace(), Iota(8)).size(), 2u);
  EXPECT_EQ(Keys(TestSpace(), Iota(9)).size(), 3u);
  EXPECT_TRUE(Keys(TestSpace(), {}).empty());
}

TEST(ChunkKeyTest, SharedPrefixSharesKeys) {
  std::vector<int32_t> a = Iota(12);
  std::vector<int32_t> b = a;
  b[9] = 999;  // third chunk differs
  std::vector<ChunkKey> ka = Keys(TestSpace(), a);
  std::vector<ChunkKey> kb = Keys(TestSpace(), b);
  ASSERT_EQ(ka.size(), 3u);
  ASSERT_EQ(kb.size(), 3u);
  EXPECT_EQ(ka[0], kb[0]);
  EXPECT_EQ(ka[1], kb[1]);
  EXPECT_NE(ka[2], kb[2]);
}

TEST(ChunkKeyTest, EarlierTokenChangesEveryLaterKey) {
  std::vector<int32_t> a = Iota(12);
  std::vector<int32_t> b = a;
  b[0] = 0;
  std::vector<ChunkKey> ka = Keys(TestSpace(), a);
  std::vector<ChunkKey> kb = Keys(TestSpace(), b);
  for (size_t i = 0; i < ka.size(); ++i) EXPECT_NE(ka[i], kb[i]) << i;
}

TEST(ChunkKeyTest, PartialChunkDiffersFromFullChunk) {
  std::vector<ChunkKey> partial = Keys(TestSpace(), Iota(6));
  std::vector<ChunkKey> full = Keys(TestSpace(), Iota(8));
  EXPECT_EQ(partial[0], full[0]);
  EXPECT_NE(partial[1], full[1]);
}

TEST(ChunkKeyTest, EveryLayoutFieldChangesKeys) {
  const std::vector<int32_t> tokens = Iota(8);
  const ChunkKey base = Keys(TestSpace(), tokens)[0];
  std::vector<void (*)(KeySpace&)> changes = {
      [](KeySpace& s) { s.name_space = "tenant-b"; },
      [](KeySpace& s) { s.model_id = "other"; },
      [](KeySpace& s) { s.dtype = "bfloat16"; },
      [](KeySpace& s) { s.layers = 6; },
      [](KeySpace& s) { s.kv_heads = 8; },
      [](KeySpace& s) { s.head_dim = 16; },
      [](KeySpace& s) { s.tp_size = 2; },
      [](KeySpace& s) {
        s.tp_size = 2;
        s.tp_rank = 1;
      },
      [](KeySpace& s) { s.chunk_tokens = 8; },
  };
  for (size_t i = 0; i < changes.size(); ++i) {
    KeySpace space = TestSpace();
    changes[i](space);
    EXPECT_NE(Keys(space, tokens)[0], base) << "change " << i;
  }
}

TEST(ChunkKeyTest, FieldBoundariesAreUnambiguous) {
  KeySpace a = TestSpace();
  a.name_space = "ab";
  a.model_id = "c";
  KeySpace b = TestSpace();
  b.name_space = "a";
  b.model_id = "bc";
  EXPECT_NE(Keys(a, Iota(4))[0], Keys(b, Iota(4))[0]);
}

TEST(ChunkKeyTest, HexRoundTrip) {
  const ChunkKey key = Keys(TestSpace(), Iota(4))[0];
  const std::string hex = key.ToHex();
  EXPECT_EQ(hex.size(), 64u);
  auto parsed = ChunkKey::FromHex(hex);
  ASSERT_TRUE(parsed.ok()) << parsed.status();
  EXPECT_EQ(*parsed, key);
}

TEST(ChunkKeyTest, RejectsMalformedKeysAndSpaces) {
  EXPECT_EQ(ChunkKey::FromHex("abc").status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(ChunkKey::FromHex(std::string(64, 'z')).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(ChunkKey::FromBytes("short").status().code(),
            absl::StatusCode::kInvalidArgument);
  KeySpace no_model = TestSpace();
  no_model.model_id.clear();
  EXPECT_FALSE(ChunkKeysForTokens(no_model, Iota(4)).ok());
  KeySpace bad_tp = TestSpace();
  bad_tp.tp_rank = 1;
  EXPECT_FALSE(ChunkKeysForTokens(bad_tp, Iota(4)).ok());
  KeySpace zero_chunk = TestSpace();
  zero_chunk.chunk_tokens = 0;
  EXPECT_FALSE(ChunkKeysForTokens(zero_chunk, Iota(4)).ok());
}

TEST(ChunkKeyTest, ContentKeyIsSha256OfBytes) {
  // SHA-256("abc"), FIPS 180-2 appendix B.1.
  EXPECT_EQ(ContentKey("abc").ToHex(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
}

}  // namespace
}  // namespace kvcache
