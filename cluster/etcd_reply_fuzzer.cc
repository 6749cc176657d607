// libFuzzer entry point for what etcd answers, which a node and a cluster
// client read and must survive whatever it is (a broken etcd, a proxy in the
// way, records other software wrote). Built and run by
// tests/fuzz/run_fuzz.sh etcd_reply.
//
// gRPC hands the client a reply as protobuf bytes; the first input byte picks
// which reply the rest is parsed as (bytes protobuf rejects are a gRPC
// error, never a reply):
//   0: a RangeResponse, read by ReadRangeResponse, and each key-value it
//      keeps read as a node record, as a membership reading does;
//   1: a WatchResponse, read as a watch's first response and as a later one,
//      and each event's value read as a node record;
//   2: a LeaseGrantResponse;  3: a LeaseKeepAliveResponse.
// Beyond not crashing: a range's keys are under the prefix, in order and
// distinct; a watch's events are under the prefix, in revision order; a
// granted lease has an id; an expired lease is never renewed; a node record
// that is read matches its key and prints and reads back the same.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "cluster/etcd_replies.h"
#include "cluster/membership.h"

namespace kvcache::cluster {
namespace {

const std::string& Prefix() {
  static const std::string* prefix = new std::string(NodesPrefix("fuzz"));
  return *prefix;
}

void Check(bool ok) {
  if (!ok) std::abort();
}

void ReadRecord(const std::string& key, const std::string& value) {
  absl::StatusOr<NodeRecord> record =
      NodeRecord::FromEtcd(Prefix(), key, value);
  if (!record.ok()) return;
  Check(key == Prefix() + record->node_id && !record->address.empty());
  absl::StatusOr<NodeRecord> again = NodeRecord::FromJson(record->ToJson());
  Check(again.ok() && *again == *record);
}

void FuzzRange(const std::string& bytes) {
  etcdserverpb::RangeResponse reply;
  if (!reply.ParseFromString(bytes)) return;
  absl::StatusOr<PrefixRange> range = ReadRangeResponse(reply, Prefix());
  if (!range.ok()) return;
  Check(range->revision > 0 && range->skipped.count >= 0);
  for (size_t i = 0; i < range->kvs.size(); ++i) {
    Check(absl::StartsWith(range->kvs[i].key, Prefix()));
    if (i > 0) Check(range->kvs[i - 1].key < range->kvs[i].key);
    ReadRecord(range->kvs[i].key, range->kvs[i].value);
  }
}

void FuzzWatch(const std::string& bytes) {
  etcdserverpb::WatchResponse reply;
  if (!reply.ParseFromString(bytes)) return;
  ReadWatchCreatedResponse(reply).status().IgnoreError();
  int64_t revision = 1;
  std::vector<WatchEvent> events;
  Skipped skipped;
  ReadWatchResponse(reply, reply.watch_id(), Prefix(), &revision, &events,
                    &skipped)
      .IgnoreError();
  int64_t last = 1;
  for (const WatchEvent& event : events) {
    Check(absl::StartsWith(event.kv.key, Prefix()));
    Check(event.revision >= last);
    last = event.revision;
    if (event.type == WatchEvent::Type::kPut) {
      ReadRecord(event.kv.key, event.kv.value);
    }
  }
  Check(revision == last);
}

void FuzzLease(const std::string& bytes, bool grant) {
  if (grant) {
    etcdserverpb::LeaseGrantResponse reply;
    if (!reply.ParseFromString(bytes)) return;
    absl::StatusOr<int64_t> id = ReadLeaseGrantResponse(reply);
    Check(!id.ok() || *id != 0);
    return;
  }
  etcdserverpb::LeaseKeepAliveResponse reply;
  if (!reply.ParseFromString(bytes)) return;
  const absl::Status s = ReadKeepAliveResponse(reply, reply.id());
  Check(!s.ok() || reply.ttl() > 0);
}

}  // namespace
}  // namespace kvcache::cluster

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace kvcache::cluster;  // NOLINT: the entry point is global
  if (size == 0) return 0;
  const std::string bytes(reinterpret_cast<const char*>(data) + 1, size - 1);
  switch (data[0] % 4) {
    case 0:
      FuzzRange(bytes);
      break;
    case 1:
      FuzzWatch(bytes);
      break;
    default:
      FuzzLease(bytes, data[0] % 4 == 2);
      break;
  }
  return 0;
}
