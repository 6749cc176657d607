#include "codec/kv_dump.h"

#include <algorithm>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iterator>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "nlohmann/json.hpp"

namespace kvcache::codec {
namespace {

namespace fs = std::filesystem;

absl::StatusOr<std::vector<uint16_t>> ReadF16File(const fs::path& path,
                                                  size_t want_values) {
  std::ifstream in(path, std::ios::binary);
  if (!in)
    return absl::NotFoundError(absl::StrCat("cannot open ", path.string()));
  std::string bytes((std::istreambuf_iterator<char>(in)),
                    std::istreambuf_iterator<char>());
  if (bytes.size() != 2 * want_values) {
    return absl::DataLossError(absl::StrCat(path.string(), " has ",
                                            bytes.size(), " bytes, expected ",
                                            2 * want_values));
  }
  std::vector<uint16_t> out(want_values);
  for (size_t i = 0; i < want_values; ++i) {
    out[i] = static_cast<uint16_t>(static_cast<uint8_t>(bytes[2 * i]) |
                                   static_cast<uint8_t>(bytes[2 * i + 1]) << 8);
  }
  return out;
}

}  // namespace

absl::StatusOr<std::string> FindKvDataDir() {
  if (const char* env = std::getenv("KVCACHE_KVDATA"); env && *env) {
    if (fs::is_directory(env)) return std::string(env);
    return absl::NotFoundError(
        absl::StrCat("KVCACHE_KVDATA=", env, " is not a directory"));
  }
  // A Bazel target that lists @kvdata//:dumps in its data finds them in its
  // runfiles tree, beside the main repository's directory.
  std::error_code ec;
  for (const char* var : {"TEST_SRCDIR", "RUNFILES_DIR"}) {
    if (const char* v = std::getenv(var); v && *v) {
      const fs::path candidate = fs::path(v) / "kvdata";
      if (fs::is_directory(candidate, ec)) return candidate.string();
    }
  }
  if (const fs::path runfiles = fs::current_path().parent_path() / "kvdata";
      fs::is_directory(runfiles, ec)) {
    return runfiles.string();
  }
  // Otherwise (a binary run from a checkout) look for shared/kvdata beside
  // the repository.
  std::vector<fs::path> starts = {fs::current_path()};
  if (const char* v = std::getenv("BUILD_WORKSPACE_DIRECTORY"); v && *v) {
    starts.push_back(v);
  }
  std::vector<std::string> searched;
  for (fs::path p : starts) {
    for (;; p = p.parent_path()) {
      const fs::path candidate = p / "shared" / "kvdata";
      if (fs::is_directory(candidate)) return candidate.string();
      searched.push_back(p.string());
      if (p == p.parent_path()) break;
    }
  }
  return absl::NotFoundError(absl::StrCat(
      "KV dumps not found: set KVCACHE_KVDATA or place shared/kvdata beside "
      "the repository; searched upward from: ",
      absl::StrJoin(searched, ", ")));
}

absl::StatusOr<std::vector<std::string>> ListManifests(const std::string& dir) {
  std::error_code ec;
  std::vector<std::string> out;
  for (const auto& entry : fs::directory_iterator(dir, ec)) {
    if (entry.path().extension() == ".json") out.push_back(entry.path());
  }
  if (ec) return absl::NotFoundError(absl::StrCat("cannot list ", dir));
  std::sort(out.begin(), out.end());
  return out;
}

absl::StatusOr<KvDump> LoadKvDump(const std::string& manifest_path) {
  std::ifstream in(manifest_path);
  if (!in)
    return absl::NotFoundError(absl::StrCat("cannot open ", manifest_path));
  KvDump dump;
  std::string kv_file, q_file;
  try {
    const nlohmann::json m = nlohmann::json::parse(in);
    dump.shape.layers = m.at("layers").get<uint32_t>();
    dump.shape.tokens = m.at("tokens").get<uint32_t>();
    dump.shape.kv_heads = m.at("kv_heads").get<uint32_t>();
    dump.shape.head_dim = m.at("head_dim").get<uint32_t>();
    dump.heads = m.at("heads").get<uint32_t>();
    if (m.at("dtype").get<std::string>() != "float16") {
      return absl::InvalidArgumentError(
          absl::StrCat(manifest_path, ": only float16 dumps are supported"));
    }
    kv_file = m.at("kv_file").get<std::string>();
    q_file = m.at("q_file").get<std::string>();
    if (m.contains("generation")) {
      const nlohmann::json& g = m["generation"];
      dump.token_ids = g.value("token_ids", std::vector<int32_t>{});
      dump.generation_temperature = g.value("temperature", 1.0);
      dump.mean_token_nll = g.value("mean_token_nll", 0.0);
    }
  } catch (const nlohmann::json::exception& e) {
    return absl::InvalidArgumentError(
        absl::StrCat(manifest_path, ": bad manifest: ", e.what()));
  }
  const ChunkShape& s = dump.shape;
  if (s.NumValues() == 0 || dump.heads == 0 || dump.heads % s.kv_heads != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat(manifest_path, ": inconsistent shape"));
  }
  const fs::path base = fs::path(manifest_path).parent_path();
  dump.name = fs::path(manifest_path).stem().string();
  absl::StatusOr<std::vector<uint16_t>> kv =
      ReadF16File(base / kv_file, s.NumValues());
  if (!kv.ok()) return kv.status();
  absl::StatusOr<std::vector<uint16_t>> q = ReadF16File(
      base / q_file, size_t{s.layers} * s.tokens * dump.heads * s.head_dim);
  if (!q.ok()) return q.status();
  dump.kv = *std::move(kv);
  dump.queries = *std::move(q);
  return dump;
}

std::vector<uint16_t> SliceTokens(const KvDump& dump, uint32_t t0,
                                  uint32_t t1) {
  const size_t row = size_t{dump.shape.kv_heads} * dump.shape.head_dim;
  std::vector<uint16_t> out;
  out.reserve(size_t{dump.shape.layers} * 2 * (t1 - t0) * row);
  for (size_t plane = 0; plane < size_t{dump.shape.layers} * 2; ++plane) {
    const auto first = dump.kv.begin() + (plane * dump.shape.tokens + t0) * row;
    out.insert(out.end(), first, first + (t1 - t0) * row);
  }
  return out;
}

}  // namespace kvcache::codec
