// The multi-turn chat flow against a real kvcached with the real
// stories260K model: a turn's KV is stored, dropped and restored on the next
// turn, and every way the store can fail falls back to recomputing, with the
// same result as a worker that never had a cache.
#include "client/examples/chat/chat_session.h"

#include <signal.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "client/chunk_key.h"
#include "client/examples/chat/chat_turn.h"
#include "client/examples/chat/llama_model.h"
#include "client/examples/chat/paged_kv_cache.h"
#include "client/examples/chat/sampler.h"
#include "client/kvcache_client.h"
#include "codec/codec.h"
#include "codec/kv_dump.h"
#include "gtest/gtest.h"
#include "tests/testing/daemon_process.h"

namespace kvcache::chat {
namespace {

using ::kvcache::testing::DaemonProcess;

constexpr char kDaemon[] = "kvstore/kvcached";
// @kvdata's files, as runfiles of this test.
constexpr char kCheckpoint[] = "../kvdata/stories260K.bin";
constexpr char kManifest[] = "../kvdata/stories260K-s1-512.json";
constexpr int32_t kBos = 1;
constexpr uint32_t kChunkTokens = 64;

struct Shared {
  absl::Status status;
  std::optional<LlamaModel> model;
  std::vector<int32_t> text;  // real story token ids, for user messages
};

const Shared& GetShared() {
  static const Shared* shared = [] {
    auto* s = new Shared;
    absl::StatusOr<LlamaModel> model = LlamaModel::Load(kCheckpoint);
    absl::StatusOr<codec::KvDump> dump = codec::LoadKvDump(kManifest);
    if (!model.ok() || !dump.ok()) {
      s->status = model.ok() ? dump.status() : model.status();
      return s;
    }
    s->model.emplace(*std::move(model));
    s->text = dump->token_ids;
    return s;
  }();
  return *shared;
}

bool SameBits(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() &&
         std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

double Agreement(const std::vector<int32_t>& a, const std::vector<int32_t>& b) {
  size_t same = 0;
  for (size_t i = 0; i < a.size() && i < b.size(); ++i) same += a[i] == b[i];
  return a.empty() ? 1.0 : static_cast<double>(same) / a.size();
}

// Lossy levels against the uncached run: greedy reply tokens identical
// position by position, and teacher-forced top-1 agreement on a fixed
// continuation (there one early difference does not change later inputs, so
// it measures the KV error rather than where the reply first forks).
struct Agreements {
  double greedy = 0;
  double top1 = 0;
};
// Lower bounds with margin under what this test measured with the codec of
// today (chat_restore_bench agrees: docs/BENCHMARKS.md, "Chat restore").
// Near-lossless: greedy 0.64, top-1 0.98. Default: top-1 0.36, and greedy
// 0.04, which is chance level (the first reply token already differs in most
// conversations: 4-bit KV moves this small model's logits by up to ~15), so
// no greedy bound is asserted for it; raise these when the codec improves.
constexpr Agreements kNearLosslessMin = {/*greedy=*/0.45, /*top1=*/0.9};
constexpr Agreements kDefaultLevelMin = {/*greedy=*/0.0, /*top1=*/0.25};

class ChatSessionTest : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_TRUE(GetShared().status.ok()) << GetShared().status;
    cache_.emplace(*PagedKvCache::Create(model().CacheShape(16, 128)));
  }

  const LlamaModel& model() const { return *GetShared().model; }
  PagedKvCache* cache() { return &*cache_; }

  // Starts a daemon with `args` and a session on it at `level`.
  void StartDaemon(codec::Level level, std::vector<std::string> args = {}) {
    absl::StatusOr<DaemonProcess> daemon = DaemonProcess::Start(kDaemon, args);
    ASSERT_TRUE(daemon.ok()) << daemon.status();
    daemon_.emplace(*std::move(daemon));
    Connect(level);
  }
  void Connect(codec::Level level) {
    ClientOptions options;
    options.address = daemon_->address();
    options.timeout = absl::Seconds(10);
    absl::StatusOr<std::unique_ptr<KvCacheClient>> client =
        KvCacheClient::Connect(options);
    ASSERT_TRUE(client.ok()) << client.status();
    client_ = *std::move(client);
    absl::StatusOr<KeySpace> space = ChatKeySpace(
        kCheckpoint, model().config(), kChunkTokens, level, "chat-test");
    ASSERT_TRUE(space.ok()) << space.status();
    ChatSessionOptions options_for_session;
    options_for_session.level = level;
    absl::StatusOr<ChatSession> session = ChatSession::Create(
        cache(), client_.get(), *space, options_for_session);
    ASSERT_TRUE(session.ok()) << session.status();
    session_.emplace(*std::move(session));
  }

