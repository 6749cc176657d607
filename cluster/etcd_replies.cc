#include "cluster/etcd_replies.h"

#include <algorithm>
#include <utility>

#include "absl/strings/escaping.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"

namespace kvcache::cluster {
namespace {

// Keys and reasons come from the server; only so much of them goes into a
// message.
constexpr size_t kShownBytes = 120;

std::string Shown(absl::string_view bytes) {
  return absl::CHexEscape(bytes.substr(0, kShownBytes));
}

// Why `key` cannot be under `prefix`, or OK.
absl::Status CheckKey(absl::string_view key, absl::string_view prefix) {
  if (key.empty()) {
    return absl::InvalidArgumentError("etcd sent an entry without a key");
  }
  if (!absl::StartsWith(key, prefix)) {
    return absl::InvalidArgumentError(
        absl::StrCat("etcd sent key \"", Shown(key),
                     "\", which is outside the range asked for"));
  }
  return absl::OkStatus();
}

absl::Status WatchCancelled(const etcdserverpb::WatchResponse& reply) {
  if (reply.compact_revision() > 0) {
    return absl::OutOfRangeError(
        absl::StrCat("etcd has compacted the watched revisions away (up to ",
                     reply.compact_revision(), ")"));
  }
  return absl::AbortedError(
      absl::StrCat("etcd cancelled the watch: ", Shown(reply.cancel_reason())));
}

}  // namespace

void Skipped::Add(absl::Status reason) {
  if (count++ == 0) first_reason = std::move(reason);
}

std::string PrefixEnd(absl::string_view prefix) {
  std::string end(prefix);
  while (!end.empty() && static_cast<unsigned char>(end.back()) == 0xff) {
    end.pop_back();
  }
  if (!end.empty()) end.back() = static_cast<char>(end.back() + 1);
  return end;
}

absl::Status CheckHeader(const etcdserverpb::ResponseHeader& header,
                         absl::string_view what) {
  if (header.revision() <= 0) {
    return absl::InternalError(
        absl::StrCat("etcd answered ", what, " without a revision"));
  }
  return absl::OkStatus();
}

absl::StatusOr<PrefixRange> ReadRangeResponse(
    const etcdserverpb::RangeResponse& reply, absl::string_view prefix) {
  if (absl::Status s = CheckHeader(reply.header(), "a range"); !s.ok()) {
    return s;
  }
  if (reply.more()) {
    return absl::InternalError("etcd answered with part of a range");
  }
  PrefixRange range;
  range.revision = reply.header().revision();
  range.kvs.reserve(reply.kvs_size());
  for (const mvccpb::KeyValue& kv : reply.kvs()) {
    if (absl::Status s = CheckKey(kv.key(), prefix); !s.ok()) {
      range.skipped.Add(std::move(s));
      continue;
    }
    range.kvs.push_back({kv.key(), kv.value()});
  }
  // etcd sends keys in order; sorting costs nothing then and makes the
  // promise hold whatever the server is.
  std::stable_sort(
      range.kvs.begin(), range.kvs.end(),
      [](const KeyValue& a, const KeyValue& b) { return a.key < b.key; });
  size_t kept = 0;
  for (size_t i = 0; i < range.kvs.size(); ++i) {
    if (kept > 0 && range.kvs[i].key == range.kvs[kept - 1].key) {
      range.skipped.Add(absl::InvalidArgumentError(absl::StrCat(
          "etcd listed key \"", Shown(range.kvs[i].key), "\" twice")));
      continue;
    }
    if (kept != i) range.kvs[kept] = std::move(range.kvs[i]);
    ++kept;
  }
  range.kvs.resize(kept);
  return range;
}

absl::StatusOr<int64_t> ReadLeaseGrantResponse(
    const etcdserverpb::LeaseGrantResponse& reply) {
  if (!reply.error().empty()) {
    return absl::InternalError(
        absl::StrCat("etcd refused a lease: ", Shown(reply.error())));
  }
  if (reply.id() == 0 || reply.ttl() <= 0) {
    return absl::InternalError("etcd granted a lease without an id or a TTL");
  }
  return reply.id();
}

absl::Status ReadKeepAliveResponse(
    const etcdserverpb::LeaseKeepAliveResponse& reply, int64_t lease) {
  if (reply.id() != lease) {
    return absl::InternalError(absl::StrCat("etcd renewed lease ", reply.id(),
                                            " when asked to renew ", lease));
  }
  if (reply.ttl() <= 0) {
    return absl::NotFoundError(
        absl::StrCat("etcd lease ", lease, " has expired"));
  }
  return absl::OkStatus();
}

absl::StatusOr<int64_t> ReadWatchCreatedResponse(
    const etcdserverpb::WatchResponse& reply) {
  if (!reply.created()) {
    return absl::InternalError(
        "etcd answered a watch request with something else");
  }
  if (reply.canceled()) return WatchCancelled(reply);
  return reply.watch_id();
}

absl::Status ReadWatchResponse(const etcdserverpb::WatchResponse& reply,
                               int64_t watch_id, absl::string_view prefix,
                               int64_t* revision,
                               std::vector<WatchEvent>* events,
                               Skipped* skipped) {
  if (reply.watch_id() != watch_id || reply.created()) {
    return absl::InternalError(
        absl::StrCat("etcd answered on watch ", watch_id, " for watch ",
                     reply.watch_id(), reply.created() ? " as if new" : ""));
  }
  // Events on a cancelled watch are left out: the range is read again.
  if (reply.canceled()) return WatchCancelled(reply);
  for (const mvccpb::Event& event : reply.events()) {
    const mvccpb::KeyValue& kv = event.kv();
    absl::Status s = CheckKey(kv.key(), prefix);
    if (s.ok() && event.type() != mvccpb::Event::PUT &&
        event.type() != mvccpb::Event::DELETE) {
      s = absl::InvalidArgumentError(
          absl::StrCat("etcd sent an event of unknown type ", event.type()));
    }
    if (s.ok() && kv.mod_revision() < *revision) {
      s = absl::InvalidArgumentError(
          absl::StrCat("etcd sent an event of revision ", kv.mod_revision(),
                       " after revision ", *revision));
    }
    if (!s.ok()) {
      skipped->Add(std::move(s));
      continue;
    }
    *revision = kv.mod_revision();
    WatchEvent out;
    out.type = event.type() == mvccpb::Event::PUT ? WatchEvent::Type::kPut
                                                  : WatchEvent::Type::kDelete;
    out.kv.key = kv.key();
    if (out.type == WatchEvent::Type::kPut) out.kv.value = kv.value();
    out.revision = kv.mod_revision();
    events->push_back(std::move(out));
  }
  return absl::OkStatus();
}

}  // namespace kvcache::cluster
