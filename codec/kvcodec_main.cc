// kvcodec: runs the KV-cache codec on a dump file from the command line, the
// way zstd runs on any file. The container it writes is codec/kvc_file.h.
#include <chrono>
#include <cstdio>
#include <fstream>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/strip.h"
#include "codec/calibrate.h"
#include "codec/codec.h"
#include "codec/kv_dump.h"
#include "codec/kvc_file.h"

namespace kvcache::codec {
namespace {

constexpr char kUsage[] =
    R"(usage: kvcodec encode [--level=LEVEL] [--chunk_tokens=N] [--profile=P.kvp] MANIFEST.json OUT.kvc
       kvcodec decode [--profile=P.kvp] IN.kvc OUT.kv
       kvcodec info IN.kvc
       kvcodec calibrate [--rope=adjacent|halves|none] [--rope_theta=BASE] MANIFEST.json... OUT.kvp

Compresses a KV-cache dump with the kvcache chunk codec.

  encode  cut the dump that MANIFEST.json describes (the manifest format of
          shared/kvdata/README.md) into chunks of N tokens, the last one
          possibly shorter, encode each at LEVEL and write them to OUT.kvc
  decode  decode every chunk of IN.kvc and write the dump's values to OUT.kv,
          [layer][k_or_v][token][kv_head][head_dim], 16-bit little-endian;
          after --level=lossless it is byte-identical to the dump's .kv file
  info    each chunk's first token, tokens, level, dtype, shape, bytes and
          ratio against fp16, then the totals, and the profile a
          transform level's chunks need
  calibrate
          make a model profile (codec/profile.h) from calibration dumps of
          one model, for the transform levels (profile-*): per layer, K/V
          and KV head, the principal components of the head's channels,
          keys with RoPE undone; use texts other than the ones judged

  --level=LEVEL     lossless, near-lossless, high, default, compact, tiny,
                    profile-fine, profile-balanced or profile-small (default:
                    near-lossless); what each promises: codec/README.md
  --chunk_tokens=N  tokens per chunk, 1..16777216 (default: 256)
  --profile=P.kvp   the model profile the profile-* levels encode with and
                    their chunks decode with
  --rope=LAYOUT     which channels the model's RoPE rotates together:
                    adjacent (2j, 2j+1; GGUF models, default), halves
                    (j, j + head_dim/2; Hugging Face) or none
  --rope_theta=BASE the model's RoPE base (SmolLM2: 100000); needed unless
                    --rope=none

exit status: 0 done; 1 a file could not be read, written or decoded;
2 bad usage
)";

constexpr int kExitUsage = 2;
constexpr int kExitFailed = 1;

struct Args {
  std::vector<std::string> positional;  // The command, then its files.
  Level level = kDefaultLevel;
  uint32_t chunk_tokens = 256;
  bool encode_flags = false;  // --level or --chunk_tokens was given.
  std::string profile;        // --profile
  RopeLayout rope = RopeLayout::kAdjacentPairs;
  double rope_theta = 0;
  bool calibrate_flags = false;  // --rope or --rope_theta was given.
  bool help = false;
};

int UsageError(const std::string& message) {
  absl::FPrintF(stderr, "kvcodec: %s (kvcodec --help for usage)\n", message);
  return kExitUsage;
}

int Failed(const absl::Status& status) {
  absl::FPrintF(stderr, "kvcodec: %s\n", status.message());
  return kExitFailed;
}

// Returns an error message, or "" when the arguments parse.
std::string ParseArgs(int argc, char** argv, Args& args) {
  for (int i = 1; i < argc; ++i) {
    absl::string_view arg = argv[i];
    if (arg == "--help" || arg == "-h") {
      args.help = true;
    } else if (absl::ConsumePrefix(&arg, "--level=")) {
      absl::StatusOr<Level> level = ParseLevel(arg);
      if (!level.ok()) return std::string(level.status().message());
      args.level = *level;
      args.encode_flags = true;
    } else if (absl::ConsumePrefix(&arg, "--profile=")) {
      args.profile = std::string(arg);
    } else if (absl::ConsumePrefix(&arg, "--rope=")) {
      if (arg == "adjacent") {
        args.rope = RopeLayout::kAdjacentPairs;
      } else if (arg == "halves") {
        args.rope = RopeLayout::kHalves;
      } else if (arg == "none") {
        args.rope = RopeLayout::kNone;
      } else {
        return absl::StrCat("--rope=", arg, " is not adjacent, halves or none");
      }
      args.calibrate_flags = true;
    } else if (absl::ConsumePrefix(&arg, "--rope_theta=")) {
      if (!absl::SimpleAtod(arg, &args.rope_theta) || !(args.rope_theta > 1)) {
        return absl::StrCat("--rope_theta=", arg, " is not a number above 1");
      }
      args.calibrate_flags = true;
    } else if (absl::ConsumePrefix(&arg, "--chunk_tokens=")) {
      if (!absl::SimpleAtoi(arg, &args.chunk_tokens) ||
          args.chunk_tokens == 0 || args.chunk_tokens > kMaxTokens) {
        return absl::StrCat("--chunk_tokens=", arg, " is not a number in 1..",
                            kMaxTokens);
      }
      args.encode_flags = true;
    } else if (absl::StartsWith(arg, "-") && arg.size() > 1) {
      return absl::StrCat("unknown flag '", arg, "'");
    } else {
      args.positional.emplace_back(arg);
    }
  }
  return "";
}

double SecondsSince(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start)
      .count();
}

