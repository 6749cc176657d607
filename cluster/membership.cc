#include "cluster/membership.h"

#include <nlohmann/json.hpp>
#include <utility>

#include "absl/strings/str_cat.h"

namespace kvcache::cluster {

using Json = nlohmann::json;

std::string NodeRecord::ToJson() const {
  return Json{{"node_id", node_id},
              {"address", address},
              {"draining", draining},
              {"started_unix_ms", started_unix_ms}}
      .dump();
}

absl::StatusOr<NodeRecord> NodeRecord::FromJson(absl::string_view json) {
  const Json parsed = Json::parse(json, nullptr, /*allow_exceptions=*/false);
  if (!parsed.is_object() || !parsed.contains("node_id") ||
      !parsed["node_id"].is_string() || !parsed.contains("address") ||
      !parsed["address"].is_string()) {
    return absl::InvalidArgumentError(
        absl::StrCat("not a node record: ", json.substr(0, 200)));
  }
  NodeRecord record;
  record.node_id = parsed["node_id"].get<std::string>();
  record.address = parsed["address"].get<std::string>();
  const Json& draining = parsed.value("draining", Json(false));
  record.draining = draining.is_boolean() && draining.get<bool>();
  // Only an integer: a float such as 1e300 has no int64 value.
  const Json& started = parsed.value("started_unix_ms", Json(0));
  record.started_unix_ms =
      started.is_number_integer() ? started.get<int64_t>() : 0;
  return record;
}

std::string NodesPrefix(absl::string_view cluster_name) {
  return absl::StrCat("/kvcache/", cluster_name, "/nodes/");
}

MembershipView::MembershipView(MembershipOptions options)
    : options_(std::move(options)),
      etcd_(options_.etcd),
      current_(std::make_shared<Membership>()) {
  poller_ = std::thread([this] { PollLoop(); });
}

MembershipView::~MembershipView() {
  {
    absl::MutexLock lock(&mu_);
    stopping_ = true;
  }
  poller_.join();
}

absl::Status MembershipView::Refresh() {
  int skipped = 0;
  absl::StatusOr<std::vector<KeyValue>> kvs =
      etcd_.RangePrefix(NodesPrefix(options_.cluster_name), &skipped);
  absl::Status skipped_reason;
  if (skipped > 0) {
    skipped_reason = absl::InvalidArgumentError(
        "etcd listed an entry that is not a key and value");
  }
  std::vector<NodeRecord> nodes;
  const absl::Status status = kvs.status();
  for (size_t i = 0; status.ok() && i < kvs->size(); ++i) {
    absl::StatusOr<NodeRecord> record = NodeRecord::FromJson((*kvs)[i].value);
    if (record.ok()) {
      nodes.push_back(*std::move(record));
      continue;
    }
    // One bad record must not hide every good one.
    if (skipped++ == 0) {
      skipped_reason = absl::Status(
          record.status().code(), absl::StrCat("etcd key ", (*kvs)[i].key, ": ",
                                               record.status().message()));
    }
  }
  absl::MutexLock lock(&mu_);
  last_error_ = status;
  if (!status.ok()) return status;
  skipped_ = skipped;
  skipped_reason_ = skipped_reason;
  if (nodes == current_->nodes) return status;
  // Range returns keys in order and the key ends with the node id, so
  // `nodes` is already sorted by node id.
  auto next = std::make_shared<Membership>();
  next->generation = current_->generation + 1;
  next->nodes = std::move(nodes);
  current_ = std::move(next);
  return status;
}

std::shared_ptr<const Membership> MembershipView::Current() const {
  absl::MutexLock lock(&mu_);
  return current_;
}

std::shared_ptr<const Membership> MembershipView::WaitForChange(
    uint64_t generation, absl::Duration timeout) const {
  absl::MutexLock lock(&mu_);
  auto changed = [&]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    return current_->generation != generation || stopping_;
  };
  mu_.AwaitWithTimeout(absl::Condition(&changed), timeout);
  return current_;
}

std::pair<int, absl::Status> MembershipView::skipped_records() const {
  absl::MutexLock lock(&mu_);
  return {skipped_, skipped_reason_};
}

absl::Status MembershipView::last_error() const {
  absl::MutexLock lock(&mu_);
  return last_error_;
}

void MembershipView::PollLoop() {
  while (true) {
    Refresh().IgnoreError();  // kept in last_error_
    absl::MutexLock lock(&mu_);
    auto stopping = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
      return stopping_;
    };
    if (mu_.AwaitWithTimeout(absl::Condition(&stopping),
                             options_.poll_interval)) {
      return;
    }
  }
}

}  // namespace kvcache::cluster
