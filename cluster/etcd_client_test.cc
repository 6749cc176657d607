// The etcd reply readers on replies no network is needed for; the client
// against a real etcd is tests/integration/etcd_client_test.cc.
#include "cluster/etcd_client.h"

#include <gtest/gtest.h>

namespace kvcache::cluster {
namespace {

TEST(EtcdReplyTest, ErrorReplyCarriesEtcdsCode) {
  const absl::Status s = ParseErrorReply(
      404,
      R"({"error":"lease not found","code":5,"message":"lease not found"})");
  EXPECT_EQ(s.code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(s.message(), "etcd (HTTP 404): lease not found");
}

// Found by fuzzing: an error reply saying code 0 (OK) made an OK status that
// a failed call then returned as its StatusOr, which aborts the process.
TEST(EtcdReplyTest, ErrorReplyIsNeverOk) {
  for (const char* body : {R"({"code":0})", R"({"code":-3})", R"({"code":99})",
                           R"({"code":"0"})", "{}", "not json", ""}) {
    const absl::Status s = ParseErrorReply(500, body);
    EXPECT_EQ(s.code(), absl::StatusCode::kUnknown) << body;
  }
}

TEST(EtcdReplyTest, LeaseGrantNeedsAnId) {
  EXPECT_EQ(*ParseLeaseGrantReply(R"({"ID":"42","TTL":"10"})"), 42);
  EXPECT_FALSE(ParseLeaseGrantReply(R"({"TTL":"10"})").ok());
  EXPECT_FALSE(ParseLeaseGrantReply("[1]").ok());
}

TEST(EtcdReplyTest, KeepAliveWithoutTtlIsAnExpiredLease) {
  EXPECT_TRUE(ParseKeepAliveReply(R"({"result":{"TTL":"9"}})", 1).ok());
  EXPECT_EQ(ParseKeepAliveReply(R"({"result":{}})", 1).code(),
            absl::StatusCode::kNotFound);
  EXPECT_EQ(ParseKeepAliveReply(R"({"result":[]})", 1).code(),
            absl::StatusCode::kNotFound);
}

TEST(EtcdReplyTest, RangeSkipsEntriesThatAreNotKeyValues) {
  int skipped = -1;
  absl::StatusOr<std::vector<KeyValue>> kvs = ParseRangeReply(
      R"({"kvs":[{"key":"YQ==","value":"Yg=="},{"key":1},7,{"key":"YQ=="}]})",
      &skipped);
  ASSERT_TRUE(kvs.ok()) << kvs.status();
  ASSERT_EQ(kvs->size(), 2u);
  EXPECT_EQ((*kvs)[0].key, "a");
  EXPECT_EQ((*kvs)[0].value, "b");
  EXPECT_EQ((*kvs)[1].value, "");
  EXPECT_EQ(skipped, 2);
  EXPECT_FALSE(ParseRangeReply(R"({"kvs":{}})").ok());
  EXPECT_TRUE(ParseRangeReply("{}")->empty());
}

}  // namespace
}  // namespace kvcache::cluster
