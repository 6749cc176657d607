// llama_logits: a model's logits for a token sequence, at chosen positions,
// in the form reference/llama_reference.py writes them, so that the worker's
// forward pass can be compared with an independent one.
//
//   llama_logits --model=FILE --tokens=1,2,3 --positions=0,2 --out=PREFIX
//
// Runs all tokens in one Prefill and writes PREFIX.f32 (little-endian
// float32, [positions][vocab]) and PREFIX.json ({"positions", "vocab",
// "tokens", "mean_token_nll"}).
#include <cmath>
#include <cstdio>
#include <fstream>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "client/examples/chat/llama_model.h"
#include "client/examples/chat/paged_kv_cache.h"
#include "client/examples/chat/sampler.h"
#include "nlohmann/json.hpp"

namespace kvcache::chat {
namespace {

bool ParseList(absl::string_view text, std::vector<int32_t>* out) {
  for (absl::string_view part : absl::StrSplit(text, ',', absl::SkipEmpty())) {
    int32_t value = 0;
    if (!absl::SimpleAtoi(part, &value)) return false;
    out->push_back(value);
  }
  return !out->empty();
}

absl::Status Run(const std::string& model_path,
                 const std::vector<int32_t>& tokens,
                 const std::vector<int32_t>& positions,
                 const std::string& out) {
  absl::StatusOr<LlamaModel> model = LlamaModel::Load(model_path);
  if (!model.ok()) return model.status();
  const int n = static_cast<int>(tokens.size());
  const int vocab = model->config().vocab_size;
  absl::StatusOr<PagedKvCache> cache =
      PagedKvCache::Create(model->CacheShape(16, n / 16 + 1));
  if (!cache.ok()) return cache.status();
  absl::StatusOr<std::vector<float>> logits = model->Prefill(
      &*cache, cache->CreateSequence(), tokens, LogitsFor::kEveryToken);
  if (!logits.ok()) return logits.status();
  std::vector<float> rows;
  for (int32_t p : positions) {
    if (p < 0 || p >= n) {
      return absl::InvalidArgumentError(
          absl::StrCat("position ", p, " outside the ", n, " tokens"));
    }
    rows.insert(rows.end(), logits->begin() + static_cast<size_t>(p) * vocab,
                logits->begin() + static_cast<size_t>(p + 1) * vocab);
  }
  double nll = 0;
  for (int p = 0; p + 1 < n; ++p) {
    nll += *TokenNll(absl::MakeConstSpan(*logits).subspan(
                         static_cast<size_t>(p) * vocab, vocab),
                     tokens[p + 1]);
  }
  std::ofstream f32(out + ".f32", std::ios::binary | std::ios::trunc);
  f32.write(reinterpret_cast<const char*>(rows.data()),
            static_cast<std::streamsize>(rows.size() * sizeof(float)));
  const nlohmann::json meta = {{"positions", positions},
                               {"vocab", vocab},
                               {"tokens", tokens},
                               {"mean_token_nll", n > 1 ? nll / (n - 1) : 0.0}};
  std::ofstream json(out + ".json", std::ios::trunc);
  json << meta.dump();
  if (!f32 || !json)
    return absl::InternalError(absl::StrCat("cannot write ", out));
  return absl::OkStatus();
}

}  // namespace
}  // namespace kvcache::chat

int main(int argc, char** argv) {
  std::string model, out;
  std::vector<int32_t> tokens, positions;
  for (int i = 1; i < argc; ++i) {
    absl::string_view value = argv[i];
    bool ok = true;
    if (absl::ConsumePrefix(&value, "--model=")) {
      model = std::string(value);
    } else if (absl::ConsumePrefix(&value, "--out=")) {
      out = std::string(value);
    } else if (absl::ConsumePrefix(&value, "--tokens=")) {
      ok = kvcache::chat::ParseList(value, &tokens);
    } else if (absl::ConsumePrefix(&value, "--positions=")) {
      ok = kvcache::chat::ParseList(value, &positions);
    } else {
      ok = false;
    }
    if (!ok) {
      std::fprintf(stderr, "llama_logits: bad argument %s\n", argv[i]);
      return 2;
    }
  }
  if (model.empty() || out.empty() || tokens.empty() || positions.empty()) {
    std::fprintf(stderr,
                 "usage: llama_logits --model=FILE --tokens=A,B,... "
                 "--positions=P,Q,... --out=PREFIX\n");
    return 2;
  }
  const absl::Status status = kvcache::chat::Run(model, tokens, positions, out);
  if (!status.ok()) {
    std::fprintf(stderr, "llama_logits: %s\n", status.ToString().c_str());
    return 1;
  }
  return 0;
}
