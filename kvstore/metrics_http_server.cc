#include "kvstore/metrics_http_server.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <utility>

// Debian builds libcpp-httplib with these, and httplib::Request's layout
// depends on them: code including httplib.h must see the same ones. The
// Bazel target sets them; this catches an include outside it.
#if !defined(CPPHTTPLIB_OPENSSL_SUPPORT) || \
    !defined(CPPHTTPLIB_ZLIB_SUPPORT) || !defined(CPPHTTPLIB_BROTLI_SUPPORT)
#error "build against @system//:httplib, which sets libcpp-httplib's macros"
#endif
#include <httplib.h>

#include "absl/base/thread_annotations.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"

namespace kvcache::kvstore {
namespace {

constexpr char kMetricsPath[] = "/metrics";
constexpr char kHealthPath[] = "/healthz";
constexpr char kPrometheusTextFormat[] = "text/plain; version=0.0.4";

// Lets at most `capacity` connections in, served or waiting for a worker.
// httplib's accept loop calls enqueue right after accept(), so waiting here
// stops it accepting: further clients queue in the kernel's listen backlog
// instead of each holding a descriptor and memory in the daemon.
class BoundedTaskQueue : public httplib::TaskQueue {
 public:
  BoundedTaskQueue(int threads, int capacity)
      : workers_(threads), capacity_(capacity) {}

  void enqueue(std::function<void()> serve_connection) override {
    {
      absl::MutexLock lock(&mutex_);
      mutex_.Await(absl::Condition(this, &BoundedTaskQueue::HasRoom));
      ++admitted_;
    }
    workers_.enqueue([this, serve_connection = std::move(serve_connection)] {
      serve_connection();
      absl::MutexLock lock(&mutex_);
      --admitted_;
    });
  }

  void shutdown() override { workers_.shutdown(); }

 private:
  bool HasRoom() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mutex_) {
    return admitted_ < capacity_;
  }

  httplib::ThreadPool workers_;
  const int capacity_;
  absl::Mutex mutex_;
  int admitted_ ABSL_GUARDED_BY(mutex_) = 0;
};

void DescribeAddress(const sockaddr_storage& address, std::string& ip,
                     int& port) {
  char text[INET6_ADDRSTRLEN] = "";
  if (address.ss_family == AF_INET) {
    const auto& v4 = reinterpret_cast<const sockaddr_in&>(address);
    inet_ntop(AF_INET, &v4.sin_addr, text, sizeof(text));
    port = ntohs(v4.sin_port);
  } else if (address.ss_family == AF_INET6) {
    const auto& v6 = reinterpret_cast<const sockaddr_in6&>(address);
    inet_ntop(AF_INET6, &v6.sin6_addr, text, sizeof(text));
    port = ntohs(v6.sin6_port);
  }
  ip = text;
}

// One accepted connection as httplib reads and writes it. httplib's own
// socket stream bounds each wait but not the whole exchange, and buffers a
// line of any length until its newline; this one ends every wait at the
// connection's deadline or when the server stops, and stops reading after
// max_request_bytes.
class ConnectionStream : public httplib::Stream {
 public:
  ConnectionStream(int fd, int stop_fd, const MetricsHttpServerOptions& options)
      : fd_(fd),
        stop_fd_(stop_fd),
        io_timeout_(absl::ToChronoMilliseconds(options.io_timeout)),
        deadline_(std::chrono::steady_clock::now() +
                  absl::ToChronoMilliseconds(options.connection_deadline)),
        unread_budget_(options.max_request_bytes) {}

  bool is_readable() const override { return begin_ < end_ || WaitFor(POLLIN); }
  bool is_writable() const override { return WaitFor(POLLOUT); }

  // httplib parses a byte at a time, so this reads the socket in blocks.
  ssize_t read(char* data, size_t size) override {
    if (begin_ == end_) {
      // A failed read makes httplib drop the request: past the budget it is
      // too large to be a scrape.
      if (unread_budget_ == 0) return -1;
      const ssize_t n = Transfer(POLLIN, [&] {
        return recv(fd_, buffer_, std::min(sizeof(buffer_), unread_budget_),
                    MSG_DONTWAIT);
      });
      if (n <= 0) return n;
      unread_budget_ -= n;
      begin_ = 0;
      end_ = n;
    }
    const size_t n = std::min(size, end_ - begin_);
    std::memcpy(data, buffer_ + begin_, n);
    begin_ += n;
    return n;
  }

