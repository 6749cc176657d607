#include "kvstore/prometheus_metrics.h"

#include <cstdint>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace kvcache::kvstore {
namespace {

const char* TierLabel(TierId tier) {
  switch (tier) {
    case TierId::kGpu:
      return "gpu";
    case TierId::kCpu:
      return "cpu";
    case TierId::kNvme:
      return "nvme";
  }
  return "unknown";
}

void Family(std::string& out, absl::string_view name, absl::string_view type,
            absl::string_view help) {
  absl::StrAppend(&out, "# HELP ", name, " ", help, "\n# TYPE ", name, " ",
                  type, "\n");
}

// One metric family with a sample per tier.
void PerTier(std::string& out, const std::vector<TierReport>& tiers,
             absl::string_view name, absl::string_view type,
             absl::string_view help,
             uint64_t (*value)(const TierReport& tier)) {
  Family(out, name, type, help);
  for (const TierReport& tier : tiers) {
    absl::StrAppend(&out, name, "{tier=\"", TierLabel(tier.tier), "\"} ",
                    value(tier), "\n");
  }
}

void Histogram(std::string& out, const std::vector<TierReport>& tiers,
               absl::string_view name, absl::string_view help,
               const LatencyHistogram& (*of)(const TierReport& tier)) {
  Family(out, name, "histogram", help);
  for (const TierReport& tier : tiers) {
    const LatencyHistogram& h = of(tier);
    const char* label = TierLabel(tier.tier);
    uint64_t cumulative = 0;
    for (int b = 0; b < LatencyHistogram::kBuckets - 1; ++b) {
      cumulative += h.bucket_count(b);
      absl::StrAppendFormat(&out, "%s_bucket{tier=\"%s\",le=\"%g\"} %d\n", name,
                            label, LatencyHistogram::BucketMicros(b) / 1e6,
                            cumulative);
    }
    cumulative += h.bucket_count(LatencyHistogram::kBuckets - 1);
    absl::StrAppendFormat(&out, "%s_bucket{tier=\"%s\",le=\"+Inf\"} %d\n", name,
                          label, cumulative);
    absl::StrAppendFormat(&out, "%s_sum{tier=\"%s\"} %.6f\n", name, label,
                          h.sum_seconds());
    absl::StrAppendFormat(&out, "%s_count{tier=\"%s\"} %d\n", name, label,
                          cumulative);
  }
}

// A label value as the text format spells it. Tenant names need no escape,
// but an owner read back from a damaged index could hold anything.
std::string LabelValue(absl::string_view value) {
  std::string out;
  for (char c : value) {
    if (c == '\\' || c == '"') out.push_back('\\');
    if (c == '\n') {
      out += "\\n";
    } else {
      out.push_back(c);
    }
  }
  return out;
}

// One metric family with a sample per tenant and tier.
void PerTenant(std::string& out, const std::vector<TierReport>& tiers,
               absl::string_view name, absl::string_view help,
               uint64_t (*value)(const OwnerUsage& owner)) {
  Family(out, name, "gauge", help);
  for (const TierReport& tier : tiers) {
    for (const OwnerUsage& owner : tier.usage.owners) {
      absl::StrAppend(&out, name, "{tenant=\"", LabelValue(owner.owner),
                      "\",tier=\"", TierLabel(tier.tier), "\"} ", value(owner),
                      "\n");
    }
  }
}

uint64_t Load(const std::atomic<uint64_t>& counter) {
  return counter.load(std::memory_order_relaxed);
}

}  // namespace

