#include "codec/crc32c.h"

#include <string>

#include "gtest/gtest.h"

namespace kvcache::codec {
namespace {

// Vectors from RFC 3720 (iSCSI), appendix B.4, plus the common check value.
TEST(Crc32cTest, KnownVectors) {
  EXPECT_EQ(Crc32c("123456789"), 0xE3069283u);
  EXPECT_EQ(Crc32c(std::string(32, '\0')), 0x8A9136AAu);
  EXPECT_EQ(Crc32c(std::string(32, '\xFF')), 0x62A8AB43u);
  std::string ascending, descending;
  for (int i = 0; i < 32; ++i) {
    ascending.push_back(static_cast<char>(i));
    descending.push_back(static_cast<char>(31 - i));
  }
  EXPECT_EQ(Crc32c(ascending), 0x46DD794Eu);
  EXPECT_EQ(Crc32c(descending), 0x113FDB5Cu);
  EXPECT_EQ(Crc32c(""), 0u);
}

TEST(Crc32cTest, ExtendMatchesWholeAndPortableMatchesHardware) {
  std::string data;
  for (int i = 0; i < 1000; ++i) data.push_back(static_cast<char>(i * 131 + 7));
  const uint32_t whole = Crc32c(data);
  for (size_t split : {0, 1, 7, 8, 9, 500, 999, 1000}) {
    const uint32_t head = Crc32c(absl::string_view(data).substr(0, split));
    EXPECT_EQ(Crc32cExtend(head, data.data() + split, data.size() - split),
              whole)
        << split;
    EXPECT_EQ(Crc32cExtendPortable(0, data.data(), split),
              Crc32c(absl::string_view(data).substr(0, split)))
        << split;
  }
  data[123] ^= 0x10;
  EXPECT_NE(Crc32c(data), whole);
}

// Long inputs take the hardware path's three-stream loop; unaligned starts
// and odd lengths take its tails.
TEST(Crc32cTest, LongInputsMatchPortable) {
  std::string data(100000, '\0');
  for (size_t i = 0; i < data.size(); ++i) {
    data[i] = static_cast<char>(i * 2654435761u >> 13);
  }
  for (size_t start : {0, 1, 5}) {
    for (size_t length : {12287, 12288, 12289, 24576, 99995}) {
      const absl::string_view piece =
          absl::string_view(data).substr(start, length);
      EXPECT_EQ(Crc32c(piece),
                Crc32cExtendPortable(0, piece.data(), piece.size()))
          << start << " " << length;
    }
  }
}

}  // namespace
}  // namespace kvcache::codec
