// TLS and mutual TLS against real kvcached processes on loopback, with
// certificates made by deploy/make_certs.sh in TEST_TMPDIR: real handshakes
// that succeed, fail for the reasons an operator meets (wrong CA, expired
// certificate, no client certificate, a client certificate from another
// CA, a wrong or missing token), certificates renewed on disk while a
// stream is in flight, and a three-node cluster whose peer copies, drain
// handoff and repair all go over mutual TLS, around an etcd reached over
// TLS with etcd's own client certificates.
#include <gtest/gtest.h>
#include <signal.h>

#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <map>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/algorithm/container.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/notification.h"
#include "absl/time/clock.h"
#include "client/chunk_key.h"
#include "client/cluster_client.h"
#include "client/kvcache_client.h"
#include "kvstore/access_control.h"
#include "tests/testing/daemon_process.h"
#include "tests/testing/etcd_process.h"

namespace kvcache {
namespace {

using ::kvcache::testing::DaemonProcess;
using ::kvcache::testing::EtcdProcess;

constexpr char kDaemon[] = "kvstore/kvcached";
constexpr char kMakeCerts[] = "deploy/make_certs.sh";

std::string TempDir() {
  const char* dir = std::getenv("TEST_TMPDIR");
  return dir ? dir : "/tmp";
}

// Runs deploy/make_certs.sh DIR ARGS (a node "node", a client "worker" and
// an expired node certificate "expired" unless told otherwise).
std::string MakeCerts(const std::string& name,
                      const std::string& args =
                          "--node node --client worker "
                          "--expired expired") {
  const std::string dir = absl::StrCat(TempDir(), "/", name);
  const std::string command =
      absl::StrCat(kMakeCerts, " ", dir, " ", args, " >/dev/null");
  EXPECT_EQ(std::system(command.c_str()), 0) << command;
  return dir;
}

std::string ReadFile(const std::string& path) {
  std::ifstream in(path);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

// Replaces `path` in one step, so a reader never sees half a file.
void ReplaceFile(const std::string& path, const std::string& contents) {
  const std::string tmp = path + ".new";
  std::ofstream(tmp) << contents;
  ASSERT_EQ(std::rename(tmp.c_str(), path.c_str()), 0) << path;
}

// --set for the node's tls section.
std::string TlsSection(const std::string& cert, const std::string& key,
                       const std::string& ca, bool require_client_certificate,
                       int reload_interval_seconds = 300) {
  return absl::StrCat("--set=tls { cert_file: \"", cert, "\" key_file: \"", key,
                      "\" ca_file: \"", ca, "\" require_client_certificate: ",
                      require_client_certificate ? "true" : "false",
                      " reload_interval_seconds: ", reload_interval_seconds,
                      " }");
}

std::vector<ChunkKey> Keys(const std::string& model, int count) {
  KeySpace space;
  space.model_id = model;
  space.chunk_tokens = 1;
  std::vector<int32_t> tokens(count);
  for (int i = 0; i < count; ++i) tokens[i] = i;
  return *ChunkKeysForTokens(space, tokens);
}

std::string Chunk(int i, size_t bytes) {
  std::string chunk(bytes, '\0');
  for (size_t b = 0; b < bytes; ++b) chunk[b] = static_cast<char>(i * 31 + b);
  return chunk;
}

template <typename Predicate>
bool WaitFor(Predicate done, absl::Duration timeout) {
  const absl::Time deadline = absl::Now() + timeout;
  while (absl::Now() < deadline) {
    if (done()) return true;
    absl::SleepFor(absl::Milliseconds(100));
  }
  return done();
}

class TlsTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    ca_ = new std::string(MakeCerts("ca-a"));
    other_ca_ = new std::string(MakeCerts("ca-b"));
  }
  static void TearDownTestSuite() {
    delete ca_;
    delete other_ca_;
  }

