// Cancels gRPC streams that stop moving: a Put whose client stalls
// mid-chunk, a Get whose client stops reading. Synchronous handlers block in
// Read or Write with no timeout of their own, holding a thread and whatever
// the stream buffered, and a callback handler's write never completes;
// cancelling the call makes that Read or Write fail, and the handler then
// frees everything on its way out.
//
// A handler opens a Watch for its call and calls Progress() after every
// message that moves. One background thread scans the open watches a few
// times per idle timeout.
//
// Thread-safe.
#ifndef KVCACHE_KVSTORE_STREAM_WATCHDOG_H_
#define KVCACHE_KVSTORE_STREAM_WATCHDOG_H_

#include <atomic>
#include <cstdint>
#include <thread>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_set.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "grpcpp/server_context.h"

namespace kvcache::kvstore {

class StreamWatchdog {
 public:
  // One call under watch, from construction to destruction (which must
  // happen before the call's handler returns, or a callback call is done).
  class Watch {
   public:
    Watch(StreamWatchdog& watchdog, grpc::ServerContextBase& context);
    ~Watch();
    Watch(const Watch&) = delete;
    Watch& operator=(const Watch&) = delete;

    // A message moved: the idle clock restarts.
    void Progress();
    // The watchdog cancelled the call for idling.
    bool timed_out() const { return timed_out_.load(); }

   private:
    friend class StreamWatchdog;
    StreamWatchdog& watchdog_;
    grpc::ServerContextBase& context_;
    std::atomic<int64_t> last_progress_ns_;
    std::atomic<bool> timed_out_{false};
  };

  explicit StreamWatchdog(absl::Duration idle_timeout);
  ~StreamWatchdog();
  StreamWatchdog(const StreamWatchdog&) = delete;
  StreamWatchdog& operator=(const StreamWatchdog&) = delete;

  absl::Duration idle_timeout() const { return idle_timeout_; }
  // Streams cancelled so far.
  uint64_t timed_out_streams() const { return timed_out_streams_.load(); }

 private:
  void Scan();

  const absl::Duration idle_timeout_;
  std::atomic<uint64_t> timed_out_streams_{0};
  absl::Mutex mu_;
  absl::flat_hash_set<Watch*> watches_ ABSL_GUARDED_BY(mu_);
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  std::thread scanner_;
};

}  // namespace kvcache::kvstore

#endif  // KVCACHE_KVSTORE_STREAM_WATCHDOG_H_
