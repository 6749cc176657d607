// dump_kv: writes real KV caches of a GGUF model over real documents, in the
// manifest format of shared/kvdata (see its README), so that codec_bench,
// kvcodec and the GPU benchmarks run on a real model's KV.
//
//   dump_kv --model=FILE.gguf --out=DIR [--tokens=2048,4096,8192]
//       [--set=evaluation|calibration] [--docs=/usr/share/doc/...]
//
// For each length L it takes the next document of the set (real_text.h)
// that has at least L tokens, runs its first L tokens through the model and
// writes NAME.kv (keys after RoPE and values, fp16,
// [layer][k_or_v][token][kv_head][head_dim]), NAME.q.f16 (queries after
// RoPE, [layer][token][head][head_dim]) and NAME.json, with the token ids and
// the model's mean negative log-likelihood of the text. NAME is
// smollm2-SET-L when the model is SmolLM2, MODEL-SET-L otherwise.
//
// Single process; OpenBLAS uses every core.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "absl/time/clock.h"
#include "client/examples/chat/chat_session.h"
#include "client/examples/chat/llama_model.h"
#include "client/examples/chat/paged_kv_cache.h"
#include "client/examples/chat/real_text.h"
#include "client/examples/chat/sampler.h"
#include "client/examples/model/bpe_tokenizer.h"
#include "client/examples/model/gguf.h"
#include "nlohmann/json.hpp"

namespace kvcache::chat {
namespace {

// Tokens a Prefill call takes at a time: bounds the every-token logits
// ([tokens][vocab] floats) the text's likelihood needs.
constexpr int kPrefillTokens = 512;

struct Options {
  std::string model;
  std::string out;
  std::vector<int> lengths = {2048, 4096, 8192};
  TextSet set = TextSet::kEvaluation;
  std::string docs = kPythonDocsRoot;
};

absl::Status WriteFile(const std::string& path, const void* data,
                       size_t bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(static_cast<const char*>(data),
            static_cast<std::streamsize>(bytes));
  if (!out) return absl::InternalError(absl::StrCat("cannot write ", path));
  return absl::OkStatus();
}

// Runs `tokens` through the model and writes the dump.
absl::Status Dump(const Options& options, const LlamaModel& model,
                  const std::string& model_sha256, const std::string& name,
                  const std::string& source,
                  const std::vector<int32_t>& tokens) {
  const LlamaConfig& c = model.config();
  const int n = static_cast<int>(tokens.size());
  absl::StatusOr<PagedKvCache> cache =
      PagedKvCache::Create(model.CacheShape(16, n / 16 + 1));
  if (!cache.ok()) return cache.status();
  const SequenceId seq = cache->CreateSequence();
  // [layer][token][dim], filled a call's tokens at a time.
  std::vector<uint16_t> queries(static_cast<size_t>(c.layers) * n * c.dim);
  double nll_sum = 0;
  const absl::Time start = absl::Now();
  for (int t0 = 0; t0 < n; t0 += kPrefillTokens) {
    const int count = std::min(kPrefillTokens, n - t0);
    PrefillTrace trace;
    absl::StatusOr<std::vector<float>> logits = model.Prefill(
        &*cache, seq, absl::MakeConstSpan(tokens).subspan(t0, count),
        LogitsFor::kEveryToken, &trace);
    if (!logits.ok()) return logits.status();
    for (int t = 0; t < count && t0 + t + 1 < n; ++t) {
      nll_sum +=
          *TokenNll(absl::MakeConstSpan(*logits).subspan(
                        static_cast<size_t>(t) * c.vocab_size, c.vocab_size),
                    tokens[t0 + t + 1]);
    }
    const size_t row = static_cast<size_t>(count) * c.dim;
    for (int l = 0; l < c.layers; ++l) {
      std::copy_n(trace.queries.begin() + l * row, row,
                  queries.begin() + (static_cast<size_t>(l) * n + t0) * c.dim);
    }
  }
  const double seconds = absl::ToDoubleSeconds(absl::Now() - start);
  absl::StatusOr<std::vector<uint16_t>> kv = cache->ExportChunk(seq, 0, n);
  if (!kv.ok()) return kv.status();

  const std::string base = absl::StrCat(options.out, "/", name);
  if (absl::Status s = WriteFile(base + ".kv", kv->data(), kv->size() * 2);
      !s.ok()) {
    return s;
  }
  if (absl::Status s =
          WriteFile(base + ".q.f16", queries.data(), queries.size() * 2);
      !s.ok()) {
    return s;
  }
  const double mean_nll = nll_sum / (n - 1);
  nlohmann::json manifest = {
      {"model", std::filesystem::path(options.model).filename().string()},
      {"checkpoint_sha256", model_sha256},
      {"dim", c.dim},
      {"layers", c.layers},
      {"heads", c.heads},
      {"kv_heads", c.kv_heads},
      {"head_dim", c.head_dim()},
      {"tokens", n},
      {"dtype", "float16"},
      {"byte_order", "little"},
      {"kv_file", name + ".kv"},
      {"kv_layout",
       "[layer][k_or_v][token][kv_head][head_dim], keys after RoPE"},
      {"q_file", name + ".q.f16"},
      {"q_layout", "[layer][token][head][head_dim], queries after RoPE"},
      {"text",
       {{"source", absl::StrCat("python3.11-doc: ", source)},
        {"set",
         options.set == TextSet::kEvaluation ? "evaluation" : "calibration"}}},
      {"generation",
       {{"from", "real text, teacher-forced"},
        {"temperature", 1.0},
        {"mean_token_nll", std::round(mean_nll * 1e4) / 1e4},
        {"token_ids", tokens}}}};
  const std::string json = manifest.dump(1);
  if (absl::Status s = WriteFile(base + ".json", json.data(), json.size());
      !s.ok()) {
    return s;
  }
  std::printf(
      "%s: %d tokens of %s, mean NLL %.4f (perplexity %.2f), %.1f s "
      "(%.0f tokens/s)\n",
      name.c_str(), n, source.c_str(), mean_nll, std::exp(mean_nll), seconds,
      n / seconds);
  return absl::OkStatus();
}

absl::Status Run(const Options& options) {
  absl::StatusOr<LlamaModel> model = LlamaModel::Load(options.model);
  if (!model.ok()) return model.status();
  absl::StatusOr<model::GgufFile> file = model::GgufFile::Open(options.model);
  if (!file.ok()) return file.status();
  absl::StatusOr<std::unique_ptr<model::BpeTokenizer>> tokenizer =
      model::BpeTokenizer::FromGguf(*file);
  if (!tokenizer.ok()) return tokenizer.status();
  absl::StatusOr<std::string> sha = FileSha256Hex(options.model);
  if (!sha.ok()) return sha.status();
  absl::StatusOr<std::vector<Document>> documents =
      LoadDocuments(options.docs, options.set);
  if (!documents.ok()) return documents.status();

  std::string model_name = absl::AsciiStrToLower(
      file->GetString("general.basename").value_or("model"));
  const std::string set_name =
      options.set == TextSet::kEvaluation ? "eval" : "calib";
  std::error_code error;
  std::filesystem::create_directories(options.out, error);
  size_t next = 0;  // documents before this one are used or too short
  for (const int length : options.lengths) {
    if (length > model->config().seq_len) {
      return absl::InvalidArgumentError(
          absl::StrCat(length, " tokens exceed the model's context of ",
                       model->config().seq_len));
    }
    std::vector<int32_t> tokens;
    for (; next < documents->size(); ++next) {
      absl::StatusOr<std::vector<int32_t>> ids =
          (*tokenizer)->Encode((*documents)[next].text);
      if (!ids.ok()) return ids.status();
      if (static_cast<int>(ids->size()) >= length) {
        tokens.assign(ids->begin(), ids->begin() + length);
        break;
      }
    }
    if (tokens.empty()) {
      return absl::NotFoundError(
          absl::StrCat("no document left in the set has ", length, " tokens"));
    }
    const std::string name =
        absl::StrCat(model_name, "-", set_name, "-", length);
    if (absl::Status s =
            Dump(options, *model, *sha, name, (*documents)[next].path, tokens);
        !s.ok()) {
      return s;
    }
    ++next;
  }
  return absl::OkStatus();
}

}  // namespace
}  // namespace kvcache::chat

