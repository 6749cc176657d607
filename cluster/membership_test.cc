#include "cluster/membership.h"

#include <gtest/gtest.h>

#include "absl/strings/str_cat.h"

namespace kvcache::cluster {
namespace {

TEST(NodeRecordTest, RoundTripsThroughJson) {
  NodeRecord record{"node-a", "10.1.2.3:50051", true, 1700000000123};
  absl::StatusOr<NodeRecord> back = NodeRecord::FromJson(record.ToJson());
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_EQ(*back, record);
}

// Found by fuzzing: a float start time has no int64 value (converting
// 1e300 was undefined behaviour); it reads as unknown (0).
TEST(NodeRecordTest, NonIntegerStartTimeReadsAsZero) {
  for (const char* started : {"1e300", "-1e300", "1.5", "\"12\""}) {
    absl::StatusOr<NodeRecord> record = NodeRecord::FromJson(absl::StrCat(
        R"({"node_id":"n","address":"h:1","started_unix_ms":)", started, "}"));
    ASSERT_TRUE(record.ok()) << record.status();
    EXPECT_EQ(record->started_unix_ms, 0) << started;
  }
}

TEST(NodeRecordTest, OptionalFieldsDefault) {
  absl::StatusOr<NodeRecord> record =
      NodeRecord::FromJson(R"({"node_id":"n","address":"h:1"})");
  ASSERT_TRUE(record.ok()) << record.status();
  EXPECT_FALSE(record->draining);
  EXPECT_EQ(record->started_unix_ms, 0);
}

TEST(NodeRecordTest, RejectsWhatIsNotARecord) {
  for (const char* bad :
       {"", "null", "[1]", R"({"node_id":"n"})", R"({"address":"h:1"})",
        R"({"node_id":1,"address":"h:1"})", "{not json"}) {
    EXPECT_EQ(NodeRecord::FromJson(bad).status().code(),
              absl::StatusCode::kInvalidArgument)
        << bad;
  }
}

TEST(NodesPrefixTest, NamesTheCluster) {
  EXPECT_EQ(NodesPrefix("prod"), "/kvcache/prod/nodes/");
}

}  // namespace
}  // namespace kvcache::cluster
