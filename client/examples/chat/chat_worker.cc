// chat_worker: the reference chat worker. Runs a multi-turn conversation
// on the CPU, keeping each turn's KV in kvcache between turns instead of in
// the worker:
//
//   turn 1: prefill the first user message, generate the reply, store the
//           conversation's KV (pinned for --pin_ttl_s), drop it locally;
//   turn n: restore the longest cached prefix of the history, prefill only
//           what was not restored plus the new user message, generate, store.
//
//   chat_worker --addr=HOST:PORT --checkpoint=FILE [--level=default]
//       [--turns=3] [--user=TEXT]... [--docs=DIR] [--seed=1]
//       [--manifest=FILE.json] [--user_tokens=24] [--reply_tokens=48]
//       [--temperature=0] [--chunk_tokens=64] [--pin_ttl_s=600]
//       [--transcript_in=FILE] [--transcript_out=FILE] [--verify=true]
//
// With a GGUF model (SmolLM2) the chat is text: ChatML turns whose user
// messages are --user, or else the questions of Python's FAQ (real_text.h),
// replies ending at the model's end-of-message token or --reply_tokens,
// both printed as text. With a llama2.c checkpoint (stories260K), which has
// no tokenizer here, user messages are slices of a kvdump manifest's real
// token ids (--manifest), or tokens drawn from the vocabulary with --seed,
// after BOS. The
// conversation's token ids can be written after the last turn
// (--transcript_out) and picked up by another worker process
// (--transcript_in), which then restores the session from the daemon.
// --verify also runs every turn without the cache and reports whether the
// reply is the same and how long recomputing the prompt took.
//
// Single-threaded.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <iterator>
#include <memory>
#include <optional>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "client/examples/chat/chat_session.h"
#include "client/examples/chat/chat_turn.h"
#include "client/examples/chat/llama_model.h"
#include "client/examples/chat/model_profile.h"
#include "client/examples/chat/paged_kv_cache.h"
#include "client/examples/chat/real_text.h"
#include "client/examples/model/chat_template.h"
#include "client/examples/model/gguf.h"
#include "client/examples/model/model_text.h"
#include "client/kvcache_client.h"
#include "client/profile_store.h"
#include "codec/codec.h"
#include "codec/kv_dump.h"

namespace kvcache::chat {
namespace {

constexpr int32_t kBos = 1;

struct WorkerOptions {
  std::string address;
  std::string checkpoint;
  codec::Level level = codec::kDefaultLevel;
  int turns = 3;
  uint64_t seed = 1;
  std::vector<std::string> user_texts;
  std::string docs = kPythonDocsRoot;
  std::string manifest;
  int user_tokens = 24;
  int reply_tokens = 48;
  double temperature = 0;
  uint32_t chunk_tokens = 64;
  int pin_ttl_s = 600;
  std::string transcript_in;
  std::string transcript_out;
  bool verify = true;
};

double Ms(absl::Duration d) { return absl::ToDoubleMilliseconds(d); }
double KiB(size_t bytes) { return bytes / 1024.0; }

// Where user messages come from: consecutive slices of real text, or random
// tokens of the vocabulary.
class UserMessages {
 public:
  UserMessages(std::vector<int32_t> text, int vocab_size, uint64_t seed)
      : text_(std::move(text)),
        vocab_size_(vocab_size),
        rng_(seed),
        next_(text_.empty() ? 0 : seed * 97 % text_.size()) {}

  std::vector<int32_t> Next(int count) {
    std::vector<int32_t> tokens;
    for (int i = 0; i < count; ++i) {
      if (text_.empty()) {
        // 0-2 are <unk>, BOS and EOS in llama2.c's tokenizer.
        tokens.push_back(3 + static_cast<int32_t>(rng_() % (vocab_size_ - 3)));
      } else {
        tokens.push_back(text_[next_]);
        next_ = (next_ + 1) % text_.size();
      }
    }
    return tokens;
  }

