// Runs a real single-member etcd (Debian's etcd-server) on free ports for
// cluster tests and cluster_bench, with its data in a fresh directory under
// TEST_TMPDIR (else /tmp), and can kill and restart it on the same ports and
// data to simulate an outage.
#ifndef KVCACHE_TESTS_TESTING_ETCD_PROCESS_H_
#define KVCACHE_TESTS_TESTING_ETCD_PROCESS_H_

#include <memory>
#include <optional>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "tests/testing/daemon_process.h"

namespace kvcache::testing {

// etcd serving clients over TLS and requiring client certificates: its own
// certificate and key, and the CA client certificates must chain to (also
// the CA its certificate chains to). A client certificate for the readiness
// check goes with them.
struct EtcdTls {
  std::string ca_file;
  std::string cert_file;
  std::string key_file;
  std::string client_cert_file;
  std::string client_key_file;
};

class EtcdProcess {
 public:
  // Starts etcd serving clients on `host` (an IPv4 address), over TLS with
  // client certificates required if `tls` is given, and waits until it
  // answers a range over its gRPC API. FAILED_PRECONDITION if /usr/bin/etcd
  // is missing (install etcd-server).
  static absl::StatusOr<std::unique_ptr<EtcdProcess>> Start(
      const std::string& host = "127.0.0.1",
      std::optional<EtcdTls> tls = std::nullopt);

  // "HOST:PORT", its client endpoint.
  const std::string& endpoint() const { return endpoint_; }

  // SIGKILLs etcd and waits for it to exit.
  void Kill();
  // Starts it again on the same ports and data and waits until it answers.
  absl::Status Restart();

 private:
  EtcdProcess() = default;
  absl::Status Launch();

  std::string data_dir_;
  int client_port_ = 0;
  int peer_port_ = 0;
  std::string endpoint_;
  std::optional<EtcdTls> tls_;
  std::unique_ptr<DaemonProcess> process_;
};

}  // namespace kvcache::testing

#endif  // KVCACHE_TESTS_TESTING_ETCD_PROCESS_H_
