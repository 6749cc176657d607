// A real kvcached with its NVMe tier on a real disk: chunks survive restarts
// and kill -9, damaged chunks are never served, metrics are scraped over
// HTTP the way Prometheus does.
#include <arpa/inet.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "client/chunk_key.h"
#include "client/kvcache_client.h"
#include "tests/testing/daemon_process.h"

namespace kvcache {
namespace {

using ::kvcache::testing::DaemonProcess;
using ::kvcache::testing::FreeLoopbackPort;

constexpr char kDaemon[] = "kvstore/kvcached";

std::string RandomBytes(size_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::string s(n, '\0');
  for (char& c : s) c = static_cast<char>(rng());
  return s;
}

std::unique_ptr<KvCacheClient> ConnectTo(const DaemonProcess& daemon) {
  ClientOptions options;
  options.address = daemon.address();
  auto client = KvCacheClient::Connect(options);
  EXPECT_TRUE(client.ok()) << client.status();
  return client.ok() ? std::move(*client) : nullptr;
}

std::string HttpGet(int port, const std::string& path) {
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(port);
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) {
    close(fd);
    return "";
  }
  const std::string request = absl::StrCat("GET ", path, " HTTP/1.0\r\n\r\n");
  EXPECT_EQ(write(fd, request.data(), request.size()),
            static_cast<ssize_t>(request.size()));
  std::string response;
  char buffer[4096];
  for (ssize_t n; (n = read(fd, buffer, sizeof(buffer))) > 0;) {
    response.append(buffer, n);
  }
  close(fd);
  return response;
}

class TieredDaemonTest : public ::testing::Test {
 protected:
  void SetUp() override {
    const char* tmp = std::getenv("TEST_TMPDIR");
    data_dir_ = absl::StrCat(
        tmp ? tmp : "/tmp", "/kvcached-",
        ::testing::UnitTest::GetInstance()->current_test_info()->name());
    std::filesystem::remove_all(data_dir_);
    // A first session's chunks: a 2 MiB memory tier, so most go to NVMe.
    for (int i = 0; i < 12; ++i) chunks_.push_back(RandomBytes(512 << 10, i));
    KeySpace space;
    space.model_id = "tiered-daemon-test";
    space.chunk_tokens = 16;
    std::vector<int32_t> tokens(space.chunk_tokens * chunks_.size());
    for (size_t i = 0; i < tokens.size(); ++i) tokens[i] = 100 + i;
    keys_ = *ChunkKeysForTokens(space, tokens);
  }

  absl::StatusOr<DaemonProcess> StartDaemon(
      bool write_through, std::vector<std::string> extra = {}) {
    std::vector<std::string> args = {
        "--set=cpu_tier { capacity_bytes: 2097152 }",
        absl::StrCat("--set=nvme_tier { data_dir: '", data_dir_,
                     "' slab_bytes: 16777216 slab_count: 2 write_through: ",
                     write_through ? "true" : "false", " }")};
    args.insert(args.end(), extra.begin(), extra.end());
    return DaemonProcess::Start(kDaemon, args);
  }

  void PutAll(KvCacheClient& client) {
    for (size_t i = 0; i < chunks_.size(); ++i) {
      ASSERT_TRUE(client.Put({{keys_[i], chunks_[i]}}).ok()) << i;
    }
  }

  void ExpectAllServedByteExact(KvCacheClient& client) {
    auto lookup = client.Lookup(keys_);
    ASSERT_TRUE(lookup.ok()) << lookup.status();
    EXPECT_EQ(lookup->prefix_chunks, keys_.size());
    auto got = client.Get(keys_);
    ASSERT_TRUE(got.ok()) << got.status();
    ASSERT_EQ(got->size(), chunks_.size());
    for (size_t i = 0; i < chunks_.size(); ++i) {
      EXPECT_TRUE((*got)[i].bytes == chunks_[i]) << "chunk " << i;
    }
  }

  // Stores every chunk through a write-through daemon, then kill -9s it.
  void StoreAllThenKill() {
    auto daemon = StartDaemon(/*write_through=*/true);
    ASSERT_TRUE(daemon.ok()) << daemon.status();
    auto client = ConnectTo(*daemon);
    ASSERT_NE(client, nullptr);
    PutAll(*client);
    daemon->Signal(SIGKILL);
    ASSERT_TRUE(daemon->WaitForExit(absl::Seconds(10)).ok());
  }

  void RestartAndExpectAllServed(bool write_through) {
    auto daemon = StartDaemon(write_through);
    ASSERT_TRUE(daemon.ok()) << daemon.status();
    auto client = ConnectTo(*daemon);
    ASSERT_NE(client, nullptr);
    ExpectAllServedByteExact(*client);
  }

