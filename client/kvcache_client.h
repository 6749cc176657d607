// The C++ client an inference worker (or an operator tool) links to talk to a
// kvcached node.
//
// A KvCacheClient holds one gRPC channel; it is thread-safe and meant to be
// shared. Every call has a deadline (ClientOptions::timeout); errors are as
// ChunkStore describes.
//
// Credentials: TLS when ClientOptions::ca_file is set (mutual TLS with
// cert_file and key_file), plaintext otherwise (a node on a trusted host);
// a token, when given, goes with every call as `authorization: Bearer`.
// Connect reads every file once and names the option and file that failed;
// a failed handshake is reported as such, with the credential to check.
//
// Chunk keys come from ChunkKeysForTokens (client/chunk_key.h).
#ifndef KVCACHE_CLIENT_KVCACHE_CLIENT_H_
#define KVCACHE_CLIENT_KVCACHE_CLIENT_H_

#include <grpcpp/grpcpp.h>

#include <atomic>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "absl/types/span.h"
#include "client/chunk_key.h"
#include "client/chunk_store.h"
#include "kvcache/v1/kvcache.grpc.pb.h"
#include "transfer/local_lookup.h"

namespace kvcache {

struct ClientOptions {
  // host:port of the kvcached node.
  std::string address = "127.0.0.1:50051";
  // Deadline of each call; a Put or Get of many large chunks needs room.
  absl::Duration timeout = absl::Seconds(30);
  // How long Connect waits for the node to answer.
  absl::Duration connect_timeout = absl::Seconds(5);
  // Connect gives up at the first failed attempt (a refused connection, an
  // unknown host) instead of retrying until connect_timeout: for a person at
  // a terminal, not for a worker riding out a node's restart.
  bool fail_fast = false;
  // Size of the data messages a Put sends.
  size_t piece_bytes = 1 << 20;

  // PEM CA bundle the node's certificate must chain to; setting it turns
  // TLS on. Empty: plaintext.
  std::string ca_file;
  // PEM client certificate and its private key, for nodes that require
  // client certificates (mutual TLS) or identify clients by them.
  std::string cert_file;
  std::string key_file;
  // Name the node's certificate must carry, when it is not the host in
  // `address` (e.g. dialling by an IP address the certificate does not
  // list). Empty: the host in `address`.
  std::string server_name;
  // Bearer token sent with every call, or a file holding it (read once by
  // Connect; a trailing newline is dropped). At most one of the two.
  std::string token;
  std::string token_file;
  // A shared namespace (e.g. "public") this client's keys live in, on a
  // node whose access section grants it to the caller's tenant; empty: the
  // tenant's own namespace.
  std::string key_namespace;
  // CountCached asks a node on this host over its local lookup socket
  // (NodeInfo.local_lookup_socket) instead of a gRPC call.
  bool local_lookups = true;
};

class KvCacheClient : public ChunkStore {
 public:
  // Opens a channel and waits until the node answers. UNAVAILABLE (naming the
  // address) if it does not within connect_timeout, saying "TLS handshake
  // with ADDRESS failed" and what to check when TLS is what failed; a
  // credential file that cannot be used is NOT_FOUND, PERMISSION_DENIED,
  // INVALID_ARGUMENT or FAILED_PRECONDITION (expired) naming the option and
  // the file.
  static absl::StatusOr<std::unique_ptr<KvCacheClient>> Connect(
      const ClientOptions& options);

  absl::StatusOr<LookupResult> Lookup(absl::Span<const ChunkKey> keys) override;
  // How many leading keys the node holds, without their infos: the
  // cheapest lookup, for a caller that needs only the prefix's length. On
  // the node's host it goes over the node's local lookup socket (found at
  // the first call; gRPC if that fails).
  absl::StatusOr<size_t> CountCached(absl::Span<const ChunkKey> keys);
  // CountCached calls answered over the local lookup socket.
  uint64_t local_lookups() const { return local_lookups_.load(); }

  // For each key on its own (not only a leading prefix): its info if the
  // node holds it, else an entry with only the key set (tier
  // TIER_UNSPECIFIED). Does not count towards the node's hits and misses.
  absl::StatusOr<std::vector<v1::ChunkInfo>> LookupEach(
      absl::Span<const ChunkKey> keys);

