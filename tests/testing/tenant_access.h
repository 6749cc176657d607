// Helpers for tests of nodes with tenants: the `access` flag that lists
// them, and a caller that sends its token (and a shared namespace, if any)
// on every call over a TCP connection of its own.
#ifndef KVCACHE_TESTS_TESTING_TENANT_ACCESS_H_
#define KVCACHE_TESTS_TESTING_TENANT_ACCESS_H_

#include <grpcpp/grpcpp.h>

#include <memory>
#include <string>

#include "absl/strings/str_cat.h"
#include "kvcache/v1/kvcache.grpc.pb.h"
#include "kvstore/access_control.h"
#include "tests/testing/daemon_process.h"
#include "tests/testing/own_connection.h"

namespace kvcache::testing {

// A `tenants { ... }` entry for `name`, acting by `token`, with `extra`
// TenantConfig fields in text format.
inline std::string TenantEntry(const std::string& name,
                               const std::string& token,
                               const std::string& extra = "") {
  return absl::StrCat("tenants { name: \"", name, "\" token_sha256: \"",
                      kvstore::Sha256Hex(token), "\" ", extra, " } ");
}

class TokenCaller {
 public:
  TokenCaller(const DaemonProcess& daemon, std::string token,
              std::string name_space = "")
      : token_(std::move(token)), name_space_(std::move(name_space)) {
    auto channel = OwnConnection(daemon.address());
    data_ = v1::KvCache::NewStub(channel);
    admin_ = v1::Admin::NewStub(channel);
  }

  // Adds this caller's credentials (none if the token is empty) and
  // namespace to a call.
  void Prepare(grpc::ClientContext& context) const {
    if (!token_.empty()) {
      context.AddMetadata("authorization", "Bearer " + token_);
    }
    if (!name_space_.empty()) {
      context.AddMetadata(kvstore::AccessControl::kNamespaceMetadata,
                          name_space_);
    }
  }

  v1::KvCache::Stub& data() { return *data_; }
  v1::Admin::Stub& admin() { return *admin_; }

 private:
  std::string token_;
  std::string name_space_;
  std::unique_ptr<v1::KvCache::Stub> data_;
  std::unique_ptr<v1::Admin::Stub> admin_;
};

}  // namespace kvcache::testing

#endif  // KVCACHE_TESTS_TESTING_TENANT_ACCESS_H_
