// Compares the codec's levels with zstd and KIVI-style quantization on real
// KV-cache dumps: size ratio, K/V/attention-output error, and single-core
// encode/decode throughput. Prints Markdown tables.
//
// Usage: codec_bench [--profile=P.kvp] [DIR_OR_MANIFEST.json ...]
// With no manifests it measures every dump in shared/kvdata (see kv_dump.h).
// With a model profile (kvcodec calibrate, on other text of the dumps'
// model) the transform levels get rows too.
#include <zstd.h>

#include <chrono>
#include <cstdio>
#include <filesystem>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "absl/strings/str_format.h"
#include "absl/strings/strip.h"
#include "codec/cachegen_ref.h"
#include "codec/codec.h"
#include "codec/kivi.h"
#include "codec/kv_dump.h"
#include "codec/metrics.h"

namespace kvcache::codec {
namespace {

constexpr uint32_t kChunkTokens = 256;

struct Row {
  std::string name;
  size_t bytes = 0;
  KvErrors errors;
  double encode_mbps = 0, decode_mbps = 0;  // 0: not measured.
};

// Runs `fn` until at least 0.3 s have passed; returns MB/s of `raw_bytes`
// per call, from the fastest call.
double Throughput(size_t raw_bytes, const std::function<void()>& fn) {
  using Clock = std::chrono::steady_clock;
  double best = 1e30, total = 0;
  for (int i = 0; i < 3 || total < 0.3; ++i) {
    const auto start = Clock::now();
    fn();
    const double s =
        std::chrono::duration<double>(Clock::now() - start).count();
    best = std::min(best, s);
    total += s;
  }
  return raw_bytes / best / 1e6;
}

struct Chunk {
  ChunkShape shape;
  std::vector<uint16_t> values;
  uint32_t first_token;
};

std::vector<Chunk> CutChunks(const KvDump& dump) {
  std::vector<Chunk> chunks;
  for (uint32_t t0 = 0; t0 < dump.shape.tokens; t0 += kChunkTokens) {
    Chunk c;
    c.shape = dump.shape;
    c.shape.tokens = std::min(kChunkTokens, dump.shape.tokens - t0);
    c.values = SliceTokens(dump, t0, t0 + c.shape.tokens);
    c.first_token = t0;
    chunks.push_back(std::move(c));
  }
  return chunks;
}

// Writes chunk values back into a whole-dump buffer.
void Place(const KvDump& dump, const Chunk& c,
           const std::vector<uint16_t>& values, std::vector<uint16_t>* all) {
  const size_t row = size_t{dump.shape.kv_heads} * dump.shape.head_dim;
  const size_t n = size_t{c.shape.tokens} * row;
  for (size_t p = 0; p < 2 * size_t{dump.shape.layers}; ++p) {
    std::copy(values.begin() + p * n, values.begin() + (p + 1) * n,
              all->begin() + (p * dump.shape.tokens + c.first_token) * row);
  }
}

// Encode options of a chunk at a transform level.
EncodeOptions OptionsFor(const Chunk& c, const ModelProfile* profile) {
  EncodeOptions options;
  options.profile = profile;
  options.first_position = c.first_token;
  return options;
}

using EncodeFn = std::function<absl::StatusOr<std::string>(const Chunk&)>;
using DecodeFn =
    std::function<absl::Status(absl::string_view, absl::Span<uint16_t>)>;

// A codec that writes real streams: their total size, the error of what
// they decode to, and both directions' throughput.
absl::StatusOr<Row> MeasureStreams(std::string name, const KvDump& dump,
                                   const std::vector<Chunk>& chunks,
                                   const EncodeFn& encode,
                                   const DecodeFn& decode) {
  Row row;
  row.name = std::move(name);
  std::vector<std::string> streams(chunks.size());
  std::vector<std::vector<uint16_t>> decoded(chunks.size());
  std::vector<uint16_t> all(dump.kv.size());
  for (size_t i = 0; i < chunks.size(); ++i) {
    absl::StatusOr<std::string> s = encode(chunks[i]);
    if (!s.ok()) return s.status();
    streams[i] = *std::move(s);
    row.bytes += streams[i].size();
    decoded[i].resize(chunks[i].values.size());
    if (absl::Status st = decode(streams[i], absl::MakeSpan(decoded[i]));
        !st.ok()) {
      return st;
    }
    Place(dump, chunks[i], decoded[i], &all);
  }
  row.errors = MeasureErrors(dump, all);
  const size_t raw = dump.kv.size() * 2;
  row.encode_mbps = Throughput(raw, [&] {
    for (const Chunk& c : chunks) {
      if (!encode(c).ok()) std::abort();
    }
  });
  row.decode_mbps = Throughput(raw, [&] {
    for (size_t i = 0; i < chunks.size(); ++i) {
      if (!decode(streams[i], absl::MakeSpan(decoded[i])).ok()) std::abort();
    }
  });
  return row;
}

absl::StatusOr<Row> MeasureLevel(const KvDump& dump,
                                 const std::vector<Chunk>& chunks, Level level,
                                 const ModelProfile* profile) {
  return MeasureStreams(
      absl::StrCat("kvcache ", LevelName(level)), dump, chunks,
      [&](const Chunk& c) {
        return EncodeChunk(c.shape, c.values, level, OptionsFor(c, profile));
      },
      [&](absl::string_view stream, absl::Span<uint16_t> out) {
        return DecodeChunk(stream, out, profile);
      });
}

Row MeasureZstd(const KvDump& dump, const std::vector<Chunk>& chunks,
                int zlevel) {
  Row row;
  row.name = absl::StrCat("zstd -", zlevel);
  row.errors = MeasureErrors(dump, dump.kv);
  std::vector<std::string> streams(chunks.size());
  for (size_t i = 0; i < chunks.size(); ++i) {
    const size_t raw = chunks[i].values.size() * 2;
    streams[i].resize(ZSTD_compressBound(raw));
    streams[i].resize(ZSTD_compress(streams[i].data(), streams[i].size(),
                                    chunks[i].values.data(), raw, zlevel));
    row.bytes += streams[i].size();
  }
  const size_t raw = dump.kv.size() * 2;
  std::string scratch;
  row.encode_mbps = Throughput(raw, [&] {
    for (const Chunk& c : chunks) {
      scratch.resize(ZSTD_compressBound(c.values.size() * 2));
      ZSTD_compress(scratch.data(), scratch.size(), c.values.data(),
                    c.values.size() * 2, zlevel);
    }
  });
  std::vector<uint16_t> out(dump.kv.size());
  row.decode_mbps = Throughput(raw, [&] {
    for (size_t i = 0; i < chunks.size(); ++i) {
      ZSTD_decompress(out.data(), out.size() * 2, streams[i].data(),
                      streams[i].size());
    }
  });
  return row;
}

Row MeasureKivi(const KvDump& dump, const std::vector<Chunk>& chunks,
                int bits) {
  Row row;
  row.name = absl::StrCat("KIVI ", bits, "-bit");
  std::vector<uint16_t> all(dump.kv.size());
  for (const Chunk& c : chunks) {
    KiviResult r = KiviRoundTrip(c.shape, c.values, bits);
    row.bytes += r.bytes;
    Place(dump, c, r.decoded, &all);
  }
  row.errors = MeasureErrors(dump, all);
  return row;
}

// CacheGen's encoder written from its paper (cachegen_ref.h): real streams,
// so the ratio counts their headers, scales and frequency tables.
absl::StatusOr<Row> MeasureCacheGen(const KvDump& dump,
                                    const std::vector<Chunk>& chunks,
                                    const CacheGenConfig& config) {
  return MeasureStreams(
      absl::StrCat("CacheGen ref (", CacheGenSettingName(config), ")"), dump,
      chunks,
      [&](const Chunk& c) { return CacheGenEncode(c.shape, c.values, config); },
      CacheGenDecode);
}

std::string Mbps(double v) {
  return v > 0 ? absl::StrFormat("%.0f", v) : std::string("-");
}

void PrintDump(const KvDump& dump, const std::vector<Row>& rows) {
  const ChunkShape& s = dump.shape;
  absl::PrintF(
      "\n### %s\n\n%u layers, %u tokens, %u kv heads x %u dims, %u query "
      "heads; %u-token chunks; %.0f KiB fp16.\n\n",
      dump.name, s.layers, s.tokens, s.kv_heads, s.head_dim, dump.heads,
      kChunkTokens, s.RawBytes() / 1024.0);
  absl::PrintF(
      "| codec | ratio | K rel L2 | V rel L2 | attn rel L2 | enc MB/s | "
      "dec MB/s |\n|---|---:|---:|---:|---:|---:|---:|\n");
  for (const Row& r : rows) {
    absl::PrintF("| %s | %.2fx | %.4f | %.4f | %.4f | %s | %s |\n", r.name,
                 static_cast<double>(s.RawBytes()) / r.bytes, r.errors.key,
                 r.errors.value, r.errors.attention, Mbps(r.encode_mbps),
                 Mbps(r.decode_mbps));
  }
  absl::PrintF("\nPer layer, K / V / attention relative L2:\n\n| codec |");
  for (uint32_t l = 0; l < s.layers; ++l) absl::PrintF(" L%u |", l);
  absl::PrintF("\n|---|");
  for (uint32_t l = 0; l < s.layers; ++l) absl::PrintF("---|");
  absl::PrintF("\n");
  for (const Row& r : rows) {
    if (r.errors.key == 0 && r.errors.value == 0) continue;
    absl::PrintF("| %s |", r.name);
    for (uint32_t l = 0; l < s.layers; ++l) {
      absl::PrintF(" %.3f / %.3f / %.3f |", r.errors.key_by_layer[l],
                   r.errors.value_by_layer[l], r.errors.attention_by_layer[l]);
    }
    absl::PrintF("\n");
  }
}

int Run(int argc, char** argv) {
  std::vector<std::string> manifests;
  std::vector<std::string> inputs;
  std::optional<ModelProfile> profile;
  for (int i = 1; i < argc; ++i) {
    absl::string_view arg = argv[i];
    if (!absl::ConsumePrefix(&arg, "--profile=")) {
      inputs.emplace_back(arg);
      continue;
    }
    absl::StatusOr<ModelProfile> parsed = ReadProfileFile(std::string(arg));
    if (!parsed.ok()) {
      absl::FPrintF(stderr, "%s\n", parsed.status().ToString());
      return 1;
    }
    profile = *std::move(parsed);
  }
  if (inputs.empty()) {
    absl::StatusOr<std::string> dir = FindKvDataDir();
    if (!dir.ok()) {
      absl::FPrintF(stderr, "%s\n", dir.status().ToString());
      return 1;
    }
    inputs.push_back(*dir);
  }
  for (const std::string& in : inputs) {
    if (std::filesystem::is_directory(in)) {
      absl::StatusOr<std::vector<std::string>> list = ListManifests(in);
      if (!list.ok()) {
        absl::FPrintF(stderr, "%s\n", list.status().ToString());
        return 1;
      }
      manifests.insert(manifests.end(), list->begin(), list->end());
    } else {
      manifests.push_back(in);
    }
  }
  for (const std::string& path : manifests) {
    absl::StatusOr<KvDump> dump = LoadKvDump(path);
    if (!dump.ok()) {
      absl::FPrintF(stderr, "%s\n", dump.status().ToString());
      return 1;
    }
    const std::vector<Chunk> chunks = CutChunks(*dump);
    std::vector<Row> rows;
    std::vector<Level> levels = {Level::kLossless, Level::kNearLossless,
                                 Level::kHigh,     Level::kDefault,
                                 Level::kCompact,  Level::kTiny};
    if (profile.has_value()) {
      levels.insert(levels.end(), {Level::kProfileFine, Level::kProfileBalanced,
                                   Level::kProfileSmall});
    }
    for (Level level : levels) {
      absl::StatusOr<Row> row = MeasureLevel(
          *dump, chunks, level, profile.has_value() ? &*profile : nullptr);
      if (!row.ok()) {
        absl::FPrintF(stderr, "%s: %s\n", path, row.status().ToString());
        return 1;
      }
      rows.push_back(*std::move(row));
    }
    rows.push_back(MeasureZstd(*dump, chunks, 3));
    rows.push_back(MeasureZstd(*dump, chunks, 19));
    for (int bits : {8, 4, 2}) rows.push_back(MeasureKivi(*dump, chunks, bits));
    for (const CacheGenConfig& config : CacheGenSettings()) {
      absl::StatusOr<Row> row = MeasureCacheGen(*dump, chunks, config);
      if (!row.ok()) {
        absl::FPrintF(stderr, "%s: %s\n", path, row.status().ToString());
        return 1;
      }
      rows.push_back(*std::move(row));
    }
    PrintDump(*dump, rows);
  }
  return 0;
}

}  // namespace
}  // namespace kvcache::codec

int main(int argc, char** argv) { return kvcache::codec::Run(argc, argv); }
