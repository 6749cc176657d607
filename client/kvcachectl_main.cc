// kvcachectl: the operator's command line for a kvcached node or cluster.
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <map>
#include <sstream>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "absl/time/time.h"
#include "client/chunk_key.h"
#include "client/cluster_client.h"
#include "client/kvcache_client.h"

namespace kvcache {
namespace {

constexpr char kUsage[] =
    R"(usage: kvcachectl [--addr=HOST:PORT] [--timeout=30s] COMMAND [ARGS]
       kvcachectl --etcd=HOST:PORT[,HOST:PORT] [--cluster=NAME] COMMAND [ARGS]

commands:
  status                         node, tier usage and counters
  config                         the node's effective configuration
  put FILE [--key=HEX] [--pin_ttl=DURATION] [--replace]
                                 store a file as one chunk; prints its key
                                 (default key: SHA-256 of the contents); a
                                 key already held keeps its bytes unless
                                 --replace
  get KEY --out=FILE             fetch a chunk into FILE ('-' for stdout)
  lookup KEY...                  how many leading keys are cached, and
                                 each one's size, tier, pin and codec
                                 shape (layers x tokens x kv heads x
                                 head dim, dtype, level)
  rm KEY...                      delete chunks
  pin KEY... --ttl=DURATION      keep chunks from eviction (e.g. --ttl=30m)
  unpin KEY...
  keys --model=ID --tokens=1,2,3 [--namespace=NS] [--dtype=float16]
       [--layers=N] [--kv_heads=N] [--head_dim=N] [--tp_rank=N]
       [--tp_size=N] [--chunk_tokens=256]
                                 print the chunk keys of a token sequence
  drain                          stop the node from taking new chunks

cluster commands (with --etcd; --cluster defaults to "default"; etcd over
TLS with --etcd_ca=FILE, and --etcd_cert=FILE --etcd_key=FILE for etcd's
client certificate):
  cluster status                 every node: address, state, chunks, usage,
                                 hit rate
  drain NODE [--wait=10m]        take NODE out of the placement and wait
                                 until its chunks are held by their new
                                 owners; then it can be stopped

credentials (for every command that talks to a node):
  --ca=FILE                      PEM CA the node's certificate chains to;
                                 turns TLS on (without it: plaintext)
  --cert=FILE --key=FILE         client certificate and key (mutual TLS)
  --server_name=NAME             name the node's certificate must carry,
                                 if not the host in --addr
  --token_file=FILE              bearer token sent with every call; or set
                                 KVCACHE_TOKEN (--token=TOKEN also works,
                                 but shows the token to other local users)
  --namespace=NAME               a shared namespace the tenant was granted
                                 (default: the tenant's own)
)";

struct Args {
  std::vector<std::string> positional;
  std::map<std::string, std::string> flags;

