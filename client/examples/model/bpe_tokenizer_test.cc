// Byte-level BPE and ChatML: the algorithm on a vocabulary small enough to
// reason about, then the real SmolLM2 vocabulary ($KVCACHE_MODEL). The
// comparison with the `tokenizers` package over real documents is
// tokenizer_reference_test.
#include "client/examples/model/bpe_tokenizer.h"

#include <cstdlib>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "client/examples/model/chat_template.h"
#include "client/examples/model/gguf.h"
#include "gtest/gtest.h"

namespace kvcache::model {
namespace {

// GPT-2's stand-in for byte b (see bpe_tokenizer.cc): printable Latin-1
// stands for itself.
std::string Mapped(int b) {
  const bool printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) ||
                         (b >= 0xAE && b <= 0xFF);
  uint32_t cp = b;
  if (!printable) {
    cp = 256;
    for (int x = 0; x < b; ++x) {
      const bool p = (x >= '!' && x <= '~') || (x >= 0xA1 && x <= 0xAC) ||
                     (x >= 0xAE && x <= 0xFF);
      if (!p) ++cp;
    }
  }
  std::string out;
  if (cp < 0x80) {
    out.push_back(static_cast<char>(cp));
  } else {
    out.push_back(static_cast<char>(0xC0 | (cp >> 6)));
    out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  }
  return out;
}

// Every byte, then "ab", "abc", " x" (spelled "Ġx") and a control token.
struct TinyVocab {
  std::vector<std::string> tokens;
  std::vector<std::string> merges = {"a b", "ab c", "Ġ x"};
  std::vector<int64_t> types;

