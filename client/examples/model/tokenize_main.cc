// tokenize: the token ids of text files under a GGUF model's tokenizer, as
// JSON, in the form reference/tokenize_reference.py writes, so the two can
// be compared.
//
//   tokenize --model=FILE.gguf --out=IDS.json FILE...
//
// Writes {"FILE as given": [ids...], ...}; exits 1 if a file does not decode
// back to its own text.
#include <cstdio>
#include <fstream>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/strip.h"
#include "client/examples/model/bpe_tokenizer.h"
#include "client/examples/model/gguf.h"
#include "nlohmann/json.hpp"

namespace kvcache::model {
namespace {

absl::Status Run(const std::string& model, const std::string& out,
                 const std::vector<std::string>& files) {
  absl::StatusOr<GgufFile> gguf = GgufFile::Open(model);
  if (!gguf.ok()) return gguf.status();
  absl::StatusOr<std::unique_ptr<BpeTokenizer>> tokenizer =
      BpeTokenizer::FromGguf(*gguf);
  if (!tokenizer.ok()) return tokenizer.status();
  nlohmann::json ids = nlohmann::json::object();
  for (const std::string& path : files) {
    std::ifstream in(path, std::ios::binary);
    if (!in) return absl::NotFoundError(absl::StrCat("cannot open ", path));
    std::ostringstream text;
    text << in.rdbuf();
    absl::StatusOr<std::vector<int32_t>> encoded =
        (*tokenizer)->Encode(text.str());
    if (!encoded.ok()) return encoded.status();
    absl::StatusOr<std::string> decoded = (*tokenizer)->Decode(*encoded);
    if (!decoded.ok()) return decoded.status();
    if (*decoded != text.str()) {
      return absl::DataLossError(
          absl::StrCat(path, " does not decode back to its text"));
    }
    ids[path] = *encoded;
  }
  std::ofstream file(out, std::ios::trunc);
  file << ids.dump();
  if (!file) return absl::InternalError(absl::StrCat("cannot write ", out));
  return absl::OkStatus();
}

}  // namespace
}  // namespace kvcache::model

int main(int argc, char** argv) {
  std::string model, out;
  std::vector<std::string> files;
  for (int i = 1; i < argc; ++i) {
    absl::string_view value = argv[i];
    if (absl::ConsumePrefix(&value, "--model=")) {
      model = std::string(value);
    } else if (absl::ConsumePrefix(&value, "--out=")) {
      out = std::string(value);
    } else if (absl::StartsWith(value, "--")) {
      std::fprintf(stderr, "tokenize: bad argument %s\n", argv[i]);
      return 2;
    } else {
      files.emplace_back(value);
    }
  }
  if (model.empty() || out.empty() || files.empty()) {
    std::fprintf(stderr,
                 "usage: tokenize --model=FILE.gguf --out=IDS.json FILE...\n");
    return 2;
  }
  const absl::Status status = kvcache::model::Run(model, out, files);
  if (!status.ok()) {
    std::fprintf(stderr, "tokenize: %s\n", status.ToString().c_str());
    return 1;
  }
  return 0;
}
