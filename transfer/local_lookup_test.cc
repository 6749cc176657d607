#include "transfer/local_lookup.h"

#include <dirent.h>
#include <gtest/gtest.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <fstream>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "absl/container/flat_hash_set.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "transfer/unix_socket.h"

namespace kvcache::transfer {
namespace {

std::string Key(int i) { return std::string(32, static_cast<char>('a' + i)); }

class LocalLookupTest : public ::testing::Test {
 protected:
  void SetUp() override {
    // TEST_TMPDIR can be longer than a socket path may be.
    path_ = absl::StrCat("/tmp/kvcache-lookup-test-", getpid(), ".sock");
    for (int i = 0; i < 5; ++i) held_.insert(Key(i));
  }

  void StartServer(LocalLookupOptions options = {}) {
    auto count = [this](absl::Span<const absl::string_view> keys) {
      absl::MutexLock lock(&mu_);
      size_t n = 0;
      while (n < keys.size() && held_.contains(keys[n])) ++n;
      return n;
    };
    absl::StatusOr<std::unique_ptr<LocalLookupServer>> server =
        LocalLookupServer::Start(path_, "node-a", count, options);
    ASSERT_TRUE(server.ok()) << server.status();
    server_ = *std::move(server);
  }

  // A raw connection, its greeting read.
  int RawConnection() {
    absl::StatusOr<int> fd = ConnectUnix(path_);
    EXPECT_TRUE(fd.ok()) << fd.status();
    if (!fd.ok()) return -1;
    SetTimeout(*fd, SO_RCVTIMEO, 5);
    char greeting[4 + 1 + 6];
    EXPECT_EQ(recv(*fd, greeting, sizeof(greeting), MSG_WAITALL),
              static_cast<ssize_t>(sizeof(greeting)));
    EXPECT_EQ(std::string(greeting + 5, 6), "node-a");
    return *fd;
  }

  // Whether the server closed `fd`: its end, or a reset where the server
  // closed with bytes of ours unread.
  static bool Closed(int fd) {
    char byte;
    const ssize_t got = recv(fd, &byte, 1, 0);
    return got == 0 || (got < 0 && errno == ECONNRESET);
  }

