#include "tests/testing/etcd_process.h"

#include <signal.h>
#include <unistd.h>

#include <cstdlib>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "cluster/etcd_client.h"
#include "transfer/tls_credentials.h"

namespace kvcache::testing {
namespace {

constexpr char kEtcd[] = "/usr/bin/etcd";

}  // namespace

absl::StatusOr<std::unique_ptr<EtcdProcess>> EtcdProcess::Start(
    const std::string& host, std::optional<EtcdTls> tls) {
  if (access(kEtcd, X_OK) != 0) {
    return absl::FailedPreconditionError(
        absl::StrCat(kEtcd, " is missing; install Debian's etcd-server"));
  }
  static int started = 0;
  const char* tmp = std::getenv("TEST_TMPDIR");
  std::unique_ptr<EtcdProcess> etcd(new EtcdProcess);
  etcd->data_dir_ =
      absl::StrCat(tmp ? tmp : "/tmp", "/etcd-", getpid(), "-", started++);
  etcd->client_port_ = FreePort(host);
  etcd->peer_port_ = FreeLoopbackPort();
  etcd->endpoint_ = absl::StrCat(host, ":", etcd->client_port_);
  etcd->tls_ = std::move(tls);
  if (absl::Status s = etcd->Launch(); !s.ok()) return s;
  return etcd;
}

absl::Status EtcdProcess::Launch() {
  const std::string client_url =
      absl::StrCat(tls_ ? "https://" : "http://", endpoint_);
  const std::string peer_url = absl::StrCat("http://127.0.0.1:", peer_port_);
  std::vector<std::string> args = {"--name=test",
                                   "--data-dir=" + data_dir_,
                                   "--listen-client-urls=" + client_url,
                                   "--advertise-client-urls=" + client_url,
                                   "--listen-peer-urls=" + peer_url,
                                   "--initial-advertise-peer-urls=" + peer_url,
                                   "--initial-cluster=test=" + peer_url,
                                   "--logger=zap",
                                   "--log-level=error"};
  cluster::EtcdOptions options{{endpoint_}, absl::Milliseconds(500)};
  if (tls_) {
    args.insert(
        args.end(),
        {"--cert-file=" + tls_->cert_file, "--key-file=" + tls_->key_file,
         "--client-cert-auth", "--trusted-ca-file=" + tls_->ca_file});
    transfer::TlsFiles files;
    files.ca_file = tls_->ca_file;
    files.cert_file = tls_->client_cert_file;
    files.key_file = tls_->client_key_file;
    absl::StatusOr<std::shared_ptr<grpc::ChannelCredentials>> credentials =
        transfer::ClientCredentials(files);
    if (!credentials.ok()) return credentials.status();
    options.credentials = *std::move(credentials);
  }
  absl::StatusOr<DaemonProcess> process = DaemonProcess::Spawn(kEtcd, args);
  if (!process.ok()) return process.status();
  process_ = std::make_unique<DaemonProcess>(std::move(*process));

  cluster::EtcdClient client(options);
  const absl::Time deadline = absl::Now() + absl::Seconds(20);
  absl::Status last;
  while (absl::Now() < deadline) {
    last = client.RangePrefix("/").status();
    if (last.ok()) return absl::OkStatus();
    absl::SleepFor(absl::Milliseconds(50));
  }
  return absl::DeadlineExceededError(absl::StrCat(
      "etcd on ", endpoint_, " not ready within 20s: ", last.message()));
}

void EtcdProcess::Kill() {
  if (!process_) return;
  process_->Signal(SIGKILL);
  process_->WaitForExit(absl::Seconds(10)).IgnoreError();
  process_.reset();
}

absl::Status EtcdProcess::Restart() {
  Kill();
  return Launch();
}

}  // namespace kvcache::testing
