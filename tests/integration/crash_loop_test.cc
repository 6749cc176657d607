// kill -9 at random moments while clients write to a real kvcached whose NVMe
// tier writes through, hundreds of times over one data directory. After each
// restart, every chunk whose Put was acknowledged is served byte-exact, every
// chunk whose Delete was acknowledged stays gone, and a chunk whose Put or
// Delete was cut off by the kill is either served byte-exact or not found:
// nothing else, and never a damaged chunk (a DATA_LOSS answer fails too, as
// it means an index record outlived its bytes).
//
// Each writer owns its keys and puts each key once (so what a key must hold
// is known without asking the node) and deletes its oldest keys to keep a
// bounded window, so extents are freed and reused throughout. The tier is
// sized so nothing is ever evicted.
//
// A kill -9 loses nothing the kernel has accepted, so this cannot see a
// missing sync; kvstore/nvme_tier_power_loss_test.cc does. It does catch an
// index record written before its chunk's bytes (a DATA_LOSS within a few
// kills).
//
// KVCACHE_CRASH_LOOP_KILLS (e.g. bazel test --test_env=...) sets the number
// of kills; the default fits a two-core CI runner in about two minutes.
#include <gtest/gtest.h>
#include <signal.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <deque>
#include <filesystem>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "client/chunk_key.h"
#include "client/kvcache_client.h"
#include "tests/testing/daemon_process.h"

namespace kvcache {
namespace {

using ::kvcache::testing::DaemonProcess;

constexpr char kDaemon[] = "kvstore/kvcached";
constexpr int kDefaultKills = 300;
constexpr int kWriters = 4;
// Keys a writer keeps stored; beyond that it deletes its oldest.
constexpr size_t kWindow = 24;
constexpr uint64_t kMaxChunkBytes = 64 << 10;
// A kill lands this long, at most, after the writers start.
constexpr int64_t kMaxKillDelayMs = 40;

// A chunk's bytes follow from its id, so any copy can be checked.
std::string ChunkBytes(uint64_t id) {
  std::mt19937_64 rng(id);
  std::string bytes(1 + rng() % kMaxChunkBytes, '\0');
  for (char& c : bytes) c = static_cast<char>(rng());
  return bytes;
}

enum class State {
  kPutting,   // Put sent, not acknowledged: stored or not
  kStored,    // Put acknowledged, or the chunk was found after a restart
  kDeleting,  // Delete sent, not acknowledged: gone or not
  kGone,      // Delete acknowledged, or the chunk was not found
};

struct Tracked {
  uint64_t id = 0;
  ChunkKey key;
  State state = State::kPutting;
};

// One client thread's keys. Only its thread touches them while the daemon
// runs; the test reads them once the thread has been joined.
struct Writer {
  int index = 0;
  std::vector<Tracked> chunks;
  // Indices into `chunks` of the ones not yet deleted, oldest first.
  std::deque<size_t> window;
  uint64_t next_seq = 0;
  // When its first (and last) call of a round failed; InfinitePast: none.
  absl::Time failed_at = absl::InfinitePast();
  absl::Status failure;
};

struct Totals {
  int kills = 0;
  uint64_t acked_puts = 0;
  uint64_t acked_deletes = 0;
  uint64_t chunks_read = 0;     // byte-checked Gets over all restarts
  uint64_t absent_checked = 0;  // keys checked not found
  uint64_t cut_puts_stored = 0;
  uint64_t cut_puts_lost = 0;
  uint64_t cut_deletes = 0;
  int kills_mid_call = 0;  // kills with some Put or Delete in flight
};

int KillsToRun() {
  const char* env = std::getenv("KVCACHE_CRASH_LOOP_KILLS");
  return env != nullptr ? std::max(1, std::atoi(env)) : kDefaultKills;
}

// Puts new chunks (one to three per call) and deletes the oldest beyond
// the window, until a call fails because the daemon was killed.
void Write(KvCacheClient& client, Writer& writer, uint32_t seed, Totals& totals,
           absl::Mutex& totals_mu) {
  std::mt19937 rng(seed);
  uint64_t puts = 0, deletes = 0;
  while (true) {
    if (writer.window.size() >= kWindow) {
      const size_t count = 1 + rng() % 3;
      std::vector<ChunkKey> keys;
      for (size_t i = 0; i < count; ++i) {
        Tracked& chunk = writer.chunks[writer.window[i]];
        chunk.state = State::kDeleting;
        keys.push_back(chunk.key);
      }
      absl::StatusOr<uint32_t> deleted = client.Delete(keys);
      if (!deleted.ok()) {
        writer.failure = deleted.status();
        break;
      }
      for (size_t i = 0; i < count; ++i) {
        writer.chunks[writer.window.front()].state = State::kGone;
        writer.window.pop_front();
      }
      deletes += count;
      continue;
    }
    const size_t count = 1 + rng() % 3;
    std::vector<std::string> bytes;
    std::vector<ChunkToPut> puts_now;
    for (size_t i = 0; i < count; ++i) {
      Tracked chunk;
      chunk.id = writer.next_seq++ * kWriters + writer.index;
      chunk.key = ContentKey(absl::StrCat("crash-loop ", chunk.id));
      writer.window.push_back(writer.chunks.size());
      writer.chunks.push_back(chunk);
      bytes.push_back(ChunkBytes(chunk.id));
    }
    for (size_t i = 0; i < count; ++i) {
      puts_now.push_back(
          {writer.chunks[writer.chunks.size() - count + i].key, bytes[i]});
    }
    if (absl::Status put = client.Put(puts_now); !put.ok()) {
      writer.failure = put;
      break;
    }
    for (size_t i = writer.chunks.size() - count; i < writer.chunks.size();
         ++i) {
      writer.chunks[i].state = State::kStored;
    }
    puts += count;
  }
  writer.failed_at = absl::Now();
  absl::MutexLock lock(&totals_mu);
  totals.acked_puts += puts;
  totals.acked_deletes += deletes;
}

class CrashLoopTest : public ::testing::Test {
 protected:
  void SetUp() override {
    const char* tmp = std::getenv("TEST_TMPDIR");
    data_dir_ = absl::StrCat(tmp ? tmp : "/tmp", "/kvcached-crash-loop");
    std::filesystem::remove_all(data_dir_);
    for (int i = 0; i < kWriters; ++i) writers_[i].index = i;
  }