double Ratio(uint64_t raw, uint64_t encoded) {
  return encoded == 0 ? 0.0 : static_cast<double>(raw) / encoded;
}

absl::Status WriteFile(const std::string& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  out.close();
  if (!out) return absl::UnknownError(absl::StrCat("cannot write ", path));
  return absl::OkStatus();
}

// The profile --profile names, or none when the flag is absent.
absl::StatusOr<std::optional<ModelProfile>> LoadProfileFlag(const Args& args) {
  if (args.profile.empty()) return std::nullopt;
  absl::StatusOr<ModelProfile> profile = ReadProfileFile(args.profile);
  if (!profile.ok()) return profile.status();
  return std::optional<ModelProfile>(*std::move(profile));
}

const ModelProfile* OrNull(const std::optional<ModelProfile>& p) {
  return p ? &*p : nullptr;
}

int Encode(const Args& args) {
  if (args.positional.size() != 3) {
    return UsageError("encode takes MANIFEST.json and OUT.kvc");
  }
  if (LevelNeedsProfile(args.level) && args.profile.empty()) {
    return UsageError(absl::StrCat("--level=", LevelName(args.level),
                                   " needs --profile (kvcodec calibrate)"));
  }
  absl::StatusOr<std::optional<ModelProfile>> profile = LoadProfileFlag(args);
  if (!profile.ok()) return Failed(profile.status());
  const std::string& manifest = args.positional[1];
  const std::string& out_path = args.positional[2];
  absl::StatusOr<KvDump> dump = LoadKvDump(manifest);
  if (!dump.ok()) return Failed(dump.status());
  const auto start = std::chrono::steady_clock::now();
  absl::StatusOr<std::string> file = EncodeKvc(
      dump->shape, dump->kv, args.level, args.chunk_tokens, OrNull(*profile));
  if (!file.ok()) {
    return Failed(
        absl::Status(file.status().code(),
                     absl::StrCat(manifest, ": ", file.status().message())));
  }
  const double seconds = SecondsSince(start);
  if (absl::Status st = WriteFile(out_path, *file); !st.ok()) {
    return Failed(st);
  }
  const uint64_t raw = dump->shape.RawBytes();
  const uint32_t chunks =
      (dump->shape.tokens + args.chunk_tokens - 1) / args.chunk_tokens;
  absl::PrintF(
      "%s -> %s: %u tokens in %u chunks of %u at %s, %u -> %u bytes "
      "(%.2fx), %.1f MB/s\n",
      manifest, out_path, dump->shape.tokens, chunks, args.chunk_tokens,
      LevelName(args.level), raw, file->size(), Ratio(raw, file->size()),
      raw / seconds / 1e6);
  return 0;
}

int Decode(const Args& args) {
  if (args.positional.size() != 3) {
    return UsageError("decode takes IN.kvc and OUT.kv");
  }
  const std::string& out_path = args.positional[2];
  absl::StatusOr<KvcFile> file = ReadKvcFile(args.positional[1]);
  if (!file.ok()) return Failed(file.status());
  absl::StatusOr<std::optional<ModelProfile>> profile = LoadProfileFlag(args);
  if (!profile.ok()) return Failed(profile.status());
  const auto start = std::chrono::steady_clock::now();
  if (absl::Status st = DecodeKvcToFile(*file, out_path, OrNull(*profile));
      !st.ok()) {
    return Failed(st);
  }
  const double seconds = SecondsSince(start);
  const uint64_t raw = file->index.shape.RawBytes();
  absl::PrintF("%s -> %s: %u tokens in %u chunks, %u -> %u bytes, %.1f MB/s\n",
               file->path, out_path, file->index.shape.tokens,
               file->index.chunks.size(), file->bytes.size(), raw,
               raw / seconds / 1e6);
  return 0;
}

std::string ShapeColumn(const ChunkShape& s) {
  return absl::StrCat(s.layers, "x", s.tokens, "x", s.kv_heads, "x",
                      s.head_dim);
}

