// The node's counters and per-tier metrics in Prometheus text exposition
// format (version 0.0.4), for the metrics_address endpoint.
//
// Thread-safe: reads atomics and tier usage under the tiers' own locks.
#ifndef KVCACHE_KVSTORE_PROMETHEUS_METRICS_H_
#define KVCACHE_KVSTORE_PROMETHEUS_METRICS_H_

#include <string>

#include "kvstore/kvcache_service.h"

namespace kvcache::kvstore {

std::string RenderPrometheusMetrics(NodeState& node);

}  // namespace kvcache::kvstore

#endif  // KVCACHE_KVSTORE_PROMETHEUS_METRICS_H_