  // Starts a node with CA A's node certificate (or `cert_name`'s).
  std::unique_ptr<DaemonProcess> StartNode(
      bool mutual, const std::string& cert_name = "node",
      const std::vector<std::string>& extra = {}) {
    std::vector<std::string> args = {
        TlsSection(Path(cert_name + ".crt"), Path(cert_name + ".key"),
                   Path("ca.crt"), mutual),
        "--set=shared_memory { enabled: false }"};
    args.insert(args.end(), extra.begin(), extra.end());
    absl::StatusOr<DaemonProcess> daemon = DaemonProcess::Start(kDaemon, args);
    EXPECT_TRUE(daemon.ok()) << daemon.status();
    if (!daemon.ok()) return nullptr;
    return std::make_unique<DaemonProcess>(*std::move(daemon));
  }

  static std::string Path(const std::string& name) {
    return absl::StrCat(*ca_, "/", name);
  }
  static std::string OtherPath(const std::string& name) {
    return absl::StrCat(*other_ca_, "/", name);
  }

  // A client trusting CA A, with its worker certificate if `with_cert`.
  static ClientOptions Options(const DaemonProcess& node, bool with_cert) {
    ClientOptions options;
    options.address = node.address();
    options.connect_timeout = absl::Seconds(3);
    options.fail_fast = true;
    options.ca_file = Path("ca.crt");
    if (with_cert) {
      options.cert_file = Path("worker.crt");
      options.key_file = Path("worker.key");
    }
    return options;
  }

