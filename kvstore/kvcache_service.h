// The gRPC services of a kvcached node: the KvCache data plane and the Admin
// plane, both over one storage engine (TieredStore: memory, then NVMe when
// configured).
//
// Handlers validate every request against the configured limits before
// touching the store, and answer with the status codes documented in
// proto/kvcache/v1/kvcache.proto. Thread-safe: gRPC calls handlers from many
// threads at once.
#ifndef KVCACHE_KVSTORE_KVCACHE_SERVICE_H_
#define KVCACHE_KVSTORE_KVCACHE_SERVICE_H_

#include <atomic>
#include <cstdint>
#include <memory>
#include <string>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/functional/function_ref.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "kvcache/v1/config.pb.h"
#include "kvcache/v1/kvcache.grpc.pb.h"
#include "kvstore/access_control.h"
#include "kvstore/byte_budget.h"
#include "kvstore/chunk_leases.h"
#include "kvstore/nccl_links.h"
#include "kvstore/stream_watchdog.h"
#include "kvstore/tiered_store.h"

namespace kvcache::kvstore {

// What both services share: the configuration, the store and the counters.
class NodeState {
 public:
  // Opens the store the configuration describes; fails (with TieredStore's
  // message) if the NVMe tier cannot be opened.
  static absl::StatusOr<std::unique_ptr<NodeState>> Create(
      v1::DaemonConfig config);

  const v1::DaemonConfig& config() const { return config_; }
  TieredStore& store() { return *store_; }
  const TieredStore& store() const { return *store_; }
  absl::Time started() const { return started_; }
  const std::string& node_id() const { return node_id_; }

  // Same-host workers' reservations of CPU-tier chunks (Locate).
  ChunkLeases& leases() { return leases_; }
  // Who may call, and the namespaces their keys live in.
  AccessControl& access() { return access_; }
  const AccessControl& access() const { return access_; }
  // NCCL links belong to the caller (Caller::name) that opened them; only
  // it sends over or closes them.
  void SetNcclLinkOwner(uint64_t link_id, std::string caller);
  bool OwnsNcclLink(const std::string& caller, uint64_t link_id) const;
  // Bytes Put streams may buffer (limits.max_put_bytes_in_flight).
  ByteBudget& put_budget() { return put_budget_; }
  // Cancels Put and Get streams idle past limits.stream_idle_timeout_seconds.
  StreamWatchdog& watchdog() { return watchdog_; }
  // NCCL links to workers' GPUs; null without a GPU tier, or with
  // gpu_tier.max_nccl_links 0.
  NcclLinks* nccl_links() { return nccl_links_.get(); }
  // Where workers on this host get the shared CPU tier; empty until the
  // daemon serves it (and when shared_memory.enabled is off).
  std::string shared_memory_socket() const;
  void set_shared_memory_socket(std::string path);
  // Where workers on this host look up prefixes without a gRPC call; empty
  // until the daemon serves it.
  std::string local_lookup_socket() const;
  void set_local_lookup_socket(std::string path);
  // How many leading stored keys the node holds, counted as a lookup's hits
  // and misses, showing `on_held` each chunk of the prefix in order: Lookup,
  // and the local lookup socket's. Chunks are looked up one by one, so one
  // evicted meanwhile shortens the prefix rather than leaving a hole in it.
  size_t CountHeld(
      absl::Span<const absl::string_view> stored_keys,
      absl::FunctionRef<void(size_t, const LocatedChunk&)> on_held =
          [](size_t, const LocatedChunk&) {});

  bool draining() const { return draining_.load(); }
  void StartDraining() { draining_.store(true); }
  // Draining and nothing left to hand to other nodes; see NodeInfo.drained.
  bool drained() const;

  // Counters reported by Stats; relaxed atomics, read as a loose snapshot.
  std::atomic<uint64_t> lookups{0};
  std::atomic<uint64_t> hits{0};
  std::atomic<uint64_t> misses{0};
  std::atomic<uint64_t> puts{0};
  std::atomic<uint64_t> bytes_in{0};
  std::atomic<uint64_t> bytes_out{0};
  // Put headers refused because Puts in flight held the whole budget.
  std::atomic<uint64_t> refused_puts{0};
  // In a cluster: chunks copied to peers to restore their replica count, and
  // chunks handed to new owners while draining.
  std::atomic<uint64_t> repaired_chunks{0};
  std::atomic<uint64_t> handoff_chunks{0};
  // Set by the cluster member once a drained node's chunks are all held by
  // their new owners.
  std::atomic<bool> handoff_done{false};

 private:
  NodeState(v1::DaemonConfig config, std::unique_ptr<TieredStore> store);