int Info(const Args& args) {
  if (args.positional.size() != 2) return UsageError("info takes IN.kvc");
  absl::StatusOr<KvcFile> file = ReadKvcFile(args.positional[1]);
  if (!file.ok()) return Failed(file.status());
  const KvcIndex& index = file->index;
  absl::PrintF(
      "%s: kvc version %u, %u layers, %u kv heads, head dim %u, %s, "
      "%u tokens in %u chunks\n",
      file->path, kKvcVersion, index.shape.layers, index.shape.kv_heads,
      index.shape.head_dim, DTypeName(index.shape.dtype), index.shape.tokens,
      index.chunks.size());
  absl::PrintF("%6s %11s %7s  %-13s  %-8s  %-18s %10s %7s\n", "chunk",
               "first_token", "tokens", "level", "dtype", "shape (LxTxHxD)",
               "bytes", "ratio");
  uint64_t stream_bytes = 0;
  for (size_t i = 0; i < index.chunks.size(); ++i) {
    const KvcChunk& c = index.chunks[i];
    const ChunkShape& s = c.summary.shape;
    absl::PrintF("%6u %11u %7u  %-13s  %-8s  %-18s %10u %6.2fx\n", i,
                 c.first_token, c.tokens, LevelName(c.summary.level),
                 DTypeName(s.dtype), ShapeColumn(s), c.bytes,
                 Ratio(s.RawBytes(), c.bytes));
    stream_bytes += c.bytes;
  }
  const uint64_t raw = index.shape.RawBytes();
  absl::PrintF("%6s %11s %7u  %-13s  %-8s  %-18s %10u %6.2fx\n", "total", "",
               index.shape.tokens, "", DTypeName(index.shape.dtype),
               ShapeColumn(index.shape), stream_bytes,
               Ratio(raw, stream_bytes));
  absl::PrintF("file: %u bytes (%u of header and index), %.2fx\n",
               file->bytes.size(), file->bytes.size() - stream_bytes,
               Ratio(raw, file->bytes.size()));
  for (const KvcChunk& c : index.chunks) {
    if (c.summary.profile_id) {
      absl::PrintF("decoding needs model profile %s\n",
                   ProfileIdHex(*c.summary.profile_id));
      break;
    }
  }
  return 0;
}

int Calibrate(const Args& args) {
  if (args.positional.size() < 3) {
    return UsageError("calibrate takes MANIFEST.json... and OUT.kvp");
  }
  if (args.rope != RopeLayout::kNone && args.rope_theta == 0) {
    return UsageError("calibrate needs --rope_theta (or --rope=none)");
  }
  const std::string& out_path = args.positional.back();
  std::optional<ProfileCalibrator> calibrator;
  for (size_t i = 1; i + 1 < args.positional.size(); ++i) {
    absl::StatusOr<KvDump> dump = LoadKvDump(args.positional[i]);
    if (!dump.ok()) return Failed(dump.status());
    if (!calibrator) {
      calibrator.emplace(
          dump->shape.layers, dump->shape.kv_heads, dump->shape.head_dim,
          args.rope,
          args.rope == RopeLayout::kNone
              ? std::vector<double>{}
              : RopeInverseFrequencies(args.rope_theta, dump->shape.head_dim));
    }
    if (absl::Status st = calibrator->Add(dump->shape, dump->kv, 0); !st.ok()) {
      return Failed(absl::Status(
          st.code(), absl::StrCat(args.positional[i], ": ", st.message())));
    }
  }
  absl::StatusOr<ModelProfile> profile = calibrator->Finish();
  if (!profile.ok()) return Failed(profile.status());
  const std::string bytes = SerializeProfile(*profile);
  if (absl::Status st = WriteFile(out_path, bytes); !st.ok()) return Failed(st);
  absl::PrintF(
      "%s: profile %s of %u layers x %u KV heads x %u from %u tokens, "
      "%u bytes\n",
      out_path, ProfileIdHex(profile->id), profile->layers, profile->kv_heads,
      profile->head_dim, calibrator->tokens(), bytes.size());
  return 0;
}

int Run(int argc, char** argv) {
  Args args;
  if (const std::string error = ParseArgs(argc, argv, args); !error.empty()) {
    return UsageError(error);
  }
  if (args.help) {
    absl::PrintF("%s", kUsage);
    return kExitUsage;
  }
  if (args.positional.empty()) {
    absl::FPrintF(stderr, "%s", kUsage);
    return kExitUsage;
  }
  const std::string& command = args.positional[0];
  if (command != "encode" && args.encode_flags) {
    return UsageError(
        absl::StrCat("--level and --chunk_tokens are for encode, "
                     "not ",
                     command));
  }
  if (command != "calibrate" && args.calibrate_flags) {
    return UsageError(absl::StrCat(
        "--rope and --rope_theta are for calibrate, not ", command));
  }
  if (command != "encode" && command != "decode" && !args.profile.empty()) {
    return UsageError(
        absl::StrCat("--profile is for encode and decode, not ", command));
  }
  if (command == "encode") return Encode(args);
  if (command == "decode") return Decode(args);
  if (command == "info") return Info(args);
  if (command == "calibrate") return Calibrate(args);
  return UsageError(absl::StrCat("unknown command '", command, "'"));
}

}  // namespace
}  // namespace kvcache::codec

int main(int argc, char** argv) { return kvcache::codec::Run(argc, argv); }
