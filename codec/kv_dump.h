// Loads the real KV-cache dumps (shared/kvdata beside the repository) that
// tests and the benchmark measure against. See shared/kvdata/README.md.
//
// Thread-safe: functions keep no state.
#ifndef KVCACHE_CODEC_KV_DUMP_H_
#define KVCACHE_CODEC_KV_DUMP_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "codec/codec.h"

namespace kvcache::codec {

struct KvDump {
  std::string name;  // Manifest file name without ".json".
  ChunkShape shape;  // All of the dump's tokens; fp16.
  uint32_t heads =
      0;  // Query heads; head h reads kv head h / (heads / kv_heads).
  std::vector<uint16_t> kv;       // [layer][K,V][token][kv_head][head_dim]
  std::vector<uint16_t> queries;  // [layer][token][head][head_dim]
  // The token ids the cache was computed from (generation.token_ids), when
  // the manifest has them; empty otherwise.
  std::vector<int32_t> token_ids;
  // How the tokens were sampled (generation.temperature) and their mean
  // negative log-likelihood under the model (generation.mean_token_nll), when
  // the manifest says.
  double generation_temperature = 1.0;
  double mean_token_nll = 0;
};

// Returns the dump directory: $KVCACHE_KVDATA if set; else, under Bazel, the
// runfiles of @kvdata//:dumps (list them in the target's data); else the
// first `shared/kvdata` found walking up from the working directory or the
// workspace. NotFound, naming the places searched, otherwise.
absl::StatusOr<std::string> FindKvDataDir();

// Returns the paths of all *.json manifests in `dir`, sorted.
absl::StatusOr<std::vector<std::string>> ListManifests(const std::string& dir);

// Loads a manifest and the .kv and .q.f16 files it names (relative to the
// manifest's directory). Fails if a field is missing or a file's size does
// not match the shape.
absl::StatusOr<KvDump> LoadKvDump(const std::string& manifest_path);

// Returns tokens [t0, t1) of `dump` in chunk layout.
std::vector<uint16_t> SliceTokens(const KvDump& dump, uint32_t t0, uint32_t t1);

}  // namespace kvcache::codec

#endif  // KVCACHE_CODEC_KV_DUMP_H_
