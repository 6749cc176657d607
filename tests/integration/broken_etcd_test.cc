// What a broken or hostile etcd can send must not stop a node or a client.
// Protobuf rules out fields of the wrong type, so a fake etcd (a gRPC server
// on loopback implementing etcd's KV, Watch and Lease services) sends wrong
// contents instead: keys outside the range asked for, records that are not
// node records, huge counts, partial ranges, replies without ids, events of
// no known type, answers for another watch; and it answers errors, hangs,
// and closes streams. Bad records are also written into a real etcd.
#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>

#include <atomic>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "cluster/etcd_client.h"
#include "cluster/membership.h"
#include "etcd/etcdserver/etcdserverpb/rpc.grpc.pb.h"
#include "tests/testing/etcd_process.h"

namespace kvcache::cluster {
namespace {

using etcdserverpb::LeaseGrantRequest;
using etcdserverpb::LeaseGrantResponse;
using etcdserverpb::LeaseKeepAliveRequest;
using etcdserverpb::LeaseKeepAliveResponse;
using etcdserverpb::RangeRequest;
using etcdserverpb::RangeResponse;
using etcdserverpb::WatchRequest;
using etcdserverpb::WatchResponse;
using WatchStream = grpc::ServerReaderWriter<WatchResponse, WatchRequest>;
using KeepAliveStream =
    grpc::ServerReaderWriter<LeaseKeepAliveResponse, LeaseKeepAliveRequest>;

// Holds a call open until the client gives up on it (its deadline, or a
// cancel), as a hung server would.
grpc::Status Hang(grpc::ServerContext* context) {
  const absl::Time limit = absl::Now() + absl::Seconds(30);
  while (!context->IsCancelled() && absl::Now() < limit) {
    absl::SleepFor(absl::Milliseconds(10));
  }
  return grpc::Status::CANCELLED;
}

// An etcd on loopback whose answers are the handlers a test sets before
// Start(); a call without a handler is UNIMPLEMENTED.
class FakeEtcd {
 public:
  std::function<grpc::Status(grpc::ServerContext*, const RangeRequest&,
                             RangeResponse*)>
      range;
  std::function<grpc::Status(grpc::ServerContext*, WatchStream*)> watch;
  std::function<grpc::Status(const LeaseGrantRequest&, LeaseGrantResponse*)>
      grant;
  std::function<grpc::Status(KeepAliveStream*)> keepalive;

  ~FakeEtcd() {
    if (server_) server_->Shutdown(absl::ToChronoTime(absl::Now()));
  }

  // "127.0.0.1:PORT".
  std::string Start() {
    kv_.fake = lease_.fake = watch_.fake = this;
    grpc::ServerBuilder builder;
    int port = 0;
    builder.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(),
                             &port);
    builder.RegisterService(&kv_);
    builder.RegisterService(&lease_);
    builder.RegisterService(&watch_);
    server_ = builder.BuildAndStart();
    EXPECT_NE(port, 0);
    return absl::StrCat("127.0.0.1:", port);
  }

 private:
  static grpc::Status Unimplemented() {
    return grpc::Status(grpc::StatusCode::UNIMPLEMENTED, "not in this fake");
  }
  struct KvService : etcdserverpb::KV::Service {
    FakeEtcd* fake = nullptr;
    grpc::Status Range(grpc::ServerContext* context, const RangeRequest* in,
                       RangeResponse* out) override {
      return fake->range ? fake->range(context, *in, out) : Unimplemented();
    }
  };
  struct LeaseService : etcdserverpb::Lease::Service {
    FakeEtcd* fake = nullptr;
    grpc::Status LeaseGrant(grpc::ServerContext*, const LeaseGrantRequest* in,
                            LeaseGrantResponse* out) override {
      return fake->grant ? fake->grant(*in, out) : Unimplemented();
    }
    grpc::Status LeaseKeepAlive(grpc::ServerContext*,
                                KeepAliveStream* stream) override {
      return fake->keepalive ? fake->keepalive(stream) : Unimplemented();
    }
  };
  struct WatchService : etcdserverpb::Watch::Service {
    FakeEtcd* fake = nullptr;
    grpc::Status Watch(grpc::ServerContext* context,
                       WatchStream* stream) override {
      return fake->watch ? fake->watch(context, stream) : Unimplemented();
    }
  };

