#include "kvstore/daemon_config.h"

#include <gtest/gtest.h>

#include <cstdio>
#include <fstream>

#include "absl/strings/match.h"

namespace kvcache::kvstore {
namespace {

std::string WriteTempFile(const std::string& text) {
  const std::string path =
      std::string(getenv("TEST_TMPDIR") ? getenv("TEST_TMPDIR") : "/tmp") +
      "/kvcached_test.textproto";
  std::ofstream(path) << text;
  return path;
}

TEST(DaemonConfigTest, EmptyConfigHasDefaults) {
  auto config = LoadConfig("", {});
  ASSERT_TRUE(config.ok()) << config.status();
  EXPECT_EQ(config->listen_address(), "127.0.0.1:50051");
  EXPECT_EQ(config->cpu_tier().capacity_bytes(), 1ull << 30);
  EXPECT_EQ(config->limits().max_chunk_bytes(), 256ull << 20);
  EXPECT_EQ(config->shutdown_grace_seconds(), 10u);
}

TEST(DaemonConfigTest, FileThenOverrides) {
  const std::string path = WriteTempFile(R"pb(
    listen_address: "127.0.0.1:7000"
    cpu_tier { capacity_bytes: 1000000 }
  )pb");
  auto config = LoadConfig(
      path, {"cpu_tier { capacity_bytes: 2000000 }", "node_id: \"n1\""});
  ASSERT_TRUE(config.ok()) << config.status();
  EXPECT_EQ(config->listen_address(), "127.0.0.1:7000");
  EXPECT_EQ(config->cpu_tier().capacity_bytes(), 2000000u);
  EXPECT_EQ(config->node_id(), "n1");
}

TEST(DaemonConfigTest, UnknownFieldNamesFieldAndLine) {
  const std::string path = WriteTempFile("\ncpu_tier { capacty_bytes: 5 }\n");
  auto config = LoadConfig(path, {});
  ASSERT_FALSE(config.ok());
  EXPECT_EQ(config.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(absl::StrContains(config.status().message(), "capacty_bytes"))
      << config.status();
  EXPECT_TRUE(absl::StrContains(config.status().message(), path + ":2:"))
      << config.status();
}

TEST(DaemonConfigTest, WrongTypeIsRejected) {
  auto config = LoadConfig("", {"cpu_tier { capacity_bytes: \"lots\" }"});
  ASSERT_FALSE(config.ok());
  EXPECT_TRUE(absl::StrContains(config.status().message(), "--set"))
      << config.status();
}

TEST(DaemonConfigTest, ValidationNamesTheField) {
  struct Case {
    std::string text;
    std::string field;
  };
  for (const Case& c : std::vector<Case>{
           {"listen_address: \"nocolon\"", "listen_address"},
           {"listen_address: \"host:99999\"", "listen_address"},
           {"cpu_tier { capacity_bytes: 0 }", "cpu_tier.capacity_bytes"},
           {"limits { max_chunk_bytes: 0 }", "limits.max_chunk_bytes"},
           {"limits { max_keys_per_request: 0 }",
            "limits.max_keys_per_request"},
           {"limits { get_piece_bytes: 100 }", "limits.get_piece_bytes"},
           {"limits { max_put_bytes_in_flight: 1 }",
            "limits.max_put_bytes_in_flight"},
           {"limits { max_concurrent_calls: 2 }",
            "limits.max_concurrent_calls"},
           {"limits { stream_idle_timeout_seconds: 0 }",
            "limits.stream_idle_timeout_seconds"},
           {"access { tenants { name: \"a b\" token_sha256: "
            "\"aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"
            "\" } }",
            "access.tenants[0].name"},
           {"access { tenants { name: \"a\" token_sha256: \"ABC\" } }",
            "access.tenants[0].token_sha256"},
           {"access { tenants { name: \"a\" } }", "access.tenants[0]"},
           {"access { tenants { name: \"a\" token_sha256: "
            "\"aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"
            "\" } "
            "tenants { name: \"b\" certificate_identities: \"b\" } }",
            "shared_memory.enabled"},
           {"access { tenants { name: \"a\" token_sha256: "
            "\"aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"
            "\" } "
            "tenants { name: \"a\" certificate_identities: \"x\" } }",
            "access.tenants[1].name"},
           {"access { tenants { name: \"a\" token_sha256: "
            "\"aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"
            "\" } "
            "admin_token_sha256: "
            "\"aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"
            "\" }",
            "access.admin_token_sha256"},
           {"cluster { etcd_endpoints: \"http://e:2379\" }",
            "cluster.etcd_endpoints"},
           {"cluster { etcd_endpoints: \"e:2379\" cluster_name: \"a/b\" }",
            "cluster.cluster_name"},
           {"cluster { etcd_endpoints: \"e:2379\" lease_ttl_seconds: 1 }",
            "cluster.lease_ttl_seconds"},
           {"cluster { etcd_endpoints: \"e:2379\" replication_factor: 0 }",
            "cluster.replication_factor"},
           {"cluster { etcd_endpoints: \"e:2379\" advertise_address: \"x\" }",
            "cluster.advertise_address"},
           {"cluster { etcd_endpoints: \"e:2379\" etcd_tls { cert_file: "
            "\"c\" } }",
            "cluster.etcd_tls.cert_file"},
           {"cluster { etcd_endpoints: \"e:2379\" etcd_tls { cert_file: "
            "\"c\" key_file: \"k\" } }",
            "cluster.etcd_tls.ca_file"},
           {"tls { cert_file: \"n.crt\" }", "tls.key_file"},
           {"tls { key_file: \"n.key\" }", "tls.cert_file"},
           {"tls { ca_file: \"ca.crt\" }", "tls.ca_file"},
           {"tls { require_client_certificate: true }",
            "tls.require_client_certificate"},
           {"tls { cert_file: \"n.crt\" key_file: \"n.key\" "
            "require_client_certificate: true }",
            "tls.ca_file"},
           {"tls { cert_file: \"n.crt\" key_file: \"n.key\" } "
            "cluster { etcd_endpoints: \"e:2379\" }",
            "tls.ca_file"},
           {"tls { cert_file: \"n.crt\" key_file: \"n.key\" "
            "reload_interval_seconds: 0 }",
            "tls.reload_interval_seconds"},
       }) {
    auto config = LoadConfig("", {c.text});
    ASSERT_FALSE(config.ok()) << c.text;
    EXPECT_TRUE(absl::StrContains(config.status().message(), c.field))
        << config.status();
  }
}

TEST(DaemonConfigTest, MissingFileIsNotFound) {
  EXPECT_EQ(LoadConfig("/nonexistent/kvcached.textproto", {}).status().code(),
            absl::StatusCode::kNotFound);
}

TEST(DaemonConfigTest, PrintedConfigShowsDefaultsAndParsesBack) {
  auto config = LoadConfig("", {"node_id: \"n7\""});
  ASSERT_TRUE(config.ok());
  const std::string text = ConfigToText(*config);
  EXPECT_TRUE(absl::StrContains(text, "max_chunk_bytes: 268435456")) << text;
  auto reparsed = LoadConfig("", {text});
  ASSERT_TRUE(reparsed.ok()) << reparsed.status();
  EXPECT_EQ(reparsed->node_id(), "n7");
}

TEST(DaemonConfigTest, ShippedExampleConfigIsValid) {
  auto config = LoadConfig("deploy/kvcached.textproto", {});
  ASSERT_TRUE(config.ok()) << config.status();
}

TEST(DaemonConfigTest, ClusterExampleLoads) {
  auto config = LoadConfig("deploy/kvcached-cluster.textproto", {});
  ASSERT_TRUE(config.ok()) << config.status();
  EXPECT_EQ(config->cluster().etcd_endpoints_size(), 1);
  EXPECT_EQ(config->cluster().replication_factor(), 2u);
}

}  // namespace
}  // namespace kvcache::kvstore