 private:
  std::vector<int32_t> text_;
  int vocab_size_;
  std::mt19937_64 rng_;
  size_t next_;
};

// A text chat in the model's own template: user messages as text, replies
// decoded back to text.
struct TextChat {
  model::ModelText text;
  std::vector<std::string> messages;  // user messages, used in turn
  size_t next = 0;
};

absl::StatusOr<std::vector<int32_t>> ReadTranscript(const std::string& path) {
  std::ifstream in(path);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot open ", path));
  std::vector<int32_t> tokens{std::istream_iterator<int32_t>(in),
                              std::istream_iterator<int32_t>()};
  if (!in.eof() || tokens.empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat(path, ": expected whitespace-separated token ids"));
  }
  return tokens;
}

absl::Status WriteTranscript(const std::string& path,
                             const std::vector<int32_t>& tokens) {
  std::ofstream out(path);
  out << absl::StrJoin(tokens, " ") << "\n";
  out.close();
  return out ? absl::OkStatus()
             : absl::InternalError(absl::StrCat("cannot write ", path));
}

// The worker's state across turns.
class Worker {
 public:
  Worker(const WorkerOptions& options, const LlamaModel& model,
         PagedKvCache cache, UserMessages user_messages,
         std::optional<TextChat> text_chat)
      : options_(options),
        model_(model),
        cache_(std::move(cache)),
        user_messages_(std::move(user_messages)),
        text_chat_(std::move(text_chat)) {}

  absl::Status Connect(KvCacheClient* client) {
    absl::StatusOr<KeySpace> space =
        ChatKeySpace(options_.checkpoint, model_.config(),
                     options_.chunk_tokens, options_.level);
    if (!space.ok()) return space.status();
    ChatSessionOptions session_options;
    session_options.level = options_.level;
    session_options.pin_ttl = absl::Seconds(options_.pin_ttl_s);
    if (codec::LevelNeedsProfile(options_.level)) {
      profiles_ = std::make_unique<ProfileStore>(client, *space);
      if (absl::Status st = LoadOrMakeProfile(); !st.ok()) return st;
      session_options.profile = profile_.get();
      session_options.profiles = profiles_.get();
    }
    absl::StatusOr<ChatSession> session =
        ChatSession::Create(&cache_, client, *space, session_options);
    if (!session.ok()) return session.status();
    session_.emplace(*std::move(session));
    return absl::OkStatus();
  }

  // The model's profile from kvcache, or, if it has none yet, calibrated
  // on the calibration text and published for the model's other workers.
  absl::Status LoadOrMakeProfile() {
    absl::StatusOr<std::shared_ptr<const codec::ModelProfile>> current =
        profiles_->Current();
    if (current.ok()) {
      profile_ = *std::move(current);
      std::printf("model profile %s, from kvcache\n",
                  codec::ProfileIdHex(profile_->id).c_str());
      return absl::OkStatus();
    }
    if (!absl::IsNotFound(current.status())) return current.status();
    if (!text_chat_.has_value()) {
      return absl::InvalidArgumentError(
          "the transform levels calibrate a model profile on text, which "
          "needs a GGUF model's tokenizer");
    }
    absl::StatusOr<std::vector<Document>> documents =
        LoadDocuments(options_.docs, TextSet::kCalibration);
    if (!documents.ok()) return documents.status();
    const absl::Time start = absl::Now();
    absl::StatusOr<codec::ModelProfile> made = CalibrateModelProfile(
        model_, *text_chat_->text.tokenizer, *documents, {});
    if (!made.ok()) return made.status();
    if (absl::Status st = profiles_->Publish(*made); !st.ok()) return st;
    std::printf("model profile %s, calibrated in %.1f s and published\n",
                codec::ProfileIdHex(made->id).c_str(),
                absl::ToDoubleSeconds(absl::Now() - start));
    profile_ = std::make_shared<const codec::ModelProfile>(*std::move(made));
    return absl::OkStatus();
  }