  KvService kv_;
  LeaseService lease_;
  WatchService watch_;
  std::unique_ptr<grpc::Server> server_;
};

const std::string kPrefix = NodesPrefix("fake");

void AddKv(RangeResponse* reply, const std::string& key,
           const std::string& value) {
  mvccpb::KeyValue* kv = reply->add_kvs();
  kv->set_key(key);
  kv->set_value(value);
}

std::string Record(const std::string& id) {
  return NodeRecord{id, "127.0.0.1:1", false, 1}.ToJson();
}

// One good node, "a", among entries and records that are not.
grpc::Status HostileRange(grpc::ServerContext*, const RangeRequest&,
                          RangeResponse* out) {
  out->mutable_header()->set_revision(5);
  out->set_count(INT64_MAX);
  AddKv(out, kPrefix + "a", Record("a"));
  AddKv(out, "/elsewhere/z", Record("z"));            // outside the range
  AddKv(out, "", Record("e"));                        // no key
  AddKv(out, kPrefix + "a", Record("a"));             // twice
  AddKv(out, kPrefix + "b", "{not json");             // not a record
  AddKv(out, kPrefix + "c", R"({"node_id": "c"})");   // no address
  AddKv(out, kPrefix + "d", Record("someone-else"));  // not its key's
  AddKv(out, kPrefix + "f", R"({"node_id": "f", "address": ""})");
  return grpc::Status::OK;
}

TEST(BrokenEtcdTest, EntriesOfARangeThatAreWrongAreSkippedAndCounted) {
  FakeEtcd fake;
  fake.range = HostileRange;
  EtcdClient client(EtcdOptions{{fake.Start()}});
  absl::StatusOr<PrefixRange> range = client.RangePrefix(kPrefix);
  ASSERT_TRUE(range.ok()) << range.status();
  EXPECT_EQ(range->kvs.size(), 5u);
  EXPECT_EQ(range->skipped.count, 3);

  MembershipOptions options;
  options.etcd.endpoints = client.options().endpoints;
  options.cluster_name = "fake";
  MembershipView view(options);
  // The fake has no Watch: the view keeps what it read and says why.
  ASSERT_TRUE(view.Refresh().ok());
  ASSERT_EQ(view.Current()->nodes.size(), 1u);
  EXPECT_EQ(view.Current()->nodes[0].node_id, "a");
  EXPECT_EQ(view.skipped_records().first, 3 + 4);
}

TEST(BrokenEtcdTest, RepliesWrongAsAWholeAreErrorsNotCrashes) {
  FakeEtcd fake;
  int variant = 0;
  fake.range = [&](grpc::ServerContext*, const RangeRequest&,
                   RangeResponse* out) {
    if (variant == 1) out->mutable_header()->set_revision(9);
    if (variant == 1) out->set_more(true);  // partial, though no limit asked
    return grpc::Status::OK;  // variant 0: no header, so no revision
  };
  fake.grant = [](const LeaseGrantRequest&, LeaseGrantResponse* out) {
    out->set_ttl(10);  // no id
    return grpc::Status::OK;
  };
  fake.keepalive = [](KeepAliveStream* stream) {
    LeaseKeepAliveRequest request;
    if (stream->Read(&request)) {
      LeaseKeepAliveResponse reply;
      reply.set_id(request.id() + 1);
      reply.set_ttl(10);
      stream->Write(reply);
    }
    return grpc::Status::OK;
  };
  EtcdClient client(EtcdOptions{{fake.Start()}});
  for (variant = 0; variant < 2; ++variant) {
    EXPECT_EQ(client.RangePrefix(kPrefix).status().code(),
              absl::StatusCode::kInternal)
        << variant;
  }
  EXPECT_EQ(client.GrantLease(absl::Seconds(5)).status().code(),
            absl::StatusCode::kInternal);
  EXPECT_EQ(client.KeepAlive(7).code(), absl::StatusCode::kInternal);
}

TEST(BrokenEtcdTest, ErrorsKeepTheirCodeHangsTimeOutClosedStreamsFail) {
  FakeEtcd fake;
  fake.range = [](grpc::ServerContext*, const RangeRequest&, RangeResponse*) {
    return grpc::Status(grpc::StatusCode::RESOURCE_EXHAUSTED,
                        std::string(5000, 'x'));
  };
  fake.grant = [](const LeaseGrantRequest&, LeaseGrantResponse*) {
    return grpc::Status::OK;  // not reached: the range below hangs first
  };
  // A keepalive stream closed without an answer.
  fake.keepalive = [](KeepAliveStream*) { return grpc::Status::OK; };
  EtcdClient client(EtcdOptions{{fake.Start()}, absl::Milliseconds(300)});
  const absl::Status refused = client.RangePrefix(kPrefix).status();
  EXPECT_EQ(refused.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_LT(refused.message().size(), 1000u);  // not the whole 5 kB
  EXPECT_EQ(client.KeepAlive(7).code(), absl::StatusCode::kUnavailable);

  FakeEtcd hung;
  hung.range = [](grpc::ServerContext* context, const RangeRequest&,
                  RangeResponse*) { return Hang(context); };
  EtcdClient waiting(EtcdOptions{{hung.Start()}, absl::Milliseconds(300)});
  const absl::Time start = absl::Now();
  const absl::Status timed_out = waiting.RangePrefix(kPrefix).status();
  EXPECT_EQ(timed_out.code(), absl::StatusCode::kUnavailable) << timed_out;
  EXPECT_LT(absl::Now() - start, absl::Seconds(3));
}

// A watch that sends bad events, then answers for a watch that is not its
// own: the view skips and counts the events, keeps the good records, and
// reads the range again rather than trusting the stream.
TEST(BrokenEtcdTest, MembershipSurvivesAHostileWatch) {
  FakeEtcd fake;
  std::atomic<int> ranges{0};
  fake.range = [&](grpc::ServerContext* context, const RangeRequest& in,
                   RangeResponse* out) {
    ++ranges;
    return HostileRange(context, in, out);
  };
  std::atomic<int64_t> start_revision{0};
  fake.watch = [&](grpc::ServerContext* context, WatchStream* stream) {
    WatchRequest request;
    if (!stream->Read(&request)) return grpc::Status::OK;
    // Only the first watch sends anything; a later one stays quiet.
    if (start_revision.exchange(request.create_request().start_revision()) !=
        0) {
      return Hang(context);
    }
    WatchResponse created;
    created.set_created(true);
    created.set_watch_id(1);
    stream->Write(created);
    WatchResponse events;
    events.set_watch_id(1);
    auto add = [&](int type, const std::string& key, const std::string& value,
                   int64_t revision) {
      mvccpb::Event* event = events.add_events();
      event->set_type(static_cast<mvccpb::Event::EventType>(type));
      event->mutable_kv()->set_key(key);
      event->mutable_kv()->set_value(value);
      event->mutable_kv()->set_mod_revision(revision);
    };
    add(mvccpb::Event::PUT, kPrefix + "g", Record("g"), 6);   // a good join
    add(mvccpb::Event::PUT, kPrefix + "h", "[]", 7);          // not a record
    add(5, kPrefix + "i", Record("i"), 8);                    // no such type
    add(mvccpb::Event::PUT, "/elsewhere/j", Record("j"), 9);  // out of range
    add(mvccpb::Event::PUT, kPrefix + "k", Record("k"), 2);   // from the past
    stream->Write(events);
    absl::SleepFor(absl::Milliseconds(300));
    WatchResponse stray;
    stray.set_watch_id(99);
    stream->Write(stray);
    return Hang(context);
  };
  MembershipOptions options;
  options.etcd.endpoints = {fake.Start()};
  options.cluster_name = "fake";
  options.resync_interval = absl::Seconds(30);
  MembershipView view(options);
  ASSERT_TRUE(view.Refresh().ok());
  auto seen = view.WaitForChange(view.Current()->generation, absl::Seconds(5));
  if (seen->nodes.size() == 1) {  // the first reading, before the watch
    seen = view.WaitForChange(seen->generation, absl::Seconds(5));
  }
  ASSERT_EQ(seen->nodes.size(), 2u);
  EXPECT_EQ(seen->nodes[1].node_id, "g");
  EXPECT_EQ(start_revision.load(), 6);  // the range's revision + 1
  // 3 entries and 4 records of the range, then "h" and 3 bad events.
  EXPECT_EQ(view.skipped_records().first, 3 + 4 + 1 + 3);

  // The stray answer ends the watch; the view reads the range again (which
  // no longer has "g") and keeps serving.
  const absl::Time deadline = absl::Now() + absl::Seconds(5);
  while (ranges.load() < 2 && absl::Now() < deadline) {
    absl::SleepFor(absl::Milliseconds(20));
  }
  EXPECT_GE(ranges.load(), 2);
  seen = view.WaitForChange(seen->generation, absl::Seconds(5));
  ASSERT_EQ(seen->nodes.size(), 1u);
  EXPECT_EQ(seen->nodes[0].node_id, "a");
}

// Against a real etcd: a bad record under the nodes prefix hides neither the
// good ones nor later changes, whether read in a range or from the watch.
TEST(BrokenEtcdTest, BadNodeRecordsAreSkippedNotFatal) {
  auto real = testing::EtcdProcess::Start();
  ASSERT_TRUE(real.ok()) << real.status();
  EtcdClient client(EtcdOptions{{(*real)->endpoint()}});
  const std::string prefix = NodesPrefix("broken");
  NodeRecord a{"a", "127.0.0.1:1", false, 1};
  ASSERT_TRUE(client.Put(prefix + "a", a.ToJson()).ok());
  ASSERT_TRUE(client.Put(prefix + "b", "{not a record").ok());
  ASSERT_TRUE(client.Put(prefix + "c", R"({"node_id": 5})").ok());

  MembershipOptions options;
  options.etcd.endpoints = {(*real)->endpoint()};
  options.cluster_name = "broken";
  options.resync_interval = absl::Seconds(30);
  MembershipView view(options);
  ASSERT_TRUE(view.Refresh().ok());
  ASSERT_EQ(view.Current()->nodes.size(), 1u);
  EXPECT_EQ(view.Current()->nodes[0].node_id, "a");
  const auto [skipped, reason] = view.skipped_records();
  EXPECT_EQ(skipped, 2);
  EXPECT_TRUE(absl::StrContains(reason.message(), prefix + "b")) << reason;

  // Through the watch, without a Refresh.
  const uint64_t generation = view.Current()->generation;
  ASSERT_TRUE(client.Put(prefix + "e", "also not a record").ok());
  NodeRecord d{"d", "127.0.0.1:4", false, 4};
  ASSERT_TRUE(client.Put(prefix + "d", d.ToJson()).ok());
  auto seen = view.WaitForChange(generation, absl::Seconds(5));
  EXPECT_EQ(seen->nodes.size(), 2u);
  EXPECT_EQ(view.skipped_records().first, 3);
}

}  // namespace
}  // namespace kvcache::cluster