  TinyVocab() {
    for (int b = 0; b < 256; ++b) tokens.push_back(Mapped(b));
    for (const char* t : {"ab", "abc", "Ġx"}) tokens.push_back(t);
    tokens.push_back("<|end|>");
    types.assign(tokens.size(), static_cast<int64_t>(TokenType::kNormal));
    types.back() = static_cast<int64_t>(TokenType::kControl);
  }
  int32_t Id(const std::string& token) const {
    for (size_t i = 0; i < tokens.size(); ++i) {
      if (tokens[i] == token) return static_cast<int32_t>(i);
    }
    return -1;
  }
};

std::unique_ptr<BpeTokenizer> Tiny(const TinyVocab& v = TinyVocab()) {
  auto t = BpeTokenizer::Create(v.tokens, v.merges, v.types);
  EXPECT_TRUE(t.ok()) << t.status();
  return t.ok() ? *std::move(t) : nullptr;
}

TEST(BpeTokenizerTest, MergesByRank) {
  const TinyVocab v;
  auto t = Tiny(v);
  // "abcab": a+b first (rank 0) everywhere, then ab+c.
  EXPECT_EQ(*t->Encode("abcab"),
            (std::vector<int32_t>{v.Id("abc"), v.Id("ab")}));
  // "ba": no merge applies.
  EXPECT_EQ(*t->Encode("ba"), (std::vector<int32_t>{'b', 'a'}));
}

TEST(BpeTokenizerTest, PreTokenizesBeforeMerging) {
  const TinyVocab v;
  auto t = Tiny(v);
  // " x" is one piece (a space joins the letters after it), so it merges;
  // "a b" is two pieces, so "a" and " b" never merge into "ab".
  EXPECT_EQ(*t->Encode(" x"), (std::vector<int32_t>{v.Id("Ġx")}));
  EXPECT_EQ(*t->Encode("a b"), (std::vector<int32_t>{'a', v.Id("Ġ"), 'b'}));
  // Every digit stands alone, even in a run: "12" is "1", "2".
  EXPECT_EQ(*t->Encode("12"), (std::vector<int32_t>{'1', '2'}));
}

TEST(BpeTokenizerTest, ControlTokensMatchInRawText) {
  const TinyVocab v;
  auto t = Tiny(v);
  EXPECT_EQ(*t->Encode("ab<|end|>c"),
            (std::vector<int32_t>{v.Id("ab"), v.Id("<|end|>"), 'c'}));
  EXPECT_EQ(*t->TokenId("<|end|>"), v.Id("<|end|>"));
  EXPECT_EQ(*t->TokenId(" x"), v.Id("Ġx"));
  EXPECT_EQ(t->TokenId("zz").status().code(), absl::StatusCode::kNotFound);
}

TEST(BpeTokenizerTest, DecodesEveryByteBack) {
  auto t = Tiny();
  std::string all;
  for (int b = 1; b < 256; ++b) all.push_back(static_cast<char>(b));
  const std::vector<int32_t> ids = *t->Encode(all);
  EXPECT_EQ(*t->Decode(ids), all);
  EXPECT_EQ(t->Decode({-1}).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(t->Decode({t->vocab_size()}).status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(BpeTokenizerTest, DropsBytesWithoutATokenAsTheReferenceDoes) {
  TinyVocab v;
  v.tokens[7] = "seven";  // byte 7 has no token of its own now
  auto t = BpeTokenizer::Create(v.tokens, v.merges, v.types);
  ASSERT_TRUE(t.ok()) << t.status();
  EXPECT_EQ(*(*t)->Encode("a\x07"
                          "b"),
            (std::vector<int32_t>{'a', 'b'}));
}

TEST(BpeTokenizerTest, RejectsInconsistentVocabularies) {
  TinyVocab bad_merge;
  bad_merge.merges.push_back("x y");  // "xy" is no token
  EXPECT_EQ(
      BpeTokenizer::Create(bad_merge.tokens, bad_merge.merges, bad_merge.types)
          .status()
          .code(),
      absl::StatusCode::kInvalidArgument);
  TinyVocab malformed;
  malformed.merges.push_back("abc");
  EXPECT_FALSE(
      BpeTokenizer::Create(malformed.tokens, malformed.merges, malformed.types)
          .ok());
  TinyVocab repeated;
  repeated.tokens.back() = "ab";
  EXPECT_FALSE(
      BpeTokenizer::Create(repeated.tokens, repeated.merges, repeated.types)
          .ok());
  TinyVocab short_types;
  short_types.types.pop_back();
  EXPECT_FALSE(BpeTokenizer::Create(short_types.tokens, short_types.merges,
                                    short_types.types)
                   .ok());
}

class SmolLm2Test : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    const char* path = std::getenv("KVCACHE_MODEL");
    ASSERT_NE(path, nullptr)
        << "KVCACHE_MODEL is not set: run deploy/setup.sh, which fetches "
           "SmolLM2-135M-Instruct and writes .setup.bazelrc";
    absl::StatusOr<GgufFile> file = GgufFile::Open(path);
    ASSERT_TRUE(file.ok()) << file.status();
    file_ = new GgufFile(*std::move(file));
    auto tokenizer = BpeTokenizer::FromGguf(*file_);
    ASSERT_TRUE(tokenizer.ok()) << tokenizer.status();
    tokenizer_ = tokenizer->release();
  }
  static GgufFile* file_;
  static BpeTokenizer* tokenizer_;
};
GgufFile* SmolLm2Test::file_ = nullptr;
BpeTokenizer* SmolLm2Test::tokenizer_ = nullptr;

// The ids SmolLM2's own tokenizer gives this prompt.
TEST_F(SmolLm2Test, ChatPromptGetsTheModelsIds) {
  absl::StatusOr<ChatMlTemplate> chat = ChatMlTemplate::FromGguf(*file_);
  ASSERT_TRUE(chat.ok()) << chat.status();
  EXPECT_EQ(chat->default_system_prompt(),
            "You are a helpful AI assistant named SmolLM, trained by Hugging "
            "Face");
  const std::string prompt =
      chat->Render({{"user", "What is the capital of France?"}},
                   /*add_generation_prompt=*/true);
  EXPECT_EQ(prompt,
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, "
            "trained by Hugging Face<|im_end|>\n<|im_start|>user\nWhat is the "
            "capital of France?<|im_end|>\n<|im_start|>assistant\n");
  const std::vector<int32_t> want = {
      1,    9690, 198,   2683, 359,  253,  5356, 5646,  11173, 3365,
      3511, 308,  34519, 28,   7018, 411,  407,  19712, 8182,  2,
      198,  1,    4093,  198,  1780, 314,  260,  3575,  282,   4649,
      47,   2,    198,   1,    520,  9531, 198};
  EXPECT_EQ(*tokenizer_->Encode(prompt), want);
  EXPECT_EQ(*tokenizer_->Decode(want), prompt);
  EXPECT_EQ(*tokenizer_->TokenId("<|im_start|>"), 1);
  EXPECT_EQ(*tokenizer_->TokenId("<|im_end|>"), 2);
}

TEST_F(SmolLm2Test, TurnPromptsConcatenateToTheRenderedConversation) {
  const ChatMlTemplate chat = *ChatMlTemplate::FromGguf(*file_);
  const ChatMessage q1{"user", "What is Python?"}, q2{"user", "Why?"};
  const std::string reply = "A language.";
  EXPECT_EQ(chat.TurnPrompt(q1, true, false) + reply + "<|im_end|>" +
                chat.TurnPrompt(q2, false, true),
            chat.Render({q1, {"assistant", reply}, q2}, true));
  // A reply cut short is closed by the next prompt.
  EXPECT_EQ(chat.TurnPrompt(q1, true, false) + reply +
                chat.TurnPrompt(q2, false, false),
            chat.Render({q1, {"assistant", reply}, q2}, true));
}

TEST_F(SmolLm2Test, SystemMessageReplacesTheDefault) {
  const ChatMlTemplate chat = *ChatMlTemplate::FromGguf(*file_);
  EXPECT_EQ(chat.Render({{"system", "Be brief."}, {"user", "Hi"}},
                        /*add_generation_prompt=*/false),
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi"
            "<|im_end|>\n");
  EXPECT_EQ(chat.Render({}, /*add_generation_prompt=*/true),
            "<|im_start|>assistant\n");
}

}  // namespace
}  // namespace kvcache::model