  // Runs one turn on top of `conversation_`, then stores and drops its KV.
  absl::Status Turn(int number) {
    TurnSpec spec;
    spec.history = conversation_;
    if (text_chat_.has_value()) {
      if (text_chat_->next == text_chat_->messages.size()) {
        return absl::OutOfRangeError("no user message left");
      }
      const std::string& message = text_chat_->messages[text_chat_->next++];
      std::printf("\nuser: %s\n", message.c_str());
      const model::ModelText& text = text_chat_->text;
      absl::StatusOr<std::vector<int32_t>> prompt =
          text.tokenizer->Encode(text.chat_template.TurnPrompt(
              {"user", message}, conversation_.empty(),
              !conversation_.empty() &&
                  conversation_.back() == text.end_of_message));
      if (!prompt.ok()) return prompt.status();
      spec.user = *std::move(prompt);
      spec.stop_token = text.end_of_message;
    } else {
      if (spec.history.empty()) spec.user.push_back(kBos);
      const std::vector<int32_t> message =
          user_messages_.Next(options_.user_tokens);
      spec.user.insert(spec.user.end(), message.begin(), message.end());
    }
    spec.reply_tokens = options_.reply_tokens;
    spec.temperature = options_.temperature;
    spec.seed = options_.seed + number;

    absl::StatusOr<TurnOutcome> turn =
        RunTurn(model_, &cache_, &*session_, spec);
    if (!turn.ok()) return turn.status();
    const RestoreStats& restore = turn->restore;
    const int prompt = static_cast<int>(spec.history.size() + spec.user.size());
    std::printf("turn %d: prompt %d tokens (history %zu + user %zu)\n", number,
                prompt, spec.history.size(), spec.user.size());
    std::printf(
        "  restored %d tokens (%d chunks, %.1f KiB fetched for %.1f KiB fp16) "
        "in %.2f ms [lookup %.2f, get %.2f, decode+import %.2f]%s\n",
        restore.tokens, restore.chunks, KiB(restore.fetched_bytes),
        KiB(restore.raw_bytes), Ms(restore.total_time()),
        Ms(restore.lookup_time), Ms(restore.get_time), Ms(restore.decode_time),
        restore.fallback.ok() ? ""
                              : absl::StrCat("; fell back to recompute: ",
                                             restore.fallback.ToString())
                                    .c_str());
    std::printf("  recomputed %d tokens in %.2f ms\n", turn->recomputed_tokens,
                Ms(turn->prefill_time));
    if (text_chat_.has_value()) {
      absl::StatusOr<std::string> reply =
          text_chat_->text.tokenizer->Decode(turn->reply);
      if (!reply.ok()) return reply.status();
      std::printf("assistant: %s\n",
                  std::string(absl::StripSuffix(
                                  *reply, model::ChatMlTemplate::kEndOfMessage))
                      .c_str());
    } else {
      std::printf("  reply: %s\n", absl::StrJoin(turn->reply, " ").c_str());
    }

    conversation_ = spec.history;
    conversation_.insert(conversation_.end(), spec.user.begin(),
                         spec.user.end());
    conversation_.insert(conversation_.end(), turn->reply.begin(),
                         turn->reply.end());
    absl::StatusOr<StoreStats> stored =
        session_->Store(turn->seq, conversation_);
    // The worker's copy goes whatever happened: the next turn restores it
    // or recomputes it.
    cache_.FreeSequence(turn->seq).IgnoreError();
    if (stored.ok()) {
      std::printf(
          "  stored %d tokens: %d chunks sent (%.1f KiB for %.1f KiB fp16, "
          "encode %.2f ms, put %.2f ms), %d kept from earlier turns\n",
          stored->tokens, stored->chunks_sent, KiB(stored->sent_bytes),
          KiB(stored->raw_bytes), Ms(stored->encode_time), Ms(stored->put_time),
          stored->chunks_kept);
    } else {
      std::printf("  not stored (the next turn recomputes): %s\n",
                  stored.status().ToString().c_str());
    }
    return options_.verify ? Verify(spec, *turn) : absl::OkStatus();
  }

  const std::vector<int32_t>& conversation() const { return conversation_; }
  void set_conversation(std::vector<int32_t> tokens) {
    conversation_ = std::move(tokens);
  }

