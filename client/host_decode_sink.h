// A ChunkSink that decodes fetched codec chunks on the CPU into buffers the
// caller owns: the worker path for hosts without a GPU, and the reference
// the GPU sink is checked against.
//
// Thread-compatible.
#ifndef KVCACHE_CLIENT_HOST_DECODE_SINK_H_
#define KVCACHE_CLIENT_HOST_DECODE_SINK_H_

#include <atomic>
#include <cstdint>
#include <deque>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/synchronization/mutex.h"
#include "absl/types/span.h"
#include "client/prefix_fetcher.h"
#include "codec/profile.h"

namespace kvcache {

struct HostDecodeOptions {
  // The model profile that chunks at the transform levels name; it must
  // outlive the sink.
  const codec::ModelProfile* profile = nullptr;
  // Threads that decode chunks whose bytes stay valid until Finish (those
  // read in place from a node's shared memory) while the fetch goes on;
  // 1 decodes every chunk in Consume, on the fetching thread.
  int threads = 1;
};

class HostDecodeSink : public ChunkSink {
 public:
  // destinations[i] receives chunk i's values, [layers][K,V][tokens]
  // [kv_heads * head_dim], and must be exactly that size. The buffers must
  // outlive the sink.
  explicit HostDecodeSink(std::vector<absl::Span<uint16_t>> destinations,
                          HostDecodeOptions options = {});
  ~HostDecodeSink() override;

  // Decodes the chunk, at once or on a decoding thread; INVALID_ARGUMENT
  // for a chunk with no destination or of another shape, DATA_LOSS (from
  // the codec) for a corrupt one, FAILED_PRECONDITION for one that names a
  // profile the sink lacks, each naming the chunk. A chunk decoded on a
  // thread reports its error from Finish.
  absl::Status Consume(size_t index, absl::string_view bytes,
                       bool stable) override;
  // Waits for the decoding threads; the error of the lowest chunk that
  // failed on one, if any.
  absl::Status Finish() override;

  // Chunks decoded so far.
  size_t decoded() const { return decoded_.load(std::memory_order_relaxed); }

 private:
  struct Job {
    size_t index;
    absl::string_view bytes;
  };
  absl::Status Decode(size_t index, absl::string_view bytes);
  void DecodeQueued();

  const std::vector<absl::Span<uint16_t>> destinations_;
  const codec::ModelProfile* const profile_;
  std::atomic<size_t> decoded_{0};
  absl::Mutex mu_;
  std::deque<Job> queue_ ABSL_GUARDED_BY(mu_);
  size_t pending_ ABSL_GUARDED_BY(mu_) = 0;  // queued or being decoded
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  absl::Status first_error_ ABSL_GUARDED_BY(mu_);
  size_t first_error_index_ ABSL_GUARDED_BY(mu_) = 0;
  std::vector<std::thread> threads_;
};

}  // namespace kvcache

#endif  // KVCACHE_CLIENT_HOST_DECODE_SINK_H_
