#include "cluster/membership.h"

#include <algorithm>
#include <nlohmann/json.hpp>
#include <utility>

#include "absl/strings/escaping.h"
#include "absl/strings/match.h"
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

absl::StatusOr<NodeRecord> NodeRecord::FromEtcd(absl::string_view prefix,
                                                absl::string_view key,
                                                absl::string_view value) {
  absl::StatusOr<NodeRecord> record = FromJson(value);
  absl::Status problem = record.status();
  if (problem.ok() && (!absl::StartsWith(key, prefix) ||
                       key.substr(prefix.size()) != record->node_id)) {
    problem = absl::InvalidArgumentError(
        absl::StrCat("the record names node \"",
                     absl::CHexEscape(record->node_id.substr(0, 120)), "\""));
  }
  if (problem.ok() && record->address.empty()) {
    problem = absl::InvalidArgumentError("the record has no address");
  }
  if (!problem.ok()) {
    return absl::InvalidArgumentError(
        absl::StrCat("etcd key ", absl::CHexEscape(key.substr(0, 120)), ": ",
                     problem.message()));
  }
  return record;
}

std::string NodesPrefix(absl::string_view cluster_name) {
  return absl::StrCat("/kvcache/", cluster_name, "/nodes/");
}

MembershipView::MembershipView(MembershipOptions options)
    : options_(std::move(options)),
      prefix_(NodesPrefix(options_.cluster_name)),
      etcd_(options_.etcd),
      current_(std::make_shared<Membership>()) {
  watcher_ = std::thread([this] { WatchLoop(); });
}

MembershipView::~MembershipView() {
  {
    absl::MutexLock lock(&mu_);
    stopping_ = true;
    if (watch_ != nullptr) watch_->Cancel();
  }
  watcher_.join();
}

absl::Status MembershipView::Refresh() {
  absl::MutexLock lock(&mu_);
  const uint64_t wanted = ++readings_wanted_;
  // A watch under way would hold the loop until its next change.
  if (watch_ != nullptr) watch_->Cancel();
  auto done = [&]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    return readings_done_ >= wanted || stopping_;
  };
  mu_.Await(absl::Condition(&done));
  return last_reading_;
}

void MembershipView::ApplyRange(const PrefixRange& range) {
  records_.clear();
  for (const KeyValue& kv : range.kvs) {
    records_.emplace(kv.key, NodeRecord::FromEtcd(prefix_, kv.key, kv.value));
  }
  malformed_ = range.skipped;
  Publish();
}

void MembershipView::ApplyEvents(const std::vector<WatchEvent>& events) {
  for (const WatchEvent& event : events) {
    if (event.type == WatchEvent::Type::kDelete) {
      records_.erase(event.kv.key);
    } else {
      records_.insert_or_assign(
          event.kv.key,
          NodeRecord::FromEtcd(prefix_, event.kv.key, event.kv.value));
    }
  }
  Publish();
}

void MembershipView::Publish() {
  // Keys are the prefix and the node id, so key order is node id order.
  std::vector<NodeRecord> nodes;
  for (const auto& [key, record] : records_) {
    if (record.ok()) nodes.push_back(*record);
  }
  if (nodes == current_->nodes) return;
  auto next = std::make_shared<Membership>();
  next->generation = current_->generation + 1;
  next->nodes = std::move(nodes);
  current_ = std::move(next);
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
  int count = malformed_.count;
  absl::Status reason = malformed_.first_reason;
  for (const auto& [key, record] : records_) {
    if (record.ok()) continue;
    if (count++ == 0) reason = record.status();
  }
  return {count, reason};
}

absl::Status MembershipView::last_error() const {
  absl::MutexLock lock(&mu_);
  return last_error_;
}

void MembershipView::Pause(absl::Duration delay, uint64_t serving) {
  auto wake = [&]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    return stopping_ || readings_wanted_ > serving;
  };
  mu_.AwaitWithTimeout(absl::Condition(&wake), delay);
}

void MembershipView::WatchLoop() {
  // After a failure, the next try waits this long (or less on Refresh).
  const absl::Duration retry_delay =
      std::min(options_.resync_interval, absl::Seconds(1));
  while (true) {
    uint64_t serving = 0;
    {
      absl::MutexLock lock(&mu_);
      if (stopping_) return;
      serving = readings_wanted_;
    }
    absl::StatusOr<PrefixRange> range = etcd_.RangePrefix(prefix_);
    std::unique_ptr<PrefixWatch> watch;
    {
      absl::MutexLock lock(&mu_);
      readings_done_ = serving;
      last_reading_ = range.status();
      last_error_ = range.status();
      if (!range.ok()) {
        Pause(retry_delay, serving);
        continue;
      }
      ApplyRange(*range);
      if (stopping_ || readings_wanted_ > serving) continue;
      // From the revision after the range: no change is missed or seen
      // twice.
      watch = etcd_.WatchPrefix(prefix_, range->revision + 1,
                                options_.resync_interval);
      watch_ = watch.get();
    }
    std::vector<WatchEvent> events;
    Skipped skipped;
    absl::Status ended;
    while ((ended = watch->Next(&events, &skipped)).ok()) {
      absl::MutexLock lock(&mu_);
      ApplyEvents(events);
      if (skipped.count > 0) {
        if (malformed_.count == 0) {
          malformed_.first_reason = skipped.first_reason;
        }
        malformed_.count += skipped.count;
        skipped = Skipped();
      }
    }
    absl::MutexLock lock(&mu_);
    watch_ = nullptr;
    // The end of its lifetime (a resync is due), a Refresh, a shutdown or
    // compaction: read again at once. Anything else is a failure.
    if (absl::IsDeadlineExceeded(ended) || absl::IsCancelled(ended) ||
        absl::IsOutOfRange(ended)) {
      continue;
    }
    last_error_ = ended;
    Pause(retry_delay, serving);
  }
}

}  // namespace kvcache::cluster