 private:
  // The same turn without the cache, for comparison.
  absl::Status Verify(const TurnSpec& spec, const TurnOutcome& got) {
    absl::StatusOr<TurnOutcome> want = RunTurn(model_, &cache_, nullptr, spec);
    if (!want.ok()) return want.status();
    cache_.FreeSequence(want->seq).IgnoreError();
    size_t same = 0;
    for (size_t i = 0; i < got.reply.size(); ++i) {
      same += got.reply[i] == want->reply[i];
    }
    float max_diff = 0;
    for (size_t i = 0; i < got.first_logits.size(); ++i) {
      max_diff = std::max(
          max_diff, std::fabs(got.first_logits[i] - want->first_logits[i]));
    }
    std::printf(
        "  uncached: prefill of all %d prompt tokens %.2f ms; reply tokens "
        "identical %zu/%zu; max abs logit diff at the first reply token "
        "%.4g\n",
        want->recomputed_tokens, Ms(want->prefill_time), same, got.reply.size(),
        max_diff);
    return absl::OkStatus();
  }

  const WorkerOptions& options_;
  const LlamaModel& model_;
  PagedKvCache cache_;
  UserMessages user_messages_;
  std::optional<TextChat> text_chat_;
  std::unique_ptr<ProfileStore> profiles_;
  std::shared_ptr<const codec::ModelProfile> profile_;
  std::optional<ChatSession> session_;
  std::vector<int32_t> conversation_;
};

absl::Status Run(const WorkerOptions& options) {
  absl::StatusOr<LlamaModel> model = LlamaModel::Load(options.checkpoint);
  if (!model.ok()) return model.status();
  const LlamaConfig& config = model->config();
  std::vector<int32_t> text;
  if (!options.manifest.empty()) {
    absl::StatusOr<codec::KvDump> dump = codec::LoadKvDump(options.manifest);
    if (!dump.ok()) return dump.status();
    text = dump->token_ids;
  }
  // Room for one whole context in 16-token blocks: a turn's sequence is
  // freed before its uncached verification runs.
  absl::StatusOr<PagedKvCache> cache =
      PagedKvCache::Create(model->CacheShape(16, config.seq_len / 16 + 1));
  if (!cache.ok()) return cache.status();

  ClientOptions client_options;
  client_options.address = options.address;
  absl::StatusOr<std::unique_ptr<KvCacheClient>> client =
      KvCacheClient::Connect(client_options);
  if (!client.ok()) return client.status();

  // A GGUF model brings its tokenizer and chat template.
  std::optional<TextChat> text_chat;
  if (absl::StatusOr<model::GgufFile> file =
          model::GgufFile::Open(options.checkpoint);
      file.ok()) {
    absl::StatusOr<model::ModelText> text = model::ModelText::FromGguf(*file);
    if (!text.ok()) return text.status();
    std::vector<std::string> messages = options.user_texts;
    if (messages.empty()) {
      absl::StatusOr<std::vector<std::string>> questions =
          LoadFaqQuestions(options.docs);
      if (!questions.ok()) return questions.status();
      messages = *std::move(questions);
    }
    text_chat.emplace(TextChat{*std::move(text), std::move(messages)});
  }
  Worker worker(options, *model, *std::move(cache),
                UserMessages(std::move(text), config.vocab_size, options.seed),
                std::move(text_chat));
  if (absl::Status status = worker.Connect(client->get()); !status.ok()) {
    return status;
  }
  std::printf(
      "chat_worker: %s (dim %d, %d layers, %d kv heads x %d, context %d), "
      "kvcached at %s, level %s, %u-token chunks\n",
      options.checkpoint.c_str(), config.dim, config.layers, config.kv_heads,
      config.head_dim(), config.seq_len, options.address.c_str(),
      std::string(codec::LevelName(options.level)).c_str(),
      options.chunk_tokens);
  if (!options.transcript_in.empty()) {
    absl::StatusOr<std::vector<int32_t>> history =
        ReadTranscript(options.transcript_in);
    if (!history.ok()) return history.status();
    std::printf("continuing a %zu-token conversation from %s\n",
                history->size(), options.transcript_in.c_str());
    worker.set_conversation(*std::move(history));
  }
  for (int turn = 1; turn <= options.turns; ++turn) {
    const size_t next = worker.conversation().size() + options.user_tokens +
                        options.reply_tokens + 1;
    if (next > static_cast<size_t>(config.seq_len)) {
      std::printf("stopping: turn %d would pass the %d-token context\n", turn,
                  config.seq_len);
      break;
    }
    if (absl::Status status = worker.Turn(turn); !status.ok()) return status;
  }
  if (!options.transcript_out.empty()) {
    return WriteTranscript(options.transcript_out, worker.conversation());
  }
  return absl::OkStatus();
}

bool ParseFlag(const std::string& arg, WorkerOptions& options) {
  std::pair<std::string, std::string> kv =
      absl::StrSplit(arg, absl::MaxSplits('=', 1));
  const std::string& name = kv.first;
  const std::string& v = kv.second;
  if (name == "--addr") return !(options.address = v).empty();
  if (name == "--checkpoint") return !(options.checkpoint = v).empty();
  if (name == "--manifest") return !(options.manifest = v).empty();
  if (name == "--docs") return !(options.docs = v).empty();
  if (name == "--user") {
    options.user_texts.push_back(v);
    return !v.empty();
  }
  if (name == "--transcript_in") return !(options.transcript_in = v).empty();
  if (name == "--transcript_out") return !(options.transcript_out = v).empty();
  if (name == "--level") {
    absl::StatusOr<codec::Level> level = codec::ParseLevel(v);
    if (level.ok()) options.level = *level;
    return level.ok();
  }
  if (name == "--turns") {
    return absl::SimpleAtoi(v, &options.turns) && options.turns > 0;
  }
  if (name == "--seed") return absl::SimpleAtoi(v, &options.seed);
  if (name == "--user_tokens") {
    return absl::SimpleAtoi(v, &options.user_tokens) && options.user_tokens > 0;
  }
  if (name == "--reply_tokens") {
    return absl::SimpleAtoi(v, &options.reply_tokens) &&
           options.reply_tokens >= 0;
  }
  if (name == "--temperature") {
    return absl::SimpleAtod(v, &options.temperature) &&
           options.temperature >= 0;
  }
  if (name == "--chunk_tokens") {
    return absl::SimpleAtoi(v, &options.chunk_tokens) &&
           options.chunk_tokens > 0;
  }
  if (name == "--pin_ttl_s") {
    return absl::SimpleAtoi(v, &options.pin_ttl_s) && options.pin_ttl_s > 0;
  }
  if (name == "--verify") return absl::SimpleAtob(v, &options.verify);
  return false;
}

}  // namespace
}  // namespace kvcache::chat

int main(int argc, char** argv) {
  kvcache::chat::WorkerOptions options;
  for (int i = 1; i < argc; ++i) {
    if (!kvcache::chat::ParseFlag(argv[i], options)) {
      std::fprintf(stderr, "chat_worker: bad argument %s\n", argv[i]);
      return 2;
    }
  }
  if (options.address.empty() || options.checkpoint.empty()) {
    std::fprintf(stderr,
                 "usage: chat_worker --addr=HOST:PORT --checkpoint=FILE "
                 "[--level=NAME] [--turns=N] [--user=TEXT]... [--docs=DIR] "
                 "[--seed=N] [--manifest=FILE] "
                 "[--user_tokens=N] [--reply_tokens=N] [--temperature=T] "
                 "[--chunk_tokens=N] [--pin_ttl_s=N] [--transcript_in=FILE] "
                 "[--transcript_out=FILE] [--verify=BOOL]\n");
    return 2;
  }
  const absl::Status status = kvcache::chat::Run(options);
  if (!status.ok()) {
    std::fprintf(stderr, "chat_worker: %s\n", status.ToString().c_str());
    return 1;
  }
  return 0;
}
