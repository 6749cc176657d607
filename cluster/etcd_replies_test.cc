// The checks of etcd's replies on replies no network is needed for; the
// client against a real etcd is tests/integration/etcd_client_test.cc, and
// against a hostile server tests/integration/broken_etcd_test.cc.
#include "cluster/etcd_replies.h"

#include <gtest/gtest.h>

namespace kvcache::cluster {
namespace {

void AddKv(etcdserverpb::RangeResponse* reply, const std::string& key,
           const std::string& value) {
  mvccpb::KeyValue* kv = reply->add_kvs();
  kv->set_key(key);
  kv->set_value(value);
}

TEST(PrefixEndTest, IsTheNextKeyAfterThePrefix) {
  EXPECT_EQ(PrefixEnd("/a/"), "/a0");
  EXPECT_EQ(PrefixEnd(std::string("a\xff", 2)), "b");
}

TEST(RangeResponseTest, SkipsKeysOutsideThePrefixEmptyKeysAndTwins) {
  etcdserverpb::RangeResponse reply;
  reply.mutable_header()->set_revision(7);
  reply.set_count(1LL << 62);  // a count is not a promise; it is ignored
  AddKv(&reply, "/n/b", "2");
  AddKv(&reply, "/other", "x");
  AddKv(&reply, "", "x");
  AddKv(&reply, "/n/a", "1");
  AddKv(&reply, "/n/b", "again");
  absl::StatusOr<PrefixRange> range = ReadRangeResponse(reply, "/n/");
  ASSERT_TRUE(range.ok()) << range.status();
  EXPECT_EQ(range->revision, 7);
  ASSERT_EQ(range->kvs.size(), 2u);
  EXPECT_EQ(range->kvs[0].key, "/n/a");
  EXPECT_EQ(range->kvs[1].key, "/n/b");
  EXPECT_EQ(range->kvs[1].value, "2");
  EXPECT_EQ(range->skipped.count, 3);
  EXPECT_NE(range->skipped.first_reason.message().find("/other"),
            std::string::npos)
      << range->skipped.first_reason;
}

TEST(RangeResponseTest, PartialOrRevisionlessRangesAreErrors) {
  etcdserverpb::RangeResponse reply;
  EXPECT_EQ(ReadRangeResponse(reply, "/n/").status().code(),
            absl::StatusCode::kInternal);
  reply.mutable_header()->set_revision(3);
  reply.set_more(true);
  EXPECT_EQ(ReadRangeResponse(reply, "/n/").status().code(),
            absl::StatusCode::kInternal);
}

TEST(LeaseResponseTest, GrantNeedsAnIdAndATtl) {
  etcdserverpb::LeaseGrantResponse grant;
  EXPECT_FALSE(ReadLeaseGrantResponse(grant).ok());
  grant.set_id(42);
  grant.set_ttl(10);
  EXPECT_EQ(*ReadLeaseGrantResponse(grant), 42);
  grant.set_error("too many leases");
  EXPECT_FALSE(ReadLeaseGrantResponse(grant).ok());
}

TEST(LeaseResponseTest, KeepAliveWithoutTtlIsAnExpiredLease) {
  etcdserverpb::LeaseKeepAliveResponse reply;
  reply.set_id(5);
  EXPECT_EQ(ReadKeepAliveResponse(reply, 5).code(),
            absl::StatusCode::kNotFound);
  reply.set_ttl(9);
  EXPECT_TRUE(ReadKeepAliveResponse(reply, 5).ok());
  EXPECT_EQ(ReadKeepAliveResponse(reply, 6).code(),
            absl::StatusCode::kInternal);
}

TEST(WatchResponseTest, CreationAndCancellation) {
  etcdserverpb::WatchResponse reply;
  EXPECT_EQ(ReadWatchCreatedResponse(reply).status().code(),
            absl::StatusCode::kInternal);
  reply.set_created(true);
  reply.set_watch_id(3);
  EXPECT_EQ(*ReadWatchCreatedResponse(reply), 3);
  reply.set_canceled(true);
  reply.set_compact_revision(10);
  EXPECT_EQ(ReadWatchCreatedResponse(reply).status().code(),
            absl::StatusCode::kOutOfRange);
  reply.set_compact_revision(0);
  EXPECT_EQ(ReadWatchCreatedResponse(reply).status().code(),
            absl::StatusCode::kAborted);
}

TEST(WatchResponseTest, SkipsEventsThatCannotBeThisWatchs) {
  etcdserverpb::WatchResponse reply;
  reply.set_watch_id(3);
  auto add = [&](int type, const std::string& key, int64_t revision) {
    mvccpb::Event* event = reply.add_events();
    event->set_type(static_cast<mvccpb::Event::EventType>(type));
    event->mutable_kv()->set_key(key);
    event->mutable_kv()->set_value("v");
    event->mutable_kv()->set_mod_revision(revision);
  };
  add(mvccpb::Event::PUT, "/n/a", 10);
  add(mvccpb::Event::PUT, "/elsewhere", 11);
  add(7, "/n/b", 11);                  // no such type
  add(mvccpb::Event::PUT, "/n/c", 4);  // before the watch's start
  add(mvccpb::Event::DELETE, "/n/a", 12);
  int64_t revision = 5;
  std::vector<WatchEvent> events;
  Skipped skipped;
  ASSERT_TRUE(
      ReadWatchResponse(reply, 3, "/n/", &revision, &events, &skipped).ok());
  ASSERT_EQ(events.size(), 2u);
  EXPECT_EQ(events[0].type, WatchEvent::Type::kPut);
  EXPECT_EQ(events[0].kv.value, "v");
  EXPECT_EQ(events[1].type, WatchEvent::Type::kDelete);
  EXPECT_EQ(events[1].kv.value, "");
  EXPECT_EQ(revision, 12);
  EXPECT_EQ(skipped.count, 3);

  EXPECT_EQ(
      ReadWatchResponse(reply, 4, "/n/", &revision, &events, &skipped).code(),
      absl::StatusCode::kInternal);
}

}  // namespace
}  // namespace kvcache::cluster
