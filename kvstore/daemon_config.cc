#include "kvstore/daemon_config.h"

#include <google/protobuf/io/tokenizer.h>
#include <google/protobuf/text_format.h>

#include <algorithm>
#include <fstream>
#include <sstream>

#include "absl/container/flat_hash_set.h"
#include "absl/status/status.h"
#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

namespace kvcache::kvstore {
namespace {

// Collects protobuf's parse errors so they can be returned, not printed.
class ErrorCollector : public google::protobuf::io::ErrorCollector {
 public:
  explicit ErrorCollector(absl::string_view origin) : origin_(origin) {}

  void AddError(int line, int column, const std::string& message) override {
    // The parser counts from 0; editors count from 1.
    errors_.push_back(
        absl::StrCat(origin_, ":", line + 1, ":", column + 1, ": ", message));
  }

  std::string Joined() const { return absl::StrJoin(errors_, "; "); }

 private:
  std::string origin_;
  std::vector<std::string> errors_;
};

absl::Status FieldError(absl::string_view field, absl::string_view problem) {
  return absl::InvalidArgumentError(
      absl::StrCat("config field ", field, ": ", problem));
}

// Sets every unset field to its default, so printing shows effective values.
void SetDefaultsExplicitly(google::protobuf::Message& message) {
  using google::protobuf::FieldDescriptor;
  const google::protobuf::Descriptor* descriptor = message.GetDescriptor();
  const google::protobuf::Reflection* reflection = message.GetReflection();
  for (int i = 0; i < descriptor->field_count(); ++i) {
    const FieldDescriptor* field = descriptor->field(i);
    if (field->is_repeated()) continue;
    switch (field->cpp_type()) {
      case FieldDescriptor::CPPTYPE_MESSAGE:
        SetDefaultsExplicitly(*reflection->MutableMessage(&message, field));
        break;
      case FieldDescriptor::CPPTYPE_STRING:
        reflection->SetString(&message, field,
                              reflection->GetString(message, field));
        break;
      case FieldDescriptor::CPPTYPE_UINT32:
        reflection->SetUInt32(&message, field,
                              reflection->GetUInt32(message, field));
        break;
      case FieldDescriptor::CPPTYPE_BOOL:
        reflection->SetBool(&message, field,
                            reflection->GetBool(message, field));
        break;
      case FieldDescriptor::CPPTYPE_UINT64:
        reflection->SetUInt64(&message, field,
                              reflection->GetUInt64(message, field));
        break;
      default:
        // The schema uses no other field types; a new one would print only
        // when set.
        break;
    }
  }
}

bool IsHostPort(const std::string& address) {
  const size_t colon = address.rfind(':');
  uint32_t port = 0;
  return colon != std::string::npos && colon != 0 &&
         absl::SimpleAtoi(address.substr(colon + 1), &port) && port <= 65535;
}

absl::Status ValidateCluster(const v1::ClusterConfig& cluster) {
  if (cluster.etcd_endpoints().empty()) return absl::OkStatus();
  for (const std::string& endpoint : cluster.etcd_endpoints()) {
    if (!IsHostPort(endpoint) || endpoint.find("://") != std::string::npos) {
      return FieldError(
          "cluster.etcd_endpoints",
          absl::StrCat("'", endpoint, "' is not host:port (no http://)"));
    }
  }
  if (cluster.cluster_name().empty() ||
      cluster.cluster_name().find('/') != std::string::npos) {
    return FieldError("cluster.cluster_name", "must be non-empty, without '/'");
  }
  if (!cluster.advertise_address().empty() &&
      !IsHostPort(cluster.advertise_address())) {
    return FieldError(
        "cluster.advertise_address",
        absl::StrCat("'", cluster.advertise_address(), "' is not host:port"));
  }
  if (cluster.lease_ttl_seconds() < 2) {
    // Renewals run every third of the TTL; below 2 s a busy node misses them.
    return FieldError("cluster.lease_ttl_seconds", "must be >= 2");
  }
  if (cluster.replication_factor() == 0) {
    return FieldError("cluster.replication_factor", "must be > 0");
  }
  if (cluster.membership_poll_ms() < 50) {
    return FieldError("cluster.membership_poll_ms", "must be >= 50");
  }
  if (cluster.repair_interval_seconds() == 0) {
    return FieldError("cluster.repair_interval_seconds", "must be > 0");
  }
  const v1::EtcdTlsConfig& etcd_tls = cluster.etcd_tls();
  if (etcd_tls.cert_file().empty() != etcd_tls.key_file().empty()) {
    return FieldError("cluster.etcd_tls.cert_file",
                      "cert_file and key_file go together");
  }
  if (!etcd_tls.cert_file().empty() && etcd_tls.ca_file().empty()) {
    // A client certificate is only sent over TLS, which needs the CA.
    return FieldError("cluster.etcd_tls.ca_file",
                      "needed with a client certificate");
  }
  return absl::OkStatus();
}

absl::Status ValidateTls(const v1::DaemonConfig& config) {
  const v1::TlsConfig& tls = config.tls();
  if (tls.cert_file().empty() != tls.key_file().empty()) {
    return FieldError(
        tls.cert_file().empty() ? "tls.cert_file" : "tls.key_file",
        "tls.cert_file and tls.key_file go together: set both "
        "for TLS, neither for plaintext");
  }
  if (tls.cert_file().empty()) {
    // Without a certificate of its own the node serves plaintext; a CA or
    // mTLS setting would then be silently ignored.
    if (!tls.ca_file().empty()) {
      return FieldError("tls.ca_file", "needs tls.cert_file and tls.key_file");
    }
    if (tls.require_client_certificate()) {
      return FieldError("tls.require_client_certificate",
                        "needs tls.cert_file, tls.key_file and tls.ca_file");
    }
    return absl::OkStatus();
  }
  if (tls.require_client_certificate() && tls.ca_file().empty()) {
    return FieldError("tls.ca_file",
                      "needed by tls.require_client_certificate: client "
                      "certificates are checked against it");
  }
  if (!config.cluster().etcd_endpoints().empty() && tls.ca_file().empty()) {
    return FieldError("tls.ca_file",
                      "needed in a cluster: peers' certificates are checked "
                      "against it");
  }
  if (tls.reload_interval_seconds() == 0) {
    return FieldError("tls.reload_interval_seconds", "must be > 0");
  }
  return absl::OkStatus();
}

bool IsName(absl::string_view name) {
  return !name.empty() && name.size() <= 128 &&
         std::all_of(name.begin(), name.end(), [](char c) {
           return absl::ascii_isalnum(c) || c == '-' || c == '_' || c == '.';
         });
}

bool IsSha256Hex(absl::string_view hex) {
  return hex.size() == 64 && std::all_of(hex.begin(), hex.end(), [](char c) {
           return absl::ascii_isdigit(c) || (c >= 'a' && c <= 'f');
         });
}

absl::Status AccessError(absl::string_view field, absl::string_view problem) {
  return FieldError(absl::StrCat("access.", field), problem);
}

// Names, token hashes and namespaces of the access section (AccessControl
// trusts them).
absl::Status ValidateAccess(const v1::AccessConfig& config) {
  absl::flat_hash_set<std::string> tenant_names, hashes;
  auto check_hash = [&](const std::string& hash,
                        const std::string& field) -> absl::Status {
    if (!IsSha256Hex(hash)) {
      return AccessError(field, absl::StrCat("'", hash,
                                             "' is not 64 lowercase hex digits "
                                             "(the SHA-256 of a token)"));
    }
    if (!hashes.insert(hash).second) {
      return AccessError(field, "the same token hash is listed twice");
    }
    return absl::OkStatus();
  };
  for (int t = 0; t < config.tenants_size(); ++t) {
    const v1::TenantConfig& tenant = config.tenants(t);
    const std::string where = absl::StrCat("tenants[", t, "]");
    if (!IsName(tenant.name())) {
      return AccessError(where + ".name",
                         "must be 1-128 letters, digits, '-', '_' or '.'");
    }
    if (!tenant_names.insert(tenant.name()).second) {
      return AccessError(where + ".name",
                         absl::StrCat("'", tenant.name(), "' is listed twice"));
    }
    if (tenant.token_sha256_size() == 0 &&
        tenant.certificate_identities_size() == 0) {
      return AccessError(where,
                         "names no token_sha256 and no "
                         "certificate_identities: nobody could act for "
                         "it");
    }
    for (const std::string& hash : tenant.token_sha256()) {
      if (absl::Status s = check_hash(hash, where + ".token_sha256"); !s.ok()) {
        return s;
      }
    }
    for (const std::string& name : tenant.shared_namespaces()) {
      if (!IsName(name)) {
        return AccessError(where + ".shared_namespaces",
                           absl::StrCat("'", name, "' is not a valid name"));
      }
    }
  }
  for (const std::string& hash : config.admin_token_sha256()) {
    if (absl::Status s = check_hash(hash, "admin_token_sha256"); !s.ok()) {
      return s;
    }
  }
  for (const std::string& hash : config.peer_token_sha256()) {
    if (absl::Status s = check_hash(hash, "peer_token_sha256"); !s.ok()) {
      return s;
    }
  }
  if (!config.metrics_token_sha256().empty() &&
      !IsSha256Hex(config.metrics_token_sha256())) {
    return AccessError("metrics_token_sha256",
                       "is not 64 lowercase hex digits");
  }
  return absl::OkStatus();
}

}  // namespace

absl::Status MergeConfigText(absl::string_view text, absl::string_view origin,
                             v1::DaemonConfig& config) {
  ErrorCollector errors(origin);
  google::protobuf::TextFormat::Parser parser;
  parser.RecordErrorsTo(&errors);
  v1::DaemonConfig parsed;
  if (!parser.ParseFromString(std::string(text), &parsed)) {
    return absl::InvalidArgumentError(
        absl::StrCat("invalid configuration: ", errors.Joined()));
  }
  config.MergeFrom(parsed);
  return absl::OkStatus();
}

absl::Status ValidateConfig(const v1::DaemonConfig& config) {
  if (!IsHostPort(config.listen_address())) {
    return FieldError(
        "listen_address",
        absl::StrCat("'", config.listen_address(), "' is not host:port"));
  }
  if (config.cpu_tier().capacity_bytes() == 0) {
    return FieldError("cpu_tier.capacity_bytes", "must be > 0");
  }
  if (config.cpu_tier().max_admit_percent() == 0 ||
      config.cpu_tier().max_admit_percent() > 100) {
    return FieldError("cpu_tier.max_admit_percent", "must be within [1, 100]");
  }
  if (config.gpu_tier().max_admit_percent() == 0 ||
      config.gpu_tier().max_admit_percent() > 100) {
    return FieldError("gpu_tier.max_admit_percent", "must be within [1, 100]");
  }
  if (config.gpu_tier().max_nccl_links() > 0) {
    if (config.gpu_tier().nccl_staging_bytes() == 0) {
      return FieldError("gpu_tier.nccl_staging_bytes",
                        "must be > 0 when NCCL links are on");
    }
    if (config.gpu_tier().nccl_send_timeout_seconds() == 0) {
      return FieldError("gpu_tier.nccl_send_timeout_seconds",
                        "must be > 0 when NCCL links are on");
    }
  }
  const v1::NvmeTierConfig& nvme = config.nvme_tier();
  if (!nvme.data_dir().empty()) {
    if (nvme.slab_bytes() == 0 || nvme.slab_bytes() % 4096 != 0) {
      return FieldError(
          "nvme_tier.slab_bytes",
          absl::StrCat("must be a positive multiple of 4096, got ",
                       nvme.slab_bytes()));
    }
    if (nvme.slab_count() == 0) {
      return FieldError("nvme_tier.slab_count", "must be > 0");
    }
    if (nvme.queue_depth() == 0 || nvme.queue_depth() > 4096) {
      return FieldError("nvme_tier.queue_depth", "must be within [1, 4096]");
    }
  } else if (nvme.write_through()) {
    return FieldError("nvme_tier.write_through",
                      "needs nvme_tier.data_dir to be set");
  }
  if (absl::Status s = ValidateCluster(config.cluster()); !s.ok()) return s;
  if (absl::Status s = ValidateTls(config); !s.ok()) return s;
  const v1::LimitsConfig& limits = config.limits();
  if (limits.max_chunk_bytes() == 0) {
    return FieldError("limits.max_chunk_bytes", "must be > 0");
  }
  if (limits.max_keys_per_request() == 0) {
    return FieldError("limits.max_keys_per_request", "must be > 0");
  }
  constexpr uint32_t kMinPiece = 4 << 10, kMaxPiece = 3 << 20;
  if (limits.get_piece_bytes() < kMinPiece ||
      limits.get_piece_bytes() > kMaxPiece) {
    // Above ~3 MiB a piece plus framing would pass gRPC's 4 MiB default
    // message limit on clients that kept it.
    return FieldError(
        "limits.get_piece_bytes",
        absl::StrCat("must be within [", kMinPiece, ", ", kMaxPiece, "], got ",
                     limits.get_piece_bytes()));
  }
  if (limits.max_put_bytes_in_flight() < limits.max_chunk_bytes()) {
    return FieldError("limits.max_put_bytes_in_flight",
                      absl::StrCat("must be at least limits.max_chunk_bytes (",
                                   limits.max_chunk_bytes(),
                                   "), or no chunk of the largest "
                                   "size could ever be stored; got ",
                                   limits.max_put_bytes_in_flight()));
  }
  // gRPC's synchronous server keeps a few threads polling for new calls,
  // out of the same allowance as the calls themselves.
  constexpr uint32_t kMinCalls = 8;
  if (limits.max_concurrent_calls() < kMinCalls) {
    return FieldError("limits.max_concurrent_calls",
                      absl::StrCat("must be at least ", kMinCalls));
  }
  if (limits.max_streams_per_connection() == 0) {
    return FieldError("limits.max_streams_per_connection", "must be > 0");
  }
  if (limits.stream_idle_timeout_seconds() == 0) {
    return FieldError("limits.stream_idle_timeout_seconds", "must be > 0");
  }
  constexpr uint64_t kMinGrpcMemory = 16 << 20;
  if (limits.grpc_memory_bytes() < kMinGrpcMemory) {
    return FieldError("limits.grpc_memory_bytes",
                      absl::StrCat("must be at least ", kMinGrpcMemory));
  }
  if (limits.keepalive_time_seconds() == 0 ||
      limits.keepalive_timeout_seconds() == 0) {
    return FieldError("limits.keepalive_time_seconds",
                      "keepalive_time_seconds and keepalive_timeout_seconds "
                      "must be > 0");
  }
  if (absl::Status s = ValidateAccess(config.access()); !s.ok()) return s;
  if (!config.metrics_address().empty() &&
      !IsLoopbackAddress(config.metrics_address()) &&
      config.access().metrics_token_sha256().empty()) {
    return FieldError(
        "metrics_address",
        absl::StrCat("'", config.metrics_address(),
                     "' is reachable from other hosts: set "
                     "access.metrics_token_sha256 so scrapers must send a "
                     "token, or listen on 127.0.0.1"));
  }
  if (config.shared_memory().enabled() && config.access().tenants_size() > 1) {
    return FieldError(
        "shared_memory.enabled",
        "a node with several tenants cannot share its memory: a mapped "
        "region shows every tenant's chunks. Set shared_memory { enabled: "
        "false } (workers then fetch over gRPC), or give each tenant a node "
        "of its own");
  }
  const uint32_t per_connection =
      config.shared_memory().max_leased_percent_per_connection();
  if (per_connection == 0 || per_connection > 100) {
    return FieldError("shared_memory.max_leased_percent_per_connection",
                      "must be within [1, 100]");
  }
  return absl::OkStatus();
}

absl::StatusOr<v1::DaemonConfig> LoadConfig(
    const std::string& path, const std::vector<std::string>& overrides) {
  v1::DaemonConfig config;
  if (!path.empty()) {
    std::ifstream file(path);
    if (!file) {
      return absl::NotFoundError(
          absl::StrCat("cannot read config file '", path, "'"));
    }
    std::stringstream text;
    text << file.rdbuf();
    if (absl::Status s = MergeConfigText(text.str(), path, config); !s.ok()) {
      return s;
    }
  }
  for (const std::string& override_text : overrides) {
    if (absl::Status s = MergeConfigText(override_text, "--set", config);
        !s.ok()) {
      return s;
    }
  }
  if (absl::Status s = ValidateConfig(config); !s.ok()) return s;
  return config;
}

bool IsLoopbackAddress(absl::string_view address) {
  absl::string_view host = address.substr(0, address.rfind(':'));
  return absl::StartsWith(host, "127.") || host == "localhost" ||
         host == "[::1]" || host == "::1";
}

std::string ConfigToText(const v1::DaemonConfig& config) {
  v1::DaemonConfig full = config;
  SetDefaultsExplicitly(full);
  std::string text;
  google::protobuf::TextFormat::PrintToString(full, &text);
  return text;
}

}  // namespace kvcache::kvstore
