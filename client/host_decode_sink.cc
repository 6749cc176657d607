#include "client/host_decode_sink.h"

#include "absl/strings/str_cat.h"
#include "codec/codec.h"

namespace kvcache {

HostDecodeSink::HostDecodeSink(std::vector<absl::Span<uint16_t>> destinations,
                               HostDecodeOptions options)
    : destinations_(std::move(destinations)), profile_(options.profile) {
  for (int t = 0; options.threads > 1 && t < options.threads; ++t) {
    threads_.emplace_back([this] { DecodeQueued(); });
  }
}

HostDecodeSink::~HostDecodeSink() {
  {
    absl::MutexLock lock(&mu_);
    stopping_ = true;
  }
  for (std::thread& thread : threads_) thread.join();
}

absl::Status HostDecodeSink::Decode(size_t index, absl::string_view bytes) {
  if (absl::Status s =
          codec::DecodeChunk(bytes, destinations_[index], profile_);
      !s.ok()) {
    return absl::Status(s.code(),
                        absl::StrCat("chunk ", index, ": ", s.message()));
  }
  decoded_.fetch_add(1, std::memory_order_relaxed);
  return absl::OkStatus();
}

absl::Status HostDecodeSink::Consume(size_t index, absl::string_view bytes,
                                     bool stable) {
  if (index >= destinations_.size()) {
    return absl::InvalidArgumentError(
        absl::StrCat("chunk ", index, " has no destination (",
                     destinations_.size(), " given)"));
  }
  if (threads_.empty() || !stable) return Decode(index, bytes);
  absl::MutexLock lock(&mu_);
  queue_.push_back({index, bytes});
  ++pending_;
  return absl::OkStatus();
}

void HostDecodeSink::DecodeQueued() {
  while (true) {
    Job job;
    {
      absl::MutexLock lock(&mu_);
      mu_.Await(absl::Condition(
          +[](HostDecodeSink* sink) ABSL_EXCLUSIVE_LOCKS_REQUIRED(sink->mu_) {
            return !sink->queue_.empty() || sink->stopping_;
          },
          this));
      if (queue_.empty()) return;
      job = queue_.front();
      queue_.pop_front();
    }
    const absl::Status decoded = Decode(job.index, job.bytes);
    absl::MutexLock lock(&mu_);
    if (!decoded.ok() &&
        (first_error_.ok() || job.index < first_error_index_)) {
      first_error_ = decoded;
      first_error_index_ = job.index;
    }
    --pending_;
  }
}

absl::Status HostDecodeSink::Finish() {
  absl::MutexLock lock(&mu_);
  mu_.Await(absl::Condition(
      +[](size_t* pending) { return *pending == 0; }, &pending_));
  absl::Status error = first_error_;
  first_error_ = absl::OkStatus();
  return error;
}

}  // namespace kvcache
