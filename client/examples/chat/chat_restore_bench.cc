// chat_restore_bench: what restoring a model's KV through kvcache changes
// and costs, per codec level beside KIVI, with a real model on real text,
// against a running kvcached (run_bench.sh starts one).
//
//   chat_restore_bench --addr=HOST:PORT --model=FILE.gguf
//       [--documents=24] [--history=1024,2048,3072,4096] [--scored=128]
//       [--chats=12] [--turns=3] [--reply=96] [--variants=NAME,...]
//       [--lengths=1024,2048,4096,8192] [--reps=3] [--chunk_tokens=256]
//       [--docs=/usr/share/doc/python3.11/html/_sources]
//       [--profile_file=FILE]
//
// Quality (quality_harness.h): documents and chats of the evaluation set
// (real_text.h), each run with its KV kept in the worker and then once per
// variant with its KV stored and restored between segments; one table row
// per variant. Variants are named as codec levels ("default"), "kivi8",
// "kivi4", "kivi2", or CacheGen's reference coder by its delta bins
// ("cachegen32-16-16", "cachegen16-8-8"); all by default. The transform
// levels use a model profile calibrated on the calibration set first, or
// the one in --profile_file if that file exists (else the calibrated one is
// written there, so that later runs skip the calibration).
//
// Time: for each history length, recomputing it (one prefill) against
// restoring it from kvcache (lookup + get + decode + import) at each codec
// level, in alternating rounds; median and range over the rounds.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "absl/time/clock.h"
#include "client/examples/chat/chat_session.h"
#include "client/examples/chat/llama_model.h"
#include "client/examples/chat/model_profile.h"
#include "client/examples/chat/paged_kv_cache.h"
#include "client/examples/chat/quality_harness.h"
#include "client/examples/chat/real_text.h"
#include "client/examples/model/bpe_tokenizer.h"
#include "client/examples/model/chat_template.h"
#include "client/examples/model/model_text.h"
#include "client/kvcache_client.h"
#include "codec/codec.h"

