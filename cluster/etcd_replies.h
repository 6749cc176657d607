// Checks of what etcd answers before anything uses it, apart from the network
// so that they can be tested and fuzzed on their own.
//
// Protobuf already rules out wrong types, but not wrong contents: a server
// that is not etcd, a proxy, or a bug can send keys outside the range asked
// for, events of an unknown type, a partial range, a lease without an id, or
// a watch response for another watch. Entries that are wrong on their own
// are skipped and counted; a reply that is wrong as a whole is an error.
// Nothing a reply holds can throw or crash.
#ifndef KVCACHE_CLUSTER_ETCD_REPLIES_H_
#define KVCACHE_CLUSTER_ETCD_REPLIES_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "etcd/etcdserver/etcdserverpb/rpc.pb.h"

namespace kvcache::cluster {

struct KeyValue {
  std::string key;
  std::string value;
};

// Entries of a reply that were skipped, and why the first one was.
struct Skipped {
  int count = 0;
  absl::Status first_reason;

  void Add(absl::Status reason);
};

// The keys under a prefix at one revision of the store.
struct PrefixRange {
  // In key order, each key once.
  std::vector<KeyValue> kvs;
  // The store's revision the range was read at; a watch from revision + 1
  // misses no change.
  int64_t revision = 0;
  Skipped skipped;
};

// One change to a key under a watched prefix.
struct WatchEvent {
  enum class Type { kPut, kDelete };
  Type type = Type::kPut;
  KeyValue kv;  // for a delete, only the key
  int64_t revision = 0;
};

// The smallest key greater than every key starting with `prefix`; empty
// (no end: every key) if there is none.
std::string PrefixEnd(absl::string_view prefix);

// OK if a reply's header carries the store's revision, as etcd's always do;
// INTERNAL, naming the reply (`what`), otherwise.
absl::Status CheckHeader(const etcdserverpb::ResponseHeader& header,
                         absl::string_view what);

// A range over `prefix`. Entries with an empty key, a key outside the prefix,
// or a key already listed are skipped. INTERNAL if the reply has no revision
// or says it is partial (`more`; this client never asks for a limit).
absl::StatusOr<PrefixRange> ReadRangeResponse(
    const etcdserverpb::RangeResponse& reply, absl::string_view prefix);

// A granted lease's id. INTERNAL if the reply carries an error, no id or no
// TTL.
absl::StatusOr<int64_t> ReadLeaseGrantResponse(
    const etcdserverpb::LeaseGrantResponse& reply);

// OK if the reply renews `lease`; NOT_FOUND if it says the lease has expired
// (etcd answers a keepalive of an unknown lease with TTL 0, not an error);
// INTERNAL if it is about another lease.
absl::Status ReadKeepAliveResponse(
    const etcdserverpb::LeaseKeepAliveResponse& reply, int64_t lease);

// The id etcd gave a watch, from the first response on its stream.
// OUT_OF_RANGE if the start revision has been compacted away (read the range
// again and watch from there), ABORTED if etcd refused the watch for another
// reason, INTERNAL if the response does not create a watch.
absl::StatusOr<int64_t> ReadWatchCreatedResponse(
    const etcdserverpb::WatchResponse& reply);

// What a created watch over `prefix` with id `watch_id` learns from one later
// response: its events, in order, are appended to `events`. `*revision` is
// the revision the watch has reached; events from before it are skipped, and
// it advances to the last event's. Events of an unknown type, with an empty
// key or a key outside the prefix are skipped too. Errors end the watch:
// OUT_OF_RANGE (compacted) and ABORTED (cancelled by etcd) as above, INTERNAL
// if the response is for another watch or creates one again.
absl::Status ReadWatchResponse(const etcdserverpb::WatchResponse& reply,
                               int64_t watch_id, absl::string_view prefix,
                               int64_t* revision,
                               std::vector<WatchEvent>* events,
                               Skipped* skipped);

}  // namespace kvcache::cluster

#endif  // KVCACHE_CLUSTER_ETCD_REPLIES_H_
