// libFuzzer entry point for the metrics endpoint's request handling: each
// input is sent as raw bytes, then end of stream, over loopback to a
// MetricsHttpServer running in this process, which anyone who can reach
// metrics_address can do. Built and run by tests/fuzz/run_fuzz.sh
// metrics_http.
//
// Beyond not crashing, the endpoint's promises: it answers or closes every
// connection within its deadline, an answer is an HTTP status line, and
// nothing but a GET or HEAD gets 200.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <string>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/time/clock.h"
#include "kvstore/metrics_http_server.h"

namespace kvcache::kvstore {
namespace {

// Longer than the server's connection deadline: a connection still open
// after it is a hang.
constexpr absl::Duration kAnswerDeadline = absl::Seconds(4);

[[noreturn]] void Fail(const char* why) {
  std::fprintf(stderr, "metrics endpoint fuzzer: %s\n", why);
  std::abort();
}

MetricsHttpServer& TheServer() {
  static MetricsHttpServer* const server = [] {
    MetricsHttpServerOptions options;
    options.io_timeout = absl::Seconds(1);
    options.connection_deadline = absl::Seconds(2);
    options.max_request_bytes = 4096;
    options.authorize = [](absl::string_view authorization) {
      return authorization == "Bearer fuzz";
    };
    absl::StatusOr<std::unique_ptr<MetricsHttpServer>> started =
        MetricsHttpServer::Start(
            "127.0.0.1:0", [] { return std::string("kvcache_up 1\n"); },
            options);
    if (!started.ok()) Fail("cannot start the server");
    return started->release();
  }();
  return *server;
}

// Sends `request`, ends the stream, and returns everything the server sent
// before closing. Aborts if it neither answers nor closes in time.
std::string Exchange(int port, absl::string_view request) {
  const int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  // The server closes first, so it keeps each connection's address pair in
  // TIME_WAIT for a minute; from one source address the ephemeral ports
  // wrap within some 30,000 connections, and a SYN that meets its own
  // TIME_WAIT pair waits for a retransmission (1 s, then 3 s more), which
  // would read as a hang. Each connection comes from the next of 250
  // loopback addresses instead.
  static uint32_t next_source = 0;
  sockaddr_in source{};
  source.sin_family = AF_INET;
  source.sin_addr.s_addr = htonl(INADDR_LOOPBACK + 1 + next_source++ % 250);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  addr.sin_port = htons(static_cast<uint16_t>(port));
  if (fd < 0 ||
      bind(fd, reinterpret_cast<sockaddr*>(&source), sizeof(source)) != 0 ||
      connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) {
    Fail("cannot connect");
  }
  // The server may answer and close before reading everything; a send
  // that fails then is expected.
  for (size_t sent = 0; sent < request.size();) {
    const ssize_t n =
        send(fd, request.data() + sent, request.size() - sent, MSG_NOSIGNAL);
    if (n <= 0) break;
    sent += n;
  }
  shutdown(fd, SHUT_WR);
  std::string answer;
  const absl::Time deadline = absl::Now() + kAnswerDeadline;
  char buffer[4096];
  while (true) {
    const int64_t left = absl::ToInt64Milliseconds(deadline - absl::Now());
    pollfd p = {fd, POLLIN, 0};
    if (left <= 0 || poll(&p, 1, static_cast<int>(left)) <= 0) {
      Fail("the connection is still open past the server's deadline");
    }
    const ssize_t n = recv(fd, buffer, sizeof(buffer), 0);
    if (n <= 0) break;  // closed (or reset after an early answer)
    answer.append(buffer, n);
  }
  close(fd);
  return answer;
}

}  // namespace
}  // namespace kvcache::kvstore

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using kvcache::kvstore::Exchange;
  using kvcache::kvstore::Fail;
  using kvcache::kvstore::TheServer;
  const absl::string_view request(reinterpret_cast<const char*>(data), size);
  const std::string answer = Exchange(TheServer().port(), request);
  if (answer.empty()) return 0;
  if (!absl::StartsWith(answer, "HTTP/1.")) Fail("an answer without a status");
  // Whitespace before the request line is tolerated, as HTTP allows.
  const absl::string_view method = absl::StripLeadingAsciiWhitespace(request);
  if (absl::StartsWith(answer.substr(8), " 200 ") &&
      !absl::StartsWith(method, "GET ") && !absl::StartsWith(method, "HEAD ")) {
    Fail("200 for a request that is neither GET nor HEAD");
  }
  return 0;
}