  static std::string* ca_;
  static std::string* other_ca_;
};

std::string* TlsTest::ca_ = nullptr;
std::string* TlsTest::other_ca_ = nullptr;

TEST_F(TlsTest, PutAndGetOverMutualTls) {
  std::unique_ptr<DaemonProcess> node = StartNode(/*mutual=*/true);
  ASSERT_NE(node, nullptr);
  absl::StatusOr<std::unique_ptr<KvCacheClient>> client =
      KvCacheClient::Connect(Options(*node, /*with_cert=*/true));
  ASSERT_TRUE(client.ok()) << client.status();
  const std::vector<ChunkKey> keys = Keys("mtls", 3);
  std::vector<std::string> bytes;
  std::vector<ChunkToPut> chunks;
  for (int i = 0; i < 3; ++i) bytes.push_back(Chunk(i, (1 << 20) + i));
  for (int i = 0; i < 3; ++i) chunks.push_back({keys[i], bytes[i]});
  ASSERT_TRUE((*client)->Put(chunks).ok());
  absl::StatusOr<std::vector<FetchedChunk>> got = (*client)->Get(keys);
  ASSERT_TRUE(got.ok()) << got.status();
  ASSERT_EQ(got->size(), 3u);
  for (int i = 0; i < 3; ++i) EXPECT_EQ((*got)[i].bytes, bytes[i]);
}

TEST_F(TlsTest, WrongCaFailsNamingTheCa) {
  std::unique_ptr<DaemonProcess> node = StartNode(/*mutual=*/false);
  ASSERT_NE(node, nullptr);
  ClientOptions options = Options(*node, /*with_cert=*/false);
  options.ca_file = OtherPath("ca.crt");
  absl::StatusOr<std::unique_ptr<KvCacheClient>> client =
      KvCacheClient::Connect(options);
  ASSERT_FALSE(client.ok());
  EXPECT_EQ(client.status().code(), absl::StatusCode::kUnavailable);
  EXPECT_TRUE(absl::StrContains(
      client.status().message(),
      absl::StrCat("TLS handshake with ", node->address(), " failed")))
      << client.status();
  EXPECT_TRUE(absl::StrContains(client.status().message(), options.ca_file))
      << client.status();
  // One-way TLS with the right CA works without a client certificate.
  options.ca_file = Path("ca.crt");
  EXPECT_TRUE(KvCacheClient::Connect(options).ok());
}

TEST_F(TlsTest, ExpiredServerCertificateFails) {
  std::unique_ptr<DaemonProcess> node = StartNode(/*mutual=*/false, "expired");
  ASSERT_NE(node, nullptr);
  absl::StatusOr<std::unique_ptr<KvCacheClient>> client =
      KvCacheClient::Connect(Options(*node, /*with_cert=*/false));
  ASSERT_FALSE(client.ok());
  EXPECT_TRUE(absl::StrContains(client.status().message(), "TLS handshake"))
      << client.status();
  EXPECT_TRUE(absl::StrContains(client.status().message(), "expired"))
      << client.status();
}

TEST_F(TlsTest, MutualTlsRefusesClientsWithoutAcceptedCertificate) {
  std::unique_ptr<DaemonProcess> node = StartNode(/*mutual=*/true);
  ASSERT_NE(node, nullptr);
  absl::StatusOr<std::unique_ptr<KvCacheClient>> without =
      KvCacheClient::Connect(Options(*node, /*with_cert=*/false));
  ASSERT_FALSE(without.ok());
  EXPECT_TRUE(absl::StrContains(without.status().message(), "TLS handshake"))
      << without.status();
  EXPECT_TRUE(absl::StrContains(without.status().message(), "cert_file"))
      << without.status();

  ClientOptions other = Options(*node, /*with_cert=*/true);
  other.cert_file = OtherPath("worker.crt");
  other.key_file = OtherPath("worker.key");
  absl::StatusOr<std::unique_ptr<KvCacheClient>> foreign =
      KvCacheClient::Connect(other);
  ASSERT_FALSE(foreign.ok());
  EXPECT_TRUE(absl::StrContains(foreign.status().message(), other.cert_file))
      << foreign.status();

  // A plaintext client is told the node may be serving TLS.
  ClientOptions plaintext;
  plaintext.address = node->address();
  plaintext.fail_fast = true;
  absl::StatusOr<std::unique_ptr<KvCacheClient>> clear =
      KvCacheClient::Connect(plaintext);
  ASSERT_FALSE(clear.ok());
  EXPECT_TRUE(absl::StrContains(clear.status().message(), "ca_file"))
      << clear.status();
}

TEST_F(TlsTest, UnusableCredentialFilesAreNamed) {
  ClientOptions options;
  options.ca_file = Path("missing.crt");
  EXPECT_EQ(KvCacheClient::Connect(options).status().code(),
            absl::StatusCode::kNotFound);
  EXPECT_TRUE(
      absl::StrContains(KvCacheClient::Connect(options).status().message(),
                        "ca_file '" + options.ca_file + "'"));
  options.ca_file = Path("ca.crt");
  options.cert_file = Path("worker.crt");
  options.key_file = OtherPath("worker.key");
  const absl::Status mismatch = KvCacheClient::Connect(options).status();
  EXPECT_TRUE(absl::StrContains(mismatch.message(), "is not the private key"))
      << mismatch;
  options.key_file = Path("worker.key");
  options.token_file = Path("no-token");
  const absl::Status token = KvCacheClient::Connect(options).status();
  EXPECT_TRUE(absl::StrContains(token.message(), "token_file")) << token;
}

// The node authenticates callers (kvstore/access_control.h); over TLS the
// client sends its token, and the certificate's identity reaches the node.
TEST_F(TlsTest, TokenAndCertificateIdentityReachTheNode) {
  const std::string access = absl::StrCat(
      "--set=access { tenants { name: \"t\" token_sha256: \"",
      kvstore::Sha256Hex("secret-token"),
      "\" } tenants { name: \"w\" certificate_identities: \"worker\" } }");
  std::unique_ptr<DaemonProcess> node =
      StartNode(/*mutual=*/false, "node", {access});
  ASSERT_NE(node, nullptr);
  const std::vector<ChunkKey> keys = Keys("token", 1);
  const std::string bytes = Chunk(1, 4096);

  ClientOptions options = Options(*node, /*with_cert=*/false);
  options.token = "secret-token";
  absl::StatusOr<std::unique_ptr<KvCacheClient>> good =
      KvCacheClient::Connect(options);
  ASSERT_TRUE(good.ok()) << good.status();
  EXPECT_TRUE((*good)->Put({{keys[0], bytes}}).ok());

  for (const std::string& token : {std::string("wrong-token"), std::string()}) {
    options.token = token;
    absl::StatusOr<std::unique_ptr<KvCacheClient>> bad =
        KvCacheClient::Connect(options);
    ASSERT_TRUE(bad.ok()) << bad.status();
    EXPECT_EQ((*bad)->Put({{keys[0], bytes}}).code(),
              absl::StatusCode::kUnauthenticated)
        << "token '" << token << "'";
  }

  // The worker certificate acts for tenant "w" with no token.
  absl::StatusOr<std::unique_ptr<KvCacheClient>> by_certificate =
      KvCacheClient::Connect(Options(*node, /*with_cert=*/true));
  ASSERT_TRUE(by_certificate.ok()) << by_certificate.status();
  EXPECT_TRUE((*by_certificate)->Put({{keys[0], bytes}}).ok());
}

// Renewed certificate files are picked up without a restart: new
// connections get the new certificate after the reload interval, while a
// stream opened before goes on to its end.
TEST_F(TlsTest, CertificatesReloadWithoutDroppingStreams) {
  const std::string dir = MakeCerts("reload", "--node node --client worker");
  const std::string renewed = MakeCerts("reload-next", "--node node");
  const std::string bundle = dir + "/both-cas.crt";
  std::ofstream(bundle) << ReadFile(dir + "/ca.crt")
                        << ReadFile(renewed + "/ca.crt");
  absl::StatusOr<DaemonProcess> node = DaemonProcess::Start(
      kDaemon, {TlsSection(dir + "/node.crt", dir + "/node.key",
                           dir + "/ca.crt", /*mutual=*/true,
                           /*reload_interval_seconds=*/1),
                "--set=shared_memory { enabled: false }"});
  ASSERT_TRUE(node.ok()) << node.status();

  ClientOptions options;
  options.address = node->address();
  options.ca_file = bundle;
  options.cert_file = dir + "/worker.crt";
  options.key_file = dir + "/worker.key";
  options.fail_fast = true;
  absl::StatusOr<std::unique_ptr<KvCacheClient>> client =
      KvCacheClient::Connect(options);
  ASSERT_TRUE(client.ok()) << client.status();
  constexpr int kChunks = 16;
  const std::vector<ChunkKey> keys = Keys("reload", kChunks);
  std::vector<std::string> bytes;
  for (int i = 0; i < kChunks; ++i) bytes.push_back(Chunk(i, 1 << 20));
  for (int i = 0; i < kChunks; ++i) {
    ASSERT_TRUE((*client)->Put({{keys[i], bytes[i]}}).ok());
  }
  ClientOptions new_ca_only = options;
  new_ca_only.ca_file = renewed + "/ca.crt";
  EXPECT_FALSE(KvCacheClient::Connect(new_ca_only).ok());

  // A Get stream that stops after its first chunk until the renewal has
  // been seen by new connections.
  absl::Notification renewed_seen;
  std::atomic<int> received{0};
  absl::Status stream_status;
  std::thread reader([&] {
    stream_status = (*client)->GetStream(keys, [&](size_t i, FetchedChunk c) {
      if (c.bytes != bytes[i]) return absl::DataLossError("wrong bytes");
      if (received++ == 0) {
        renewed_seen.WaitForNotificationWithTimeout(absl::Seconds(30));
      }
      return absl::OkStatus();
    });
  });
  WaitFor([&] { return received.load() > 0; }, absl::Seconds(10));
  ASSERT_EQ(received.load(), 1);

  ReplaceFile(dir + "/node.key", ReadFile(renewed + "/node.key"));
  ReplaceFile(dir + "/node.crt", ReadFile(renewed + "/node.crt"));
  const bool reloaded =
      WaitFor([&] { return KvCacheClient::Connect(new_ca_only).ok(); },
              absl::Seconds(15));
  renewed_seen.Notify();
  reader.join();
  EXPECT_TRUE(reloaded) << "new connections never saw the renewed certificate";
  EXPECT_TRUE(stream_status.ok()) << stream_status;
  EXPECT_EQ(received.load(), kChunks);
}

// Three nodes over mutual TLS (client certificates required), registered
// in an etcd that requires client certificates of its own CA: a node
// joining gets its chunks from its peers, a draining node hands its chunks
// over, and a node killed is repaired from the survivors. Every one of
// those copies is a peer call over mTLS.
class TlsClusterTest : public TlsTest {
 protected:
  void SetUp() override {
    etcd_certs_ =
        MakeCerts("etcd-ca", "--node etcd-server --client kvcache-etcd");
    testing::EtcdTls tls;
    tls.ca_file = etcd_certs_ + "/ca.crt";
    tls.cert_file = etcd_certs_ + "/etcd-server.crt";
    tls.key_file = etcd_certs_ + "/etcd-server.key";
    tls.client_cert_file = etcd_certs_ + "/kvcache-etcd.crt";
    tls.client_key_file = etcd_certs_ + "/kvcache-etcd.key";
    absl::StatusOr<std::unique_ptr<EtcdProcess>> etcd =
        EtcdProcess::Start("127.0.0.1", tls);
    ASSERT_TRUE(etcd.ok()) << etcd.status();
    etcd_ = *std::move(etcd);
  }

