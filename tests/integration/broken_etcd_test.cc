// What a broken or hostile etcd can send must not stop a node or a client:
// replies whose fields have the wrong types, lists that are not lists,
// garbage, and node records that are not records. A fake etcd on loopback
// answers with the bad replies (a real one never would); the bad records
// are written into a real etcd.
#include <arpa/inet.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <string>
#include <thread>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "cluster/etcd_client.h"
#include "cluster/membership.h"
#include "tests/testing/etcd_process.h"

namespace kvcache::cluster {
namespace {

// Answers every HTTP request on a loopback port with `body` (status 200),
// one connection at a time, until destroyed.
class FakeEtcd {
 public:
  explicit FakeEtcd(std::string body) : body_(std::move(body)) {
    listener_ = socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t len = sizeof(addr);
    EXPECT_EQ(bind(listener_, reinterpret_cast<sockaddr*>(&addr), len), 0);
    EXPECT_EQ(listen(listener_, 8), 0);
    getsockname(listener_, reinterpret_cast<sockaddr*>(&addr), &len);
    endpoint_ = absl::StrCat("127.0.0.1:", ntohs(addr.sin_port));
    server_ = std::thread([this] { Serve(); });
  }
  ~FakeEtcd() {
    stopping_ = true;
    shutdown(listener_, SHUT_RDWR);
    close(listener_);
    server_.join();
  }
  const std::string& endpoint() const { return endpoint_; }

 private:
  void Serve() {
    while (!stopping_) {
      const int conn = accept(listener_, nullptr, nullptr);
      if (conn < 0) return;
      // The request's headers and JSON body arrive in one small write.
      char buffer[4096];
      if (read(conn, buffer, sizeof(buffer)) > 0) {
        const std::string reply = absl::StrCat(
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
            "Content-Length: ",
            body_.size(), "\r\nConnection: close\r\n\r\n", body_);
        EXPECT_EQ(write(conn, reply.data(), reply.size()),
                  static_cast<ssize_t>(reply.size()));
      }
      close(conn);
    }
  }

  const std::string body_;
  int listener_ = -1;
  std::string endpoint_;
  std::atomic<bool> stopping_{false};
  std::thread server_;
};

// "/n/a" and "x" in base64, as etcd spells keys and values.
constexpr char kGoodEntry[] = R"({"key": "L24vYQ==", "value": "eA=="})";

absl::StatusOr<std::vector<KeyValue>> RangeFrom(const std::string& body,
                                                int* skipped) {
  FakeEtcd etcd(body);
  EtcdClient client(EtcdOptions{{etcd.endpoint()}});
  return client.RangePrefix("/n/", skipped);
}

TEST(BrokenEtcdTest, EntriesOfTheWrongShapeAreSkippedAndCounted) {
  const std::string body = absl::StrCat(
      R"({"kvs": [)", kGoodEntry,
      R"(, {"key": 12, "value": "eA=="}, {"key": "L24vYg==", "value": [1]},
          "a string", 7, null, {"value": "eA=="}, {"key": "not base64!"}, )",
      kGoodEntry, "]}");
  int skipped = -1;
  absl::StatusOr<std::vector<KeyValue>> kvs = RangeFrom(body, &skipped);
  ASSERT_TRUE(kvs.ok()) << kvs.status();
  ASSERT_EQ(kvs->size(), 2u);
  EXPECT_EQ((*kvs)[0].key, "/n/a");
  EXPECT_EQ((*kvs)[0].value, "x");
  EXPECT_EQ(skipped, 7);
}

TEST(BrokenEtcdTest, RepliesThatAreNotRangesAreErrorsNotCrashes) {
  for (const char* body : {R"({"kvs": {"key": "L24vYQ=="}})",
                           R"({"kvs": "L24vYQ=="})", R"({"kvs": 3})", "[1, 2]",
                           "not json at all", "", "{\"kvs\": [", "null"}) {
    int skipped = 0;
    absl::StatusOr<std::vector<KeyValue>> kvs = RangeFrom(body, &skipped);
    EXPECT_EQ(kvs.status().code(), absl::StatusCode::kInternal) << body;
  }
}

TEST(BrokenEtcdTest, MembershipSurvivesAHostileReply) {
  FakeEtcd etcd(R"({"kvs": [{"key": 1, "value": {"node_id": 2}}]})");
  MembershipOptions options;
  options.etcd.endpoints = {etcd.endpoint()};
  options.poll_interval = absl::Milliseconds(50);
  MembershipView view(options);
  EXPECT_TRUE(view.Refresh().ok());
  EXPECT_TRUE(view.Current()->nodes.empty());
  EXPECT_EQ(view.skipped_records().first, 1);
}

// Against a real etcd: a bad record under the nodes prefix hides neither the
// good ones nor later changes.
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
  MembershipView view(options);
  ASSERT_TRUE(view.Refresh().ok());
  ASSERT_EQ(view.Current()->nodes.size(), 1u);
  EXPECT_EQ(view.Current()->nodes[0].node_id, "a");
  const auto [skipped, reason] = view.skipped_records();
  EXPECT_EQ(skipped, 2);
  EXPECT_TRUE(absl::StrContains(reason.message(), prefix + "b")) << reason;

  NodeRecord d{"d", "127.0.0.1:4", false, 4};
  ASSERT_TRUE(client.Put(prefix + "d", d.ToJson()).ok());
  ASSERT_TRUE(view.Refresh().ok());
  EXPECT_EQ(view.Current()->nodes.size(), 2u);
}

}  // namespace
}  // namespace kvcache::cluster