  // Sends the chunks in one stream, in order; chunks before a failing one
  // may have been stored.
  absl::Status Put(absl::Span<const ChunkToPut> chunks,
                   const PutOptions& options = {}) override;
  // Fetches the chunks in one stream.
  absl::StatusOr<std::vector<FetchedChunk>> Get(
      absl::Span<const ChunkKey> keys) override;
  // Like Get, but hands each chunk to `on_chunk` (with its index in `keys`)
  // as soon as all of it arrived and passed its CRC32C check, so the caller
  // works on chunk i while chunk i + 1 is in flight. An error from
  // `on_chunk` cancels the stream and is returned.
  absl::Status GetStream(
      absl::Span<const ChunkKey> keys,
      const std::function<absl::Status(size_t, FetchedChunk)>& on_chunk);

  // Same-host transfer (see Locate in kvcache.proto): where the leading
  // cached chunks of `keys` lie in the node's shared CPU tier, or in its GPU
  // tier if `gpu_region_id` names the GPU region this process opened,
  // reserved for `lease`. Release the lease once the bytes are copied.
  // The node reads at most `max_read_bytes` (0: no limit) up from NVMe in
  // one call (LocateResponse.read_limited).
  absl::StatusOr<v1::LocateResponse> Locate(
      absl::Span<const ChunkKey> keys, absl::Duration lease,
      absl::string_view gpu_region_id = {}, uint64_t max_read_bytes = 0);
  // False if the lease had expired (its chunks may have been reused).
  absl::StatusOr<bool> Release(uint64_t lease_id);
  // GPU to GPU (see OpenNcclLink in kvcache.proto): asks the node to join
  // the NCCL link `nccl_id` names, waiting up to `join_timeout` for this
  // side; then to send the leading chunks of `keys` it holds over link
  // `link_id`, at most `max_bytes` of them, for this side to receive in the
  // order and sizes answered.
  absl::StatusOr<v1::OpenNcclLinkResponse> OpenNcclLink(
      absl::string_view nccl_id, absl::Duration join_timeout);
  absl::StatusOr<bool> CloseNcclLink(uint64_t link_id);
  absl::StatusOr<v1::SendOverNcclResponse> SendOverNccl(
      uint64_t link_id, absl::Span<const ChunkKey> keys, uint64_t max_bytes);

  absl::StatusOr<uint32_t> Delete(absl::Span<const ChunkKey> keys) override;
  absl::StatusOr<absl::Time> Pin(absl::Span<const ChunkKey> keys,
                                 absl::Duration ttl) override;
  absl::Status Unpin(absl::Span<const ChunkKey> keys) override;

  absl::StatusOr<v1::StatsResponse> Stats();
  absl::StatusOr<v1::NodeInfoResponse> NodeInfo();
  absl::StatusOr<v1::TierUsageResponse> TierUsage();
  absl::StatusOr<std::string> Config();
  // Stops the node from taking new chunks; returns how many it holds.
  absl::StatusOr<uint64_t> Drain();

  const ClientOptions& options() const { return options_; }

 private:
  KvCacheClient(const ClientOptions& options, std::string token,
                std::shared_ptr<grpc::Channel> channel);

  // Prefixes a failed call's status with the call and the address, and
  // says so when the failure is a TLS handshake.
  absl::Status Annotate(const grpc::Status& status,
                        absl::string_view call) const;

  // A context carrying the call deadline and the token.
  std::unique_ptr<grpc::ClientContext> NewContext() const;
  // Lookup's call (an empty response for no keys), with or without the
  // chunks' infos.
  absl::StatusOr<v1::LookupResponse> LookupCall(absl::Span<const ChunkKey> keys,
                                                bool count_only);
  // Fills a repeated keys field.
  template <typename Request>
  static void AddKeys(absl::Span<const ChunkKey> keys, Request& request);

  // The node's local lookup socket and this caller's namespace there, if
  // the node runs on this host; found once (null: gRPC).
  struct LocalLookup {
    std::unique_ptr<transfer::LocalLookupClient> client;
    std::string key_namespace;
  };
  std::shared_ptr<LocalLookup> FindLocalLookup();
  void DropLocalLookup(const std::shared_ptr<LocalLookup>& broken);

  ClientOptions options_;
  absl::Mutex local_mu_;
  bool local_searched_ ABSL_GUARDED_BY(local_mu_) = false;
  std::shared_ptr<LocalLookup> local_ ABSL_GUARDED_BY(local_mu_);
  std::atomic<uint64_t> local_lookups_{0};
  // "Bearer <token>", or empty when no token is given.
  std::string authorization_;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<v1::KvCache::Stub> data_;
  std::unique_ptr<v1::Admin::Stub> admin_;
};

}  // namespace kvcache

#endif  // KVCACHE_CLIENT_KVCACHE_CLIENT_H_
