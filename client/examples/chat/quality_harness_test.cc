// The quality harness on SmolLM2-135M-Instruct ($KVCACHE_MODEL) with a real
// kvcached, on a small set: two documents and one two-turn chat of the
// evaluation text. Lossless restores must give the reference's logits bit
// for bit; lossy ones must change them, yet keep the model's top choices
// most of the time, and be as small as their level says.
#include "client/examples/chat/quality_harness.h"

#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "client/examples/chat/llama_model.h"
#include "client/examples/chat/real_text.h"
#include "client/examples/chat/test_model.h"
#include "client/examples/model/model_text.h"
#include "client/kvcache_client.h"
#include "gtest/gtest.h"
#include "tests/testing/daemon_process.h"

namespace kvcache::chat {
namespace {

using ::kvcache::testing::DaemonProcess;

TEST(QualityHarnessTest, LosslessIsExactAndLossyLevelsStayClose) {
  absl::StatusOr<TestModel> loaded = LoadTestModel();
  ASSERT_TRUE(loaded.ok()) << loaded.status();
  const LlamaModel* model = &loaded->model;
  const model::ModelText* text = &loaded->text;
  const std::string& path = loaded->path;

  absl::StatusOr<std::vector<Document>> documents =
      LoadDocuments(kPythonDocsRoot, TextSet::kEvaluation);
  ASSERT_TRUE(documents.ok()) << documents.status();
  DocumentOptions doc_options;
  doc_options.count = 2;
  doc_options.history_tokens = {300, 200};  // not a multiple of the chunk
  doc_options.scored_tokens = 32;
  absl::StatusOr<std::vector<Conversation>> conversations =
      DocumentConversations(*text->tokenizer, *documents, doc_options);
  ASSERT_TRUE(conversations.ok()) << conversations.status();
  absl::StatusOr<std::vector<std::string>> questions =
      LoadFaqQuestions(kPythonDocsRoot);
  ASSERT_TRUE(questions.ok()) << questions.status();
  ASSERT_GT(questions->size(), 100u);
  ChatOptions chat_options;
  chat_options.count = 1;
  chat_options.turns = 2;
  chat_options.reply_tokens = 24;
  absl::StatusOr<std::vector<Conversation>> chats = ChatConversations(
      *model, *text->tokenizer, text->chat_template, *questions, chat_options);
  ASSERT_TRUE(chats.ok()) << chats.status();
  ASSERT_EQ(chats->size(), 1u);
  ASSERT_EQ((*chats)[0].segments.size(), 2u);
  conversations->push_back((*chats)[0]);

  absl::StatusOr<DaemonProcess> daemon =
      DaemonProcess::Start("kvstore/kvcached", {});
  ASSERT_TRUE(daemon.ok()) << daemon.status();
  ClientOptions client_options;
  client_options.address = daemon->address();
  auto client = KvCacheClient::Connect(client_options);
  ASSERT_TRUE(client.ok()) << client.status();

  std::vector<Variant> variants;
  for (const Variant& v : DefaultVariants()) {
    if (v.name == "lossless" || v.name == "default" || v.name == "KIVI 4-bit") {
      variants.push_back(v);
    }
  }
  ASSERT_EQ(variants.size(), 3u);
  QualityHarness harness(*model, path, client->get(), /*chunk_tokens=*/128);
  absl::StatusOr<std::vector<VariantResult>> results =
      harness.Run(*conversations, variants);
  ASSERT_TRUE(results.ok()) << results.status();

  const VariantResult& lossless = (*results)[0];
  const VariantResult& lossy = (*results)[1];
  const VariantResult& kivi = (*results)[2];
  for (const VariantResult& r : *results) {
    std::cout << r.name << ": " << r.Ratio() << "x, top-1 " << r.Top1()
              << ", perplexity " << r.Perplexity() << " vs "
              << r.PerplexityReference() << ", KL mean " << r.MeanKl()
              << " p99 " << r.KlQuantile(0.99) << ", replies identical "
              << r.replies_identical << "/" << r.replies << "\n";
    // Two documents' 32 positions and the chat's second reply.
    EXPECT_GT(r.positions, 64);
    EXPECT_EQ(r.replies, 1);
    EXPECT_EQ(r.text_positions, 64);
  }
  // Lossless: every restored logit is the reference's.
  EXPECT_EQ(lossless.rows_identical, lossless.positions);
  EXPECT_EQ(lossless.MeanKl(), 0.0);
  EXPECT_EQ(lossless.Perplexity(), lossless.PerplexityReference());
  EXPECT_EQ(lossless.replies_identical, 1);
  EXPECT_GT(lossless.Ratio(), 1.05);

  // Lossy: smaller, different, and still more often than not the same top
  // token (the default level measured 0.70 here, KIVI 4-bit 0.94).
  EXPECT_GT(lossy.Ratio(), 4.0);
  EXPECT_GT(lossy.MeanKl(), 0.0);
  EXPECT_LT(lossy.rows_identical, lossy.positions);
  EXPECT_GT(lossy.Top1(), 0.5);
  EXPECT_GT(kivi.Ratio(), 3.0);
  EXPECT_LT(kivi.Ratio(), 4.0);  // 4 bits plus a scale and zero per group
  EXPECT_GT(kivi.MeanKl(), 0.0);
  EXPECT_GT(kivi.Top1(), 0.8);
}

}  // namespace
}  // namespace kvcache::chat
