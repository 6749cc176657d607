#include "kvstore/tier_metrics.h"

#include <algorithm>
#include <cmath>

namespace kvcache::kvstore {

void LatencyHistogram::Record(absl::Duration latency) {
  const int64_t micros =
      std::max<int64_t>(1, absl::ToInt64Microseconds(latency));
  int bucket = 0;
  while (bucket < kBuckets - 1 &&
         BucketMicros(bucket) < static_cast<uint64_t>(micros)) {
    ++bucket;
  }
  counts_[bucket].fetch_add(1, std::memory_order_relaxed);
  sum_micros_.fetch_add(micros, std::memory_order_relaxed);
}

uint64_t LatencyHistogram::count() const {
  uint64_t total = 0;
  for (const auto& c : counts_) total += c.load(std::memory_order_relaxed);
  return total;
}

uint64_t LatencyHistogram::QuantileMicros(double q) const {
  const uint64_t total = count();
  if (total == 0) return 0;
  const uint64_t rank =
      std::max<uint64_t>(1, static_cast<uint64_t>(std::ceil(q * total)));
  uint64_t seen = 0;
  for (int bucket = 0; bucket < kBuckets; ++bucket) {
    seen += bucket_count(bucket);
    if (seen >= rank) return BucketMicros(bucket);
  }
  return BucketMicros(kBuckets - 1);
}

}  // namespace kvcache::kvstore
