// What an NCCL link checks before it touches a GPU; joining and moving
// bytes between two GPUs is tested on a GPU host (tests/gpu_nccl_test).
#include "transfer/nccl_link.h"

#include <gtest/gtest.h>

#include <cstdlib>
#include <string>

namespace kvcache::transfer {
namespace {

TEST(NcclLinkTest, LoadsTheToolkitsNccl) {
  ASSERT_TRUE(NcclLink::Available().ok()) << NcclLink::Available();
  absl::StatusOr<std::string> version = NcclLink::Version();
  ASSERT_TRUE(version.ok()) << version.status();
  EXPECT_EQ(version->substr(0, 2), "2.");
}

TEST(NcclLinkTest, IdsAre128FreshBytes) {
  absl::StatusOr<std::string> a = NcclLink::NewId();
  absl::StatusOr<std::string> b = NcclLink::NewId();
  ASSERT_TRUE(a.ok()) << a.status();
  ASSERT_TRUE(b.ok()) << b.status();
  EXPECT_EQ(a->size(), 128u);
  EXPECT_NE(*a, *b);
}

TEST(NcclLinkTest, MalformedJoinsAreRefusedBeforeAnyWait) {
  absl::StatusOr<std::string> id = NcclLink::NewId();
  ASSERT_TRUE(id.ok()) << id.status();
  absl::StatusOr<std::unique_ptr<NcclLink>> short_id = NcclLink::Join(
      id->substr(0, 100), NcclLink::kNodeRank, 0, absl::Seconds(1));
  EXPECT_EQ(short_id.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(short_id.status().message().find("128 bytes"), std::string::npos)
      << short_id.status();
  absl::StatusOr<std::unique_ptr<NcclLink>> bad_rank =
      NcclLink::Join(*id, 2, 0, absl::Seconds(1));
  EXPECT_EQ(bad_rank.status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(NcclLinkDeathTest, MissingLibraryIsUnavailableAndNamed) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  // A fresh process, so NCCL is not loaded yet.
  EXPECT_EXIT(
      {
        setenv("KVCACHE_NCCL_LIBRARY", "/nonexistent/libnccl.so.2", 1);
        const absl::Status s = NcclLink::Available();
        const bool named =
            s.message().find("KVCACHE_NCCL_LIBRARY") != std::string::npos;
        std::_Exit(absl::IsUnavailable(s) && named &&
                           absl::IsUnavailable(NcclLink::NewId().status())
                       ? 0
                       : 1);
      },
      ::testing::ExitedWithCode(0), "");
}

}  // namespace
}  // namespace kvcache::transfer
