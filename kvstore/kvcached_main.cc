// kvcached: the kvcache storage daemon.
//
//   kvcached [--config=FILE] [--set=TEXTPROTO]... [--listen=HOST:PORT]
//            [--port_file=FILE]
//
// Serves the KvCache and Admin APIs, gRPC health checking and server
// reflection on one port, and Prometheus metrics on metrics_address if set.
// With a `cluster` section it joins that cluster (kvstore/cluster_member.h).
// SIGTERM or SIGINT starts a graceful shutdown: it leaves the cluster, new
// calls are refused, calls
// in flight get shutdown_grace_seconds to end, then chunks held only in
// memory are written to the NVMe tier (when configured) so they survive the
// restart.
#include <grpcpp/ext/proto_server_reflection_plugin.h>
#include <grpcpp/grpcpp.h>
#include <grpcpp/health_check_service_interface.h>
#include <grpcpp/resource_quota.h>
#include <signal.h>
#include <unistd.h>

#include <cstdio>
#include <fstream>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/strip.h"
#include "absl/time/time.h"
#include "kvstore/cluster_member.h"
#include "kvstore/daemon_config.h"
#include "kvstore/gpu_arena.h"
#include "kvstore/kvcache_service.h"
#include "kvstore/malloc_options.h"
#include "kvstore/metrics_http_server.h"
#include "kvstore/peer_client.h"
#include "kvstore/prometheus_metrics.h"
#include "transfer/grpc_stream.h"
#include "transfer/local_lookup.h"
#include "transfer/shared_region.h"
#include "transfer/tls_credentials.h"

