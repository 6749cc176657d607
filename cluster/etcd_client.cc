#include "cluster/etcd_client.h"

#include <algorithm>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/time/clock.h"

namespace kvcache::cluster {
namespace {

// Only so much of a server's error message goes into a status.
constexpr size_t kMessageBytes = 200;

std::shared_ptr<grpc::Channel> ChannelTo(
    const std::string& address,
    const std::shared_ptr<grpc::ChannelCredentials>& credentials) {
  grpc::ChannelArguments args;
  // gRPC waits up to two minutes between reconnection attempts by default;
  // a node must see etcd again within a second of its coming back. (The
  // minimum backoff is left alone: gRPC also uses it as the connect
  // timeout.)
  args.SetInt(GRPC_ARG_INITIAL_RECONNECT_BACKOFF_MS, 100);
  args.SetInt(GRPC_ARG_MAX_RECONNECT_BACKOFF_MS, 1000);
  // A watch is quiet for as long as membership does not change; pings find
  // a connection that died without closing (a partition) within 15 s
  // instead of at the end of the watch's lifetime. etcd accepts pings every
  // 5 s or more (its --grpc-keepalive-min-time).
  args.SetInt(GRPC_ARG_KEEPALIVE_TIME_MS, 10000);
  args.SetInt(GRPC_ARG_KEEPALIVE_TIMEOUT_MS, 5000);
  args.SetInt(GRPC_ARG_HTTP2_MAX_PINGS_WITHOUT_DATA, 0);
  return grpc::CreateCustomChannel(
      address, credentials ? credentials : grpc::InsecureChannelCredentials(),
      args);
}

void SetDeadline(grpc::ClientContext* context, absl::Duration timeout) {
  context->set_deadline(absl::ToChronoTime(absl::Now() + timeout));
}

// A failure that says nothing about etcd's answer, so another endpoint may
// give one. etcd itself answers UNAVAILABLE while it has no leader.
bool Unanswered(const grpc::Status& status) {
  return status.error_code() == grpc::StatusCode::UNAVAILABLE ||
         status.error_code() == grpc::StatusCode::DEADLINE_EXCEEDED;
}

// etcd's error as a status; gRPC codes share absl's numbering.
absl::Status EtcdError(const grpc::Status& status) {
  int code = status.error_code();
  // An out-of-range code from a hostile server must not become OK or a
  // code absl does not know.
  if (code <= 0 ||
      code > static_cast<int>(absl::StatusCode::kUnauthenticated)) {
    code = static_cast<int>(absl::StatusCode::kUnknown);
  }
  return absl::Status(
      static_cast<absl::StatusCode>(code),
      absl::StrCat("etcd: ", status.error_message().substr(0, kMessageBytes)));
}

}  // namespace

PrefixWatch::PrefixWatch(etcdserverpb::Watch::Stub* stub, std::string endpoint,
                         std::string prefix, int64_t start_revision,
                         absl::Duration lifetime)
    : stub_(stub),
      endpoint_(std::move(endpoint)),
      prefix_(std::move(prefix)),
      revision_(start_revision) {
  SetDeadline(&context_, lifetime);
}

PrefixWatch::~PrefixWatch() {
  if (!ended_) End(absl::CancelledError()).IgnoreError();
}

void PrefixWatch::Cancel() {
  cancelled_.store(true);
  // Also before the stream exists: gRPC cancels the call when it starts.
  context_.TryCancel();
}

absl::Status PrefixWatch::End(absl::Status status) {
  if (stream_ != nullptr) {
    context_.TryCancel();
    const grpc::Status finished = stream_->Finish();
    if (status.ok()) {
      // The stream ended on its own: say why in etcd's or gRPC's words.
      if (cancelled_.load()) {
        status = absl::CancelledError("the watch was cancelled");
      } else if (finished.error_code() == grpc::StatusCode::DEADLINE_EXCEEDED) {
        status = absl::DeadlineExceededError("the watch has run its time");
      } else if (finished.ok() || Unanswered(finished) ||
                 finished.error_code() == grpc::StatusCode::CANCELLED) {
        // gRPC reports a connection that closed under the stream as
        // CANCELLED too; only Cancel above means it was asked for.
        status = absl::UnavailableError(absl::StrCat(
            "etcd watch on ", endpoint_,
            " broke: ", finished.error_message().substr(0, kMessageBytes)));
      } else {
        status = EtcdError(finished);
      }
    }
  }
  ended_ = true;
  outcome_ = std::move(status);
  return outcome_;
}

absl::Status PrefixWatch::Next(std::vector<WatchEvent>* events,
                               Skipped* skipped) {
  events->clear();
  if (ended_) return outcome_;
  if (stub_ == nullptr) {
    return End(absl::FailedPreconditionError("no etcd endpoints configured"));
  }
  if (stream_ == nullptr) {
    stream_ = stub_->Watch(&context_);
    etcdserverpb::WatchRequest request;
    etcdserverpb::WatchCreateRequest* create = request.mutable_create_request();
    create->set_key(prefix_);
    create->set_range_end(PrefixEnd(prefix_));
    create->set_start_revision(revision_);
    // A failed write shows as the stream's end in the Read below.
    stream_->Write(request);
  }
  etcdserverpb::WatchResponse reply;
  while (stream_->Read(&reply)) {
    if (watch_id_ < 0) {
      absl::StatusOr<int64_t> id = ReadWatchCreatedResponse(reply);
      if (!id.ok()) return End(id.status());
      watch_id_ = *id;
      continue;
    }
    absl::Status s = ReadWatchResponse(reply, watch_id_, prefix_, &revision_,
                                       events, skipped);
    if (!s.ok()) return End(std::move(s));
    // A response without events (a progress report) is not a change.
    if (reply.events_size() > 0) return absl::OkStatus();
  }
  return End(absl::OkStatus());
}

EtcdClient::EtcdClient(EtcdOptions options) : options_(std::move(options)) {
  for (const std::string& address : options_.endpoints) {
    Endpoint endpoint;
    endpoint.address = address;
    endpoint.channel = ChannelTo(address, options_.credentials);
    endpoint.kv = etcdserverpb::KV::NewStub(endpoint.channel);
    endpoint.lease = etcdserverpb::Lease::NewStub(endpoint.channel);
    endpoint.watch = etcdserverpb::Watch::NewStub(endpoint.channel);
    endpoints_.push_back(std::move(endpoint));
  }
}

template <typename CallFn>
absl::Status EtcdClient::Call(const CallFn& call) {
  if (endpoints_.empty()) {
    return absl::FailedPreconditionError("no etcd endpoints configured");
  }
  std::vector<std::string> failures;
  const size_t first = preferred_.load(std::memory_order_relaxed);
  for (size_t i = 0; i < endpoints_.size(); ++i) {
    const size_t index = (first + i) % endpoints_.size();
    grpc::ClientContext context;
    SetDeadline(&context, options_.timeout);
    const grpc::Status status = call(endpoints_[index], &context);
    if (Unanswered(status)) {
      failures.push_back(
          absl::StrCat(endpoints_[index].address, ": ",
                       status.error_message().substr(0, kMessageBytes)));
      continue;
    }
    preferred_.store(index, std::memory_order_relaxed);
    return status.ok() ? absl::OkStatus() : EtcdError(status);
  }
  return absl::UnavailableError(absl::StrCat(
      "etcd is unreachable (", absl::StrJoin(failures, "; "), ")"));
}

absl::StatusOr<int64_t> EtcdClient::GrantLease(absl::Duration ttl) {
  etcdserverpb::LeaseGrantRequest request;
  request.set_ttl(std::max<int64_t>(1, absl::ToInt64Seconds(ttl)));
  etcdserverpb::LeaseGrantResponse reply;
  absl::Status s = Call([&](Endpoint& endpoint, grpc::ClientContext* context) {
    return endpoint.lease->LeaseGrant(context, request, &reply);
  });
  if (!s.ok()) return s;
  return ReadLeaseGrantResponse(reply);
}

absl::Status EtcdClient::KeepAlive(int64_t lease) {
  etcdserverpb::LeaseKeepAliveRequest request;
  request.set_id(lease);
  etcdserverpb::LeaseKeepAliveResponse reply;
  // etcd renews over a stream meant to stay open; NodeRegistration renews
  // every third of the TTL, so one short stream per renewal (on the
  // connection kept open) costs little and never needs reconnecting.
  absl::Status s = Call([&](Endpoint& endpoint, grpc::ClientContext* context) {
    auto stream = endpoint.lease->LeaseKeepAlive(context);
    stream->Write(request);
    stream->WritesDone();
    const bool answered = stream->Read(&reply);
    if (answered) context->TryCancel();
    const grpc::Status finished = stream->Finish();
    if (answered) return grpc::Status::OK;
    // A stream that ends without a reply and without an error is not an
    // answer either.
    return finished.ok() ? grpc::Status(grpc::StatusCode::UNAVAILABLE,
                                        "keepalive stream closed unanswered")
                         : finished;
  });
  if (!s.ok()) return s;
  return ReadKeepAliveResponse(reply, lease);
}

absl::Status EtcdClient::RevokeLease(int64_t lease) {
  etcdserverpb::LeaseRevokeRequest request;
  request.set_id(lease);
  etcdserverpb::LeaseRevokeResponse reply;
  absl::Status s = Call([&](Endpoint& endpoint, grpc::ClientContext* context) {
    return endpoint.lease->LeaseRevoke(context, request, &reply);
  });
  if (!s.ok()) return s;
  return CheckHeader(reply.header(), "a lease revocation");
}

absl::Status EtcdClient::Put(absl::string_view key, absl::string_view value,
                             int64_t lease) {
  etcdserverpb::PutRequest request;
  request.set_key(std::string(key));
  request.set_value(std::string(value));
  request.set_lease(lease);
  etcdserverpb::PutResponse reply;
  absl::Status s = Call([&](Endpoint& endpoint, grpc::ClientContext* context) {
    return endpoint.kv->Put(context, request, &reply);
  });
  if (!s.ok()) return s;
  return CheckHeader(reply.header(), "a put");
}

absl::StatusOr<PrefixRange> EtcdClient::RangePrefix(absl::string_view prefix) {
  etcdserverpb::RangeRequest request;
  request.set_key(std::string(prefix));
  request.set_range_end(PrefixEnd(prefix));
  etcdserverpb::RangeResponse reply;
  absl::Status s = Call([&](Endpoint& endpoint, grpc::ClientContext* context) {
    return endpoint.kv->Range(context, request, &reply);
  });
  if (!s.ok()) return s;
  return ReadRangeResponse(reply, prefix);
}

std::unique_ptr<PrefixWatch> EtcdClient::WatchPrefix(absl::string_view prefix,
                                                     int64_t start_revision,
                                                     absl::Duration lifetime) {
  etcdserverpb::Watch::Stub* stub = nullptr;
  std::string address;
  if (!endpoints_.empty()) {
    const size_t index =
        preferred_.load(std::memory_order_relaxed) % endpoints_.size();
    stub = endpoints_[index].watch.get();
    address = endpoints_[index].address;
  }
  return std::unique_ptr<PrefixWatch>(new PrefixWatch(
      stub, std::move(address), std::string(prefix), start_revision, lifetime));
}

}  // namespace kvcache::cluster
