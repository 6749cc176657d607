// ChatML rendering (see chat_template.h).
#include "client/examples/model/chat_template.h"

#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "client/examples/model/gguf.h"

namespace kvcache::model {
namespace {

constexpr absl::string_view kStart = "<|im_start|>";
// How a ChatML template writes its default system message.
constexpr absl::string_view kSystemOpening = "'<|im_start|>system\n";

}  // namespace

absl::StatusOr<ChatMlTemplate> ChatMlTemplate::FromGguf(const GgufFile& file) {
  absl::StatusOr<std::string> source =
      file.GetString("tokenizer.chat_template");
  if (!source.ok()) return source.status();
  const bool chatml =
      absl::StrContains(*source,
                        "'<|im_start|>' + message['role'] + '\n' + "
                        "message['content'] + '<|im_end|>'") &&
      absl::StrContains(*source, "<|im_start|>assistant\n");
  if (!chatml) {
    return absl::UnimplementedError(
        "tokenizer.chat_template is not ChatML; only ChatML is implemented");
  }
  const absl::string_view text = *source;
  const size_t at = text.find(kSystemOpening);
  if (at == absl::string_view::npos) return ChatMlTemplate("");
  const size_t begin = at + kSystemOpening.size();
  const size_t end = text.find(kEndOfMessage, begin);
  if (end == absl::string_view::npos) {
    return absl::InvalidArgumentError(
        "tokenizer.chat_template opens a default system message it never "
        "closes");
  }
  return ChatMlTemplate(std::string(text.substr(begin, end - begin)));
}

std::string ChatMlTemplate::RenderMessage(const ChatMessage& message) {
  return absl::StrCat(kStart, message.role, "\n", message.content,
                      kEndOfMessage, "\n");
}

std::string ChatMlTemplate::TurnPrompt(const ChatMessage& user, bool first_turn,
                                       bool reply_closed) const {
  if (first_turn) return Render({user}, /*add_generation_prompt=*/true);
  return absl::StrCat(reply_closed ? "" : kEndOfMessage, "\n",
                      RenderMessage(user), kStart, "assistant\n");
}

std::string ChatMlTemplate::Render(absl::Span<const ChatMessage> messages,
                                   bool add_generation_prompt) const {
  std::string text;
  // As the template: only a conversation with a first message that is not
  // the system's gets the default.
  if (!default_system_prompt_.empty() && !messages.empty() &&
      messages.front().role != "system") {
    text = RenderMessage({"system", default_system_prompt_});
  }
  for (const ChatMessage& message : messages) {
    absl::StrAppend(&text, RenderMessage(message));
  }
  if (add_generation_prompt) absl::StrAppend(&text, kStart, "assistant\n");
  return text;
}

}  // namespace kvcache::model
