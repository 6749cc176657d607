// Who is calling a node and what they may touch (AccessConfig in
// proto/kvcache/v1/config.proto).
//
// A caller authenticates with a bearer token (`authorization: Bearer ...`
// metadata; the node keeps only SHA-256 hashes and compares them in constant
// time) or a client certificate (its subject alternative names and common
// name, as gRPC's TLS layer verified them). The node decides the tenant;
// nothing in a request can name it.
//
// A tenant's chunks live under stored keys derived from its namespace and
// the key the worker sent (cluster/stored_key.h), so another tenant's key
// is simply a key the node does not hold: every call answers it exactly as
// it answers an absent key, down to the code path. Peers (other nodes) name
// chunks by their stored keys.
//
// Thread-safe after construction.
#ifndef KVCACHE_KVSTORE_ACCESS_CONTROL_H_
#define KVCACHE_KVSTORE_ACCESS_CONTROL_H_

#include <atomic>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "cluster/stored_key.h"
#include "grpcpp/server_context.h"
#include "kvcache/v1/config.pb.h"

namespace kvcache::kvstore {

enum Role : uint32_t {
  kTenantRole = 1,  // the data plane, within its own namespaces
  kAdminRole = 2,   // Drain, GetConfig, Stats, every tenant's usage
  kPeerRole = 4,    // node-to-node copies, by stored key
};

// SHA-256 of `text` as 64 lowercase hex digits.
std::string Sha256Hex(absl::string_view text);

// A tenant's live usage of its own call limits.
class TenantLimits {
 public:
  TenantLimits(uint32_t max_concurrent_calls, uint32_t max_requests_per_second);
  // Takes a call slot and a request token; RESOURCE_EXHAUSTED naming the
  // limit otherwise.
  absl::Status Enter(absl::string_view tenant, absl::Time now);
  void Leave();

 private:
  const uint32_t max_concurrent_calls_;
  const uint32_t max_requests_per_second_;
  std::atomic<uint32_t> calls_{0};
  absl::Mutex mu_;
  // Token bucket: up to one second's worth of requests, refilled smoothly.
  double tokens_ ABSL_GUARDED_BY(mu_) = 0;
  absl::Time refilled_ ABSL_GUARDED_BY(mu_) = absl::InfinitePast();
};

class AccessControl;

// An authenticated call. Holds the tenant's call slot until destroyed.
class Caller {
 public:
  Caller(Caller&& other) noexcept;
  Caller& operator=(Caller&&) = delete;
  ~Caller();

  // Tenant name, "admin", or "peer"; empty on an open node.
  const std::string& name() const { return name_; }
  // The namespace this call's keys live in (empty: stored keys as sent).
  const std::string& key_namespace() const { return key_namespace_; }
  std::string Stored(absl::string_view key) const {
    return cluster::StoredKey(key_namespace_, key);
  }
  // Whether the caller acts in `role`. On an open node every caller acts in
  // every role.
  bool Has(Role role) const { return (roles_ & role) != 0; }

 private:
  friend class AccessControl;
  Caller(std::string name, std::string key_namespace, uint32_t roles,
         TenantLimits* limits)
      : name_(std::move(name)),
        key_namespace_(std::move(key_namespace)),
        roles_(roles),
        limits_(limits) {}
  std::string name_;
  std::string key_namespace_;
  uint32_t roles_;
  TenantLimits* limits_;  // null: no per-tenant limits to release
};

class AccessControl {
 public:
  // `config` must have passed ValidateAccessConfig.
  explicit AccessControl(const v1::AccessConfig& config);

  // False: an open node (nothing configured), every caller is admitted.
  bool enabled() const { return enabled_; }

  // Authenticates the call and checks it may act in one of `roles` (a
  // bitmask of Role). UNAUTHENTICATED without credentials or with unknown
  // ones; PERMISSION_DENIED for a role the caller lacks or a shared
  // namespace it was not granted; RESOURCE_EXHAUSTED past the tenant's
  // call limits.
  absl::StatusOr<Caller> Admit(const grpc::ServerContextBase& context,
                               uint32_t roles);

  // For the metrics endpoint: whether `authorization` (the header's value)
  // carries the metrics token. Always true without one configured.
  bool MetricsAuthorized(absl::string_view authorization) const;

  // The metadata key a call names a shared namespace with.
  static constexpr char kNamespaceMetadata[] = "x-kvcache-namespace";

 private:
  struct Identity {
    std::string token_sha256;  // empty when matched by certificate
    std::string certificate_identity;
    uint32_t roles = 0;
    int tenant = -1;  // index into tenants_, for the tenant role
  };
  struct Tenant {
    const v1::TenantConfig* config;
    std::unique_ptr<TenantLimits> limits;
  };

  // The identity the call's credentials match, or null.
  const Identity* Identify(const grpc::ServerContextBase& context,
                           bool* had_credentials) const;

  const v1::AccessConfig config_;
  const bool enabled_;
  std::vector<Identity> identities_;
  std::vector<Tenant> tenants_;
};

}  // namespace kvcache::kvstore

#endif  // KVCACHE_KVSTORE_ACCESS_CONTROL_H_
