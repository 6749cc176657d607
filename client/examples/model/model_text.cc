// A GGUF model's tokenizer and chat template (see model_text.h).
#include "client/examples/model/model_text.h"

#include <utility>

namespace kvcache::model {

absl::StatusOr<ModelText> ModelText::FromGguf(const GgufFile& file) {
  ModelText text;
  absl::StatusOr<std::unique_ptr<BpeTokenizer>> tokenizer =
      BpeTokenizer::FromGguf(file);
  if (!tokenizer.ok()) return tokenizer.status();
  text.tokenizer = *std::move(tokenizer);
  absl::StatusOr<ChatMlTemplate> chat_template = ChatMlTemplate::FromGguf(file);
  if (!chat_template.ok()) return chat_template.status();
  text.chat_template = *std::move(chat_template);
  absl::StatusOr<int32_t> end =
      text.tokenizer->TokenId(ChatMlTemplate::kEndOfMessage);
  if (!end.ok()) return end.status();
  text.end_of_message = *end;
  return text;
}

absl::StatusOr<ModelText> ModelText::Open(const std::string& path) {
  absl::StatusOr<GgufFile> file = GgufFile::Open(path);
  if (!file.ok()) return file.status();
  return FromGguf(*file);
}

}  // namespace kvcache::model