  std::string path_;
  absl::Mutex mu_;
  absl::flat_hash_set<std::string> held_ ABSL_GUARDED_BY(mu_);
  std::unique_ptr<LocalLookupServer> server_;
};

// This process's threads at nice value `nice` (/proc/self/task/*/stat,
// field 19).
int ThreadsAtNice(int nice) {
  int count = 0;
  DIR* tasks = opendir("/proc/self/task");
  if (tasks == nullptr) return -1;
  while (dirent* entry = readdir(tasks)) {
    if (entry->d_name[0] == '.') continue;
    std::ifstream file(
        absl::StrCat("/proc/self/task/", entry->d_name, "/stat"));
    std::stringstream text;
    text << file.rdbuf();
    const std::string stat = text.str();
    const size_t after_name = stat.rfind(')');
    if (after_name == std::string::npos) continue;
    const std::vector<std::string> fields =
        absl::StrSplit(stat.substr(after_name + 2), ' ');
    // Fields from the third (state) on: nice is the 19th.
    if (fields.size() > 16 && fields[16] == std::to_string(nice)) ++count;
  }
  closedir(tasks);
  return count;
}

TEST_F(LocalLookupTest, LoopsRunAtTheirNiceValueWhereAllowed) {
  constexpr int kNice = -7;
  // Whether this process may raise a thread's priority that far.
  bool allowed = false;
  std::thread([&] {
    allowed =
        setpriority(PRIO_PROCESS, static_cast<id_t>(gettid()), kNice) == 0;
  }).join();
  LocalLookupOptions options;
  options.nice = kNice;
  options.threads = 3;
  StartServer(options);
  close(RawConnection());
  const int expected = allowed ? 3 : 0;
  const absl::Time deadline = absl::Now() + absl::Seconds(5);
  while (ThreadsAtNice(kNice) != expected && absl::Now() < deadline) {
    absl::SleepFor(absl::Milliseconds(10));
  }
  EXPECT_EQ(ThreadsAtNice(kNice), expected) << "allowed: " << allowed;
}

TEST_F(LocalLookupTest, CountsTheLeadingKeysHeld) {
  StartServer();
  absl::StatusOr<std::unique_ptr<LocalLookupClient>> client =
      LocalLookupClient::Connect(path_, "node-a");
  ASSERT_TRUE(client.ok()) << client.status();
  std::vector<std::string> keys;
  for (int i = 0; i < 8; ++i) keys.push_back(Key(i));
  EXPECT_EQ(*(*client)->CountHeld(keys), 5u);
  EXPECT_EQ(*(*client)->CountHeld(absl::MakeConstSpan(keys).first(3)), 3u);
  EXPECT_EQ(*(*client)->CountHeld({Key(6), Key(0)}), 0u);
  EXPECT_EQ(*(*client)->CountHeld({}), 0u);
  {
    absl::MutexLock lock(&mu_);
    held_.erase(Key(2));
  }
  EXPECT_EQ(*(*client)->CountHeld(keys), 2u);
  EXPECT_EQ((*client)->CountHeld({"short"}).status().code(),
            absl::StatusCode::kInvalidArgument);
  // Threads share the client, each on a connection of its own.
  std::vector<std::thread> threads;
  std::vector<size_t> counts(8);
  for (size_t t = 0; t < counts.size(); ++t) {
    threads.emplace_back([&, t] {
      for (int i = 0; i < 200; ++i) counts[t] = *(*client)->CountHeld(keys);
    });
  }
  for (std::thread& t : threads) t.join();
  for (size_t count : counts) EXPECT_EQ(count, 2u);
}

TEST_F(LocalLookupTest, AnotherNodesSocketIsRefused) {
  StartServer();
  EXPECT_EQ(LocalLookupClient::Connect(path_, "node-b").status().code(),
            absl::StatusCode::kFailedPrecondition);
  server_.reset();
  EXPECT_EQ(LocalLookupClient::Connect(path_, "node-a").status().code(),
            absl::StatusCode::kUnavailable);
}

TEST_F(LocalLookupTest, MalformedRequestsCloseTheirConnectionOnly) {
  StartServer();
  const std::string bad_magic = "XXXX\x01\0\0\0" + Key(0);
  uint32_t too_many = kMaxLocalLookupKeys + 1, none = 0;
  std::string over("KVLQ"), empty("KVLQ");
  over.append(reinterpret_cast<const char*>(&too_many), 4);
  empty.append(reinterpret_cast<const char*>(&none), 4);
  for (const std::string& request : {bad_magic, over, empty}) {
    const int fd = RawConnection();
    ASSERT_EQ(send(fd, request.data(), request.size(), 0),
              static_cast<ssize_t>(request.size()));
    EXPECT_TRUE(Closed(fd));
    close(fd);
  }
  // A truncated request, then the client goes away mid-key.
  const int fd = RawConnection();
  const std::string half = std::string("KVLQ\x02\0\0\0", 8) + Key(0);
  ASSERT_EQ(send(fd, half.data(), half.size(), 0),
            static_cast<ssize_t>(half.size()));
  close(fd);
  absl::StatusOr<std::unique_ptr<LocalLookupClient>> client =
      LocalLookupClient::Connect(path_, "node-a");
  ASSERT_TRUE(client.ok()) << client.status();
  EXPECT_EQ(*(*client)->CountHeld({Key(0), Key(1)}), 2u);
}

TEST_F(LocalLookupTest, ConnectionsAreBoundedAndIdleOnesClosed) {
  StartServer({.max_connections = 3, .idle_timeout = absl::Seconds(1)});
  std::vector<int> fds;
  for (int i = 0; i < 3; ++i) fds.push_back(RawConnection());
  // The fourth is closed unanswered.
  absl::StatusOr<int> extra = ConnectUnix(path_);
  ASSERT_TRUE(extra.ok());
  SetTimeout(*extra, SO_RCVTIMEO, 5);
  EXPECT_TRUE(Closed(*extra));
  close(*extra);
  // Idle connections are closed after a second.
  for (int fd : fds) {
    EXPECT_TRUE(Closed(fd));
    close(fd);
  }
  // And their places are free again.
  absl::StatusOr<std::unique_ptr<LocalLookupClient>> client =
      LocalLookupClient::Connect(path_, "node-a");
  ASSERT_TRUE(client.ok()) << client.status();
  EXPECT_EQ(*(*client)->CountHeld({Key(0)}), 1u);
}

}  // namespace
}  // namespace kvcache::transfer
