#include "codec/kvc_file.h"

#include <cstdlib>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "codec/crc32c.h"
#include "codec/test_data.h"
#include "gtest/gtest.h"

namespace kvcache::codec {
namespace {

// 40 tokens in chunks of 16: two full chunks and a short one.
const ChunkShape kDump{2, 40, 2, 8, DType::kFloat16};
constexpr uint32_t kChunkTokens = 16;

// Offsets of header fields and index entries (FORMAT.md).
constexpr size_t kDTypeAt = 5;
constexpr size_t kReservedAt = 6;
constexpr size_t kLayersAt = 8;
constexpr size_t kTokensAt = 20;
constexpr size_t kChunkCountAt = 24;
size_t EntryAt(size_t chunk) {
  return kKvcHeaderBytes + chunk * kKvcIndexEntryBytes;
}

uint32_t Get32(const std::string& b, size_t at) {
  return uint32_t{static_cast<uint8_t>(b[at])} |
         uint32_t{static_cast<uint8_t>(b[at + 1])} << 8 |
         uint32_t{static_cast<uint8_t>(b[at + 2])} << 16 |
         uint32_t{static_cast<uint8_t>(b[at + 3])} << 24;
}

void Put32(std::string* b, size_t at, uint32_t v) {
  for (int i = 0; i < 4; ++i) (*b)[at + i] = static_cast<char>(v >> (8 * i));
}

// Recomputes the index checksum after an edit, so that the edit reaches the
// checks behind it, as a careless writer's file would.
void Reseal(std::string* b) {
  const size_t index_end =
      kKvcHeaderBytes + Get32(*b, kChunkCountAt) * kKvcIndexEntryBytes;
  Put32(b, index_end, Crc32c(absl::string_view(*b).substr(0, index_end)));
}

std::vector<uint16_t> DumpValues() {
  // A dump has the layout of one chunk spanning all its tokens.
  return SyntheticChunk(kDump, 7);
}

std::string MakeFile(Level level = Level::kLossless) {
  absl::StatusOr<std::string> file =
      EncodeKvc(kDump, DumpValues(), level, kChunkTokens);
  EXPECT_TRUE(file.ok()) << file.status();
  return file.ok() ? *file : std::string();
}

// Expects DataLoss whose message contains `words`.
void ExpectDamaged(const std::string& file, absl::string_view words) {
  absl::StatusOr<KvcIndex> index = ParseKvc(file);
  ASSERT_FALSE(index.ok()) << "accepted; expected: " << words;
  EXPECT_TRUE(absl::IsDataLoss(index.status())) << index.status();
  EXPECT_TRUE(absl::StrContains(index.status().message(), words))
      << index.status() << "; expected: " << words;
}

std::string TempPath(const std::string& name) {
  const char* dir = std::getenv("TEST_TMPDIR");
  return std::string(dir ? dir : "/tmp") + "/" + name;
}

std::string ReadAll(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

TEST(KvcFileTest, RoundTripKeepsShapeChunksAndValues) {
  const std::string file = MakeFile();
  absl::StatusOr<KvcIndex> index = ParseKvc(file);
  ASSERT_TRUE(index.ok()) << index.status();
  EXPECT_TRUE(index->shape == kDump);
  ASSERT_EQ(index->chunks.size(), 3u);
  const uint32_t want_first[] = {0, 16, 32}, want_tokens[] = {16, 16, 8};
  uint64_t offset =
      kKvcHeaderBytes + 3 * kKvcIndexEntryBytes + kKvcIndexCrcBytes;
  const std::vector<uint16_t> values = DumpValues();
  const size_t row = kDump.kv_heads * kDump.head_dim;
  for (size_t i = 0; i < 3; ++i) {
    const KvcChunk& c = index->chunks[i];
    EXPECT_EQ(c.first_token, want_first[i]);
    EXPECT_EQ(c.tokens, want_tokens[i]);
    EXPECT_EQ(c.offset, offset);
    EXPECT_EQ(c.summary.level, Level::kLossless);
    EXPECT_TRUE(c.summary.shape == index->ChunkShapeOf(i));
    offset += c.bytes;
    // Each chunk holds its tokens of every (layer, K/V) plane.
    std::vector<uint16_t> out(index->ChunkShapeOf(i).NumValues());
    ASSERT_TRUE(DecodeChunk(absl::string_view(file).substr(c.offset, c.bytes),
                            absl::MakeSpan(out))
                    .ok());
    for (size_t p = 0; p < 2 * kDump.layers; ++p) {
      for (size_t j = 0; j < c.tokens * row; ++j) {
        ASSERT_EQ(out[p * c.tokens * row + j],
                  values[(p * kDump.tokens + c.first_token) * row + j])
            << "chunk " << i << " plane " << p;
      }
    }
  }
  EXPECT_EQ(offset, file.size());
}

TEST(KvcFileTest, ReadAndDecodeToFileGiveTheDumpBack) {
  const std::string path = TempPath("roundtrip.kvc");
  {
    std::ofstream out(path, std::ios::binary);
    out << MakeFile();
  }
  absl::StatusOr<KvcFile> file = ReadKvcFile(path);
  ASSERT_TRUE(file.ok()) << file.status();
  EXPECT_EQ(file->path, path);
  EXPECT_EQ(file->index.chunks.size(), 3u);
  const std::string kv_path = TempPath("roundtrip.kv");
  ASSERT_TRUE(DecodeKvcToFile(*file, kv_path).ok());
  std::string want;
  for (uint16_t v : DumpValues()) {
    want.push_back(static_cast<char>(v & 0xFF));
    want.push_back(static_cast<char>(v >> 8));
  }
  EXPECT_EQ(ReadAll(kv_path), want);
}

TEST(KvcFileTest, SerializeTakesTokenCountsFromTheStreams) {
  std::vector<std::string> streams;
  for (uint32_t tokens : {30u, 10u}) {
    ChunkShape s = kDump;
    s.tokens = tokens;
    absl::StatusOr<std::string> stream =
        EncodeChunk(s, SyntheticChunk(s, tokens), Level::kHigh);
    ASSERT_TRUE(stream.ok());
    streams.push_back(*stream);
  }
  absl::StatusOr<std::string> file = SerializeKvc(kDump, streams);
  ASSERT_TRUE(file.ok()) << file.status();
  absl::StatusOr<KvcIndex> index = ParseKvc(*file);
  ASSERT_TRUE(index.ok()) << index.status();
  ASSERT_EQ(index->chunks.size(), 2u);
  EXPECT_EQ(index->chunks[1].first_token, 30u);
  EXPECT_EQ(index->chunks[1].tokens, 10u);
  EXPECT_EQ(index->chunks[1].summary.level, Level::kHigh);

  // Too few tokens, a stream of another shape, and not a stream at all.
  EXPECT_TRUE(
      absl::IsInvalidArgument(SerializeKvc(kDump, {streams[0]}).status()));
  ChunkShape other = kDump;
  other.head_dim = 4;
  other.tokens = 10;
  absl::StatusOr<std::string> odd =
      EncodeChunk(other, SyntheticChunk(other, 1), Level::kHigh);
  ASSERT_TRUE(odd.ok());
  EXPECT_TRUE(absl::IsInvalidArgument(
      SerializeKvc(kDump, {streams[0], *odd}).status()));
  EXPECT_TRUE(absl::IsInvalidArgument(
      SerializeKvc(kDump, {streams[0], "not a stream"}).status()));
  EXPECT_TRUE(absl::IsInvalidArgument(SerializeKvc(kDump, {}).status()));
}

TEST(KvcFileTest, EncodeRejectsBadArguments) {
  const std::vector<uint16_t> values = DumpValues();
  EXPECT_TRUE(absl::IsInvalidArgument(
      EncodeKvc(kDump, values, kDefaultLevel, 0).status()));
  EXPECT_TRUE(absl::IsInvalidArgument(
      EncodeKvc(kDump, values, kDefaultLevel, kMaxTokens + 1).status()));
  EXPECT_TRUE(absl::IsInvalidArgument(
      EncodeKvc(kDump, absl::MakeSpan(values).subspan(1), kDefaultLevel, 16)
          .status()));
}

TEST(KvcFileTest, BadMagic) {
  std::string file = MakeFile();
  file[0] = 'X';
  ExpectDamaged(file, "bad magic");
  // A bare codec stream is not a container.
  absl::StatusOr<std::string> stream =
      EncodeChunk(kDump, DumpValues(), Level::kLossless);
  ASSERT_TRUE(stream.ok());
  ExpectDamaged(*stream, "bad magic");
}

TEST(KvcFileTest, NewerVersionIsUnimplemented) {
  std::string file = MakeFile();
  file[4] = 2;
  absl::StatusOr<KvcIndex> index = ParseKvc(file);
  EXPECT_TRUE(absl::IsUnimplemented(index.status())) << index.status();
  EXPECT_TRUE(absl::StrContains(index.status().message(), "version 2"));
}

TEST(KvcFileTest, TruncatedAtEveryLength) {
  const std::string file = MakeFile(Level::kDefault);
  ASSERT_TRUE(ParseKvc(file).ok());
  for (size_t n = 0; n < file.size(); ++n) {
    SCOPED_TRACE(n);
    ExpectDamaged(file.substr(0, n), "truncated");
  }
}

TEST(KvcFileTest, TrailingBytesAreRejected) {
  ExpectDamaged(MakeFile() + "x", "1 unexpected bytes after the last chunk");
}

TEST(KvcFileTest, ChunkLengthPastTheEnd) {
  std::string file = MakeFile();
  Put32(&file, EntryAt(2) + 8, Get32(file, EntryAt(2) + 8) + 1000);
  Reseal(&file);
  ExpectDamaged(file, "chunk 2's stream");
  // A length that swallows the next chunk still fits in the file; the
  // stream's own header disagrees with it.
  file = MakeFile();
  Put32(&file, EntryAt(1) + 8, Get32(file, EntryAt(1) + 8) + 1000);
  Reseal(&file);
  ExpectDamaged(file, "but its header implies");
  // A length near 2^64 must not wrap around the end check.
  file = MakeFile();
  Put32(&file, EntryAt(0) + 12, 0xFFFFFFFF);
  Reseal(&file);
  ExpectDamaged(file, "runs past the end of the file");
  // A chunk count no file this size could index is refused before the index
  // is read or anything is allocated.
  file = MakeFile();
  Put32(&file, kChunkCountAt, 0xFFFFFFFF);
  ExpectDamaged(file, "the index of 4294967295 chunks needs");
}

TEST(KvcFileTest, IndexChecksumCatchesHeaderAndIndexDamage) {
  for (size_t at : {kLayersAt, kTokensAt, EntryAt(1) + 4, EntryAt(2) + 8}) {
    std::string file = MakeFile();
    file[at] ^= 0x10;
    ExpectDamaged(file, "index checksum mismatch");
  }
}

TEST(KvcFileTest, StreamChecksumCatchesPayloadDamage) {
  std::string file = MakeFile();
  absl::StatusOr<KvcIndex> index = ParseKvc(file);
  ASSERT_TRUE(index.ok());
  const KvcChunk& c = index->chunks[1];
  file[c.offset + c.bytes / 2] ^= 0x01;
  ExpectDamaged(file, "chunk 1 (tokens 16..32): checksum mismatch");
}

TEST(KvcFileTest, BadHeaderFields) {
  std::string file = MakeFile();
  file[kReservedAt] = 1;
  Reseal(&file);
  ExpectDamaged(file, "reserved");

  file = MakeFile();
  file[kDTypeAt] = 7;
  Reseal(&file);
  ExpectDamaged(file, "unknown dtype 7");

  file = MakeFile();
  Put32(&file, kLayersAt, 0);
  Reseal(&file);
  ExpectDamaged(file, "beyond the codec's limits");

  file = MakeFile();
  Put32(&file, kChunkCountAt, 0);
  Reseal(&file);
  ExpectDamaged(file, "no chunks");

  // Each dimension within the codec's limits, but the whole dump too large
  // for byte offsets into it.
  file = MakeFile();
  Put32(&file, kLayersAt, kMaxLayers);
  Put32(&file, kLayersAt + 4, 1024);
  Put32(&file, kLayersAt + 8, 1024);
  Put32(&file, kTokensAt, 0xFFFFFFFF);
  Reseal(&file);
  ExpectDamaged(file, "beyond the codec's limits");
}

TEST(KvcFileTest, ChunksMustTileTheTokens) {
  // A gap between chunks 0 and 1.
  std::string file = MakeFile();
  Put32(&file, EntryAt(1), 17);
  Reseal(&file);
  ExpectDamaged(file, "chunk 1 starts at token 17, expected 16");

  // The chunks cover fewer tokens than the header has.
  file = MakeFile();
  Put32(&file, kTokensAt, 41);
  Reseal(&file);
  ExpectDamaged(file, "they cover 40 of the header's 41");

  // ... or more.
  file = MakeFile();
  Put32(&file, kTokensAt, 39);
  Reseal(&file);
  ExpectDamaged(file, "chunk 2 ends at token 40, past the header's 39");

  file = MakeFile();
  Put32(&file, EntryAt(0) + 4, 0);
  Reseal(&file);
  ExpectDamaged(file, "chunk 0 has no tokens");
}

TEST(KvcFileTest, ChunkShapeMustMatchTheHeader) {
  // The header claims a third layer that the streams do not have.
  std::string file = MakeFile();
  Put32(&file, kLayersAt, 3);
  Reseal(&file);
  ExpectDamaged(file,
                "chunk 0's stream holds 2x16x2x8 float16, the file's header "
                "and index say 3x16x2x8 float16");

  // bf16 in the header, fp16 in the streams.
  file = MakeFile();
  file[kDTypeAt] = 1;
  Reseal(&file);
  ExpectDamaged(file, "say 2x16x2x8 bfloat16");

  // The index moves a token from chunk 0 to chunk 1: still a tiling, but
  // not what the streams hold.
  file = MakeFile();
  Put32(&file, EntryAt(0) + 4, 15);
  Put32(&file, EntryAt(1), 15);
  Put32(&file, EntryAt(1) + 4, 17);
  Reseal(&file);
  ExpectDamaged(file,
                "chunk 0's stream holds 2x16x2x8 float16, the file's "
                "header and index say 2x15x2x8 float16");
}

TEST(KvcFileTest, ReadKvcFileNamesThePath) {
  const std::string path = TempPath("short.kvc");
  {
    std::ofstream out(path, std::ios::binary);
    out << MakeFile().substr(0, 100);
  }
  absl::StatusOr<KvcFile> file = ReadKvcFile(path);
  ASSERT_FALSE(file.ok());
  EXPECT_TRUE(absl::IsDataLoss(file.status()));
  EXPECT_TRUE(absl::StartsWith(file.status().message(), path + ": "))
      << file.status();
  EXPECT_TRUE(absl::IsNotFound(ReadKvcFile(TempPath("missing.kvc")).status()));
}

}  // namespace
}  // namespace kvcache::codec
