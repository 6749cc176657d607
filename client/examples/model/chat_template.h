// ChatML, the chat format of SmolLM2 and many other instruction-tuned
// models: each message is "<|im_start|>ROLE\nCONTENT<|im_end|>\n", and a
// conversation that does not open with a system message gets the model's
// default one first.
//
// GGUF files carry their chat template as Jinja source; rather than
// interpret Jinja, FromGguf recognizes a ChatML template and takes its
// default system prompt out of it. Thread-safe: immutable.
#ifndef KVCACHE_CLIENT_EXAMPLES_MODEL_CHAT_TEMPLATE_H_
#define KVCACHE_CLIENT_EXAMPLES_MODEL_CHAT_TEMPLATE_H_

#include <string>
#include <utility>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/types/span.h"

namespace kvcache::model {

class GgufFile;

struct ChatMessage {
  std::string role;  // "system", "user" or "assistant"
  std::string content;
};

class ChatMlTemplate {
 public:
  // A template with this default system prompt (empty: none is added).
  explicit ChatMlTemplate(std::string default_system_prompt)
      : default_system_prompt_(std::move(default_system_prompt)) {}

  // From tokenizer.chat_template. NOT_FOUND if the file has none;
  // UNIMPLEMENTED if it is not ChatML.
  static absl::StatusOr<ChatMlTemplate> FromGguf(const GgufFile& file);

  const std::string& default_system_prompt() const {
    return default_system_prompt_;
  }

  // The prompt text of `messages`, followed by "<|im_start|>assistant\n" if
  // `add_generation_prompt`, as the model's template renders them.
  std::string Render(absl::Span<const ChatMessage> messages,
                     bool add_generation_prompt) const;

  // The prompt text of a turn that asks `user`. The first turn's is Render
  // of that one message; a later turn's follows the model's last reply
  // (`reply_closed`: it ended with kEndOfMessage): what closes the reply, the
  // user's message and the assistant's header. So the turns' prompts and
  // replies, concatenated, are what Render gives for the whole conversation.
  std::string TurnPrompt(const ChatMessage& user, bool first_turn,
                         bool reply_closed) const;

  // One message, as Render writes it.
  static std::string RenderMessage(const ChatMessage& message);

  // What ends a reply.
  static constexpr absl::string_view kEndOfMessage = "<|im_end|>";

 private:
  std::string default_system_prompt_;
};

}  // namespace kvcache::model

#endif  // KVCACHE_CLIENT_EXAMPLES_MODEL_CHAT_TEMPLATE_H_