std::string RenderPrometheusMetrics(NodeState& node) {
  std::string out;
  const std::pair<const char*, const std::atomic<uint64_t>*> node_counters[] = {
      {"lookups", &node.lookups},
      {"hits", &node.hits},
      {"misses", &node.misses},
      {"puts", &node.puts},
      {"bytes_in", &node.bytes_in},
      {"bytes_out", &node.bytes_out},
      {"repaired_chunks", &node.repaired_chunks},
      {"handoff_chunks", &node.handoff_chunks},
      {"refused_puts", &node.refused_puts}};
  for (const auto& [name, counter] : node_counters) {
    const std::string metric = absl::StrCat("kvcache_", name, "_total");
    Family(out, metric, "counter", "KvCache API counter since start-up");
    absl::StrAppend(&out, metric, " ", Load(*counter), "\n");
  }
  Family(out, "kvcache_idle_streams_cancelled_total", "counter",
         "Put and Get streams cancelled for moving nothing for "
         "limits.stream_idle_timeout_seconds");
  absl::StrAppend(&out, "kvcache_idle_streams_cancelled_total ",
                  node.watchdog().timed_out_streams(), "\n");
  Family(out, "kvcache_put_bytes_in_flight", "gauge",
         "Put data buffered before its chunk is stored");
  absl::StrAppend(&out, "kvcache_put_bytes_in_flight ",
                  node.put_budget().used(), "\n");
  Family(out, "kvcache_put_bytes_in_flight_limit", "gauge",
         "limits.max_put_bytes_in_flight");
  absl::StrAppend(&out, "kvcache_put_bytes_in_flight_limit ",
                  node.put_budget().capacity(), "\n");
  const std::vector<TierReport> tiers = node.store().Report();
  PerTier(out, tiers, "kvcache_tier_used_bytes", "gauge",
          "Bytes of chunk data held (NVMe: allocated extents)",
          [](const TierReport& t) { return t.usage.used_bytes; });
  PerTier(out, tiers, "kvcache_tier_capacity_bytes", "gauge",
          "Configured capacity of the tier",
          [](const TierReport& t) { return t.usage.capacity_bytes; });
  PerTier(out, tiers, "kvcache_tier_chunks", "gauge", "Chunks held",
          [](const TierReport& t) { return t.usage.chunks; });
  PerTier(out, tiers, "kvcache_tier_pinned_chunks", "gauge",
          "Chunks held under a live pin",
          [](const TierReport& t) { return t.usage.pinned_chunks; });
  PerTier(out, tiers, "kvcache_tier_hits_total", "counter",
          "Get answered from this tier",
          [](const TierReport& t) { return Load(t.counters->hits); });
  PerTier(out, tiers, "kvcache_tier_misses_total", "counter",
          "Get that did not find the chunk in this tier",
          [](const TierReport& t) { return Load(t.counters->misses); });
  PerTier(out, tiers, "kvcache_tier_evictions_total", "counter",
          "Chunks pushed out of this tier for room",
          [](const TierReport& t) { return t.usage.evictions; });
  PerTier(out, tiers, "kvcache_tier_promotions_total", "counter",
          "Chunks copied into this tier on a hit in a slower one",
          [](const TierReport& t) { return Load(t.counters->promotions); });
  PerTier(out, tiers, "kvcache_tier_demotions_total", "counter",
          "Chunks moved from this tier to a slower one",
          [](const TierReport& t) { return Load(t.counters->demotions); });
  PerTier(out, tiers, "kvcache_tier_corrupt_chunks_total", "counter",
          "Chunks found damaged and dropped",
          [](const TierReport& t) { return t.usage.corrupt_chunks; });
  PerTenant(out, tiers, "kvcache_tenant_used_bytes",
            "Bytes of a tenant's chunk data held in the tier",
            [](const OwnerUsage& o) { return o.used_bytes; });
  PerTenant(out, tiers, "kvcache_tenant_quota_bytes",
            "Most bytes of the tenant's chunks the tier may hold "
            "(access.tenants.*_quota_bytes; 0: no quota)",
            [](const OwnerUsage& o) { return o.quota_bytes; });
  PerTenant(out, tiers, "kvcache_tenant_chunks",
            "Chunks of the tenant held in the tier",
            [](const OwnerUsage& o) { return o.chunks; });
  Histogram(out, tiers, "kvcache_tier_read_seconds",
            "Time to read one chunk from the tier",
            [](const TierReport& t) -> const LatencyHistogram& {
              return t.counters->read_latency;
            });
  Histogram(out, tiers, "kvcache_tier_write_seconds",
            "Time to write one chunk to the tier",
            [](const TierReport& t) -> const LatencyHistogram& {
              return t.counters->write_latency;
            });
  return out;
}

}  // namespace kvcache::kvstore
