// The credential files' checks, and real handshakes on loopback between an
// in-process gRPC server and the credentials nodes dial their peers with:
// the peer's certificate must chain to the CA and name the host dialled,
// and the server refuses a peer without a certificate of its CA.
#include "transfer/tls_credentials.h"

#include <grpcpp/grpcpp.h>
#include <grpcpp/health_check_service_interface.h>
#include <gtest/gtest.h>

#include <cstdlib>
#include <memory>
#include <string>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"

namespace kvcache::transfer {
namespace {

std::string MakeCerts(const std::string& name) {
  const char* tmp = std::getenv("TEST_TMPDIR");
  const std::string dir = absl::StrCat(tmp ? tmp : "/tmp", "/", name);
  const std::string command =
      absl::StrCat("deploy/make_certs.sh ", dir,
                   " --node node --client worker --expired old >/dev/null");
  EXPECT_EQ(std::system(command.c_str()), 0) << command;
  return dir;
}

TlsFiles FilesOf(const std::string& dir, const std::string& name) {
  TlsFiles files;
  files.ca_file = dir + "/ca.crt";
  files.cert_file = dir + "/" + name + ".crt";
  files.key_file = dir + "/" + name + ".key";
  return files;
}

class TlsCredentialsTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    ca_ = new std::string(MakeCerts("a"));
    other_ = new std::string(MakeCerts("b"));
  }
  static void TearDownTestSuite() {
    delete ca_;
    delete other_;
  }

  // A server with only the health service, over `credentials`.
  void StartServer(std::shared_ptr<grpc::ServerCredentials> credentials) {
    grpc::EnableDefaultHealthCheckService(true);
    grpc::ServerBuilder builder;
    builder.AddListeningPort("127.0.0.1:0", credentials, &port_);
    server_ = builder.BuildAndStart();
    ASSERT_NE(server_, nullptr);
  }

  // Whether a channel to the server over `credentials` becomes ready, with
  // `server_name` as the name the server's certificate must carry.
  bool Connects(std::shared_ptr<grpc::ChannelCredentials> credentials,
                const std::string& server_name = "") {
    grpc::ChannelArguments args;
    if (!server_name.empty()) args.SetSslTargetNameOverride(server_name);
    std::shared_ptr<grpc::Channel> channel = grpc::CreateCustomChannel(
        absl::StrCat("127.0.0.1:", port_), credentials, args);
    return channel->WaitForConnected(std::chrono::system_clock::now() +
                                     std::chrono::seconds(3));
  }

  static std::string* ca_;
  static std::string* other_;
  int port_ = 0;
  std::unique_ptr<grpc::Server> server_;
};

std::string* TlsCredentialsTest::ca_ = nullptr;
std::string* TlsCredentialsTest::other_ = nullptr;

TEST_F(TlsCredentialsTest, FilesAreCheckedAndNamed) {
  EXPECT_TRUE(LoadTlsFiles(FilesOf(*ca_, "node")).ok());
  TlsFiles files = FilesOf(*ca_, "node");
  files.key_file = *other_ + "/node.key";
  absl::StatusOr<TlsPem> mismatch = LoadTlsFiles(files);
  EXPECT_TRUE(absl::StrContains(mismatch.status().message(),
                                "is not the private key of cert_file"))
      << mismatch.status();
  files = FilesOf(*ca_, "node");
  files.ca_file = files.key_file;  // a key is not a certificate
  files.ca_option = "tls.ca_file";
  absl::StatusOr<TlsPem> not_ca = LoadTlsFiles(files);
  EXPECT_TRUE(absl::StrContains(not_ca.status().message(), "tls.ca_file"))
      << not_ca.status();
  files = FilesOf(*ca_, "node");
  files.key_file.clear();
  EXPECT_EQ(LoadTlsFiles(files).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(ReadCredentialFile(*ca_ + "/none", "x").status().code(),
            absl::StatusCode::kNotFound);
}

TEST_F(TlsCredentialsTest, ExpiredCertificateIsReported) {
  absl::StatusOr<std::string> old =
      ReadCredentialFile(*ca_ + "/old.crt", "cert_file");
  ASSERT_TRUE(old.ok());
  const absl::Status expired = CheckValidNow(*old, "cert_file");
  EXPECT_EQ(expired.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_TRUE(absl::StrContains(expired.message(), "expired on")) << expired;
  absl::StatusOr<std::string> node =
      ReadCredentialFile(*ca_ + "/node.crt", "cert_file");
  EXPECT_TRUE(CheckValidNow(*node, "cert_file").ok());
  // A client does not send an expired certificate.
  EXPECT_EQ(ClientCredentials(FilesOf(*ca_, "old")).status().code(),
            absl::StatusCode::kFailedPrecondition);
}

TEST_F(TlsCredentialsTest, PeersCheckChainAndHostName) {
  absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> server =
      ServerCredentials(FilesOf(*ca_, "node"), ClientCertificates::kRequired,
                        absl::Seconds(60));
  ASSERT_TRUE(server.ok()) << server.status();
  StartServer(*server);

  absl::StatusOr<std::shared_ptr<grpc::ChannelCredentials>> peer =
      ReloadingChannelCredentials(FilesOf(*ca_, "node"), absl::Seconds(60));
  ASSERT_TRUE(peer.ok()) << peer.status();
  EXPECT_TRUE(Connects(*peer));
  // The certificate names node, localhost and 127.0.0.1, not this host.
  EXPECT_FALSE(Connects(*peer, "elsewhere.example"));

  // A peer of another CA: it rejects this server's certificate, and this
  // server rejects its.
  absl::StatusOr<std::shared_ptr<grpc::ChannelCredentials>> stranger =
      ReloadingChannelCredentials(FilesOf(*other_, "node"), absl::Seconds(60));
  ASSERT_TRUE(stranger.ok());
  EXPECT_FALSE(Connects(*stranger));
  TlsFiles trusting = FilesOf(*other_, "node");
  trusting.ca_file = *ca_ + "/ca.crt";
  absl::StatusOr<std::shared_ptr<grpc::ChannelCredentials>> foreign_cert =
      ReloadingChannelCredentials(trusting, absl::Seconds(60));
  ASSERT_TRUE(foreign_cert.ok());
  EXPECT_FALSE(Connects(*foreign_cert));
}

TEST_F(TlsCredentialsTest, ClientCredentialsNeedACaForACertificate) {
  TlsFiles files = FilesOf(*ca_, "worker");
  files.ca_file.clear();
  EXPECT_EQ(ClientCredentials(files).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(ClientCredentials(TlsFiles()).ok());  // plaintext
}

}  // namespace
}  // namespace kvcache::transfer
