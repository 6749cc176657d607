// kvcache_demo: what a worker does with kvcache, on real KV caches.
//
// Against a running kvcached, for each KV dump in the data directory: cut the
// cache into chunks, key them by their token ids, compress them with the
// codec, store them. Then a new prompt that starts like a stored one asks for
// its longest cached prefix, fetches it, decodes it and checks it against the
// original KV. Exits non-zero if anything does not hold.
//
//   kvcache_demo --addr=HOST:PORT [--kvdata=DIR] [--level=default]
//                [--chunk_tokens=128]
#include <cmath>
#include <cstdio>
#include <map>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/time/clock.h"
#include "client/chunk_key.h"
#include "client/kvcache_client.h"
#include "codec/codec.h"
#include "codec/half.h"
#include "codec/kv_dump.h"

namespace kvcache {
namespace {

struct DemoOptions {
  std::string address = "127.0.0.1:50051";
  std::string kvdata;
  codec::Level level = codec::kDefaultLevel;
  uint32_t chunk_tokens = 128;
};

double Ms(absl::Duration d) { return absl::ToDoubleMilliseconds(d); }
double KiB(size_t bytes) { return bytes / 1024.0; }

KeySpace KeySpaceFor(const codec::KvDump& dump, uint32_t chunk_tokens) {
  KeySpace space;
  space.name_space = "demo";
  space.model_id = "llama2.c/stories260K";
  space.dtype = "float16";
  space.layers = dump.shape.layers;
  space.kv_heads = dump.shape.kv_heads;
  space.head_dim = dump.shape.head_dim;
  space.chunk_tokens = chunk_tokens;
  return space;
}

// Relative L2 error of decoded fp16 values against the originals.
double RelativeL2(absl::Span<const uint16_t> original,
                  absl::Span<const uint16_t> decoded) {
  double err = 0, ref = 0;
  for (size_t i = 0; i < original.size(); ++i) {
    const double a = codec::HalfToFloat(original[i]);
    const double d = codec::HalfToFloat(decoded[i]) - a;
    err += d * d;
    ref += a * a;
  }
  return ref > 0 ? std::sqrt(err / ref) : std::sqrt(err);
}

// Cuts tokens [0, tokens) of `dump` into chunks and encodes each one.
absl::StatusOr<std::vector<std::string>> EncodePrefix(const codec::KvDump& dump,
                                                      uint32_t tokens,
                                                      uint32_t chunk_tokens,
                                                      codec::Level level) {
  std::vector<std::string> encoded;
  for (uint32_t t0 = 0; t0 < tokens; t0 += chunk_tokens) {
    const uint32_t t1 = std::min(tokens, t0 + chunk_tokens);
    codec::ChunkShape shape = dump.shape;
    shape.tokens = t1 - t0;
    absl::StatusOr<std::string> bits =
        codec::EncodeChunk(shape, codec::SliceTokens(dump, t0, t1), level);
    if (!bits.ok()) return bits.status();
    encoded.push_back(*std::move(bits));
  }
  return encoded;
}

absl::Status StoreDump(KvCacheClient& client, const codec::KvDump& dump,
                       const DemoOptions& options, codec::Level level) {
  const KeySpace space = KeySpaceFor(dump, options.chunk_tokens);
  absl::StatusOr<std::vector<ChunkKey>> keys =
      ChunkKeysForTokens(space, dump.token_ids);
  if (!keys.ok()) return keys.status();
  const absl::Time t0 = absl::Now();
  absl::StatusOr<std::vector<std::string>> encoded =
      EncodePrefix(dump, dump.shape.tokens, options.chunk_tokens, level);
  if (!encoded.ok()) return encoded.status();
  const absl::Time t1 = absl::Now();
  size_t stored = 0;
  for (const std::string& chunk : *encoded) stored += chunk.size();
  if (absl::Status s = client.Put(PromptChunks(*keys, 0, *encoded)); !s.ok()) {
    return s;
  }
  const absl::Time t2 = absl::Now();
  std::printf(
      "  %-24s %zu chunks  %7.1f KiB fp16 -> %6.1f KiB %-13s (%4.1fx)  "
      "encode %5.2f ms  put %5.2f ms\n",
      dump.name.c_str(), keys->size(), KiB(dump.shape.RawBytes()), KiB(stored),
      std::string(codec::LevelName(level)).c_str(),
      static_cast<double>(dump.shape.RawBytes()) / stored, Ms(t1 - t0),
      Ms(t2 - t1));
  return absl::OkStatus();
}

// A new prompt: the first `shared` tokens of `dump`, then tokens of its own.
// Finds, fetches and decodes its cached prefix; checks it.
absl::Status RestorePrefix(KvCacheClient& client, const codec::KvDump& dump,
                           const DemoOptions& options, uint32_t shared,
                           double max_error) {
  std::vector<int32_t> prompt(dump.token_ids.begin(),
                              dump.token_ids.begin() + shared);
  for (uint32_t i = 0; i < 200; ++i) prompt.push_back((7 * i + 3) % 500 + 1);
  const KeySpace space = KeySpaceFor(dump, options.chunk_tokens);
  absl::StatusOr<std::vector<ChunkKey>> keys =
      ChunkKeysForTokens(space, prompt);
  if (!keys.ok()) return keys.status();

  const absl::Time t0 = absl::Now();
  absl::StatusOr<LookupResult> hit = client.Lookup(*keys);
  if (!hit.ok()) return hit.status();
  const absl::Time t1 = absl::Now();
  const size_t expected = shared / options.chunk_tokens;
  std::printf(
      "  prompt of %zu tokens (first %u from %s): %zu chunk keys, cached "
      "prefix %zu chunks = %zu tokens (lookup %.2f ms)\n",
      prompt.size(), shared, dump.name.c_str(), keys->size(),
      hit->prefix_chunks, hit->prefix_chunks * options.chunk_tokens,
      Ms(t1 - t0));
  if (hit->prefix_chunks != expected) {
    return absl::InternalError(
        absl::StrCat("expected a cached prefix of ", expected, " chunks"));
  }

  absl::StatusOr<std::vector<FetchedChunk>> fetched =
      client.Get(absl::MakeConstSpan(*keys).first(hit->prefix_chunks));
  if (!fetched.ok()) return fetched.status();
  const absl::Time t2 = absl::Now();
  const uint32_t tokens = hit->prefix_chunks * options.chunk_tokens;
  codec::ChunkShape prefix_shape = dump.shape;
  prefix_shape.tokens = tokens;
  // Decode chunk by chunk, then lay the prefix out as one cache to compare.
  std::vector<uint16_t> restored;
  size_t fetched_bytes = 0;
  for (const FetchedChunk& chunk : *fetched) {
    absl::StatusOr<codec::ChunkShape> shape = codec::PeekShape(chunk.bytes);
    if (!shape.ok()) return shape.status();
    std::vector<uint16_t> values(shape->NumValues());
    if (absl::Status s =
            codec::DecodeChunk(chunk.bytes, absl::MakeSpan(values));
        !s.ok()) {
      return s;
    }
    restored.insert(restored.end(), values.begin(), values.end());
    fetched_bytes += chunk.bytes.size();
  }
  const absl::Time t3 = absl::Now();
  // Chunks are [layer][K,V][tokens][...] each; compare chunk by chunk.
  double worst = 0;
  size_t offset = 0;
  for (uint32_t c0 = 0; c0 < tokens; c0 += options.chunk_tokens) {
    const std::vector<uint16_t> original =
        codec::SliceTokens(dump, c0, c0 + options.chunk_tokens);
    worst = std::max(worst,
                     RelativeL2(original, absl::MakeConstSpan(restored).subspan(
                                              offset, original.size())));
    offset += original.size();
  }
  std::printf(
      "  fetched %zu chunks, %.1f KiB over gRPC in %.2f ms; decoded %.1f KiB "
      "of fp16 KV in %.2f ms; relative L2 error %.4f (bound %.4f)\n",
      fetched->size(), KiB(fetched_bytes), Ms(t2 - t1),
      KiB(prefix_shape.RawBytes()), Ms(t3 - t2), worst, max_error);
  if (worst > max_error) {
    return absl::InternalError(
        "restored KV is further from the original "
        "than the level allows");
  }
  return absl::OkStatus();
}

absl::Status Run(const DemoOptions& options) {
  absl::StatusOr<std::string> dir =
      options.kvdata.empty() ? codec::FindKvDataDir()
                             : absl::StatusOr<std::string>(options.kvdata);
  if (!dir.ok()) return dir.status();
  absl::StatusOr<std::vector<std::string>> manifests =
      codec::ListManifests(*dir);
  if (!manifests.ok()) return manifests.status();
  std::vector<codec::KvDump> dumps;
  for (const std::string& manifest : *manifests) {
    absl::StatusOr<codec::KvDump> dump = codec::LoadKvDump(manifest);
    if (!dump.ok()) return dump.status();
    if (dump->token_ids.size() != dump->shape.tokens) {
      return absl::InvalidArgumentError(
          absl::StrCat(manifest, ": the demo needs generation.token_ids"));
    }
    dumps.push_back(*std::move(dump));
  }
  if (dumps.empty()) {
    return absl::NotFoundError(absl::StrCat("no KV dumps in ", *dir));
  }

  ClientOptions client_options;
  client_options.address = options.address;
  absl::StatusOr<std::unique_ptr<KvCacheClient>> client =
      KvCacheClient::Connect(client_options);
  if (!client.ok()) return client.status();

  const codec::KvDump& first = dumps.front();
  std::printf(
      "kvcache demo: kvcached at %s, %zu real KV caches from %s\n"
      "model: %u layers, %u KV heads x %u dims, fp16; %u-token chunks\n\n",
      options.address.c_str(), dumps.size(), dir->c_str(), first.shape.layers,
      first.shape.kv_heads, first.shape.head_dim, options.chunk_tokens);

  std::printf("1. store every cache, compressed\n");
  for (size_t i = 0; i < dumps.size(); ++i) {
    // The last cache is stored losslessly to show the exact round trip.
    const codec::Level level =
        i + 1 == dumps.size() ? codec::Level::kLossless : options.level;
    if (absl::Status s = StoreDump(**client, dumps[i], options, level);
        !s.ok()) {
      return s;
    }
  }

  std::printf("\n2. a new prompt shares its beginning with a stored one\n");
  // The loosest relative-L2 bound codec/README.md documents for a lossy
  // level (tiny's); lossless must be exact.
  const double lossy_bound =
      options.level == codec::Level::kLossless ? 0 : 0.65;
  if (absl::Status s = RestorePrefix(
          **client, first, options, 2 * options.chunk_tokens + 44, lossy_bound);
      !s.ok()) {
    return s;
  }
  std::printf("\n3. the same, from the losslessly stored cache\n");
  if (absl::Status s = RestorePrefix(**client, dumps.back(), options,
                                     3 * options.chunk_tokens + 1, 0.0);
      !s.ok()) {
    return s;
  }

  absl::StatusOr<v1::StatsResponse> stats = (*client)->Stats();
  if (!stats.ok()) return stats.status();
  std::printf(
      "\nnode: %llu chunks held, %llu puts, %llu lookups, %llu chunk hits, "
      "%llu misses\n",
      static_cast<unsigned long long>(stats->chunks()),
      static_cast<unsigned long long>(stats->puts()),
      static_cast<unsigned long long>(stats->lookups()),
      static_cast<unsigned long long>(stats->hits()),
      static_cast<unsigned long long>(stats->misses()));
  return absl::OkStatus();
}

}  // namespace
}  // namespace kvcache