  std::string Flag(const std::string& name, const std::string& fallback) const {
    auto it = flags.find(name);
    return it == flags.end() ? fallback : it->second;
  }
};

Args ParseArgs(int argc, char** argv) {
  Args args;
  for (int i = 1; i < argc; ++i) {
    absl::string_view arg = argv[i];
    if (absl::StartsWith(arg, "--")) {
      std::pair<std::string, std::string> kv =
          absl::StrSplit(arg.substr(2), absl::MaxSplits('=', 1));
      args.flags[kv.first] = kv.second;
    } else {
      args.positional.emplace_back(arg);
    }
  }
  return args;
}

absl::StatusOr<absl::Duration> DurationFlag(const Args& args,
                                            const std::string& name,
                                            const std::string& fallback) {
  absl::Duration d;
  const std::string text = args.Flag(name, fallback);
  if (!absl::ParseDuration(text, &d) || d < absl::ZeroDuration()) {
    return absl::InvalidArgumentError(
        absl::StrCat("--", name, "=", text, " is not a duration like 30s"));
  }
  return d;
}

absl::StatusOr<uint32_t> UintFlag(const Args& args, const std::string& name,
                                  uint32_t fallback) {
  const std::string text = args.Flag(name, std::to_string(fallback));
  uint32_t v = 0;
  if (!absl::SimpleAtoi(text, &v)) {
    return absl::InvalidArgumentError(
        absl::StrCat("--", name, "=", text, " is not a number"));
  }
  return v;
}

absl::StatusOr<std::vector<ChunkKey>> KeysFrom(
    const std::vector<std::string>& hex) {
  if (hex.empty()) return absl::InvalidArgumentError("name at least one KEY");
  std::vector<ChunkKey> keys;
  for (const std::string& h : hex) {
    absl::StatusOr<ChunkKey> key = ChunkKey::FromHex(h);
    if (!key.ok()) return key.status();
    keys.push_back(*key);
  }
  return keys;
}

const char* TierName(v1::Tier tier) {
  switch (tier) {
    case v1::TIER_GPU:
      return "gpu";
    case v1::TIER_CPU:
      return "cpu";
    case v1::TIER_NVME:
      return "nvme";
    default:
      return "?";
  }
}

absl::Status Status(KvCacheClient& client) {
  absl::StatusOr<v1::NodeInfoResponse> info = client.NodeInfo();
  if (!info.ok()) return info.status();
  absl::StatusOr<v1::TierUsageResponse> usage = client.TierUsage();
  if (!usage.ok()) return usage.status();
  absl::StatusOr<v1::StatsResponse> stats = client.Stats();
  if (!stats.ok()) return stats.status();
  const absl::Duration uptime =
      absl::Now() - absl::FromUnixMillis(info->started_unix_ms());
  std::printf("node      %s (kvcached %s) at %s, up %s%s\n",
              info->node_id().c_str(), info->version().c_str(),
              client.options().address.c_str(),
              absl::FormatDuration(absl::Trunc(uptime, absl::Milliseconds(100)))
                  .c_str(),
              info->draining() ? ", DRAINING" : "");
  for (const v1::TierUsage& tier : usage->tiers()) {
    std::printf("tier %-4s %.1f / %.1f MiB used, %llu chunks (%llu pinned)\n",
                TierName(tier.tier()), tier.used_bytes() / 1048576.0,
                tier.capacity_bytes() / 1048576.0,
                static_cast<unsigned long long>(tier.chunks()),
                static_cast<unsigned long long>(tier.pinned_chunks()));
    std::printf(
        "          %llu hits, %llu misses, %llu evictions, %llu promotions, "
        "%llu demotions, %llu corrupt; read p50/p99 %llu/%llu us, "
        "write p50/p99 %llu/%llu us\n",
        static_cast<unsigned long long>(tier.hits()),
        static_cast<unsigned long long>(tier.misses()),
        static_cast<unsigned long long>(tier.evictions()),
        static_cast<unsigned long long>(tier.promotions()),
        static_cast<unsigned long long>(tier.demotions()),
        static_cast<unsigned long long>(tier.corrupt_chunks()),
        static_cast<unsigned long long>(tier.read_p50_us()),
        static_cast<unsigned long long>(tier.read_p99_us()),
        static_cast<unsigned long long>(tier.write_p50_us()),
        static_cast<unsigned long long>(tier.write_p99_us()));
    for (const v1::TenantTierUsage& tenant : tier.tenants()) {
      std::printf("          tenant %s: %.1f MiB in %llu chunks%s\n",
                  tenant.tenant().empty() ? "(none)" : tenant.tenant().c_str(),
                  tenant.used_bytes() / 1048576.0,
                  static_cast<unsigned long long>(tenant.chunks()),
                  tenant.quota_bytes() == 0
                      ? ""
                      : absl::StrFormat(" of a %.1f MiB quota",
                                        tenant.quota_bytes() / 1048576.0)
                            .c_str());
    }
  }
  const uint64_t asked = stats->hits() + stats->misses();
  std::printf(
      "traffic   %llu lookups, %llu puts, %.1f MiB in, %.1f MiB out\n"
      "hits      %llu of %llu chunks (%.1f%%), %llu evictions\n",
      static_cast<unsigned long long>(stats->lookups()),
      static_cast<unsigned long long>(stats->puts()),
      stats->bytes_in() / 1048576.0, stats->bytes_out() / 1048576.0,
      static_cast<unsigned long long>(stats->hits()),
      static_cast<unsigned long long>(asked),
      asked ? 100.0 * stats->hits() / asked : 0.0,
      static_cast<unsigned long long>(stats->evictions()));
  return absl::OkStatus();
}

absl::Status Put(KvCacheClient& client, const Args& args) {
  if (args.positional.size() != 2) {
    return absl::InvalidArgumentError("put takes one FILE");
  }
  std::ifstream file(args.positional[1], std::ios::binary);
  if (!file) {
    return absl::NotFoundError(
        absl::StrCat("cannot read '", args.positional[1], "'"));
  }
  std::stringstream contents;
  contents << file.rdbuf();
  const std::string bytes = contents.str();
  ChunkKey key = ContentKey(bytes);
  if (args.flags.count("key")) {
    absl::StatusOr<ChunkKey> given = ChunkKey::FromHex(args.Flag("key", ""));
    if (!given.ok()) return given.status();
    key = *given;
  }
  absl::StatusOr<absl::Duration> pin_ttl = DurationFlag(args, "pin_ttl", "0s");
  if (!pin_ttl.ok()) return pin_ttl.status();
  const ChunkToPut chunk{key, bytes};
  const PutOptions options{*pin_ttl, args.flags.count("replace") > 0};
  if (absl::Status s = client.Put({chunk}, options); !s.ok()) {
    return s;
  }
  std::printf("%s %zu bytes\n", key.ToHex().c_str(), bytes.size());
  return absl::OkStatus();
}

absl::Status Get(KvCacheClient& client, const Args& args) {
  if (args.positional.size() != 2 || !args.flags.count("out")) {
    return absl::InvalidArgumentError("get takes one KEY and --out=FILE");
  }
  absl::StatusOr<std::vector<ChunkKey>> keys = KeysFrom({args.positional[1]});
  if (!keys.ok()) return keys.status();
  absl::StatusOr<std::vector<FetchedChunk>> chunks = client.Get(*keys);
  if (!chunks.ok()) return chunks.status();
  const std::string& bytes = chunks->front().bytes;
  const std::string out = args.Flag("out", "");
  if (out == "-") {
    std::fwrite(bytes.data(), 1, bytes.size(), stdout);
    return absl::OkStatus();
  }
  std::ofstream file(out, std::ios::binary);
  file.write(bytes.data(), bytes.size());
  if (!file)
    return absl::InternalError(absl::StrCat("cannot write '", out, "'"));
  std::fprintf(stderr, "%zu bytes from tier %s -> %s\n", bytes.size(),
               TierName(chunks->front().tier), out.c_str());
  return absl::OkStatus();
}

// " codec=LAYERSxTOKENSxKV_HEADSxHEAD_DIM DTYPE LEVEL" for a codec chunk,
// "" for opaque bytes.
std::string CodecDescription(const v1::ChunkInfo& info) {
  if (!info.has_codec()) return "";
  const v1::CodecSummary& c = info.codec();
  return absl::StrCat(" codec=", c.layers(), "x", c.tokens(), "x", c.kv_heads(),
                      "x", c.head_dim(), " ", c.dtype(), " ", c.level());
}

absl::Status Lookup(KvCacheClient& client, const Args& args) {
  absl::StatusOr<std::vector<ChunkKey>> keys =
      KeysFrom({args.positional.begin() + 1, args.positional.end()});
  if (!keys.ok()) return keys.status();
  absl::StatusOr<LookupResult> result = client.Lookup(*keys);
  if (!result.ok()) return result.status();
  std::printf("prefix %zu of %zu chunks cached\n", result->prefix_chunks,
              keys->size());
  for (size_t i = 0; i < result->chunks.size(); ++i) {
    const v1::ChunkInfo& info = result->chunks[i];
    std::printf("  %s %llu bytes tier=%s%s%s\n", (*keys)[i].ToHex().c_str(),
                static_cast<unsigned long long>(info.size_bytes()),
                TierName(info.tier()), info.pinned() ? " pinned" : "",
                CodecDescription(info).c_str());
  }
  return absl::OkStatus();
}

absl::Status PrintKeys(const Args& args) {
  KeySpace space;
  space.model_id = args.Flag("model", "");
  space.name_space = args.Flag("namespace", space.name_space);
  space.dtype = args.Flag("dtype", space.dtype);
  struct {
    const char* name;
    uint32_t* field;
  } numbers[] = {
      {"layers", &space.layers},     {"kv_heads", &space.kv_heads},
      {"head_dim", &space.head_dim}, {"tp_rank", &space.tp_rank},
      {"tp_size", &space.tp_size},   {"chunk_tokens", &space.chunk_tokens}};
  for (const auto& n : numbers) {
    absl::StatusOr<uint32_t> v = UintFlag(args, n.name, *n.field);
    if (!v.ok()) return v.status();
    *n.field = *v;
  }
  std::vector<int32_t> tokens;
  for (absl::string_view t :
       absl::StrSplit(args.Flag("tokens", ""), ',', absl::SkipEmpty())) {
    int32_t token = 0;
    if (!absl::SimpleAtoi(t, &token)) {
      return absl::InvalidArgumentError(
          absl::StrCat("--tokens: '", t, "' is not a token id"));
    }
    tokens.push_back(token);
  }
  absl::StatusOr<std::vector<ChunkKey>> keys =
      ChunkKeysForTokens(space, tokens);
  if (!keys.ok()) return keys.status();
  for (const ChunkKey& key : *keys) std::printf("%s\n", key.ToHex().c_str());
  return absl::OkStatus();
}

// The credential flags, into `options` (files are read by Connect, whose
// errors name the option; the flag for each is in kUsage).
void SetCredentials(const Args& args, ClientOptions& options) {
  options.ca_file = args.Flag("ca", "");
  options.cert_file = args.Flag("cert", "");
  options.key_file = args.Flag("key", "");
  options.server_name = args.Flag("server_name", "");
  options.token_file = args.Flag("token_file", "");
  options.key_namespace = args.Flag("namespace", "");
  const char* from_environment = std::getenv("KVCACHE_TOKEN");
  options.token = args.Flag(
      "token", options.token_file.empty() && from_environment != nullptr
                   ? from_environment
                   : "");
}

absl::StatusOr<std::unique_ptr<ClusterClient>> ConnectCluster(
    const Args& args, absl::Duration timeout) {
  ClusterClientOptions options;
  options.etcd_endpoints =
      absl::StrSplit(args.Flag("etcd", ""), ',', absl::SkipEmpty());
  options.cluster_name = args.Flag("cluster", options.cluster_name);
  options.etcd_ca_file = args.Flag("etcd_ca", "");
  options.etcd_cert_file = args.Flag("etcd_cert", "");
  options.etcd_key_file = args.Flag("etcd_key", "");
  options.node.timeout = timeout;
  SetCredentials(args, options.node);
  return ClusterClient::Connect(options);
}

const char* StateName(const cluster::NodeRecord& node) {
  return node.draining ? "draining" : "serving";
}

absl::Status ClusterStatus(ClusterClient& cluster, const Args& args) {
  const std::shared_ptr<const cluster::Membership> membership =
      cluster.Membership();
  std::printf("cluster %s: %zu nodes\n",
              args.Flag("cluster", "default").c_str(),
              membership->nodes.size());
  std::printf("%-16s %-22s %-9s %9s %10s %10s %9s\n", "NODE", "ADDRESS",
              "STATE", "CHUNKS", "USED_MiB", "CAP_MiB", "HIT_RATE");
  for (const cluster::NodeRecord& node : membership->nodes) {
    absl::StatusOr<KvCacheClient*> client = cluster.Node(node);
    absl::StatusOr<v1::TierUsageResponse> usage =
        client.ok() ? (*client)->TierUsage() : client.status();
    absl::StatusOr<v1::StatsResponse> stats =
        usage.ok() ? (*client)->Stats() : usage.status();
    if (!stats.ok()) {
      std::printf("%-16s %-22s %-9s unreachable: %s\n", node.node_id.c_str(),
                  node.address.c_str(), StateName(node),
                  std::string(stats.status().message()).c_str());
      continue;
    }
    uint64_t used = 0, capacity = 0;
    for (const v1::TierUsage& tier : usage->tiers()) {
      used += tier.used_bytes();
      capacity += tier.capacity_bytes();
    }
    const uint64_t asked = stats->hits() + stats->misses();
    std::printf("%-16s %-22s %-9s %9llu %10.1f %10.1f %8.1f%%\n",
                node.node_id.c_str(), node.address.c_str(), StateName(node),
                static_cast<unsigned long long>(stats->chunks()),
                used / 1048576.0, capacity / 1048576.0,
                asked ? 100.0 * stats->hits() / asked : 0.0);
  }
  return absl::OkStatus();
}

absl::Status DrainNode(ClusterClient& cluster, const Args& args) {
  const std::string& node_id = args.positional[1];
  absl::StatusOr<absl::Duration> wait = DurationFlag(args, "wait", "10m");
  if (!wait.ok()) return wait.status();
  const std::shared_ptr<const cluster::Membership> membership =
      cluster.Membership();
  auto node = std::find_if(
      membership->nodes.begin(), membership->nodes.end(),
      [&](const cluster::NodeRecord& n) { return n.node_id == node_id; });
  if (node == membership->nodes.end()) {
    return absl::NotFoundError(absl::StrCat("no node '", node_id,
                                            "' in cluster ",
                                            args.Flag("cluster", "default")));
  }
  absl::StatusOr<KvCacheClient*> client = cluster.Node(*node);
  if (!client.ok()) return client.status();
  absl::StatusOr<uint64_t> held = (*client)->Drain();
  if (!held.ok()) return held.status();
  std::printf("%s draining: handing %llu chunks to their new owners\n",
              node_id.c_str(), static_cast<unsigned long long>(*held));
  const absl::Time deadline = absl::Now() + *wait;
  while (true) {
    absl::StatusOr<v1::NodeInfoResponse> info = (*client)->NodeInfo();
    if (!info.ok()) return info.status();
    if (info->drained()) {
      std::printf("%s drained: %llu chunks handed off; it can be stopped\n",
                  node_id.c_str(),
                  static_cast<unsigned long long>(info->handoff_chunks()));
      return absl::OkStatus();
    }
    if (absl::Now() > deadline) {
      return absl::DeadlineExceededError(
          absl::StrCat(node_id, " is still handing chunks off after ",
                       absl::FormatDuration(*wait), " (",
                       info->handoff_chunks(), " so far); see its log"));
    }
    absl::SleepFor(absl::Milliseconds(200));
  }
}

absl::Status RunCluster(const Args& args, absl::Duration timeout) {
  absl::StatusOr<std::unique_ptr<ClusterClient>> cluster =
      ConnectCluster(args, timeout);
  if (!cluster.ok()) return cluster.status();
  const std::vector<std::string>& p = args.positional;
  if (p.size() == 2 && p[0] == "cluster" && p[1] == "status") {
    return ClusterStatus(**cluster, args);
  }
  if (p.size() == 2 && p[0] == "drain") return DrainNode(**cluster, args);
  return absl::InvalidArgumentError(
      "with --etcd, the commands are 'cluster status' and 'drain NODE'");
}

absl::Status Run(const Args& args) {
  if (args.positional.empty()) {
    return absl::InvalidArgumentError("no command given");
  }
  const std::string& command = args.positional[0];
  if (command == "keys") return PrintKeys(args);

  absl::StatusOr<absl::Duration> timeout = DurationFlag(args, "timeout", "30s");
  if (!timeout.ok()) return timeout.status();
  if (args.flags.count("etcd")) return RunCluster(args, *timeout);
  ClientOptions options;
  options.address = args.Flag("addr", options.address);
  options.timeout = *timeout;
  options.connect_timeout = std::min(options.connect_timeout, *timeout);
  options.fail_fast = true;
  SetCredentials(args, options);
  absl::StatusOr<std::unique_ptr<KvCacheClient>> client =
      KvCacheClient::Connect(options);
  if (!client.ok()) return client.status();
  KvCacheClient& c = **client;
  const std::vector<std::string> rest(args.positional.begin() + 1,
                                      args.positional.end());

  if (command == "status") return Status(c);
  if (command == "config") {
    absl::StatusOr<std::string> text = c.Config();
    if (!text.ok()) return text.status();
    std::printf("%s", text->c_str());
    return absl::OkStatus();
  }
  if (command == "put") return Put(c, args);
  if (command == "get") return Get(c, args);
  if (command == "lookup") return Lookup(c, args);
  if (command == "drain") {
    absl::StatusOr<uint64_t> remaining = c.Drain();
    if (!remaining.ok()) return remaining.status();
    std::printf("draining: no new chunks accepted; %llu chunks held\n",
                static_cast<unsigned long long>(*remaining));
    return absl::OkStatus();
  }
  absl::StatusOr<std::vector<ChunkKey>> keys = KeysFrom(rest);
  if (!keys.ok()) return keys.status();
  if (command == "rm") {
    absl::StatusOr<uint32_t> deleted = c.Delete(*keys);
    if (!deleted.ok()) return deleted.status();
    std::printf("deleted %u of %zu\n", *deleted, keys->size());
    return absl::OkStatus();
  }
  if (command == "pin") {
    absl::StatusOr<absl::Duration> ttl = DurationFlag(args, "ttl", "10m");
    if (!ttl.ok()) return ttl.status();
    absl::StatusOr<absl::Time> expiry = c.Pin(*keys, *ttl);
    if (!expiry.ok()) return expiry.status();
    std::printf("pinned %zu until %s\n", keys->size(),
                absl::FormatTime(*expiry, absl::UTCTimeZone()).c_str());
    return absl::OkStatus();
  }
  if (command == "unpin") {
    if (absl::Status s = c.Unpin(*keys); !s.ok()) return s;
    std::printf("unpinned %zu\n", keys->size());
    return absl::OkStatus();
  }
  return absl::InvalidArgumentError(
      absl::StrCat("unknown command '", command, "'"));
}

}  // namespace
}  // namespace kvcache

int main(int argc, char** argv) {
  const kvcache::Args args = kvcache::ParseArgs(argc, argv);
  if (args.flags.count("help") || args.positional.empty()) {
    std::fputs(kvcache::kUsage, args.positional.empty() ? stderr : stdout);
    return args.flags.count("help") ? 0 : 2;
  }
  const absl::Status status = kvcache::Run(args);
  if (!status.ok()) {
    std::fprintf(stderr, "kvcachectl: %s: %s\n",
                 absl::StatusCodeToString(status.code()).c_str(),
                 std::string(status.message()).c_str());
    return status.code() == absl::StatusCode::kInvalidArgument ? 2 : 1;
  }
  return 0;
}
