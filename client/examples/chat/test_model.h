// The reference model for tests: SmolLM2-135M-Instruct from $KVCACHE_MODEL
// (deploy/setup.sh fetches it and sets the variable for bazel test), with
// its tokenizer and chat template.
#ifndef KVCACHE_CLIENT_EXAMPLES_CHAT_TEST_MODEL_H_
#define KVCACHE_CLIENT_EXAMPLES_CHAT_TEST_MODEL_H_

#include <cstdlib>
#include <string>
#include <utility>

#include "absl/status/statusor.h"
#include "client/examples/chat/llama_model.h"
#include "client/examples/model/model_text.h"

namespace kvcache::chat {

struct TestModel {
  std::string path;
  LlamaModel model;
  model::ModelText text;
};

// FAILED_PRECONDITION if $KVCACHE_MODEL is not set; the loaders' errors.
inline absl::StatusOr<TestModel> LoadTestModel() {
  const char* path = std::getenv("KVCACHE_MODEL");
  if (path == nullptr) {
    return absl::FailedPreconditionError(
        "KVCACHE_MODEL is not set: run deploy/setup.sh");
  }
  absl::StatusOr<LlamaModel> model = LlamaModel::Load(path);
  if (!model.ok()) return model.status();
  absl::StatusOr<model::ModelText> text = model::ModelText::Open(path);
  if (!text.ok()) return text.status();
  return TestModel{path, *std::move(model), *std::move(text)};
}

}  // namespace kvcache::chat

#endif  // KVCACHE_CLIENT_EXAMPLES_CHAT_TEST_MODEL_H_
