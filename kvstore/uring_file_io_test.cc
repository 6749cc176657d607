#include "kvstore/uring_file_io.h"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <cstdlib>
#include <random>
#include <string>
#include <vector>

#include "kvstore/aligned_buffer.h"

namespace kvcache::kvstore {
namespace {

class UringFileIoTest : public ::testing::Test {
 protected:
  void SetUp() override {
    const char* tmp = std::getenv("TEST_TMPDIR");
    const std::string path =
        std::string(tmp ? tmp : "/tmp") + "/uring-" +
        ::testing::UnitTest::GetInstance()->current_test_info()->name();
    fd_ = open(path.c_str(), O_RDWR | O_CREAT | O_TRUNC | O_DIRECT, 0600);
    ASSERT_GE(fd_, 0) << path;
  }
  void TearDown() override { close(fd_); }

  int fd_ = -1;
};

TEST_F(UringFileIoTest, ReadHandsOverEveryPieceInOrder) {
  // More operations than the queue holds, so the window slides mid-read.
  UringOptions options;
  options.rings = 1;
  options.queue_depth = 3;
  options.op_bytes = 2 * kBlockBytes;
  auto io = UringFileIo::Create(options);
  ASSERT_TRUE(io.ok()) << io.status();

  const uint64_t length = 11 * kBlockBytes;  // the last operation is short
  AlignedBuffer written(length);
  std::mt19937 rng(7);
  for (uint64_t i = 0; i < length; ++i) written.data()[i] = rng();
  ASSERT_TRUE((*io)->Write(fd_, kBlockBytes, written.data(), length).ok());

  AlignedBuffer read(length);
  std::string seen;
  std::vector<const char*> starts;
  ASSERT_TRUE((*io)
                  ->Read(fd_, kBlockBytes, read.data(), length,
                         [&](absl::string_view piece) {
                           starts.push_back(piece.data());
                           seen.append(piece.data(), piece.size());
                         })
                  .ok());
  EXPECT_EQ(seen, std::string(written.data(), length));
  ASSERT_EQ(starts.size(), 6u);
  for (size_t i = 0; i < starts.size(); ++i) {
    EXPECT_EQ(starts[i], read.data() + i * options.op_bytes);
  }
}

TEST_F(UringFileIoTest, ReadPastTheEndIsDataLoss) {
  auto io = UringFileIo::Create(UringOptions());
  ASSERT_TRUE(io.ok()) << io.status();
  AlignedBuffer block(kBlockBytes);
  ASSERT_TRUE((*io)->Write(fd_, 0, block.data(), kBlockBytes).ok());

  AlignedBuffer read(4 * kBlockBytes);
  int pieces = 0;
  const absl::Status status = (*io)->Read(fd_, 0, read.data(), 4 * kBlockBytes,
                                          [&](absl::string_view) { ++pieces; });
  EXPECT_EQ(status.code(), absl::StatusCode::kDataLoss) << status;
  EXPECT_EQ(pieces, 0);  // the one operation came back short, then empty
}

}  // namespace
}  // namespace kvcache::kvstore