  // How far it got, failed or not.
  void TearDown() override {
    std::printf(
        "%d kills in %.1f s (%d with a Put or Delete in flight); %llu puts and "
        "%llu deletes acknowledged; %llu chunks read back byte-exact and %llu "
        "keys checked absent over the restarts; of the calls cut off, %llu "
        "puts were stored, %llu were not, %llu deletes took\n",
        totals_.kills, absl::ToDoubleSeconds(absl::Now() - start_),
        totals_.kills_mid_call,
        static_cast<unsigned long long>(totals_.acked_puts),
        static_cast<unsigned long long>(totals_.acked_deletes),
        static_cast<unsigned long long>(totals_.chunks_read),
        static_cast<unsigned long long>(totals_.absent_checked),
        static_cast<unsigned long long>(totals_.cut_puts_stored),
        static_cast<unsigned long long>(totals_.cut_puts_lost),
        static_cast<unsigned long long>(totals_.cut_deletes));
  }

  absl::StatusOr<DaemonProcess> StartDaemon() {
    // 32 MiB of slabs hold every writer's window several times over, so
    // nothing is evicted and every acknowledged chunk must stay.
    return DaemonProcess::Start(
        kDaemon, {"--set=cpu_tier { capacity_bytes: 4194304 }",
                  absl::StrCat("--set=nvme_tier { data_dir: '", data_dir_,
                               "' slab_bytes: 16777216 slab_count: 2 "
                               "write_through: true }")});
  }

  std::unique_ptr<KvCacheClient> Connect(const DaemonProcess& daemon) {
    ClientOptions options;
    options.address = daemon.address();
    options.timeout = absl::Seconds(10);
    auto client = KvCacheClient::Connect(options);
    EXPECT_TRUE(client.ok()) << client.status();
    return client.ok() ? std::move(*client) : nullptr;
  }

  // Writers run against `daemon` until it is killed at a random moment.
  void WriteUntilKilled(DaemonProcess& daemon, KvCacheClient& client,
                        std::mt19937& rng) {
    std::vector<std::thread> threads;
    for (Writer& writer : writers_) {
      writer.failed_at = absl::InfinitePast();
      writer.failure = absl::OkStatus();
      threads.emplace_back(Write, std::ref(client), std::ref(writer), rng(),
                           std::ref(totals_), std::ref(totals_mu_));
    }
    absl::SleepFor(absl::Milliseconds(rng() % (kMaxKillDelayMs + 1)));
    const absl::Time killed_at = absl::Now();
    daemon.Signal(SIGKILL);
    const absl::StatusOr<int> exited = daemon.WaitForExit(absl::Seconds(10));
    for (std::thread& thread : threads) thread.join();
    ASSERT_TRUE(exited.ok()) << exited.status();
    ++totals_.kills;
    bool mid_call = false;
    for (const Writer& writer : writers_) {
      EXPECT_GE(writer.failed_at, killed_at)
          << "writer " << writer.index
          << " failed before the kill: " << writer.failure;
      for (const Tracked& chunk : writer.chunks) {
        mid_call |=
            chunk.state == State::kPutting || chunk.state == State::kDeleting;
      }
    }
    totals_.kills_mid_call += mid_call ? 1 : 0;
  }