  // Turn 1 of conversation `n`: BOS and a user message of real story text,
  // then a greedy reply. Returns the conversation so far after storing its
  // KV through the session and dropping it from the worker.
  // With `kept`, the worker's copy stays there too, as that sequence.
  std::vector<int32_t> FirstTurnStored(int n, int user_tokens, int reply_tokens,
                                       SequenceId* kept = nullptr) {
    TurnSpec spec;
    spec.history = {kBos};
    spec.user = Text(n, 0, user_tokens);
    spec.reply_tokens = reply_tokens;
    absl::StatusOr<TurnOutcome> turn =
        RunTurn(model(), cache(), &*session_, spec);
    EXPECT_TRUE(turn.ok()) << turn.status();
    if (!turn.ok()) return {};
    std::vector<int32_t> conversation = spec.history;
    conversation.insert(conversation.end(), spec.user.begin(), spec.user.end());
    conversation.insert(conversation.end(), turn->reply.begin(),
                        turn->reply.end());
    absl::StatusOr<StoreStats> stored =
        session_->Store(turn->seq, conversation);
    EXPECT_TRUE(stored.ok()) << stored.status();
    if (kept != nullptr) {
      *kept = turn->seq;
    } else {
      EXPECT_TRUE(cache()->FreeSequence(turn->seq).ok());
    }
    return conversation;
  }

  // Turn 2: the history, a new user message, a scored continuation and a
  // greedy reply.
  TurnSpec SecondTurn(int n, std::vector<int32_t> history,
                      int reply_tokens = 32) const {
    TurnSpec spec;
    spec.history = std::move(history);
    spec.user = Text(n, 200, 24);
    spec.continuation = Text(n, 224, 32);
    spec.reply_tokens = reply_tokens;
    return spec;
  }

  // Runs a turn through the session (or without any cache) and frees its
  // sequence, checking the cache is left with every block free.
  TurnOutcome Run(const TurnSpec& spec, bool use_cache) {
    const int free_before = cache()->free_blocks();
    absl::StatusOr<TurnOutcome> turn =
        RunTurn(model(), cache(), use_cache ? &*session_ : nullptr, spec);
    EXPECT_TRUE(turn.ok()) << turn.status();
    if (!turn.ok()) return {};
    EXPECT_TRUE(cache()->FreeSequence(turn->seq).ok());
    EXPECT_EQ(cache()->free_blocks(), free_before);
    return *std::move(turn);
  }

  // A run that restored nothing must be the uncached run, bit for bit: both
  // prefill the whole prompt.
  void ExpectSameAsUncached(const TurnSpec& spec, const TurnOutcome& got) {
    const TurnOutcome want = Run(spec, /*use_cache=*/false);
    ExpectSame(got, want);
  }

  // A run that restored the whole history losslessly must be the worker
  // that kept it (sequence `kept`, freed here), bit for bit.
  void ExpectSameAsKept(SequenceId kept, const TurnSpec& spec,
                        const TurnOutcome& got) {
    absl::StatusOr<TurnOutcome> want =
        ContinueTurn(model(), cache(), kept, spec);
    ASSERT_TRUE(want.ok()) << want.status();
    EXPECT_TRUE(cache()->FreeSequence(kept).ok());
    ExpectSame(got, *want);
  }

  static void ExpectSame(const TurnOutcome& got, const TurnOutcome& want) {
    EXPECT_TRUE(SameBits(got.first_logits, want.first_logits));
    EXPECT_EQ(got.reply, want.reply);
    EXPECT_EQ(got.continuation.mean_nll, want.continuation.mean_nll);
    EXPECT_EQ(got.continuation.predicted, want.continuation.predicted);
  }

