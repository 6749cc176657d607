#include "kvstore/metrics_http_server.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "gtest/gtest.h"

namespace kvcache::kvstore {
namespace {

constexpr char kMetricsText[] = "kvcache_up 1\n";

// Connects to the server on loopback; every read gives up after 20 s so a
// server that never answers fails the test instead of hanging it.
int Connect(int port) {
  const int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_in address = {};
  address.sin_family = AF_INET;
  address.sin_port = htons(port);
  address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  EXPECT_EQ(connect(fd, reinterpret_cast<sockaddr*>(&address), sizeof(address)),
            0);
  timeval timeout = {20, 0};
  setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, sizeof(timeout));
  return fd;
}

// Sends what the server still takes; false once it has hung up.
bool Send(int fd, const std::string& data) {
  for (size_t sent = 0; sent < data.size();) {
    const ssize_t n =
        send(fd, data.data() + sent, data.size() - sent, MSG_NOSIGNAL);
    if (n <= 0) return false;
    sent += n;
  }
  return true;
}

// Everything the server sends until it closes the connection.
std::string ReadToEnd(int fd) {
  std::string received;
  char buffer[4096];
  for (ssize_t n; (n = read(fd, buffer, sizeof(buffer))) > 0;) {
    received.append(buffer, n);
  }
  return received;
}

std::string Exchange(int port, const std::string& request) {
  const int fd = Connect(port);
  Send(fd, request);
  std::string response = ReadToEnd(fd);
  close(fd);
  return response;
}

std::string Get(int port, const std::string& path) {
  return Exchange(port,
                  absl::StrCat("GET ", path, " HTTP/1.1\r\nHost: x\r\n\r\n"));
}

bool IsStatus(const std::string& response, int status) {
  return absl::StartsWith(response, absl::StrCat("HTTP/1.1 ", status, " "));
}

// A client that sends a request that never ends, one byte every 0.5 s.
class SlowClient {
 public:
  explicit SlowClient(int port) : fd_(Connect(port)) {
    thread_ = std::thread([this] {
      const std::string start = "GET /metrics HTTP/1.1\r\nX-Slow: ";
      for (size_t i = 0; !stop_.load(); ++i) {
        if (!Send(fd_, std::string(1, i < start.size() ? start[i] : 'a'))) {
          break;
        }
        absl::SleepFor(absl::Milliseconds(500));
      }
    });
  }
  ~SlowClient() {
    stop_.store(true);
    thread_.join();
    close(fd_);
  }

  // Waits for the server to hang up; how long that took, or an infinite
  // duration if it still held the connection after `limit`.
  absl::Duration TimeUntilDropped(absl::Duration limit) {
    const absl::Time start = absl::Now();
    pollfd hangup = {fd_, POLLIN | POLLRDHUP, 0};
    if (poll(&hangup, 1, absl::ToInt64Milliseconds(limit)) <= 0) {
      return absl::InfiniteDuration();
    }
    return absl::Now() - start;
  }

