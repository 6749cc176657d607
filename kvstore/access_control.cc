#include "kvstore/access_control.h"

#include <openssl/crypto.h>
#include <openssl/evp.h>

#include <algorithm>
#include <utility>

#include "absl/strings/ascii.h"
#include "absl/strings/escaping.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "grpc/grpc_security_constants.h"

namespace kvcache::kvstore {
namespace {

constexpr absl::string_view kBearer = "Bearer ";

std::string Sha256(absl::string_view text) {
  unsigned char digest[EVP_MAX_MD_SIZE];
  unsigned int size = 0;
  EVP_Digest(text.data(), text.size(), digest, &size, EVP_sha256(), nullptr);
  return std::string(reinterpret_cast<const char*>(digest), size);
}

// The token of an `authorization` value, if it is a bearer token.
bool BearerToken(absl::string_view authorization, absl::string_view* token) {
  if (!absl::StartsWith(authorization, kBearer)) return false;
  *token = absl::StripAsciiWhitespace(authorization.substr(kBearer.size()));
  return !token->empty();
}

// Whether the token hashes to `want_hex`, in time that depends on neither.
bool TokenMatches(const std::string& token_hex, const std::string& want_hex) {
  return want_hex.size() == token_hex.size() &&
         CRYPTO_memcmp(token_hex.data(), want_hex.data(), want_hex.size()) == 0;
}

}  // namespace

std::string Sha256Hex(absl::string_view text) {
  return absl::BytesToHexString(Sha256(text));
}

TenantLimits::TenantLimits(uint32_t max_concurrent_calls,
                           uint32_t max_requests_per_second)
    : max_concurrent_calls_(max_concurrent_calls),
      max_requests_per_second_(max_requests_per_second) {}

absl::Status TenantLimits::Enter(absl::string_view tenant, absl::Time now) {
  if (max_requests_per_second_ > 0) {
    absl::MutexLock lock(&mu_);
    const double rate = max_requests_per_second_;
    tokens_ =
        std::min(rate, tokens_ + rate * absl::ToDoubleSeconds(now - refilled_));
    refilled_ = now;
    if (tokens_ < 1) {
      return absl::ResourceExhaustedError(absl::StrCat(
          "tenant ", tenant, " is over its ", max_requests_per_second_,
          " requests per second (max_requests_per_second)"));
    }
    tokens_ -= 1;
  }
  if (max_concurrent_calls_ > 0 &&
      calls_.fetch_add(1) >= max_concurrent_calls_) {
    calls_.fetch_sub(1);
    return absl::ResourceExhaustedError(
        absl::StrCat("tenant ", tenant, " already has ", max_concurrent_calls_,
                     " calls in progress (max_concurrent_calls)"));
  }
  return absl::OkStatus();
}

void TenantLimits::Leave() {
  if (max_concurrent_calls_ > 0) calls_.fetch_sub(1);
}

Caller::Caller(Caller&& other) noexcept
    : name_(std::move(other.name_)),
      key_namespace_(std::move(other.key_namespace_)),
      roles_(other.roles_),
      limits_(std::exchange(other.limits_, nullptr)) {}

Caller::~Caller() {
  if (limits_ != nullptr) limits_->Leave();
}

AccessControl::AccessControl(const v1::AccessConfig& config)
    : config_(config),
      enabled_(config.tenants_size() > 0 ||
               config.admin_token_sha256_size() > 0 ||
               config.admin_certificate_identities_size() > 0 ||
               config.peer_token_sha256_size() > 0 ||
               config.peer_certificate_identities_size() > 0) {
  for (int t = 0; t < config_.tenants_size(); ++t) {
    const v1::TenantConfig& tenant = config_.tenants(t);
    tenants_.push_back({&tenant, std::make_unique<TenantLimits>(
                                     tenant.max_concurrent_calls(),
                                     tenant.max_requests_per_second())});
    for (const std::string& hash : tenant.token_sha256()) {
      identities_.push_back({hash, "", kTenantRole, t});
    }
    for (const std::string& name : tenant.certificate_identities()) {
      identities_.push_back({"", name, kTenantRole, t});
    }
  }
  for (const std::string& hash : config_.admin_token_sha256()) {
    identities_.push_back({hash, "", kAdminRole, -1});
  }
  for (const std::string& name : config_.admin_certificate_identities()) {
    identities_.push_back({"", name, kAdminRole, -1});
  }
  for (const std::string& hash : config_.peer_token_sha256()) {
    identities_.push_back({hash, "", kPeerRole, -1});
  }
  for (const std::string& name : config_.peer_certificate_identities()) {
    identities_.push_back({"", name, kPeerRole, -1});
  }
}

const AccessControl::Identity* AccessControl::Identify(
    const grpc::ServerContextBase& context, bool* had_credentials) const {
  const auto& metadata = context.client_metadata();
  auto authorization = metadata.find("authorization");
  absl::string_view token;
  if (authorization != metadata.end() &&
      BearerToken(absl::string_view(authorization->second.data(),
                                    authorization->second.size()),
                  &token)) {
    *had_credentials = true;
    // Every configured hash is compared, match or not, so the time taken
    // says nothing about which one (if any) matched.
    const std::string token_hex = Sha256Hex(token);
    const Identity* found = nullptr;
    for (const Identity& identity : identities_) {
      if (identity.token_sha256.empty()) continue;
      if (TokenMatches(token_hex, identity.token_sha256) && found == nullptr) {
        found = &identity;
      }
    }
    return found;
  }
  std::shared_ptr<const grpc::AuthContext> auth = context.auth_context();
  if (auth == nullptr || !auth->IsPeerAuthenticated()) return nullptr;
  *had_credentials = true;
  std::vector<std::string> names;
  for (const char* property :
       {GRPC_X509_SAN_PROPERTY_NAME, GRPC_X509_CN_PROPERTY_NAME}) {
    for (const grpc::string_ref& value : auth->FindPropertyValues(property)) {
      names.emplace_back(value.data(), value.size());
    }
  }
  for (const Identity& identity : identities_) {
    if (identity.certificate_identity.empty()) continue;
    if (std::find(names.begin(), names.end(), identity.certificate_identity) !=
        names.end()) {
      return &identity;
    }
  }
  return nullptr;
}

absl::StatusOr<Caller> AccessControl::Admit(
    const grpc::ServerContextBase& context, uint32_t roles) {
  if (!enabled_) {
    return Caller("", "", kTenantRole | kAdminRole | kPeerRole, nullptr);
  }
  bool had_credentials = false;
  const Identity* identity = Identify(context, &had_credentials);
  if (identity == nullptr) {
    return absl::UnauthenticatedError(
        had_credentials
            ? "the token or client certificate is not one this node knows"
            : "this node needs credentials: send `authorization: Bearer "
              "<token>` metadata or a client certificate");
  }
  if ((identity->roles & roles) == 0) {
    return absl::PermissionDeniedError(
        (roles & kAdminRole) != 0 && (roles & kTenantRole) == 0
            ? "this call is for admins"
            : "this call is not open to this caller's role");
  }
  if (identity->roles & kPeerRole) {
    return Caller("peer", "", kPeerRole, nullptr);
  }
  if (identity->roles & kAdminRole) {
    return Caller("admin", "", kAdminRole, nullptr);
  }

  const Tenant& tenant = tenants_[identity->tenant];
  const std::string& name = tenant.config->name();
  std::string key_namespace = absl::StrCat("tenant/", name);
  const auto& metadata = context.client_metadata();
  if (auto shared = metadata.find(kNamespaceMetadata);
      shared != metadata.end()) {
    const std::string wanted(shared->second.data(), shared->second.size());
    const auto& granted = tenant.config->shared_namespaces();
    if (std::find(granted.begin(), granted.end(), wanted) == granted.end()) {
      return absl::PermissionDeniedError(absl::StrCat(
          "tenant ", name, " was not granted shared namespace '", wanted, "'"));
    }
    key_namespace = absl::StrCat("shared/", wanted);
  }
  if (absl::Status s = tenant.limits->Enter(name, absl::Now()); !s.ok()) {
    return s;
  }
  return Caller(name, std::move(key_namespace), kTenantRole,
                tenant.limits.get());
}

bool AccessControl::MetricsAuthorized(absl::string_view authorization) const {
  if (config_.metrics_token_sha256().empty()) return true;
  absl::string_view token;
  return BearerToken(authorization, &token) &&
         TokenMatches(Sha256Hex(token), config_.metrics_token_sha256());
}

}  // namespace kvcache::kvstore