namespace kvcache::chat {
namespace {

struct BenchOptions {
  std::string address;
  std::string model;
  std::string docs = kPythonDocsRoot;
  std::string profile_file;
  DocumentOptions documents;
  ChatOptions chats;
  std::vector<std::string> variants;  // empty: all
  std::vector<int> lengths = {1024, 2048, 4096, 8192};
  int reps = 3;
  uint32_t chunk_tokens = 256;
};

double Ms(absl::Duration d) { return absl::ToDoubleMilliseconds(d); }

// "median (min-max)" of a sample.
std::string Range(std::vector<double> v, const char* format) {
  std::sort(v.begin(), v.end());
  return absl::StrCat(absl::StrFormat(format, v[v.size() / 2]), " (",
                      absl::StrFormat(format, v.front()), "-",
                      absl::StrFormat(format, v.back()), ")");
}

absl::StatusOr<std::vector<Variant>> ChooseVariants(
    const std::vector<std::string>& names) {
  std::vector<Variant> all = DefaultVariants();
  if (names.empty()) return all;
  std::vector<Variant> chosen;
  for (const std::string& name : names) {
    auto it = std::find_if(all.begin(), all.end(),
                           [&](const Variant& v) { return v.key == name; });
    if (it == all.end()) {
      std::string keys;
      for (const Variant& v : all) {
        absl::StrAppend(&keys, keys.empty() ? "" : ", ", v.key);
      }
      return absl::InvalidArgumentError(
          absl::StrCat("unknown variant \"", name, "\"; variants: ", keys));
    }
    chosen.push_back(*it);
  }
  return chosen;
}

// The model's profile from options.profile_file, or calibrated (and then
// written there when a file is named).
absl::StatusOr<codec::ModelProfile> LoadOrCalibrate(
    const BenchOptions& options, const LlamaModel& model,
    const model::BpeTokenizer& tokenizer) {
  if (!options.profile_file.empty() &&
      std::ifstream(options.profile_file).good()) {
    absl::StatusOr<codec::ModelProfile> read =
        codec::ReadProfileFile(options.profile_file);
    if (read.ok()) {
      std::printf("Model profile %s from %s\n\n",
                  codec::ProfileIdHex(read->id).c_str(),
                  options.profile_file.c_str());
    }
    return read;
  }
  absl::StatusOr<std::vector<Document>> calibration =
      LoadDocuments(options.docs, TextSet::kCalibration);
  if (!calibration.ok()) return calibration.status();
  const absl::Time start = absl::Now();
  absl::StatusOr<codec::ModelProfile> made =
      CalibrateModelProfile(model, tokenizer, *calibration, {});
  if (!made.ok()) return made.status();
  std::printf("Model profile %s from %d calibration tokens, %.1f s\n\n",
              codec::ProfileIdHex(made->id).c_str(),
              CalibrationOptions().tokens,
              absl::ToDoubleSeconds(absl::Now() - start));
  if (!options.profile_file.empty()) {
    std::ofstream out(options.profile_file, std::ios::binary);
    out << codec::SerializeProfile(*made);
    if (!out.flush()) {
      return absl::InternalError(
          absl::StrCat("cannot write ", options.profile_file));
    }
  }
  return made;
}

absl::Status Quality(const BenchOptions& options, const LlamaModel& model,
                     const model::BpeTokenizer& tokenizer,
                     const model::ChatMlTemplate& chat_template,
                     ChunkStore& store) {
  absl::StatusOr<std::vector<Variant>> variants =
      ChooseVariants(options.variants);
  if (!variants.ok()) return variants.status();
  absl::StatusOr<std::vector<Document>> documents =
      LoadDocuments(options.docs, TextSet::kEvaluation);
  if (!documents.ok()) return documents.status();
  absl::StatusOr<std::vector<std::string>> questions =
      LoadFaqQuestions(options.docs);
  if (!questions.ok()) return questions.status();

  const absl::Time start = absl::Now();
  absl::StatusOr<std::vector<Conversation>> conversations =
      DocumentConversations(tokenizer, *documents, options.documents);
  if (!conversations.ok()) return conversations.status();
  absl::StatusOr<std::vector<Conversation>> chats = ChatConversations(
      model, tokenizer, chat_template, *questions, options.chats);
  if (!chats.ok()) return chats.status();
  conversations->insert(conversations->end(), chats->begin(), chats->end());

  // The transform levels need the model's profile: calibrated here on the
  // calibration set, as a worker would before its first store.
  std::optional<codec::ModelProfile> profile;
  if (std::any_of(variants->begin(), variants->end(), [](const Variant& v) {
        return v.level.has_value() && codec::LevelNeedsProfile(*v.level);
      })) {
    absl::StatusOr<codec::ModelProfile> made =
        LoadOrCalibrate(options, model, tokenizer);
    if (!made.ok()) return made.status();
    profile = *std::move(made);
  }
  QualityHarness harness(model, options.model, &store, options.chunk_tokens,
                         profile ? &*profile : nullptr);
  absl::StatusOr<std::vector<VariantResult>> results =
      harness.Run(*conversations, *variants);
  if (!results.ok()) return results.status();

  std::string histories;
  for (int h : options.documents.history_tokens) {
    absl::StrAppend(&histories, histories.empty() ? "" : "/", h);
  }
  std::printf(
      "Quality: %d documents (%s-token histories restored, %d-token prompt, "
      "%d real tokens scored) and %d chats (%d turns of FAQ questions, "
      "greedy replies of up to %d tokens, restored before every turn after "
      "the first); %d-token chunks; %.0f s\n\n",
      options.documents.count, histories.c_str(),
      options.documents.prompt_tokens, options.documents.scored_tokens,
      options.chats.count, options.chats.turns, options.chats.reply_tokens,
      options.chunk_tokens, absl::ToDoubleSeconds(absl::Now() - start));
  std::printf(
      "| variant | bytes vs fp16 | top-1 agreement | perplexity restored / "
      "recomputed (documents) | KL mean | KL p99 | greedy replies identical "
      "| first difference (mean) |\n"
      "|---|---:|---:|---:|---:|---:|---:|---:|\n");
  for (const VariantResult& r : *results) {
    std::printf(
        "| %s | %.2fx smaller | %.4f | %.3f / %.3f (%+.2f%%) | %.5f | %.4f | "
        "%d of %d | %.1f of %.1f |\n",
        r.name.c_str(), r.Ratio(), r.Top1(), r.Perplexity(),
        r.PerplexityReference(),
        100 * (r.Perplexity() / r.PerplexityReference() - 1), r.MeanKl(),
        r.KlQuantile(0.99), r.replies_identical, r.replies,
        r.replies ? r.first_difference_sum / r.replies : 0,
        r.replies ? r.reply_tokens_sum / r.replies : 0);
  }
  std::printf("\n");
  std::fflush(stdout);
  return absl::OkStatus();
}

absl::Status Timing(const BenchOptions& options, const LlamaModel& model,
                    const model::BpeTokenizer& tokenizer, ChunkStore& store) {
  const int longest =
      *std::max_element(options.lengths.begin(), options.lengths.end());
  absl::StatusOr<std::vector<Document>> documents =
      LoadDocuments(options.docs, TextSet::kEvaluation);
  if (!documents.ok()) return documents.status();
  std::vector<int32_t> text;
  for (const Document& d : *documents) {
    absl::StatusOr<std::vector<int32_t>> ids = tokenizer.Encode(d.text);
    if (!ids.ok()) return ids.status();
    if (static_cast<int>(ids->size()) >= longest) {
      text = *std::move(ids);
      break;
    }
  }
  if (text.empty()) {
    return absl::NotFoundError(
        absl::StrCat("no evaluation document has ", longest, " tokens"));
  }
  const std::vector<codec::Level> levels = {
      codec::Level::kLossless, codec::Level::kNearLossless, codec::Level::kHigh,
      codec::Level::kDefault};
  absl::StatusOr<PagedKvCache> cache =
      PagedKvCache::Create(model.CacheShape(16, longest / 16 + 8));
  if (!cache.ok()) return cache.status();

  std::printf(
      "Time: recompute (prefill) vs restore from kvcache (lookup + get + "
      "decode + import), ms, median (range) of %d alternating rounds\n\n",
      options.reps);
  std::string header = "| history tokens | prefill |";
  std::string rule = "|---:|---:|";
  for (codec::Level level : levels) {
    absl::StrAppend(&header, " restore ", codec::LevelName(level), " |");
    absl::StrAppend(&rule, "---:|");
  }
  std::printf("%s\n%s\n", header.c_str(), rule.c_str());
  for (const int length : options.lengths) {
    const absl::Span<const int32_t> history =
        absl::MakeConstSpan(text).first(length);
    std::vector<ChatSession> sessions;
    for (codec::Level level : levels) {
      absl::StatusOr<KeySpace> space = ChatKeySpace(
          options.model, model.config(), options.chunk_tokens, level, "timing");
      if (!space.ok()) return space.status();
      ChatSessionOptions session_options;
      session_options.level = level;
      absl::StatusOr<ChatSession> session =
          ChatSession::Create(&*cache, &store, *space, session_options);
      if (!session.ok()) return session.status();
      sessions.push_back(*std::move(session));
    }
    std::vector<double> prefill;
    std::vector<std::vector<double>> restore(levels.size());
    for (int r = 0; r < options.reps; ++r) {
      SequenceId seq = cache->CreateSequence();
      const absl::Time start = absl::Now();
      absl::StatusOr<std::vector<float>> logits =
          model.Prefill(&*cache, seq, history);
      prefill.push_back(Ms(absl::Now() - start));
      if (!logits.ok()) return logits.status();
      for (size_t l = 0; l < levels.size(); ++l) {
        if (r == 0) {
          absl::StatusOr<StoreStats> stored = sessions[l].Store(seq, history);
          if (!stored.ok()) return stored.status();
        }
      }
      cache->FreeSequence(seq).IgnoreError();
      for (size_t l = 0; l < levels.size(); ++l) {
        seq = cache->CreateSequence();
        absl::StatusOr<RestoreStats> restored =
            sessions[l].Restore(seq, history);
        cache->FreeSequence(seq).IgnoreError();
        if (!restored.ok()) return restored.status();
        if (!restored->fallback.ok()) return restored->fallback;
        if (restored->tokens != length) {
          return absl::InternalError(absl::StrCat("restored ", restored->tokens,
                                                  " of ", length, " tokens"));
        }
        restore[l].push_back(Ms(restored->total_time()));
      }
    }
    std::string row =
        absl::StrCat("| ", length, " | ", Range(prefill, "%.0f"), " |");
    for (size_t l = 0; l < levels.size(); ++l) {
      absl::StrAppend(&row, " ", Range(restore[l], "%.0f"), " |");
    }
    std::printf("%s\n", row.c_str());
    std::fflush(stdout);
  }
  return absl::OkStatus();
}

absl::Status Run(const BenchOptions& options) {
  absl::StatusOr<LlamaModel> model = LlamaModel::Load(options.model);
  if (!model.ok()) return model.status();
  absl::StatusOr<model::ModelText> text = model::ModelText::Open(options.model);
  if (!text.ok()) return text.status();

  ClientOptions client_options;
  client_options.address = options.address;
  absl::StatusOr<std::unique_ptr<KvCacheClient>> client =
      KvCacheClient::Connect(client_options);
  if (!client.ok()) return client.status();

  const LlamaConfig& c = model->config();
  std::printf(
      "chat_restore_bench: %s (dim %d, %d layers, %d heads, %d kv heads x %d, "
      "vocab %d), kvcached at %s\n\n",
      options.model.c_str(), c.dim, c.layers, c.heads, c.kv_heads, c.head_dim(),
      c.vocab_size, options.address.c_str());
  if (absl::Status s = Quality(options, *model, *text->tokenizer,
                               text->chat_template, **client);
      !s.ok()) {
    return s;
  }
  return Timing(options, *model, *text->tokenizer, **client);
}

bool ParseInts(absl::string_view text, std::vector<int>& out) {
  out.clear();
  for (absl::string_view part : absl::StrSplit(text, ',')) {
    int value = 0;
    if (!absl::SimpleAtoi(part, &value) || value <= 0) return false;
    out.push_back(value);
  }
  return !out.empty();
}

bool ParsePositive(absl::string_view text, int& out) {
  return absl::SimpleAtoi(text, &out) && out > 0;
}

}  // namespace
}  // namespace kvcache::chat

