// Replays the fuzz corpus (tests/fuzz/corpus/codec) through the decoder so
// every CI run exercises the inputs the fuzzer found interesting. Files
// named valid_* must decode; all others must fail or succeed cleanly.
#include <filesystem>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

#include "codec/codec.h"
#include "codec/crc32c.h"
#include "codec/fuzz_profile.h"
#include "gtest/gtest.h"

namespace kvcache::codec {
namespace {

absl::Status DecodeBounded(absl::string_view stream) {
  absl::StatusOr<ChunkShape> shape = PeekShape(stream);
  if (!shape.ok()) return shape.status();
  if (shape->NumValues() > (size_t{1} << 22)) {
    return absl::ResourceExhaustedError("too large for the replay");
  }
  std::vector<uint16_t> out(shape->NumValues());
  return DecodeChunk(stream, absl::MakeSpan(out), &FuzzProfile());
}

TEST(CorpusTest, ReplaysEveryFile) {
  const std::filesystem::path dir = "tests/fuzz/corpus/codec";
  ASSERT_TRUE(std::filesystem::is_directory(dir))
      << "corpus missing from runfiles: " << dir;
  int files = 0, valid = 0;
  for (const auto& entry : std::filesystem::directory_iterator(dir)) {
    std::ifstream in(entry.path(), std::ios::binary);
    const std::string data((std::istreambuf_iterator<char>(in)),
                           std::istreambuf_iterator<char>());
    const absl::Status st = DecodeBounded(data);
    ++files;
    if (entry.path().filename().string().rfind("valid_", 0) == 0) {
      EXPECT_TRUE(st.ok()) << entry.path() << ": " << st;
      ++valid;
    }
    if (data.size() >= 4) {
      // As the fuzzer does: also get past the checksum.
      std::string fixed = data;
      const uint32_t crc =
          Crc32c(absl::string_view(fixed).substr(0, fixed.size() - 4));
      for (int i = 0; i < 4; ++i) {
        fixed[fixed.size() - 4 + i] = static_cast<char>(crc >> (8 * i));
      }
      (void)DecodeBounded(fixed);
    }
  }
  EXPECT_GT(valid, 0);
  EXPECT_GE(files, valid);
}

}  // namespace
}  // namespace kvcache::codec