  std::string EtcdTlsSection() const {
    return absl::StrCat("etcd_tls { ca_file: \"", etcd_certs_,
                        "/ca.crt\" cert_file: \"", etcd_certs_,
                        "/kvcache-etcd.crt\" key_file: \"", etcd_certs_,
                        "/kvcache-etcd.key\" }");
  }

  void StartMember(const std::string& id) {
    std::unique_ptr<DaemonProcess> node = StartNode(
        /*mutual=*/true, "node",
        {absl::StrCat("--set=node_id: \"", id, "\""),
         absl::StrCat("--set=cluster { etcd_endpoints: \"", etcd_->endpoint(),
                      "\" cluster_name: \"tls\" lease_ttl_seconds: 2 "
                      "replication_factor: 2 membership_poll_ms: 100 "
                      "repair_interval_seconds: 2 ",
                      EtcdTlsSection(), " }")});
    ASSERT_NE(node, nullptr);
    nodes_[id] = std::move(node);
  }

  // Which of the nodes named hold `key`, by asking each over mTLS.
  std::vector<std::string> Holders(const ChunkKey& key,
                                   const std::vector<std::string>& ids) {
    std::vector<std::string> holders;
    for (const std::string& id : ids) {
      absl::StatusOr<std::unique_ptr<KvCacheClient>> client =
          KvCacheClient::Connect(Options(*nodes_[id], /*with_cert=*/true));
      if (!client.ok()) continue;
      absl::StatusOr<std::vector<v1::ChunkInfo>> info =
          (*client)->LookupEach({key});
      if (info.ok() && (*info)[0].tier() != v1::TIER_UNSPECIFIED) {
        holders.push_back(id);
      }
    }
    return holders;
  }