  ssize_t write(const char* data, size_t size) override {
    // MSG_NOSIGNAL: a scraper hanging up mid-response must not raise SIGPIPE
    // in the daemon.
    return Transfer(POLLOUT, [&] {
      return send(fd_, data, size, MSG_DONTWAIT | MSG_NOSIGNAL);
    });
  }

  void get_remote_ip_and_port(std::string& ip, int& port) const override {
    sockaddr_storage address = {};
    socklen_t length = sizeof(address);
    if (getpeername(fd_, reinterpret_cast<sockaddr*>(&address), &length) == 0) {
      DescribeAddress(address, ip, port);
    }
  }

  void get_local_ip_and_port(std::string& ip, int& port) const override {
    sockaddr_storage address = {};
    socklen_t length = sizeof(address);
    if (getsockname(fd_, reinterpret_cast<sockaddr*>(&address), &length) == 0) {
      DescribeAddress(address, ip, port);
    }
  }

  int socket() const override { return fd_; }

 private:
  // Waits until the socket is ready for `events`: false once io_timeout
  // passes without it, at the deadline, on error, or when the server stops.
  bool WaitFor(short events) const {
    for (;;) {
      const auto left = std::min<std::chrono::steady_clock::duration>(
          io_timeout_, deadline_ - std::chrono::steady_clock::now());
      if (left <= std::chrono::steady_clock::duration::zero()) return false;
      pollfd waits[2] = {{fd_, events, 0}, {stop_fd_, POLLIN, 0}};
      const int ready = poll(
          waits, 2, std::chrono::ceil<std::chrono::milliseconds>(left).count());
      if (ready < 0 && errno == EINTR) continue;
      return ready > 0 && waits[1].revents == 0 &&
             (waits[0].revents & events) != 0;
    }
  }

  // Runs a non-blocking recv or send once the socket is ready, so a single
  // call never blocks past the deadline.
  template <typename Call>
  ssize_t Transfer(short events, const Call& call) const {
    for (;;) {
      if (!WaitFor(events)) return -1;
      const ssize_t n = call();
      if (n >= 0 || (errno != EAGAIN && errno != EINTR)) return n;
    }
  }

  const int fd_;
  const int stop_fd_;
  const std::chrono::milliseconds io_timeout_;
  const std::chrono::steady_clock::time_point deadline_;
  size_t unread_budget_;
  char buffer_[4096];
  size_t begin_ = 0;
  size_t end_ = 0;
};

// Answers what the GET handlers do not see, before httplib would read a
// request body nobody needs.
httplib::Server::HandlerResponse AnswerOtherMethods(
    const httplib::Request& request, httplib::Response& response) {
  if (request.method == "GET" || request.method == "HEAD") {
    return httplib::Server::HandlerResponse::Unhandled;
  }
  if (request.path == kMetricsPath || request.path == kHealthPath) {
    response.status = 405;
    response.set_header("Allow", "GET, HEAD");
  } else {
    response.status = 404;
  }
  return httplib::Server::HandlerResponse::Handled;
}

// httplib's default sets SO_REUSEPORT, which would let a second daemon
// listen on the same port and take half the scrapes; SO_REUSEADDR alone
// still allows a quick restart.
void SetListenSocketOptions(int fd) {
  const int one = 1;
  setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
  fcntl(fd, F_SETFD, FD_CLOEXEC);
}

}  // namespace