int main(int argc, char** argv) {
  kvcache::DemoOptions options;
  for (int i = 1; i < argc; ++i) {
    std::pair<std::string, std::string> kv =
        absl::StrSplit(argv[i], absl::MaxSplits('=', 1));
    absl::StatusOr<kvcache::codec::Level> level;
    if (kv.first == "--addr") {
      options.address = kv.second;
    } else if (kv.first == "--kvdata") {
      options.kvdata = kv.second;
    } else if (kv.first == "--level" &&
               (level = kvcache::codec::ParseLevel(kv.second)).ok()) {
      options.level = *level;
    } else if (kv.first == "--chunk_tokens" &&
               absl::SimpleAtoi(kv.second, &options.chunk_tokens) &&
               options.chunk_tokens > 0) {
    } else {
      std::fprintf(stderr,
                   "usage: kvcache_demo --addr=HOST:PORT [--kvdata=DIR] "
                   "[--level=NAME] [--chunk_tokens=N]\nbad argument: %s\n",
                   argv[i]);
      return 2;
    }
  }
  const absl::Status status = kvcache::Run(options);
  if (!status.ok()) {
    std::fprintf(stderr, "kvcache_demo: %s\n", status.ToString().c_str());
    return 1;
  }
  std::printf("demo: ok\n");
  return 0;
}
