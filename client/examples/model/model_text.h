// What turns a GGUF chat model's tokens into text and back: its tokenizer,
// its chat template and the token that ends a message, all read from the
// file's metadata.
//
// Thread-safety: as its parts; immutable once loaded.
#ifndef KVCACHE_CLIENT_EXAMPLES_MODEL_MODEL_TEXT_H_
#define KVCACHE_CLIENT_EXAMPLES_MODEL_MODEL_TEXT_H_

#include <cstdint>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "client/examples/model/bpe_tokenizer.h"
#include "client/examples/model/chat_template.h"
#include "client/examples/model/gguf.h"

namespace kvcache::model {

struct ModelText {
  std::unique_ptr<BpeTokenizer> tokenizer;
  ChatMlTemplate chat_template{""};
  int32_t end_of_message = 0;  // the token of ChatMlTemplate::kEndOfMessage

  // The errors of BpeTokenizer::FromGguf and ChatMlTemplate::FromGguf;
  // NOT_FOUND if the vocabulary has no end-of-message token.
  static absl::StatusOr<ModelText> FromGguf(const GgufFile& file);
  // Opens the file first; GgufFile::Open's errors too.
  static absl::StatusOr<ModelText> Open(const std::string& path);
};

}  // namespace kvcache::model

#endif  // KVCACHE_CLIENT_EXAMPLES_MODEL_MODEL_TEXT_H_
