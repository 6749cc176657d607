// The etcd client against a real etcd: keys, prefix ranges, leases that
// expire or are revoked, and a clear error when etcd is down.
#include "cluster/etcd_client.h"

#include <gtest/gtest.h>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "tests/testing/daemon_process.h"
#include "tests/testing/etcd_process.h"

namespace kvcache::cluster {
namespace {

using ::kvcache::testing::EtcdProcess;

class EtcdClientTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto etcd = EtcdProcess::Start();
    ASSERT_TRUE(etcd.ok()) << etcd.status();
    etcd_ = std::move(*etcd);
    client_ = std::make_unique<EtcdClient>(EtcdOptions{{etcd_->endpoint()}});
  }

  std::unique_ptr<EtcdProcess> etcd_;
  std::unique_ptr<EtcdClient> client_;
};

TEST_F(EtcdClientTest, PutAndRangeByPrefix) {
  ASSERT_TRUE(client_->Put("/a/1", "one").ok());
  ASSERT_TRUE(client_->Put("/a/2", std::string("t\0o", 3)).ok());
  ASSERT_TRUE(client_->Put("/b/1", "other").ok());
  auto kvs = client_->RangePrefix("/a/");
  ASSERT_TRUE(kvs.ok()) << kvs.status();
  ASSERT_EQ(kvs->size(), 2u);
  EXPECT_EQ((*kvs)[0].key, "/a/1");
  EXPECT_EQ((*kvs)[0].value, "one");
  EXPECT_EQ((*kvs)[1].value, std::string("t\0o", 3));
  EXPECT_TRUE(client_->RangePrefix("/none/")->empty());
}

TEST_F(EtcdClientTest, KeysVanishWithTheirLease) {
  auto lease = client_->GrantLease(absl::Seconds(2));
  ASSERT_TRUE(lease.ok()) << lease.status();
  ASSERT_TRUE(client_->Put("/l/kept", "x", *lease).ok());
  EXPECT_TRUE(client_->KeepAlive(*lease).ok());
  ASSERT_TRUE(client_->RevokeLease(*lease).ok());
  EXPECT_TRUE(client_->RangePrefix("/l/")->empty());
  EXPECT_EQ(client_->KeepAlive(*lease).code(), absl::StatusCode::kNotFound);

  auto short_lease = client_->GrantLease(absl::Seconds(2));
  ASSERT_TRUE(short_lease.ok());
  ASSERT_TRUE(client_->Put("/l/expires", "x", *short_lease).ok());
  absl::SleepFor(absl::Seconds(3));
  EXPECT_TRUE(client_->RangePrefix("/l/")->empty());
  EXPECT_EQ(client_->Put("/l/late", "x", *short_lease).code(),
            absl::StatusCode::kNotFound);
}

TEST_F(EtcdClientTest, FallsOverToALiveEndpointAndNamesDeadOnes) {
  const std::string dead =
      absl::StrCat("127.0.0.1:", testing::FreeLoopbackPort());
  EtcdClient both({{dead, etcd_->endpoint()}});
  EXPECT_TRUE(both.Put("/f/1", "x").ok());
  etcd_->Kill();
  const absl::Status down = both.Put("/f/2", "x");
  EXPECT_EQ(down.code(), absl::StatusCode::kUnavailable);
  EXPECT_TRUE(absl::StrContains(down.message(), dead)) << down;
  EXPECT_TRUE(absl::StrContains(down.message(), etcd_->endpoint())) << down;
}

}  // namespace
}  // namespace kvcache::cluster
