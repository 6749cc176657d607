#include "transfer/grpc_stream.h"

#include <gtest/gtest.h>

#include <string>
#include <vector>

namespace kvcache::transfer {
namespace {

TEST(GrpcStreamTest, StatusCodesSurviveBothWays) {
  for (absl::StatusCode code :
       {absl::StatusCode::kInvalidArgument, absl::StatusCode::kNotFound,
        absl::StatusCode::kResourceExhausted,
        absl::StatusCode::kFailedPrecondition, absl::StatusCode::kDataLoss}) {
    const absl::Status original(code, "why");
    const grpc::Status wire = ToGrpcStatus(original);
    EXPECT_EQ(static_cast<int>(wire.error_code()), static_cast<int>(code));
    EXPECT_EQ(FromGrpcStatus(wire), original);
  }
  EXPECT_TRUE(ToGrpcStatus(absl::OkStatus()).ok());
  EXPECT_TRUE(FromGrpcStatus(grpc::Status::OK).ok());
}

TEST(GrpcStreamTest, PiecesCoverDataExactly) {
  std::string data(10, 'x');
  for (size_t i = 0; i < data.size(); ++i) data[i] = static_cast<char>(i);
  std::vector<std::string> pieces;
  EXPECT_TRUE(ForEachPiece(data, 4, [&](absl::string_view piece) {
    pieces.emplace_back(piece);
    return true;
  }));
  ASSERT_EQ(pieces.size(), 3u);
  EXPECT_EQ(pieces[0].size(), 4u);
  EXPECT_EQ(pieces[2].size(), 2u);
  EXPECT_EQ(pieces[0] + pieces[1] + pieces[2], data);
}

TEST(GrpcStreamTest, StopsWhenEmitFails) {
  int calls = 0;
  EXPECT_FALSE(ForEachPiece(std::string(10, 'x'), 2,
                            [&](absl::string_view) { return ++calls < 2; }));
  EXPECT_EQ(calls, 2);
  EXPECT_TRUE(ForEachPiece("", 2, [](absl::string_view) { return false; }));
}

}  // namespace
}  // namespace kvcache::transfer
