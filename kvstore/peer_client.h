// The calls a node makes to its peers in a cluster: which chunks a peer
// holds, and copying chunks from this node's store into it through the
// peer's ordinary Put API (so the peer checks them like any client's).
//
// Channels are opened on first use and kept; a peer that has died fails its
// calls fast with UNAVAILABLE. When the node has a tls section, peers are
// dialled over mutual TLS: the node presents its own certificate and the
// peer's must chain to the node's CA and name the address dialled. Not
// thread-safe: one repair loop uses it.
#ifndef KVCACHE_KVSTORE_PEER_CLIENT_H_
#define KVCACHE_KVSTORE_PEER_CLIENT_H_

#include <memory>
#include <string>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "kvcache/v1/config.pb.h"
#include "kvcache/v1/kvcache.grpc.pb.h"
#include "kvstore/tiered_store.h"
#include "transfer/tls_credentials.h"

namespace kvcache::kvstore {

// The files a node's tls section names, with the config fields that named
// them (for error messages).
transfer::TlsFiles NodeTlsFiles(const v1::TlsConfig& tls);

// How a node proves itself to its peers.
struct PeerCredentials {
  // Mutual TLS with the node's certificate (reloaded with it), or plaintext
  // when the node has no tls section.
  std::shared_ptr<grpc::ChannelCredentials> channel;
  // Sent as `authorization: Bearer` on every call when not empty.
  std::string token;
};

// The node's PeerCredentials from its configuration: tls, and the token in
// access.peer_token_file. Errors name the field and file that failed.
absl::StatusOr<PeerCredentials> PeerCredentialsOf(
    const v1::DaemonConfig& config);

class PeerClient {
 public:
  // Holds waits at most `lookup_timeout`, Copy `copy_timeout`.
  PeerClient(PeerCredentials credentials, absl::Duration lookup_timeout,
             absl::Duration copy_timeout)
      : credentials_(std::move(credentials)),
        lookup_timeout_(lookup_timeout),
        copy_timeout_(copy_timeout) {}

  // For each of `keys`, whether the peer at `address` holds it. Errors are
  // the peer's (UNAVAILABLE naming it when it cannot be reached).
  absl::StatusOr<std::vector<bool>> Holds(const std::string& address,
                                          const std::vector<std::string>& keys);

  // Copies the chunks under `keys` from `store` to the peer, keeping their
  // pins and owners. Keys the store no longer holds are skipped. Returns how
  // many were copied; on error some before the failing one may have been.
  absl::StatusOr<size_t> Copy(const std::string& address,
                              const std::vector<std::string>& keys,
                              TieredStore& store);

 private:
  v1::KvCache::Stub& StubFor(const std::string& address);
  // Sets the deadline and the token on a call's context.
  void Prepare(grpc::ClientContext& context, absl::Duration timeout) const;

  const PeerCredentials credentials_;
  const absl::Duration lookup_timeout_;
  const absl::Duration copy_timeout_;
  absl::flat_hash_map<std::string, std::unique_ptr<v1::KvCache::Stub>> stubs_;
};

}  // namespace kvcache::kvstore

#endif  // KVCACHE_KVSTORE_PEER_CLIENT_H_