  // True once every key is held by every node in `ids` (with two nodes and
  // two replicas, both hold everything).
  bool AllHeldBy(const std::vector<ChunkKey>& keys,
                 const std::vector<std::string>& ids) {
    for (const ChunkKey& key : keys) {
      if (Holders(key, ids).size() != ids.size()) return false;
    }
    return true;
  }

  std::string etcd_certs_;
  std::unique_ptr<EtcdProcess> etcd_;
  std::map<std::string, std::unique_ptr<DaemonProcess>> nodes_;
};

TEST_F(TlsClusterTest, JoinDrainAndRepairOverMutualTls) {
  StartMember("n1");
  StartMember("n2");
  ClusterClientOptions options;
  options.etcd_endpoints = {etcd_->endpoint()};
  options.cluster_name = "tls";
  options.membership_poll = absl::Milliseconds(100);
  options.node = Options(*nodes_["n1"], /*with_cert=*/true);
  // Without etcd's client certificate the cluster cannot be read.
  options.etcd_ca_file = etcd_certs_ + "/ca.crt";
  EXPECT_FALSE(ClusterClient::Connect(options).ok());
  options.etcd_cert_file = etcd_certs_ + "/kvcache-etcd.crt";
  options.etcd_key_file = etcd_certs_ + "/kvcache-etcd.key";
  absl::StatusOr<std::unique_ptr<ClusterClient>> cluster;
  ASSERT_TRUE(WaitFor(
      [&] {
        cluster = ClusterClient::Connect(options);
        return cluster.ok() && (*cluster)->Membership()->nodes.size() == 2;
      },
      absl::Seconds(10)))
      << cluster.status();
  constexpr int kChunks = 24;
  const std::vector<ChunkKey> keys = Keys("tls-cluster", kChunks);
  std::vector<std::string> bytes;
  std::vector<ChunkToPut> chunks;
  for (int i = 0; i < kChunks; ++i) bytes.push_back(Chunk(i, 64 << 10));
  for (int i = 0; i < kChunks; ++i) chunks.push_back({keys[i], bytes[i]});
  ASSERT_TRUE((*cluster)->Put(chunks).ok());
  EXPECT_TRUE(AllHeldBy(keys, {"n1", "n2"}));

  // Join: n3 becomes a replica of some chunks and gets them from a peer.
  StartMember("n3");
  EXPECT_TRUE(WaitFor(
      [&] {
        int on_n3 = 0;
        for (const ChunkKey& key : keys) {
          const std::vector<std::string> holders =
              Holders(key, {"n1", "n2", "n3"});
          if (holders.size() < 2) return false;
          on_n3 += absl::c_linear_search(holders, "n3");
        }
        return on_n3 > 0;
      },
      absl::Seconds(30)))
      << "n3 got no chunks from its peers";

  // Drain: n1 hands its chunks over, then stops; n2 and n3 hold them all.
  absl::StatusOr<std::unique_ptr<KvCacheClient>> n1 =
      KvCacheClient::Connect(Options(*nodes_["n1"], /*with_cert=*/true));
  ASSERT_TRUE(n1.ok()) << n1.status();
  ASSERT_TRUE((*n1)->Drain().ok());
  EXPECT_TRUE(WaitFor(
      [&] {
        absl::StatusOr<v1::NodeInfoResponse> info = (*n1)->NodeInfo();
        return info.ok() && info->drained();
      },
      absl::Seconds(30)))
      << "n1 never drained";
  nodes_["n1"]->Signal(SIGTERM);
  ASSERT_TRUE(nodes_["n1"]->WaitForExit(absl::Seconds(20)).ok());
  EXPECT_TRUE(WaitFor(
      [&] {
        return AllHeldBy(keys, {"n2", "n3"});
      },
      absl::Seconds(30)))
      << "the drained chunks did not reach n2 and n3";

  // Repair: n2 is killed; n4 joins and is repaired from n3.
  nodes_["n2"].reset();
  StartMember("n4");
  EXPECT_TRUE(WaitFor(
      [&] {
        return AllHeldBy(keys, {"n3", "n4"});
      },
      absl::Seconds(40)))
      << "n4 was not repaired from n3";
  absl::StatusOr<std::vector<FetchedChunk>> got = (*cluster)->Get(keys);
  ASSERT_TRUE(got.ok()) << got.status();
  for (int i = 0; i < kChunks; ++i) EXPECT_EQ((*got)[i].bytes, bytes[i]);
}

}  // namespace
}  // namespace kvcache
