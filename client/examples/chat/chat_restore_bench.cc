// chat_restore_bench: what restoring a chat history through kvcache costs and
// changes, per codec level, with the real model, against a running kvcached
// (run_bench.sh starts one).
//
//   chat_restore_bench --addr=HOST:PORT --checkpoint=FILE
//       --manifests=A.json,B.json,... [--conversations=8] [--history=256]
//       [--reply=64] [--lengths=64,128,256,384,512] [--reps=7]
//       [--chunk_tokens=64]
//
// Quality: conversation n takes real story text from manifest n % count at
// an offset that grows with n: BOS and `history` - 1 tokens of history, a
// 16-token user message, then 64 more tokens as a fixed continuation. The
// history's KV is computed, stored at the level, dropped and restored; the
// turn then runs both restored and uncached, and the table compares them:
// greedy reply tokens identical position by position (and where the first
// difference is), teacher-forced top-1 agreement and perplexity on the
// continuation, the largest logit difference at the first new token, and
// bytes fetched against fp16.
//
// Time: for each history length, recomputing it (one prefill) against
// restoring it (lookup + get + decode + import), median of `reps`.
//
// Single-threaded; the daemon runs in its own process.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "absl/time/clock.h"
#include "client/examples/chat/chat_session.h"
#include "client/examples/chat/chat_turn.h"
#include "client/examples/chat/llama_model.h"
#include "client/examples/chat/paged_kv_cache.h"
#include "client/kvcache_client.h"
#include "codec/codec.h"
#include "codec/kv_dump.h"

namespace kvcache::chat {
namespace {

constexpr int32_t kBos = 1;
constexpr int kUserTokens = 16;
constexpr int kContinuationTokens = 64;

struct BenchOptions {
  std::string address;
  std::string checkpoint;
  std::vector<std::string> manifests;
  int conversations = 8;
  int history = 256;
  int reply = 64;
  std::vector<int> lengths = {64, 128, 256, 384, 512};
  int reps = 7;
  uint32_t chunk_tokens = 64;
};

constexpr codec::Level kLevels[] = {
    codec::Level::kLossless, codec::Level::kNearLossless, codec::Level::kHigh,
    codec::Level::kDefault,  codec::Level::kCompact,      codec::Level::kTiny};

double Ms(absl::Duration d) { return absl::ToDoubleMilliseconds(d); }

double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

double Agreement(absl::Span<const int32_t> a, absl::Span<const int32_t> b) {
  size_t same = 0;
  for (size_t i = 0; i < a.size() && i < b.size(); ++i) same += a[i] == b[i];
  return a.empty() ? 1.0 : static_cast<double>(same) / a.size();
}

size_t FirstDifference(absl::Span<const int32_t> a,
                       absl::Span<const int32_t> b) {
  size_t i = 0;
  while (i < a.size() && i < b.size() && a[i] == b[i]) ++i;
  return i;
}

// Everything a level's runs share.
class Bench {
 public:
  Bench(const BenchOptions& options, const LlamaModel& model,
        KvCacheClient& client, std::vector<std::vector<int32_t>> texts)
      : options_(options),
        model_(model),
        client_(client),
        texts_(std::move(texts)),
        cache_(*PagedKvCache::Create(model.CacheShape(16, 256))) {}

  absl::Status Quality();
  absl::Status Timing();

 private:
  absl::StatusOr<ChatSession> SessionAt(codec::Level level,
                                        absl::string_view name_space) {
    absl::StatusOr<KeySpace> space =
        ChatKeySpace(options_.checkpoint, model_.config(),
                     options_.chunk_tokens, level, name_space);
    if (!space.ok()) return space.status();
    ChatSessionOptions session_options;
    session_options.level = level;
    return ChatSession::Create(&cache_, &client_, *space, session_options);
  }

