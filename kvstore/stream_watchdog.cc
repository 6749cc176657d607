#include "kvstore/stream_watchdog.h"

#include <algorithm>

namespace kvcache::kvstore {
namespace {

int64_t NowNs() { return absl::GetCurrentTimeNanos(); }

}  // namespace

StreamWatchdog::Watch::Watch(StreamWatchdog& watchdog,
                             grpc::ServerContextBase& context)
    : watchdog_(watchdog), context_(context), last_progress_ns_(NowNs()) {
  absl::MutexLock lock(&watchdog_.mu_);
  watchdog_.watches_.insert(this);
}

StreamWatchdog::Watch::~Watch() {
  // Under the lock, so the scanner never cancels a finished call.
  absl::MutexLock lock(&watchdog_.mu_);
  watchdog_.watches_.erase(this);
}

void StreamWatchdog::Watch::Progress() {
  last_progress_ns_.store(NowNs(), std::memory_order_relaxed);
}

StreamWatchdog::StreamWatchdog(absl::Duration idle_timeout)
    : idle_timeout_(idle_timeout), scanner_([this] { Scan(); }) {}

StreamWatchdog::~StreamWatchdog() {
  {
    absl::MutexLock lock(&mu_);
    stopping_ = true;
  }
  scanner_.join();
}

void StreamWatchdog::Scan() {
  // A stream is cancelled between one and 1.25 idle timeouts after it
  // stopped moving.
  const absl::Duration period =
      std::clamp(idle_timeout_ / 4, absl::Milliseconds(10), absl::Seconds(1));
  const int64_t idle_ns = absl::ToInt64Nanoseconds(idle_timeout_);
  absl::MutexLock lock(&mu_);
  while (!mu_.AwaitWithTimeout(absl::Condition(&stopping_), period)) {
    const int64_t now = NowNs();
    for (Watch* watch : watches_) {
      if (watch->timed_out_.load() ||
          now - watch->last_progress_ns_.load(std::memory_order_relaxed) <
              idle_ns) {
        continue;
      }
      watch->timed_out_.store(true);
      timed_out_streams_.fetch_add(1);
      watch->context_.TryCancel();
    }
  }
}

}  // namespace kvcache::kvstore