 private:
  const int fd_;
  std::atomic<bool> stop_{false};
  std::thread thread_;
};

std::unique_ptr<MetricsHttpServer> StartServer(
    const MetricsHttpServer::Options& options = MetricsHttpServer::Options(),
    MetricsHttpServer::Render render = [] { return kMetricsText; }) {
  absl::StatusOr<std::unique_ptr<MetricsHttpServer>> server =
      MetricsHttpServer::Start("127.0.0.1:0", std::move(render), options);
  EXPECT_TRUE(server.ok()) << server.status();
  return server.ok() ? std::move(*server) : nullptr;
}

TEST(MetricsHttpServerTest, MetricsAnswerWithPrometheusText) {
  std::unique_ptr<MetricsHttpServer> server = StartServer();
  const std::string response = Get(server->port(), "/metrics");
  EXPECT_TRUE(IsStatus(response, 200)) << response;
  EXPECT_TRUE(absl::StrContains(response,
                                "Content-Type: text/plain; version=0.0.4\r\n"))
      << response;
  EXPECT_TRUE(absl::EndsWith(response, absl::StrCat("\r\n\r\n", kMetricsText)))
      << response;
}

TEST(MetricsHttpServerTest, HeadAnswersWithoutBody) {
  std::unique_ptr<MetricsHttpServer> server = StartServer();
  const std::string response =
      Exchange(server->port(), "HEAD /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
  EXPECT_TRUE(IsStatus(response, 200)) << response;
  EXPECT_TRUE(absl::EndsWith(response, "\r\n\r\n")) << response;
}

TEST(MetricsHttpServerTest, HealthPathAnswersOk) {
  std::unique_ptr<MetricsHttpServer> server = StartServer();
  const std::string response = Get(server->port(), "/healthz");
  EXPECT_TRUE(IsStatus(response, 200)) << response;
  EXPECT_TRUE(absl::EndsWith(response, "\r\n\r\nok\n")) << response;
}

TEST(MetricsHttpServerTest, MetricsNeedTheTokenWhenOneIsSet) {
  MetricsHttpServer::Options options;
  options.authorize = [](absl::string_view authorization) {
    return authorization == "Bearer right";
  };
  std::unique_ptr<MetricsHttpServer> server = StartServer(options);
  const std::string missing = Get(server->port(), "/metrics");
  EXPECT_TRUE(IsStatus(missing, 401)) << missing;
  EXPECT_FALSE(absl::StrContains(missing, kMetricsText)) << missing;
  const std::string wrong =
      Exchange(server->port(),
               "GET /metrics HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
               "wrong\r\n\r\n");
  EXPECT_TRUE(IsStatus(wrong, 401)) << wrong;
  const std::string right =
      Exchange(server->port(),
               "GET /metrics HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
               "right\r\n\r\n");
  EXPECT_TRUE(IsStatus(right, 200)) << right;
  EXPECT_TRUE(absl::EndsWith(right, kMetricsText)) << right;
  // Probes need no token.
  EXPECT_TRUE(IsStatus(Get(server->port(), "/healthz"), 200));
}

TEST(MetricsHttpServerTest, HttpTenClientIsAnswered) {
  std::unique_ptr<MetricsHttpServer> server = StartServer();
  const std::string response =
      Exchange(server->port(), "GET /metrics HTTP/1.0\r\n\r\n");
  EXPECT_TRUE(IsStatus(response, 200)) << response;
}

TEST(MetricsHttpServerTest, OtherPathIsNotFound) {
  std::unique_ptr<MetricsHttpServer> server = StartServer();
  EXPECT_TRUE(IsStatus(Get(server->port(), "/"), 404));
  EXPECT_TRUE(IsStatus(Get(server->port(), "/metrics/x"), 404));
  EXPECT_TRUE(IsStatus(
      Exchange(server->port(), "POST /other HTTP/1.1\r\nHost: x\r\n\r\n"),
      404));
}

TEST(MetricsHttpServerTest, OtherMethodIsNotAllowed) {
  std::unique_ptr<MetricsHttpServer> server = StartServer();
  for (const char* method : {"POST", "PUT", "DELETE", "OPTIONS"}) {
    const std::string response = Exchange(
        server->port(),
        absl::StrCat(method,
                     " /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: "
                     "3\r\n\r\nabc"));
    EXPECT_TRUE(IsStatus(response, 405)) << method << ": " << response;
    EXPECT_TRUE(absl::StrContains(response, "Allow: GET, HEAD\r\n"))
        << response;
  }
  EXPECT_TRUE(IsStatus(
      Exchange(server->port(), "POST /healthz HTTP/1.1\r\nHost: x\r\n\r\n"),
      405));
}

TEST(MetricsHttpServerTest, GarbageIsNotAnsweredWithOk) {
  // A TLS handshake has no line break: the server waits for one until
  // io_timeout.
  MetricsHttpServer::Options options;
  options.io_timeout = absl::Milliseconds(500);
  std::unique_ptr<MetricsHttpServer> server = StartServer(options);
  for (const std::string& garbage :
       {std::string("hello\r\n\r\n"), std::string("GET\r\n\r\n"),
        std::string("BREW /metrics HTTP/1.1\r\n\r\n"),
        std::string("\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", 11),
        std::string("\0\0\0\0\r\n\r\n", 8)}) {
    const std::string response = Exchange(server->port(), garbage);
    EXPECT_FALSE(absl::StrContains(response, " 200 ")) << response;
  }
  EXPECT_TRUE(IsStatus(Get(server->port(), "/metrics"), 200));
}

TEST(MetricsHttpServerTest, HugeHeaderIsRefused) {
  std::unique_ptr<MetricsHttpServer> server = StartServer();
  // Without a line break, so the server cannot answer before the end of the
  // line and must refuse to buffer it.
  const int fd = Connect(server->port());
  Send(fd, "GET /metrics HTTP/1.1\r\nX-Big: " + std::string(8 << 20, 'a'));
  const std::string response = ReadToEnd(fd);
  close(fd);
  EXPECT_FALSE(IsStatus(response, 200)) << response;
  EXPECT_TRUE(IsStatus(Get(server->port(), "/metrics"), 200));
}

TEST(MetricsHttpServerTest, ManyShortHeadersAreRefused) {
  std::unique_ptr<MetricsHttpServer> server = StartServer();
  std::string request = "GET /metrics HTTP/1.1\r\n";
  for (int i = 0; i < 100000; ++i)
    absl::StrAppend(&request, "X-", i, ": a\r\n");
  const std::string response = Exchange(server->port(), request + "\r\n");
  EXPECT_FALSE(IsStatus(response, 200)) << response.substr(0, 200);
}

TEST(MetricsHttpServerTest, ScrapeIsPromptWhileSlowClientHoldsConnection) {
  MetricsHttpServer::Options options;
  options.connection_deadline = absl::Seconds(30);
  std::unique_ptr<MetricsHttpServer> server = StartServer(options);
  SlowClient slow(server->port());
  absl::SleepFor(absl::Seconds(1));
  const absl::Time start = absl::Now();
  EXPECT_TRUE(IsStatus(Get(server->port(), "/metrics"), 200));
  EXPECT_LT(absl::Now() - start, absl::Milliseconds(500));
}

TEST(MetricsHttpServerTest, SlowClientIsDroppedAtTheDeadline) {
  MetricsHttpServer::Options options;
  options.connection_deadline = absl::Seconds(1);
  std::unique_ptr<MetricsHttpServer> server = StartServer(options);
  SlowClient slow(server->port());
  const absl::Duration held = slow.TimeUntilDropped(absl::Seconds(10));
  EXPECT_GE(held, absl::Milliseconds(800));
  EXPECT_LT(held, absl::Seconds(3));
}

TEST(MetricsHttpServerTest, SilentClientIsDroppedAfterIoTimeout) {
  MetricsHttpServer::Options options;
  options.io_timeout = absl::Seconds(1);
  std::unique_ptr<MetricsHttpServer> server = StartServer(options);
  const int fd = Connect(server->port());
  const absl::Time start = absl::Now();
  EXPECT_EQ(ReadToEnd(fd), "");
  EXPECT_LT(absl::Now() - start, absl::Seconds(3));
  close(fd);
}

TEST(MetricsHttpServerTest, ScrapeSucceedsWhenSlowClientsHoldEveryWorker) {
  MetricsHttpServer::Options options;
  options.threads = 2;
  options.connection_deadline = absl::Milliseconds(1500);
  std::unique_ptr<MetricsHttpServer> server = StartServer(options);
  SlowClient first(server->port());
  SlowClient second(server->port());
  absl::SleepFor(absl::Milliseconds(200));
  const absl::Time start = absl::Now();
  EXPECT_TRUE(IsStatus(Get(server->port(), "/metrics"), 200));
  EXPECT_LT(absl::Now() - start, absl::Seconds(4));
}

TEST(MetricsHttpServerTest, ConcurrentScrapesAllSucceed) {
  MetricsHttpServer::Options options;
  options.threads = 4;
  std::atomic<int> rendering{0};
  std::atomic<int> most_at_once{0};
  std::unique_ptr<MetricsHttpServer> server =
      StartServer(options, [&rendering, &most_at_once] {
        const int now = rendering.fetch_add(1) + 1;
        for (int seen = most_at_once.load();
             now > seen && !most_at_once.compare_exchange_weak(seen, now);) {
        }
        absl::SleepFor(absl::Milliseconds(100));
        rendering.fetch_sub(1);
        return std::string(kMetricsText);
      });
  constexpr int kScrapes = 32;
  std::vector<std::string> responses(kScrapes);
  std::vector<std::thread> scrapers;
  for (int i = 0; i < kScrapes; ++i) {
    scrapers.emplace_back(
        [&, i] { responses[i] = Get(server->port(), "/metrics"); });
  }
  for (std::thread& scraper : scrapers) scraper.join();
  for (const std::string& response : responses) {
    EXPECT_TRUE(IsStatus(response, 200)) << response;
  }
  EXPECT_GT(most_at_once.load(), 1);
  EXPECT_LE(most_at_once.load(), options.threads);
}

TEST(MetricsHttpServerTest, DestructorStopsWhileClientsAreConnected) {
  MetricsHttpServer::Options options;
  options.threads = 1;
  options.io_timeout = absl::Seconds(30);
  options.connection_deadline = absl::Seconds(30);
  std::unique_ptr<MetricsHttpServer> server = StartServer(options);
  // One holds the only worker, the others wait for it.
  const int partial = Connect(server->port());
  Send(partial, "GET /metrics HTTP/1.1\r\n");
  std::vector<int> waiting;
  for (int i = 0; i < 3; ++i) waiting.push_back(Connect(server->port()));
  absl::SleepFor(absl::Milliseconds(200));
  const absl::Time start = absl::Now();
  server.reset();
  EXPECT_LT(absl::Now() - start, absl::Seconds(2));
  EXPECT_EQ(ReadToEnd(partial), "");
  close(partial);
  for (int fd : waiting) close(fd);
}

TEST(MetricsHttpServerTest, TakenPortIsUnavailable) {
  std::unique_ptr<MetricsHttpServer> server = StartServer();
  absl::StatusOr<std::unique_ptr<MetricsHttpServer>> second =
      MetricsHttpServer::Start(absl::StrCat("127.0.0.1:", server->port()),
                               [] { return std::string(); });
  EXPECT_EQ(second.status().code(), absl::StatusCode::kUnavailable)
      << second.status();
}

TEST(MetricsHttpServerTest, MalformedAddressIsInvalid) {
  for (const char* address : {"", "9464", "host:", "host:port", "h:70000"}) {
    EXPECT_EQ(MetricsHttpServer::Start(address, [] { return std::string(); })
                  .status()
                  .code(),
              absl::StatusCode::kInvalidArgument)
        << address;
  }
}

}  // namespace
}  // namespace kvcache::kvstore