  std::vector<ChunkKey> KeysFor(const std::vector<int32_t>& tokens) const {
    return *ChunkKeysForTokens(session_->key_space(), tokens);
  }

  // Story text for conversation n: tokens [offset, offset + count) of the
  // manifest, shifted by n so conversations differ.
  static std::vector<int32_t> Text(int n, int offset, int count) {
    const std::vector<int32_t>& text = GetShared().text;
    const auto begin = text.begin() + 40 * n + offset;
    return std::vector<int32_t>(begin, begin + count);
  }

  std::optional<PagedKvCache> cache_;
  std::optional<DaemonProcess> daemon_;
  std::unique_ptr<KvCacheClient> client_;
  std::optional<ChatSession> session_;
};

TEST_F(ChatSessionTest, LosslessRestoreIsBitIdentical) {
  StartDaemon(codec::Level::kLossless);
  // 1 + 100 + 37 = 138 tokens: two full chunks and a partial tail.
  SequenceId kept = 0;
  const std::vector<int32_t> history = FirstTurnStored(0, 100, 37, &kept);
  ASSERT_EQ(history.size(), 138u);
  const TurnSpec spec = SecondTurn(0, history);
  const TurnOutcome got = Run(spec, /*use_cache=*/true);
  ASSERT_TRUE(got.restore.fallback.ok()) << got.restore.fallback;
  EXPECT_EQ(got.restore.tokens, 138);
  EXPECT_EQ(got.restore.chunks, 3);
  EXPECT_EQ(got.recomputed_tokens, 24);
  EXPECT_GT(got.restore.fetched_bytes, 0u);
  ExpectSameAsKept(kept, spec, got);
}

TEST_F(ChatSessionTest, LaterTurnsResendOnlyNewChunksAndUnpinTheOldTail) {
  StartDaemon(codec::Level::kLossless);
  const std::vector<int32_t> history = FirstTurnStored(0, 100, 37);
  const ChunkKey old_tail = KeysFor(history).back();

  const TurnSpec spec = SecondTurn(0, history);
  absl::StatusOr<TurnOutcome> turn =
      RunTurn(model(), cache(), &*session_, spec);
  ASSERT_TRUE(turn.ok()) << turn.status();
  std::vector<int32_t> conversation = spec.history;
  conversation.insert(conversation.end(), spec.user.begin(), spec.user.end());
  conversation.insert(conversation.end(), turn->reply.begin(),
                      turn->reply.end());
  // 138 + 24 + 32 = 194 tokens: chunks 0 and 1 are kept, 2 and the new
  // tail are sent.
  absl::StatusOr<StoreStats> stored = session_->Store(turn->seq, conversation);
  ASSERT_TRUE(stored.ok()) << stored.status();
  EXPECT_EQ(stored->tokens, 194);
  EXPECT_EQ(stored->chunks_kept, 2);
  EXPECT_EQ(stored->chunks_sent, 2);

  absl::StatusOr<LookupResult> tail = client_->Lookup({old_tail});
  ASSERT_TRUE(tail.ok()) << tail.status();
  ASSERT_EQ(tail->prefix_chunks, 1u);
  EXPECT_FALSE(tail->chunks[0].pinned());
  absl::StatusOr<LookupResult> all = client_->Lookup(KeysFor(conversation));
  ASSERT_TRUE(all.ok()) << all.status();
  ASSERT_EQ(all->prefix_chunks, 4u);
  for (const v1::ChunkInfo& chunk : all->chunks) EXPECT_TRUE(chunk.pinned());
}

// Over four two-turn conversations each.
TEST_F(ChatSessionTest, LossyLevelsKeepTokenAgreement) {
  for (const codec::Level level :
       {codec::Level::kNearLossless, codec::Level::kDefault}) {
    StartDaemon(level);
    constexpr int kConversations = 4;
    Agreements mean;
    for (int n = 0; n < kConversations; ++n) {
      const TurnSpec spec = SecondTurn(n, FirstTurnStored(n, 120, 64), 64);
      const TurnOutcome got = Run(spec, /*use_cache=*/true);
      ASSERT_TRUE(got.restore.fallback.ok()) << got.restore.fallback;
      ASSERT_EQ(got.restore.tokens, static_cast<int>(spec.history.size()));
      EXPECT_LT(got.restore.fetched_bytes, got.restore.raw_bytes * 2 / 3);
      const TurnOutcome want = Run(spec, /*use_cache=*/false);
      mean.greedy += Agreement(got.reply, want.reply) / kConversations;
      mean.top1 +=
          Agreement(got.continuation.predicted, want.continuation.predicted) /
          kConversations;
    }
    std::printf("%s: greedy agreement %.3f, teacher-forced top-1 %.3f\n",
                std::string(codec::LevelName(level)).c_str(), mean.greedy,
                mean.top1);
    const Agreements& bound =
        level == codec::Level::kDefault ? kDefaultLevelMin : kNearLosslessMin;
    EXPECT_GE(mean.greedy, bound.greedy) << codec::LevelName(level);
    EXPECT_GE(mean.top1, bound.top1) << codec::LevelName(level);
  }
}

TEST_F(ChatSessionTest, ExpiredSessionFallsBackToRecompute) {
  // A CPU tier of 256 KiB holds this session (about 150 KiB) but not the
  // filler below, which evicts it once its pin has lapsed.
  StartDaemon(codec::Level::kLossless,
              {"--set=cpu_tier { capacity_bytes: 262144 }"});
  ChatSessionOptions options = session_->options();
  options.pin_ttl = absl::Seconds(1);
  session_.emplace(*ChatSession::Create(cache(), client_.get(),
                                        session_->key_space(), options));
  const std::vector<int32_t> history = FirstTurnStored(1, 150, 40);
  absl::SleepFor(absl::Milliseconds(1200));
  std::mt19937_64 rng(7);
  for (int i = 0; i < 16; ++i) {
    std::string filler(32 << 10, '\0');
    for (char& c : filler) c = static_cast<char>(rng());
    ASSERT_TRUE(client_->Put({{ContentKey(filler), filler}}).ok());
  }

  const TurnSpec spec = SecondTurn(1, history);
  const TurnOutcome got = Run(spec, /*use_cache=*/true);
  EXPECT_TRUE(got.restore.fallback.ok()) << got.restore.fallback;
  EXPECT_EQ(got.restore.tokens, 0);
  EXPECT_EQ(got.recomputed_tokens, static_cast<int>(history.size()) + 24);
  ExpectSameAsUncached(spec, got);
}

TEST_F(ChatSessionTest, PartiallyEvictedHistoryRestoresTheCachedPrefix) {
  StartDaemon(codec::Level::kLossless);
  // 1 + 160 + 95 = 256 tokens: four full chunks; the second one goes.
  const std::vector<int32_t> history = FirstTurnStored(2, 160, 95);
  ASSERT_EQ(history.size(), 256u);
  ASSERT_EQ(*client_->Delete({KeysFor(history)[1]}), 1u);

  const TurnSpec spec = SecondTurn(2, history);
  const TurnOutcome got = Run(spec, /*use_cache=*/true);
  EXPECT_TRUE(got.restore.fallback.ok()) << got.restore.fallback;
  EXPECT_EQ(got.restore.tokens, 64);
  EXPECT_EQ(got.recomputed_tokens, 256 - 64 + 24);
  // The rest is recomputed in one batch where the uncached run takes the
  // whole prompt in one: the same to rounding.
  const TurnOutcome want = Run(spec, /*use_cache=*/false);
  float max_diff = 0;
  for (size_t i = 0; i < want.first_logits.size(); ++i) {
    max_diff = std::max(max_diff,
                        std::fabs(got.first_logits[i] - want.first_logits[i]));
  }
  EXPECT_LT(max_diff, 2e-3f);
  EXPECT_EQ(*ArgMax(got.first_logits), *ArgMax(want.first_logits));
}

TEST_F(ChatSessionTest, DamagedChunkFallsBackWithTheSequenceClean) {
  StartDaemon(codec::Level::kLossless);
  const std::vector<int32_t> history = FirstTurnStored(3, 160, 40);
  // A valid bitstream of the wrong shape under the third chunk's key, and
  // bytes that are no bitstream at all: both must be refused.
  std::vector<uint16_t> zeros(5 * 2 * 3 * 32);
  codec::ChunkShape small{5, 3, 4, 8};
  const std::string wrong_shape =
      *codec::EncodeChunk(small, zeros, codec::Level::kLossless);
  const std::string garbage(1000, 'x');
  for (const std::string* bytes : {&wrong_shape, &garbage}) {
    ASSERT_TRUE(client_
                    ->Put({{KeysFor(history)[2], *bytes}},
                          PutOptions{absl::ZeroDuration(), /*replace=*/true})
                    .ok());
    const TurnSpec spec = SecondTurn(3, history);
    const TurnOutcome got = Run(spec, /*use_cache=*/true);
    EXPECT_TRUE(absl::IsDataLoss(got.restore.fallback)) << got.restore.fallback;
    EXPECT_EQ(got.restore.tokens, 0);
    EXPECT_EQ(got.recomputed_tokens, static_cast<int>(history.size()) + 24);
    ExpectSameAsUncached(spec, got);
  }
}

TEST_F(ChatSessionTest, KilledDaemonFallsBackWithAClearStatus) {
  StartDaemon(codec::Level::kLossless);
  const std::vector<int32_t> history = FirstTurnStored(4, 100, 40);
  daemon_->Signal(SIGKILL);
  ASSERT_TRUE(daemon_->WaitForExit(absl::Seconds(10)).ok());

  const TurnSpec spec = SecondTurn(4, history);
  const TurnOutcome got = Run(spec, /*use_cache=*/true);
  EXPECT_TRUE(absl::IsUnavailable(got.restore.fallback))
      << got.restore.fallback;
  EXPECT_EQ(got.restore.tokens, 0);
  ExpectSameAsUncached(spec, got);

  // Storing the next turn fails with the client's status; the worker's KV
  // is untouched.
  absl::StatusOr<TurnOutcome> turn = RunTurn(model(), cache(), nullptr, spec);
  ASSERT_TRUE(turn.ok()) << turn.status();
  EXPECT_TRUE(
      absl::IsUnavailable(session_->Store(turn->seq, spec.history).status()));
  EXPECT_EQ(*cache()->Length(turn->seq),
            static_cast<int>(history.size()) + 24 + 32);
}

// The session's chunks come back from the NVMe tier after a restart: after
// a clean stop (memory is flushed to NVMe) and after SIGKILL with
// write-through (every acknowledged Put is already durable).
TEST_F(ChatSessionTest, RestoresAfterADaemonRestart) {
  const char* tmp = std::getenv("TEST_TMPDIR");
  ASSERT_NE(tmp, nullptr);
  for (const bool crash : {false, true}) {
    const std::string nvme = absl::StrCat(
        "--set=nvme_tier { data_dir: \"", tmp, "/nvme-", crash,
        "\" slab_bytes: 4194304 slab_count: 2 write_through: ", crash, " }");
    StartDaemon(codec::Level::kLossless, {nvme});
    SequenceId kept = 0;
    const std::vector<int32_t> history = FirstTurnStored(5, 150, 40, &kept);
    daemon_->Signal(crash ? SIGKILL : SIGTERM);
    ASSERT_TRUE(daemon_->WaitForExit(absl::Seconds(20)).ok());
    StartDaemon(codec::Level::kLossless, {nvme});

    const TurnSpec spec = SecondTurn(5, history);
    const TurnOutcome got = Run(spec, /*use_cache=*/true);
    ASSERT_TRUE(got.restore.fallback.ok()) << got.restore.fallback;
    EXPECT_EQ(got.restore.tokens, static_cast<int>(history.size()))
        << (crash ? "after SIGKILL" : "after SIGTERM");
    ExpectSameAsKept(kept, spec, got);
  }
}

}  // namespace
}  // namespace kvcache::chat
