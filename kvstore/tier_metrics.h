// Per-tier counters and latency histograms of the storage engine, read by
// the Admin service (kvcachectl status) and the Prometheus endpoint.
//
// Thread-safe and lock-free: every field is a relaxed atomic, so a snapshot
// is loose (counters may be mid-update relative to each other).
#ifndef KVCACHE_KVSTORE_TIER_METRICS_H_
#define KVCACHE_KVSTORE_TIER_METRICS_H_

#include <array>
#include <atomic>
#include <cstdint>

#include "absl/time/time.h"

namespace kvcache::kvstore {

// Latencies in power-of-two microsecond buckets: bucket i counts samples of
// at most 2^i us; the last bucket takes everything slower (~16 s and up).
class LatencyHistogram {
 public:
  static constexpr int kBuckets = 25;

  void Record(absl::Duration latency);

  // Upper bound (us) of the bucket holding quantile `q` in (0, 1]; 0 if no
  // sample was recorded.
  uint64_t QuantileMicros(double q) const;

  // Bucket upper bound in microseconds (the last one stands for +Inf).
  static uint64_t BucketMicros(int bucket) { return uint64_t{1} << bucket; }
  uint64_t bucket_count(int bucket) const {
    return counts_[bucket].load(std::memory_order_relaxed);
  }
  uint64_t count() const;
  double sum_seconds() const {
    return sum_micros_.load(std::memory_order_relaxed) / 1e6;
  }

 private:
  std::array<std::atomic<uint64_t>, kBuckets> counts_{};
  std::atomic<uint64_t> sum_micros_{0};
};

// Events of one tier that its own bookkeeping does not know about.
struct TierCounters {
  std::atomic<uint64_t> hits{0};
  std::atomic<uint64_t> misses{0};
  std::atomic<uint64_t> promotions{0};
  std::atomic<uint64_t> demotions{0};
  // Evicted chunks that could not be demoted (their key was busy) and were
  // dropped instead.
  std::atomic<uint64_t> dropped{0};
  LatencyHistogram read_latency;
  LatencyHistogram write_latency;

  static void Add(std::atomic<uint64_t>& counter, uint64_t n = 1) {
    counter.fetch_add(n, std::memory_order_relaxed);
  }
};

}  // namespace kvcache::kvstore

#endif  // KVCACHE_KVSTORE_TIER_METRICS_H_