namespace kvcache::kvstore {
namespace {

struct Flags {
  std::string config_path;
  std::vector<std::string> overrides;
  std::string port_file;
};

constexpr char kUsage[] =
    "usage: kvcached [--config=FILE] [--set=TEXTPROTO]... "
    "[--listen=HOST:PORT] [--port_file=FILE]\n"
    "  --config     text-format DaemonConfig (proto/kvcache/v1/config.proto)\n"
    "  --set        override fields, e.g. --set='cpu_tier { capacity_bytes: "
    "1073741824 }'\n"
    "  --listen     shorthand for --set='listen_address: \"HOST:PORT\"'\n"
    "  --port_file  write the bound port here once serving (for port 0)\n";

bool ParseFlags(int argc, char** argv, Flags& flags) {
  for (int i = 1; i < argc; ++i) {
    absl::string_view value = argv[i];
    if (absl::ConsumePrefix(&value, "--config=")) {
      flags.config_path = std::string(value);
    } else if (absl::ConsumePrefix(&value, "--port_file=")) {
      flags.port_file = std::string(value);
    } else if (absl::ConsumePrefix(&value, "--set=")) {
      flags.overrides.push_back(std::string(value));
    } else if (absl::ConsumePrefix(&value, "--listen=")) {
      flags.overrides.push_back(
          absl::StrCat("listen_address: \"", value, "\""));
    } else {
      std::fprintf(stderr, "kvcached: unknown argument '%s'\n%s", argv[i],
                   kUsage);
      return false;
    }
  }
  return true;
}

// Replaces the port in "host:port".
std::string WithPort(const std::string& address, int port) {
  return absl::StrCat(address.substr(0, address.rfind(':')), ":", port);
}

// Where peers and clients reach this node: the configured address, else the
// bound one with a wildcard host replaced by the host name.
std::string AdvertiseAddress(const v1::DaemonConfig& config, int port) {
  if (!config.cluster().advertise_address().empty()) {
    return config.cluster().advertise_address();
  }
  const std::string host =
      config.listen_address().substr(0, config.listen_address().rfind(':'));
  if (host != "0.0.0.0" && host != "[::]") return WithPort(host + ":0", port);
  char name[256] = {};
  gethostname(name, sizeof(name) - 1);
  return absl::StrCat(name, ":", port);
}

// What keeps clients from growing the node without bound: a thread per
// call in progress, out of max_concurrent_calls (beyond it gRPC answers
// RESOURCE_EXHAUSTED); gRPC's own buffers within grpc_memory_bytes; a
// stream limit per connection; and keepalive pings that find dead clients
// so their calls end.
void ApplyConnectionLimits(const v1::LimitsConfig& limits,
                           grpc::ServerBuilder& builder) {
  grpc::ResourceQuota quota("kvcached");
  quota.SetMaxThreads(static_cast<int>(limits.max_concurrent_calls()));
  quota.Resize(limits.grpc_memory_bytes());
  builder.SetResourceQuota(quota);
  builder.AddChannelArgument(
      GRPC_ARG_MAX_CONCURRENT_STREAMS,
      static_cast<int>(limits.max_streams_per_connection()));
  builder.AddChannelArgument(
      GRPC_ARG_KEEPALIVE_TIME_MS,
      static_cast<int>(limits.keepalive_time_seconds()) * 1000);
  builder.AddChannelArgument(
      GRPC_ARG_KEEPALIVE_TIMEOUT_MS,
      static_cast<int>(limits.keepalive_timeout_seconds()) * 1000);
  // Clients may ping as often as every 10 s, even between calls, without
  // being cut off as abusive.
  builder.AddChannelArgument(GRPC_ARG_KEEPALIVE_PERMIT_WITHOUT_CALLS, 1);
  builder.AddChannelArgument(
      GRPC_ARG_HTTP2_MIN_RECV_PING_INTERVAL_WITHOUT_DATA_MS, 10000);
}

// The credentials of the listening port: TLS as the tls section says, with
// its files read again every reload_interval_seconds, else plaintext.
absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> ListenCredentials(
    const v1::TlsConfig& tls) {
  if (tls.cert_file().empty()) return grpc::InsecureServerCredentials();
  const transfer::TlsFiles files = NodeTlsFiles(tls);
  // A CA without mTLS still asks for certificates (without insisting), so
  // a client can identify itself by one instead of a token.
  const transfer::ClientCertificates client_certificates =
      tls.require_client_certificate() ? transfer::ClientCertificates::kRequired
      : tls.ca_file().empty()
          ? transfer::ClientCertificates::kNotRequested
          : transfer::ClientCertificates::kVerifiedIfPresented;
  absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> credentials =
      transfer::ServerCredentials(files, client_certificates,
                                  absl::Seconds(tls.reload_interval_seconds()));
  if (!credentials.ok()) return credentials.status();
  absl::StatusOr<std::string> cert =
      transfer::ReadCredentialFile(files.cert_file, files.cert_option);
  if (cert.ok()) {
    // Served anyway: a renewed certificate may arrive before the next
    // reload, and clients say clearly why they cannot connect meanwhile.
    if (absl::Status s = transfer::CheckValidNow(*cert, files.cert_option);
        !s.ok()) {
      std::fprintf(stderr, "kvcached: WARNING: %s; clients will refuse it\n",
                   std::string(s.message()).c_str());
    }
  }
  std::fprintf(stderr,
               "kvcached: TLS on, client certificates %s, files read again "
               "every %us\n",
               tls.require_client_certificate() ? "required (mutual TLS)"
               : tls.ca_file().empty()          ? "not requested"
                                                : "verified if presented",
               tls.reload_interval_seconds());
  return credentials;
}

// Plaintext is for one trusted host; anywhere else, anyone who reaches the
// port reads and writes every chunk and sees tokens in the clear. Said so
// it cannot be missed in a log.
void WarnIfPlaintextOffLoopback(const v1::DaemonConfig& config,
                                const std::string& address) {
  if (!config.tls().cert_file().empty()) return;
  if (IsLoopbackAddress(address)) return;
  std::fprintf(
      stderr,
      "kvcached: "
      "*****************************************************************\n"
      "kvcached: WARNING: serving PLAINTEXT gRPC on %s, not a loopback "
      "address.\n"
      "kvcached: Anyone who can reach it can read and write cached chunks, "
      "and\n"
      "kvcached: tokens and chunks cross the network unencrypted. Plaintext "
      "is\n"
      "kvcached: for a single trusted host: listen on 127.0.0.1, or set "
      "tls {\n"
      "kvcached: cert_file key_file ca_file } (deploy/make_certs.sh makes "
      "them).\n"
      "kvcached: "
      "*****************************************************************\n",
      address.c_str());
}

// With no tenants or admins configured every caller may read, overwrite
// and delete every chunk and drain the node: fine on one trusted host only.
void WarnIfOpenOffLoopback(const NodeState& node, const std::string& address) {
  if (node.access().enabled() || IsLoopbackAddress(address)) return;
  std::fprintf(
      stderr,
      "kvcached: WARNING: no access section: every caller that reaches %s\n"
      "kvcached: acts as admin and can read, replace and delete every "
      "chunk.\n"
      "kvcached: List tenants (and admins) under access { } with their token\n"
      "kvcached: hashes or certificate identities.\n",
      address.c_str());
}

// Quotas that add up to more than a tier holds cannot all be honoured: a
// tenant within its quota may then find the tier full of others' chunks
// that are within theirs, and its chunk goes a tier down.
void WarnIfQuotasOvercommit(const v1::DaemonConfig& config) {
  uint64_t gpu = 0, cpu = 0, nvme = 0;
  for (const v1::TenantConfig& tenant : config.access().tenants()) {
    gpu += tenant.gpu_quota_bytes();
    cpu += tenant.cpu_quota_bytes();
    nvme += tenant.nvme_quota_bytes();
  }
  const v1::NvmeTierConfig& disk = config.nvme_tier();
  const struct {
    const char* tier;
    uint64_t quotas;
    uint64_t capacity;
  } tiers[] = {
      {"gpu", gpu, config.gpu_tier().capacity_bytes()},
      {"cpu", cpu, config.cpu_tier().capacity_bytes()},
      {"nvme", nvme,
       disk.data_dir().empty() ? 0 : disk.slab_bytes() * disk.slab_count()},
  };
  for (const auto& t : tiers) {
    if (t.capacity == 0 || t.quotas <= t.capacity) continue;
    std::fprintf(stderr,
                 "kvcached: WARNING: tenants' %s_quota_bytes add up to %llu "
                 "bytes, more than the %s tier's %llu: a tenant within its "
                 "quota may find that tier full\n",
                 t.tier, static_cast<unsigned long long>(t.quotas), t.tier,
                 static_cast<unsigned long long>(t.capacity));
  }
}

int Run(int argc, char** argv) {
  Flags flags;
  if (!ParseFlags(argc, argv, flags)) return 2;
  KeepLargeBlocksForReuse();
  absl::StatusOr<v1::DaemonConfig> config =
      LoadConfig(flags.config_path, flags.overrides);
  if (!config.ok()) {
    std::fprintf(stderr, "kvcached: %s\n", config.status().ToString().c_str());
    return 2;
  }

  // Signals are taken by sigwait below, so block them before gRPC starts
  // threads that would otherwise inherit the default handlers.
  sigset_t stop_signals;
  sigemptyset(&stop_signals);
  sigaddset(&stop_signals, SIGTERM);
  sigaddset(&stop_signals, SIGINT);
  pthread_sigmask(SIG_BLOCK, &stop_signals, nullptr);

  absl::StatusOr<std::unique_ptr<NodeState>> node_state =
      NodeState::Create(*config);
  if (!node_state.ok()) {
    std::fprintf(stderr, "kvcached: %s\n",
                 node_state.status().ToString().c_str());
    return 1;
  }
  NodeState& node = **node_state;
  KvCacheService data_plane(node);
  AdminService admin_plane(node);

  std::unique_ptr<MetricsHttpServer> metrics;
  if (!config->metrics_address().empty()) {
    MetricsHttpServer::Options options;
    if (!config->access().metrics_token_sha256().empty()) {
      options.authorize = [&node](absl::string_view authorization) {
        return node.access().MetricsAuthorized(authorization);
      };
    }
    absl::StatusOr<std::unique_ptr<MetricsHttpServer>> started =
        MetricsHttpServer::Start(
            config->metrics_address(),
            [&node] { return RenderPrometheusMetrics(node); }, options);
    if (!started.ok()) {
      std::fprintf(stderr, "kvcached: %s\n",
                   started.status().ToString().c_str());
      return 1;
    }
    metrics = std::move(*started);
    std::fprintf(stderr, "kvcached: metrics on %s\n",
                 WithPort(config->metrics_address(), metrics->port()).c_str());
  }

  grpc::EnableDefaultHealthCheckService(true);
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  grpc::ServerBuilder builder;
  int bound_port = 0;
  absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> credentials =
      ListenCredentials(config->tls());
  if (!credentials.ok()) {
    std::fprintf(stderr, "kvcached: %s\n",
                 credentials.status().ToString().c_str());
    return 2;
  }
  builder.AddListeningPort(config->listen_address(), *credentials, &bound_port);
  // Put data arrives in pieces; a piece of up to limits.get_piece_bytes plus
  // framing must always fit, whatever the client's piece size.
  builder.SetMaxReceiveMessageSize(8 << 20);
  transfer::SetChunkStreamWindow(builder);
  ApplyConnectionLimits(config->limits(), builder);
  builder.RegisterService(&data_plane);
  builder.RegisterService(&admin_plane);
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  if (!server || bound_port == 0) {
    std::fprintf(stderr, "kvcached: cannot listen on %s\n",
                 config->listen_address().c_str());
    return 1;
  }
  const std::string address = WithPort(config->listen_address(), bound_port);
  WarnIfPlaintextOffLoopback(*config, address);
  WarnIfOpenOffLoopback(node, address);
  WarnIfQuotasOvercommit(*config);
  if (!flags.port_file.empty()) {
    // Written to a temporary name and renamed, so a reader never sees a
    // half-written port.
    const std::string tmp = flags.port_file + ".tmp";
    std::ofstream(tmp) << bound_port << "\n";
    std::rename(tmp.c_str(), flags.port_file.c_str());
  }
  std::fprintf(
      stderr,
      "kvcached: node=%s listening=%s cpu_tier_bytes=%llu "
      "max_chunk_bytes=%llu\n",
      node.node_id().c_str(), address.c_str(),
      static_cast<unsigned long long>(config->cpu_tier().capacity_bytes()),
      static_cast<unsigned long long>(config->limits().max_chunk_bytes()));
  if (const GpuArena* gpu = node.store().gpu_arena(); gpu != nullptr) {
    std::fprintf(stderr, "kvcached: GPU tier of %llu bytes on device %d (%s)\n",
                 static_cast<unsigned long long>(gpu->capacity_bytes()),
                 gpu->device(), gpu->pci_bus_id().c_str());
  }

  // Workers on this host map the CPU tier through this socket.
  std::unique_ptr<transfer::SharedRegionServer> shared_region;
  std::unique_ptr<transfer::LocalLookupServer> local_lookups;
  if (config->shared_memory().enabled()) {
    const std::string path =
        config->shared_memory().socket_path().empty()
            ? absl::StrCat("/tmp/kvcached-", bound_port, ".sock")
            : config->shared_memory().socket_path();
    const HostArena& arena = node.store().cpu_arena();
    absl::StatusOr<std::unique_ptr<transfer::SharedRegionServer>> started =
        transfer::SharedRegionServer::Start(
            path, arena.fd(), arena.capacity_bytes(), arena.id(),
            {config->shared_memory().allowed_uids().begin(),
             config->shared_memory().allowed_uids().end()});
    if (started.ok()) {
      shared_region = *std::move(started);
      node.set_shared_memory_socket(path);
      std::fprintf(stderr, "kvcached: shared CPU tier on %s\n", path.c_str());
      // The same users look up prefixes beside it without a gRPC call.
      absl::StatusOr<std::unique_ptr<transfer::LocalLookupServer>> lookups =
          transfer::LocalLookupServer::Start(
              path + ".lookup", node.node_id(),
              [&node](absl::Span<const absl::string_view> keys) {
                return node.CountHeld(keys);
              },
              {.allowed_uids = {config->shared_memory().allowed_uids().begin(),
                                config->shared_memory().allowed_uids().end()}});
      if (lookups.ok()) {
        local_lookups = *std::move(lookups);
        node.set_local_lookup_socket(local_lookups->socket_path());
      } else {
        std::fprintf(stderr, "kvcached: no local lookups: %s\n",
                     lookups.status().ToString().c_str());
      }
    } else {
      // Same-host workers then fetch over gRPC like remote ones.
      std::fprintf(stderr, "kvcached: CPU tier not shared: %s\n",
                   started.status().ToString().c_str());
    }
  }

  std::unique_ptr<ClusterMember> cluster;
  if (!config->cluster().etcd_endpoints().empty()) {
    absl::StatusOr<PeerCredentials> peer_credentials =
        PeerCredentialsOf(*config);
    absl::StatusOr<std::shared_ptr<grpc::ChannelCredentials>> etcd_credentials =
        EtcdCredentialsOf(config->cluster());
    for (const absl::Status& s :
         {peer_credentials.status(), etcd_credentials.status()}) {
      if (!s.ok()) {
        std::fprintf(stderr, "kvcached: %s\n", s.ToString().c_str());
        return 2;
      }
    }
    cluster = std::make_unique<ClusterMember>(
        node, AdvertiseAddress(*config, bound_port),
        *std::move(peer_credentials), *std::move(etcd_credentials));
  }

  int signal_number = 0;
  sigwait(&stop_signals, &signal_number);
  std::fprintf(stderr, "kvcached: signal=%d shutting down, grace=%us\n",
               signal_number, config->shutdown_grace_seconds());
  // Leave the cluster first, so clients send new calls elsewhere while the
  // ones in flight finish.
  cluster.reset();
  server->GetHealthCheckService()->SetServingStatus(false);
  server->Shutdown(std::chrono::system_clock::now() +
                   std::chrono::seconds(config->shutdown_grace_seconds()));
  server->Wait();
  node.set_shared_memory_socket("");
  shared_region.reset();
  if (absl::Status s = node.store().Flush(); !s.ok()) {
    std::fprintf(stderr, "kvcached: some chunks were not kept: %s\n",
                 s.ToString().c_str());
  }
  std::fprintf(stderr, "kvcached: stopped\n");
  return 0;
}

}  // namespace
}  // namespace kvcache::kvstore

int main(int argc, char** argv) { return kvcache::kvstore::Run(argc, argv); }
