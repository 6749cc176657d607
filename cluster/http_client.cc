#include "cluster/http_client.h"

#include <netdb.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "absl/status/status.h"
#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/time/clock.h"

namespace kvcache::cluster {
namespace {

// Closes the socket when the request is done, however it ends.
class Socket {
 public:
  Socket() = default;
  Socket(const Socket&) = delete;
  Socket& operator=(const Socket&) = delete;
  ~Socket() {
    if (fd_ >= 0) close(fd_);
  }
  void Own(int fd) { fd_ = fd; }

 private:
  int fd_ = -1;
};

// Waits until `fd` is ready for `events` or the deadline passes.
absl::Status WaitFor(int fd, short events, absl::Time deadline,
                     absl::string_view endpoint) {
  while (true) {
    const int64_t left_ms = absl::ToInt64Milliseconds(deadline - absl::Now());
    if (left_ms <= 0) {
      return absl::DeadlineExceededError(
          absl::StrCat("etcd at ", endpoint, " did not answer in time"));
    }
    pollfd p = {fd, events, 0};
    const int n = poll(&p, 1, static_cast<int>(left_ms));
    if (n > 0) return absl::OkStatus();
    if (n < 0 && errno != EINTR) {
      return absl::UnavailableError(
          absl::StrCat("poll on ", endpoint, ": ", std::strerror(errno)));
    }
  }
}

absl::StatusOr<int> ConnectTo(absl::string_view host_port, absl::Time deadline,
                              Socket& holder) {
  const size_t colon = host_port.rfind(':');
  if (colon == absl::string_view::npos) {
    return absl::InvalidArgumentError(
        absl::StrCat("etcd endpoint '", host_port, "' is not host:port"));
  }
  const std::string host(host_port.substr(0, colon));
  const std::string port(host_port.substr(colon + 1));
  addrinfo hints = {};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  addrinfo* found = nullptr;
  if (const int rc = getaddrinfo(host.c_str(), port.c_str(), &hints, &found);
      rc != 0) {
    return absl::UnavailableError(
        absl::StrCat("cannot resolve ", host_port, ": ", gai_strerror(rc)));
  }
  const int fd =
      socket(found->ai_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  holder.Own(fd);
  const int rc = fd < 0 ? -1 : connect(fd, found->ai_addr, found->ai_addrlen);
  freeaddrinfo(found);
  if (fd < 0 || (rc != 0 && errno != EINPROGRESS)) {
    return absl::UnavailableError(absl::StrCat("cannot connect to ", host_port,
                                               ": ", std::strerror(errno)));
  }
  if (absl::Status s = WaitFor(fd, POLLOUT, deadline, host_port); !s.ok()) {
    return s;
  }
  int error = 0;
  socklen_t len = sizeof(error);
  getsockopt(fd, SOL_SOCKET, SO_ERROR, &error, &len);
  if (error != 0) {
    return absl::UnavailableError(absl::StrCat("cannot connect to ", host_port,
                                               ": ", std::strerror(error)));
  }
  return fd;
}

// Removes chunked transfer encoding; trailers after the last chunk are
// dropped.
absl::StatusOr<std::string> Dechunk(absl::string_view raw) {
  std::string body;
  while (true) {
    const size_t eol = raw.find("\r\n");
    if (eol == absl::string_view::npos) {
      return absl::UnavailableError("truncated chunked HTTP body");
    }
    absl::string_view size_text = raw.substr(0, eol);
    size_text = size_text.substr(0, size_text.find(';'));  // no extensions
    uint64_t size = 0;
    if (!absl::SimpleHexAtoi(absl::StripAsciiWhitespace(size_text), &size) ||
        raw.size() - eol - 2 < size) {
      return absl::UnavailableError("truncated chunked HTTP body");
    }
    if (size == 0) return body;
    absl::StrAppend(&body, raw.substr(eol + 2, size));
    raw.remove_prefix(eol + 2 + size);
    if (absl::StartsWith(raw, "\r\n")) raw.remove_prefix(2);
  }
}

absl::StatusOr<HttpResponse> Parse(absl::string_view raw,
                                   absl::string_view endpoint) {
  const size_t head_end = raw.find("\r\n\r\n");
  if (head_end == absl::string_view::npos) {
    return absl::UnavailableError(
        absl::StrCat("incomplete HTTP response from ", endpoint));
  }
  std::vector<absl::string_view> lines =
      absl::StrSplit(raw.substr(0, head_end), "\r\n");
  std::vector<absl::string_view> status_line =
      absl::StrSplit(lines[0], absl::MaxSplits(' ', 2));
  HttpResponse response;
  if (status_line.size() < 2 ||
      !absl::SimpleAtoi(status_line[1], &response.status)) {
    return absl::UnavailableError(
        absl::StrCat("malformed HTTP status from ", endpoint, ": ", lines[0]));
  }
  bool chunked = false;
  for (size_t i = 1; i < lines.size(); ++i) {
    const std::string line = absl::AsciiStrToLower(lines[i]);
    chunked |= absl::StartsWith(line, "transfer-encoding:") &&
               absl::StrContains(line, "chunked");
  }
  const absl::string_view body = raw.substr(head_end + 4);
  if (!chunked) {
    response.body = std::string(body);
    return response;
  }
  absl::StatusOr<std::string> decoded = Dechunk(body);
  if (!decoded.ok()) {
    return absl::UnavailableError(
        absl::StrCat(endpoint, ": ", decoded.status().message()));
  }
  response.body = std::move(*decoded);
  return response;
}

}  // namespace

absl::StatusOr<HttpResponse> HttpPost(absl::string_view host_port,
                                      absl::string_view path,
                                      absl::string_view body,
                                      absl::Duration timeout) {
  const absl::Time deadline = absl::Now() + timeout;
  Socket socket;
  absl::StatusOr<int> fd = ConnectTo(host_port, deadline, socket);
  if (!fd.ok()) return fd.status();

  const std::string request = absl::StrCat(
      "POST ", path, " HTTP/1.1\r\nHost: ", host_port,
      "\r\nContent-Type: application/json\r\nContent-Length: ", body.size(),
      "\r\nConnection: close\r\n\r\n", body);
  for (size_t sent = 0; sent < request.size();) {
    if (absl::Status s = WaitFor(*fd, POLLOUT, deadline, host_port); !s.ok()) {
      return s;
    }
    const ssize_t n =
        send(*fd, request.data() + sent, request.size() - sent, MSG_NOSIGNAL);
    if (n < 0 && errno != EAGAIN && errno != EINTR) {
      return absl::UnavailableError(absl::StrCat(
          "sending to ", host_port, " failed: ", std::strerror(errno)));
    }
    if (n > 0) sent += n;
  }
  std::string raw;
  char buffer[16 << 10];
  while (true) {
    if (absl::Status s = WaitFor(*fd, POLLIN, deadline, host_port); !s.ok()) {
      return s;
    }
    const ssize_t n = recv(*fd, buffer, sizeof(buffer), 0);
    if (n == 0) break;
    if (n < 0 && errno != EAGAIN && errno != EINTR) {
      return absl::UnavailableError(absl::StrCat(
          "reading from ", host_port, " failed: ", std::strerror(errno)));
    }
    if (n > 0) raw.append(buffer, n);
  }
  return Parse(raw, host_port);
}

}  // namespace kvcache::cluster