  std::string data_dir_;
  std::vector<std::string> chunks_;
  std::vector<ChunkKey> keys_;
};

TEST_F(TieredDaemonTest, KillDashNineWithWriteThroughLosesNothing) {
  ASSERT_NO_FATAL_FAILURE(StoreAllThenKill());
  RestartAndExpectAllServed(/*write_through=*/true);
}

TEST_F(TieredDaemonTest, CleanRestartKeepsChunksHeldOnlyInMemory) {
  {
    auto daemon = StartDaemon(/*write_through=*/false);
    ASSERT_TRUE(daemon.ok()) << daemon.status();
    auto client = ConnectTo(*daemon);
    ASSERT_NE(client, nullptr);
    PutAll(*client);
    // The last chunks are only in memory until SIGTERM flushes them.
    auto lookup = client->Lookup({keys_.back()});
    ASSERT_TRUE(lookup.ok());
    EXPECT_EQ(lookup->chunks[0].tier(), v1::TIER_CPU);
    daemon->Signal(SIGTERM);
    auto exit_code = daemon->WaitForExit(absl::Seconds(20));
    ASSERT_TRUE(exit_code.ok()) << exit_code.status();
    EXPECT_EQ(*exit_code, 0);
  }
  RestartAndExpectAllServed(/*write_through=*/false);
}

TEST_F(TieredDaemonTest, DamagedChunkIsDataLossThenGoneAndOthersServe) {
  ASSERT_NO_FATAL_FAILURE(StoreAllThenKill());
  // Damage chunk 3 on disk, wherever the daemon put it.
  const std::string needle = chunks_[3].substr(1000, 64);
  int flipped = 0;
  for (const auto& entry : std::filesystem::directory_iterator(data_dir_)) {
    if (!absl::StartsWith(entry.path().filename().string(), "slab-")) continue;
    std::fstream slab(entry.path(),
                      std::ios::in | std::ios::out | std::ios::binary);
    const std::string contents((std::istreambuf_iterator<char>(slab)), {});
    for (size_t at = contents.find(needle); at != std::string::npos;
         at = contents.find(needle, at + 1)) {
      slab.seekp(at);
      slab.put(static_cast<char>(contents[at] ^ 0x01));
      ++flipped;
    }
  }
  ASSERT_GE(flipped, 1);

  auto daemon = StartDaemon(/*write_through=*/true);
  ASSERT_TRUE(daemon.ok()) << daemon.status();
  auto client = ConnectTo(*daemon);
  ASSERT_NE(client, nullptr);
  auto damaged = client->Get({keys_[3]});
  EXPECT_EQ(damaged.status().code(), absl::StatusCode::kDataLoss)
      << damaged.status();
  EXPECT_EQ(client->Get({keys_[3]}).status().code(),
            absl::StatusCode::kNotFound);
  EXPECT_EQ(client->Lookup(keys_)->prefix_chunks, 3u);
  for (size_t i : {0, 1, 2, 4, 11}) {
    auto got = client->Get({keys_[i]});
    ASSERT_TRUE(got.ok()) << i << ": " << got.status();
    EXPECT_TRUE(got->front().bytes == chunks_[i]) << i;
  }
}

TEST_F(TieredDaemonTest, StatusAndPrometheusReportEveryTier) {
  const int port = FreeLoopbackPort();
  auto daemon = StartDaemon(
      /*write_through=*/false,
      {absl::StrCat("--set=metrics_address: '127.0.0.1:", port, "'")});
  ASSERT_TRUE(daemon.ok()) << daemon.status();
  auto client = ConnectTo(*daemon);
  ASSERT_NE(client, nullptr);
  PutAll(*client);
  ASSERT_TRUE(client->Get({keys_[0]}).ok());  // an NVMe hit, promoted

  auto usage = client->TierUsage();
  ASSERT_TRUE(usage.ok()) << usage.status();
  ASSERT_EQ(usage->tiers_size(), 2);
  const v1::TierUsage& cpu = usage->tiers(0);
  const v1::TierUsage& nvme = usage->tiers(1);
  EXPECT_EQ(cpu.tier(), v1::TIER_CPU);
  EXPECT_EQ(nvme.tier(), v1::TIER_NVME);
  EXPECT_LE(cpu.used_bytes(), cpu.capacity_bytes());
  EXPECT_EQ(nvme.capacity_bytes(), 32u << 20);
  EXPECT_GE(cpu.demotions(), 8u);
  EXPECT_EQ(cpu.promotions(), 1u);
  EXPECT_EQ(nvme.hits(), 1u);

  const std::string scrape = HttpGet(port, "/metrics");
  EXPECT_TRUE(absl::StartsWith(scrape, "HTTP/1.1 200")) << scrape;
  EXPECT_TRUE(absl::StrContains(
      scrape,
      absl::StrCat("kvcache_tier_capacity_bytes{tier=\"nvme\"} ", 32 << 20)))
      << scrape;
  EXPECT_TRUE(
      absl::StrContains(scrape, "kvcache_tier_hits_total{tier=\"nvme\"} 1"))
      << scrape;
  EXPECT_TRUE(absl::StrContains(scrape, "kvcache_tier_read_seconds_bucket"))
      << scrape;
}

TEST_F(TieredDaemonTest, UnusableDataDirFailsStartupNamingIt) {
  // A path under a regular file can never be a directory.
  std::filesystem::create_directories(data_dir_);
  const std::string file = data_dir_ + "/not-a-dir";
  std::ofstream(file) << "x";
  const std::string command = absl::StrCat(
      kDaemon, " --set=\"nvme_tier { data_dir: '", file, "/nvme' }\" 2>&1");
  FILE* pipe = popen(command.c_str(), "r");
  std::string output;
  char buffer[1024];
  for (size_t n; (n = fread(buffer, 1, sizeof(buffer), pipe)) > 0;) {
    output.append(buffer, n);
  }
  EXPECT_NE(WEXITSTATUS(pclose(pipe)), 0);
  EXPECT_TRUE(absl::StrContains(output, file + "/nvme")) << output;
}

}  // namespace
}  // namespace kvcache