  const v1::DaemonConfig config_;
  const std::string node_id_;
  const absl::Time started_;
  std::unique_ptr<TieredStore> store_;
  ChunkLeases leases_;
  AccessControl access_;
  ByteBudget put_budget_;
  StreamWatchdog watchdog_;
  std::unique_ptr<NcclLinks> nccl_links_;
  mutable absl::Mutex nccl_owners_mu_;
  absl::flat_hash_map<uint64_t, std::string> nccl_link_owners_
      ABSL_GUARDED_BY(nccl_owners_mu_);
  mutable absl::Mutex socket_mu_;
  std::string shared_memory_socket_ ABSL_GUARDED_BY(socket_mu_);
  std::string local_lookup_socket_ ABSL_GUARDED_BY(socket_mu_);
  std::atomic<bool> draining_{false};
};

// Get runs on gRPC's callback API with raw messages, so that a chunk's
// bytes go to gRPC as slices of the tier's memory, never copied into a
// message, and no thread waits on a write. Lookup and LookupEach, short
// calls on every request's path, answer on gRPC's own thread instead of
// being handed to a synchronous one. Every other call is synchronous.
class KvCacheService final
    : public v1::KvCache::WithCallbackMethod_Lookup<
          v1::KvCache::WithCallbackMethod_LookupEach<
              v1::KvCache::WithRawCallbackMethod_Get<v1::KvCache::Service>>> {
 public:
  explicit KvCacheService(NodeState& node) : node_(node) {}

  grpc::ServerUnaryReactor* Lookup(grpc::CallbackServerContext* context,
                                   const v1::LookupRequest* request,
                                   v1::LookupResponse* response) override;
  grpc::Status Put(grpc::ServerContext* context,
                   grpc::ServerReader<v1::PutRequest>* reader,
                   v1::PutResponse* response) override;
  grpc::ServerWriteReactor<grpc::ByteBuffer>* Get(
      grpc::CallbackServerContext* context,
      const grpc::ByteBuffer* request) override;
  grpc::Status Delete(grpc::ServerContext* context,
                      const v1::DeleteRequest* request,
                      v1::DeleteResponse* response) override;
  grpc::Status Pin(grpc::ServerContext* context, const v1::PinRequest* request,
                   v1::PinResponse* response) override;
  grpc::Status Unpin(grpc::ServerContext* context,
                     const v1::UnpinRequest* request,
                     v1::UnpinResponse* response) override;
  grpc::Status Stats(grpc::ServerContext* context,
                     const v1::StatsRequest* request,
                     v1::StatsResponse* response) override;
  grpc::ServerUnaryReactor* LookupEach(
      grpc::CallbackServerContext* context,
      const v1::LookupEachRequest* request,
      v1::LookupEachResponse* response) override;
  grpc::Status Locate(grpc::ServerContext* context,
                      const v1::LocateRequest* request,
                      v1::LocateResponse* response) override;
  grpc::Status Release(grpc::ServerContext* context,
                       const v1::ReleaseRequest* request,
                       v1::ReleaseResponse* response) override;
  grpc::Status SendOverNccl(grpc::ServerContext* context,
                            const v1::SendOverNcclRequest* request,
                            v1::SendOverNcclResponse* response) override;

 private:
  NodeState& node_;
};

class AdminService final : public v1::Admin::Service {
 public:
  explicit AdminService(NodeState& node) : node_(node) {}

  grpc::Status NodeInfo(grpc::ServerContext* context,
                        const v1::NodeInfoRequest* request,
                        v1::NodeInfoResponse* response) override;
  grpc::Status GetTierUsage(grpc::ServerContext* context,
                            const v1::TierUsageRequest* request,
                            v1::TierUsageResponse* response) override;
  grpc::Status GetConfig(grpc::ServerContext* context,
                         const v1::GetConfigRequest* request,
                         v1::GetConfigResponse* response) override;
  grpc::Status Drain(grpc::ServerContext* context,
                     const v1::DrainRequest* request,
                     v1::DrainResponse* response) override;
  grpc::Status OpenNcclLink(grpc::ServerContext* context,
                            const v1::OpenNcclLinkRequest* request,
                            v1::OpenNcclLinkResponse* response) override;
  grpc::Status CloseNcclLink(grpc::ServerContext* context,
                             const v1::CloseNcclLinkRequest* request,
                             v1::CloseNcclLinkResponse* response) override;

 private:
  NodeState& node_;
};

}  // namespace kvcache::kvstore

#endif  // KVCACHE_KVSTORE_KVCACHE_SERVICE_H_
