// A network namespace joined to the test's own by a veth pair: a process
// started in it (StartOptions::network_namespace) is on a host of its own,
// which the test can cut off from the network and reconnect while the
// process keeps running. Needs root and iproute2 (/sbin/ip).
#ifndef KVCACHE_TESTS_TESTING_NETWORK_NAMESPACE_H_
#define KVCACHE_TESTS_TESTING_NETWORK_NAMESPACE_H_

#include <memory>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace kvcache::testing {

class NetworkNamespace {
 public:
  // Creates the namespace and its link, on a 10.77.0.0/16 subnet no other
  // namespace of this host uses. Errors carry the failed command's output.
  static absl::StatusOr<std::unique_ptr<NetworkNamespace>> Create();

  NetworkNamespace(const NetworkNamespace&) = delete;
  NetworkNamespace& operator=(const NetworkNamespace&) = delete;
  // Deletes the link and the namespace.
  ~NetworkNamespace();

  const std::string& name() const { return name_; }
  // This side's end of the link: servers that the namespace must reach
  // listen here.
  const std::string& host_address() const { return host_address_; }
  // The namespace's own address.
  const std::string& address() const { return address_; }

  // Takes the namespace's end of the link down: whatever is sent to the
  // namespace is dropped without an answer, and nothing inside can reach
  // this side.
  absl::Status Cut();
  // Brings it up again.
  absl::Status Restore();

 private:
  NetworkNamespace() = default;

  std::string name_;
  std::string host_device_;
  std::string host_address_;
  std::string address_;
};

}  // namespace kvcache::testing

#endif  // KVCACHE_TESTS_TESTING_NETWORK_NAMESPACE_H_