int main(int argc, char** argv) {
  kvcache::chat::Options options;
  for (int i = 1; i < argc; ++i) {
    absl::string_view arg = argv[i], value = arg;
    bool ok = true;
    if (absl::ConsumePrefix(&value, "--model=")) {
      options.model = std::string(value);
    } else if (absl::ConsumePrefix(&value, "--out=")) {
      options.out = std::string(value);
    } else if (absl::ConsumePrefix(&value, "--docs=")) {
      options.docs = std::string(value);
    } else if (absl::ConsumePrefix(&value, "--set=")) {
      ok = value == "evaluation" || value == "calibration";
      options.set = value == "evaluation"
                        ? kvcache::chat::TextSet::kEvaluation
                        : kvcache::chat::TextSet::kCalibration;
    } else if (absl::ConsumePrefix(&value, "--tokens=")) {
      options.lengths.clear();
      for (absl::string_view part : absl::StrSplit(value, ',')) {
        int length = 0;
        ok = ok && absl::SimpleAtoi(part, &length) && length > 1;
        options.lengths.push_back(length);
      }
    } else {
      ok = false;
    }
    if (!ok) {
      std::fprintf(stderr, "dump_kv: bad argument %s\n", argv[i]);
      return 2;
    }
  }
  if (options.model.empty() || options.out.empty()) {
    std::fprintf(stderr,
                 "usage: dump_kv --model=FILE.gguf --out=DIR "
                 "[--tokens=2048,4096,8192] [--set=evaluation|calibration] "
                 "[--docs=DIR]\n");
    return 2;
  }
  const absl::Status status = kvcache::chat::Run(options);
  if (!status.ok()) {
    std::fprintf(stderr, "dump_kv: %s\n", status.ToString().c_str());
    return 1;
  }
  return 0;
}