  // Computes `history`'s KV from scratch, stores it, and drops it.
  absl::StatusOr<StoreStats> Store(ChatSession& session,
                                   const std::vector<int32_t>& history) {
    const SequenceId seq = cache_.CreateSequence();
    absl::StatusOr<std::vector<float>> logits =
        model_.Prefill(&cache_, seq, history);
    absl::StatusOr<StoreStats> stored =
        logits.ok() ? session.Store(seq, history)
                    : absl::StatusOr<StoreStats>(logits.status());
    cache_.FreeSequence(seq).IgnoreError();
    return stored;
  }

  // BOS and then `count` - 1 tokens of text t from `offset`.
  std::vector<int32_t> Text(size_t t, int offset, int count) const {
    std::vector<int32_t> tokens = {kBos};
    const std::vector<int32_t>& text = texts_[t % texts_.size()];
    tokens.insert(tokens.end(), text.begin() + offset,
                  text.begin() + offset + count - 1);
    return tokens;
  }

  const BenchOptions& options_;
  const LlamaModel& model_;
  KvCacheClient& client_;
  std::vector<std::vector<int32_t>> texts_;
  PagedKvCache cache_;
};

absl::Status Bench::Quality() {
  // Conversation n: its history, user message and continuation.
  std::vector<TurnSpec> specs;
  std::vector<TurnOutcome> uncached;
  for (int n = 0; n < options_.conversations; ++n) {
    const int offset = 48 * (n / static_cast<int>(texts_.size()));
    std::vector<int32_t> all =
        Text(n, offset, options_.history + kUserTokens + kContinuationTokens);
    TurnSpec spec;
    spec.history.assign(all.begin(), all.begin() + options_.history);
    spec.user.assign(all.begin() + options_.history,
                     all.begin() + options_.history + kUserTokens);
    spec.continuation.assign(all.begin() + options_.history + kUserTokens,
                             all.end());
    spec.reply_tokens = options_.reply;
    absl::StatusOr<TurnOutcome> turn = RunTurn(model_, &cache_, nullptr, spec);
    if (!turn.ok()) return turn.status();
    cache_.FreeSequence(turn->seq).IgnoreError();
    specs.push_back(std::move(spec));
    uncached.push_back(*std::move(turn));
  }

  std::printf(
      "Quality: %d conversations, %d-token histories restored, %d-token user "
      "message, greedy %d-token reply, %d-token fixed continuation\n\n",
      options_.conversations, options_.history, kUserTokens, options_.reply,
      kContinuationTokens);
  std::printf(
      "| level | reply tokens identical | first difference (mean) | "
      "teacher-forced top-1 | perplexity restored / recomputed | "
      "max abs logit diff, first new token | bytes vs fp16 |\n"
      "|---|---|---|---|---|---|---|\n");
  for (const codec::Level level : kLevels) {
    absl::StatusOr<ChatSession> session = SessionAt(level, "chat-bench");
    if (!session.ok()) return session.status();
    double agreement = 0, first_difference = 0, top1 = 0, nll = 0,
           nll_uncached = 0, max_logit_diff = 0;
    size_t fetched = 0, raw = 0;
    for (size_t n = 0; n < specs.size(); ++n) {
      if (absl::StatusOr<StoreStats> stored = Store(*session, specs[n].history);
          !stored.ok()) {
        return stored.status();
      }
      absl::StatusOr<TurnOutcome> turn =
          RunTurn(model_, &cache_, &*session, specs[n]);
      if (!turn.ok()) return turn.status();
      cache_.FreeSequence(turn->seq).IgnoreError();
      if (!turn->restore.fallback.ok()) return turn->restore.fallback;
      if (turn->restore.tokens != options_.history) {
        return absl::InternalError(
            absl::StrCat("restored ", turn->restore.tokens, " of ",
                         options_.history, " history tokens"));
      }
      const TurnOutcome& want = uncached[n];
      agreement += Agreement(turn->reply, want.reply);
      first_difference += FirstDifference(turn->reply, want.reply);
      top1 +=
          Agreement(turn->continuation.predicted, want.continuation.predicted);
      nll += turn->continuation.mean_nll;
      nll_uncached += want.continuation.mean_nll;
      for (size_t i = 0; i < want.first_logits.size(); ++i) {
        max_logit_diff = std::max(
            max_logit_diff, static_cast<double>(std::fabs(
                                turn->first_logits[i] - want.first_logits[i])));
      }
      fetched += turn->restore.fetched_bytes;
      raw += turn->restore.raw_bytes;
    }
    const double count = specs.size();
    std::printf(
        "| %s | %.3f | %.1f of %d | %.3f | %.3f / %.3f | %.4f | %.3f "
        "(%.2fx smaller) |\n",
        std::string(codec::LevelName(level)).c_str(), agreement / count,
        first_difference / count, options_.reply, top1 / count,
        std::exp(nll / count), std::exp(nll_uncached / count), max_logit_diff,
        static_cast<double>(fetched) / raw, static_cast<double>(raw) / fetched);
    std::fflush(stdout);
  }
  return absl::OkStatus();
}

absl::Status Bench::Timing() {
  std::printf(
      "\nTime: recompute (prefill) vs restore (lookup + get + decode + "
      "import) per history length, median of %d; restore cells are ms / KiB "
      "fetched (fp16: %zu KiB per 64 tokens)\n\n",
      options_.reps,
      static_cast<size_t>(model_.config().layers) * 2 * 64 *
          model_.config().kv_dim() * 2 / 1024);
  std::string header = "| history tokens | prefill ms |";
  std::string rule = "|---|---|";
  for (const codec::Level level : kLevels) {
    absl::StrAppend(&header, " restore ", codec::LevelName(level), " |");
    absl::StrAppend(&rule, "---|");
  }
  std::printf("%s\n%s\n", header.c_str(), rule.c_str());

  for (const int length : options_.lengths) {
    const std::vector<int32_t> history = Text(0, 0, length);
    std::vector<double> prefill;
    for (int r = 0; r < options_.reps; ++r) {
      const SequenceId seq = cache_.CreateSequence();
      const absl::Time start = absl::Now();
      absl::StatusOr<std::vector<float>> logits =
          model_.Prefill(&cache_, seq, history);
      prefill.push_back(Ms(absl::Now() - start));
      cache_.FreeSequence(seq).IgnoreError();
      if (!logits.ok()) return logits.status();
    }
    std::string row = absl::StrCat(
        "| ", length, " | ", absl::StrFormat("%.2f", Median(prefill)), " |");
    for (const codec::Level level : kLevels) {
      // Its own namespace, so that the quality runs' chunks are not reused.
      absl::StatusOr<ChatSession> session = SessionAt(level, "chat-timing");
      if (!session.ok()) return session.status();
      if (absl::StatusOr<StoreStats> stored = Store(*session, history);
          !stored.ok()) {
        return stored.status();
      }
      std::vector<double> restore;
      size_t fetched = 0;
      for (int r = 0; r < options_.reps; ++r) {
        const SequenceId seq = cache_.CreateSequence();
        absl::StatusOr<RestoreStats> restored = session->Restore(seq, history);
        cache_.FreeSequence(seq).IgnoreError();
        if (!restored.ok()) return restored.status();
        if (!restored->fallback.ok()) return restored->fallback;
        restore.push_back(Ms(restored->total_time()));
        fetched = restored->fetched_bytes;
      }
      absl::StrAppend(&row, absl::StrFormat(" %.2f / %.1f |", Median(restore),
                                            fetched / 1024.0));
    }
    std::printf("%s\n", row.c_str());
    std::fflush(stdout);
  }
  return absl::OkStatus();
}

absl::Status Run(const BenchOptions& options) {
  absl::StatusOr<LlamaModel> model = LlamaModel::Load(options.checkpoint);
  if (!model.ok()) return model.status();
  std::vector<std::vector<int32_t>> texts;
  for (const std::string& manifest : options.manifests) {
    absl::StatusOr<codec::KvDump> dump = codec::LoadKvDump(manifest);
    if (!dump.ok()) return dump.status();
    texts.push_back(dump->token_ids);
  }
  const int needed = std::max(
      *std::max_element(options.lengths.begin(), options.lengths.end()),
      48 * ((options.conversations - 1) / static_cast<int>(texts.size())) +
          options.history + kUserTokens + kContinuationTokens);
  for (size_t t = 0; t < texts.size(); ++t) {
    if (static_cast<int>(texts[t].size()) + 1 < needed) {
      return absl::InvalidArgumentError(
          absl::StrCat(options.manifests[t], " has ", texts[t].size(),
                       " token ids; these settings need ", needed - 1));
    }
  }

  ClientOptions client_options;
  client_options.address = options.address;
  absl::StatusOr<std::unique_ptr<KvCacheClient>> client =
      KvCacheClient::Connect(client_options);
  if (!client.ok()) return client.status();

  const LlamaConfig& config = model->config();
  std::printf(
      "chat_restore_bench: %s (dim %d, %d layers, %d heads, %d kv heads x "
      "%d), kvcached at %s, %u-token chunks\n\n",
      options.checkpoint.c_str(), config.dim, config.layers, config.heads,
      config.kv_heads, config.head_dim(), options.address.c_str(),
      options.chunk_tokens);
  Bench bench(options, *model, **client, std::move(texts));
  if (absl::Status status = bench.Quality(); !status.ok()) return status;
  return bench.Timing();
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

}  // namespace
}  // namespace kvcache::chat

int main(int argc, char** argv) {
  kvcache::chat::BenchOptions options;
  for (int i = 1; i < argc; ++i) {
    std::pair<std::string, std::string> kv =
        absl::StrSplit(argv[i], absl::MaxSplits('=', 1));
    const std::string& v = kv.second;
    bool ok = true;
    if (kv.first == "--addr") {
      options.address = v;
    } else if (kv.first == "--checkpoint") {
      options.checkpoint = v;
    } else if (kv.first == "--manifests") {
      options.manifests = absl::StrSplit(v, ',', absl::SkipEmpty());
    } else if (kv.first == "--conversations") {
      ok = absl::SimpleAtoi(v, &options.conversations) &&
           options.conversations > 0;
    } else if (kv.first == "--history") {
      ok = absl::SimpleAtoi(v, &options.history) && options.history > 0;
    } else if (kv.first == "--reply") {
      ok = absl::SimpleAtoi(v, &options.reply) && options.reply > 0;
    } else if (kv.first == "--lengths") {
      ok = kvcache::chat::ParseInts(v, options.lengths);
    } else if (kv.first == "--reps") {
      ok = absl::SimpleAtoi(v, &options.reps) && options.reps > 0;
    } else if (kv.first == "--chunk_tokens") {
      ok = absl::SimpleAtoi(v, &options.chunk_tokens) &&
           options.chunk_tokens > 0;
    } else {
      ok = false;
    }
    if (!ok) {
      std::fprintf(stderr, "chat_restore_bench: bad argument %s\n", argv[i]);
      return 2;
    }
  }
  if (options.address.empty() || options.checkpoint.empty() ||
      options.manifests.empty()) {
    std::fprintf(stderr,
                 "usage: chat_restore_bench --addr=HOST:PORT "
                 "--checkpoint=FILE --manifests=A.json,... [--conversations=N] "
                 "[--history=N] [--reply=N] [--lengths=A,B,...] [--reps=N] "
                 "[--chunk_tokens=N]\n");
    return 2;
  }
  const absl::Status status = kvcache::chat::Run(options);
  if (!status.ok()) {
    std::fprintf(stderr, "chat_restore_bench: %s\n", status.ToString().c_str());
    return 1;
  }
  return 0;
}