int main(int argc, char** argv) {
  using kvcache::chat::ParseInts;
  using kvcache::chat::ParsePositive;
  kvcache::chat::BenchOptions o;
  for (int i = 1; i < argc; ++i) {
    absl::string_view v = argv[i];
    bool ok = true;
    if (absl::ConsumePrefix(&v, "--addr=")) {
      o.address = std::string(v);
    } else if (absl::ConsumePrefix(&v, "--model=")) {
      o.model = std::string(v);
    } else if (absl::ConsumePrefix(&v, "--docs=")) {
      o.docs = std::string(v);
    } else if (absl::ConsumePrefix(&v, "--profile_file=")) {
      o.profile_file = std::string(v);
    } else if (absl::ConsumePrefix(&v, "--documents=")) {
      ok = absl::SimpleAtoi(v, &o.documents.count) && o.documents.count >= 0;
    } else if (absl::ConsumePrefix(&v, "--history=")) {
      ok = ParseInts(v, o.documents.history_tokens);
    } else if (absl::ConsumePrefix(&v, "--scored=")) {
      ok = ParsePositive(v, o.documents.scored_tokens);
    } else if (absl::ConsumePrefix(&v, "--chats=")) {
      ok = absl::SimpleAtoi(v, &o.chats.count) && o.chats.count >= 0;
    } else if (absl::ConsumePrefix(&v, "--turns=")) {
      ok = absl::SimpleAtoi(v, &o.chats.turns) && o.chats.turns >= 2;
    } else if (absl::ConsumePrefix(&v, "--reply=")) {
      ok = ParsePositive(v, o.chats.reply_tokens);
    } else if (absl::ConsumePrefix(&v, "--variants=")) {
      o.variants = absl::StrSplit(v, ',', absl::SkipEmpty());
    } else if (absl::ConsumePrefix(&v, "--lengths=")) {
      ok = ParseInts(v, o.lengths);
    } else if (absl::ConsumePrefix(&v, "--reps=")) {
      ok = ParsePositive(v, o.reps);
    } else if (absl::ConsumePrefix(&v, "--chunk_tokens=")) {
      int chunk = 0;
      ok = ParsePositive(v, chunk);
      o.chunk_tokens = chunk;
    } else {
      ok = false;
    }
    if (!ok) {
      std::fprintf(stderr, "chat_restore_bench: bad argument %s\n", argv[i]);
      return 2;
    }
  }
  if (o.address.empty() || o.model.empty()) {
    std::fprintf(
        stderr,
        "usage: chat_restore_bench --addr=HOST:PORT --model=FILE.gguf "
        "[--documents=N] [--history=A,B,...] [--scored=N] [--chats=N] "
        "[--turns=N] [--reply=N] [--variants=NAME,...] [--lengths=A,B,...] "
        "[--reps=N] [--chunk_tokens=N] [--docs=DIR] [--profile_file=FILE]\n");
    return 2;
  }
  const absl::Status status = kvcache::chat::Run(o);
  if (!status.ok()) {
    std::fprintf(stderr, "chat_restore_bench: %s\n", status.ToString().c_str());
    return 1;
  }
  return 0;
}