  // Checks every key ever written against what the restarted daemon holds,
  // and settles the calls the kill cut off by what it found.
  void CheckAfterRestart(KvCacheClient& client) {
    std::vector<Tracked*> all;
    for (Writer& writer : writers_) {
      for (Tracked& chunk : writer.chunks) all.push_back(&chunk);
    }
    std::vector<Tracked*> present;
    constexpr size_t kLookupBatch = 1000;
    for (size_t first = 0; first < all.size(); first += kLookupBatch) {
      std::vector<ChunkKey> keys;
      for (size_t i = first; i < std::min(all.size(), first + kLookupBatch);
           ++i) {
        keys.push_back(all[i]->key);
      }
      auto infos = client.LookupEach(keys);
      ASSERT_TRUE(infos.ok()) << infos.status();
      for (size_t i = 0; i < keys.size(); ++i) {
        Tracked& chunk = *all[first + i];
        const bool held = (*infos)[i].tier() != v1::TIER_UNSPECIFIED;
        if (chunk.state == State::kStored) {
          ASSERT_TRUE(held) << "acknowledged chunk " << chunk.id << " lost";
        }
        if (chunk.state == State::kGone) {
          ASSERT_FALSE(held) << "deleted chunk " << chunk.id << " is back";
        }
        if (held) {
          present.push_back(&chunk);
          continue;
        }
        if (chunk.state == State::kPutting) {
          // Lookup answers from memory; Get reads the tiers and must agree.
          auto got = client.Get({chunk.key});
          ASSERT_EQ(got.status().code(), absl::StatusCode::kNotFound)
              << "chunk " << chunk.id << ": " << got.status();
          ++totals_.cut_puts_lost;
        }
        if (chunk.state == State::kDeleting) ++totals_.cut_deletes;
        chunk.state = State::kGone;
        ++totals_.absent_checked;
      }
    }
    constexpr size_t kGetBatch = 16;
    for (size_t first = 0; first < present.size(); first += kGetBatch) {
      std::vector<ChunkKey> keys;
      const size_t end = std::min(present.size(), first + kGetBatch);
      for (size_t i = first; i < end; ++i) keys.push_back(present[i]->key);
      auto got = client.Get(keys);
      ASSERT_TRUE(got.ok()) << got.status();
      ASSERT_EQ(got->size(), keys.size());
      for (size_t i = first; i < end; ++i) {
        Tracked& chunk = *present[i];
        ASSERT_TRUE((*got)[i - first].bytes == ChunkBytes(chunk.id))
            << "chunk " << chunk.id << " served with wrong bytes";
        if (chunk.state == State::kPutting) ++totals_.cut_puts_stored;
        // A delete the kill cut off is retried from the writer's window.
        chunk.state = State::kStored;
        ++totals_.chunks_read;
      }
    }
    // Chunks not found leave their writer's window.
    for (Writer& writer : writers_) {
      std::deque<size_t> kept;
      for (size_t i : writer.window) {
        if (writer.chunks[i].state != State::kGone) kept.push_back(i);
      }
      writer.window.swap(kept);
    }
  }

  std::string data_dir_;
  Writer writers_[kWriters];
  absl::Mutex totals_mu_;
  Totals totals_;
  const absl::Time start_ = absl::Now();
};

TEST_F(CrashLoopTest, KillDashNineMidWriteLosesNothingAcknowledged) {
  const int kills = KillsToRun();
  std::mt19937 rng(std::random_device{}());
  for (int round = 0; round <= kills && !HasFailure(); ++round) {
    SCOPED_TRACE(absl::StrCat("after ", round, " kills"));
    auto daemon = StartDaemon();
    ASSERT_TRUE(daemon.ok()) << daemon.status();
    auto client = Connect(*daemon);
    ASSERT_NE(client, nullptr);
    ASSERT_NO_FATAL_FAILURE(CheckAfterRestart(*client));
    if (round == kills) break;
    ASSERT_NO_FATAL_FAILURE(WriteUntilKilled(*daemon, *client, rng));
  }
}

}  // namespace
}  // namespace kvcache