class MetricsHttpServer::HttpServer : public httplib::Server {
 public:
  HttpServer(const MetricsHttpServerOptions& options, int stop_fd,
             Render render)
      : options_(options), stop_fd_(stop_fd) {
    Get(kMetricsPath,
        [render = std::move(render), authorize = options.authorize](
            const httplib::Request& request, httplib::Response& response) {
          if (authorize &&
              !authorize(request.get_header_value("Authorization"))) {
            response.status = 401;
            response.set_header("WWW-Authenticate", "Bearer");
            response.set_content("a bearer token is needed\n", "text/plain");
            return;
          }
          response.set_content(render(), kPrometheusTextFormat);
        });
    Get(kHealthPath, [](const httplib::Request&, httplib::Response& response) {
      response.set_content("ok\n", "text/plain");
    });
    set_pre_routing_handler(AnswerOtherMethods);
    set_socket_options(SetListenSocketOptions);
    // httplib's accept loop marks itself running, which stop() needs, just
    // before it asks for its task queue.
    new_task_queue = [this]() -> httplib::TaskQueue* {
      accepting_.Notify();
      return new BoundedTaskQueue(
          options_.threads,
          options_.threads + options_.max_pending_connections);
    };
  }

  void WaitUntilAccepting() { accepting_.WaitForNotification(); }

 private:
  // httplib calls this on a worker for each accepted connection; overriding
  // it (as httplib's own SSLServer does) swaps in ConnectionStream and drops
  // keep-alive, while parsing, routing and writing stay httplib's.
  bool process_and_close_socket(int fd) override {
    ConnectionStream stream(fd, stop_fd_, options_);
    // One request per connection (the response says Connection: close): an
    // idle keep-alive connection would hold one of the few workers.
    bool connection_closed = false;
    const bool served = process_request(stream, /*close_connection=*/true,
                                        connection_closed, nullptr);
    shutdown(fd, SHUT_RDWR);
    close(fd);
    return served;
  }

  const MetricsHttpServerOptions options_;
  const int stop_fd_;
  absl::Notification accepting_;
};

absl::StatusOr<std::unique_ptr<MetricsHttpServer>> MetricsHttpServer::Start(
    const std::string& address, Render render, const Options& options) {
  const size_t colon = address.rfind(':');
  int port = 0;
  if (colon == std::string::npos ||
      !absl::SimpleAtoi(address.substr(colon + 1), &port) || port < 0 ||
      port > 65535) {
    return absl::InvalidArgumentError(
        absl::StrCat("metrics_address '", address, "' is not host:port"));
  }
  if (options.threads < 1 || options.max_pending_connections < 0 ||
      options.max_request_bytes == 0) {
    return absl::InvalidArgumentError(
        "metrics server needs a worker and room for a request");
  }
  std::string host = address.substr(0, colon);
  if (host.size() >= 2 && host.front() == '[' && host.back() == ']') {
    host = host.substr(1, host.size() - 2);
  }

  const int stop_fd = eventfd(0, EFD_CLOEXEC);
  if (stop_fd < 0) {
    return absl::InternalError(absl::StrCat("eventfd: ", std::strerror(errno)));
  }
  auto server =
      std::make_unique<HttpServer>(options, stop_fd, std::move(render));
  errno = 0;
  const int bound_port =
      port == 0 ? server->bind_to_any_port(host, AI_PASSIVE)
                : (server->bind_to_port(host, port, AI_PASSIVE) ? port : -1);
  if (bound_port < 0) {
    const int error = errno;
    close(stop_fd);
    return absl::UnavailableError(absl::StrCat(
        "cannot serve metrics on ", address,
        error != 0 ? absl::StrCat(": ", std::strerror(error)) : std::string()));
  }
  return std::unique_ptr<MetricsHttpServer>(
      new MetricsHttpServer(std::move(server), bound_port, stop_fd));
}

MetricsHttpServer::MetricsHttpServer(std::unique_ptr<HttpServer> server,
                                     int port, int stop_fd)
    : stop_fd_(stop_fd), port_(port), server_(std::move(server)) {
  accept_thread_ =
      std::thread([server = server_.get()] { server->listen_after_bind(); });
  server_->WaitUntilAccepting();
}

MetricsHttpServer::~MetricsHttpServer() {
  // Ends every wait on a client at once, so workers finish their
  // connections and the queued ones without waiting for anyone.
  eventfd_write(stop_fd_, 1);
  server_->stop();
  accept_thread_.join();
  close(stop_fd_);
}

}  // namespace kvcache::kvstore
