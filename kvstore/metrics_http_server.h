// The HTTP endpoint Prometheus scrapes, served by cpp-httplib:
//   GET /metrics  200, text/plain; version=0.0.4, the text a callback renders
//   GET /healthz  200, "ok" (for load balancers and liveness probes)
// HEAD is answered like GET without the body. Any other method on those two
// paths gets 405, any other path 404, and a malformed request 400 or a
// closed connection: nothing but a well-formed GET of those paths gets 200.
//
// A client cannot hold the endpoint for long nor grow the daemon: a few
// workers serve connections concurrently; each connection carries one
// request and is cut off when it has not finished within
// Options::connection_deadline (a client that trickles a byte at a time
// still hits it), each read or write waits at most Options::io_timeout, and
// a request larger than Options::max_request_bytes is refused without being
// buffered. Connections beyond the workers and max_pending_connections wait
// in the kernel's listen backlog, not in the daemon's memory.
//
// Threading: Start spawns the threads. The render callback may run on several
// workers at once and must be thread-safe. The destructor stops accepting,
// cuts open connections off and joins the threads before it returns.
#ifndef KVCACHE_KVSTORE_METRICS_HTTP_SERVER_H_
#define KVCACHE_KVSTORE_METRICS_HTTP_SERVER_H_

#include <cstddef>
#include <functional>
#include <memory>
#include <string>
#include <thread>

#include "absl/status/statusor.h"
#include "absl/time/time.h"

namespace kvcache::kvstore {

// How many clients MetricsHttpServer serves at once and how long each may take.
struct MetricsHttpServerOptions {
  // Connections served at once. Scrapes are short; a few workers let
  // several Prometheus replicas scrape while one client misbehaves.
  int threads = 4;
  // Accepted connections that may wait for a worker.
  int max_pending_connections = 16;
  // Longest wait for the client to send or accept any byte.
  absl::Duration io_timeout = absl::Seconds(5);
  // Longest a connection may take from accept to the last response byte,
  // rendering included. Prometheus' default scrape_timeout is 10 s.
  absl::Duration connection_deadline = absl::Seconds(10);
  // Request line, headers and body together; a scrape needs well under
  // 1 KiB.
  size_t max_request_bytes = 16 << 10;
  // Given the request's Authorization header (empty if none), whether it
  // may read /metrics; others get 401. Null: anyone may. /healthz stays
  // open to probes either way.
  std::function<bool(absl::string_view authorization)> authorize;
};

class MetricsHttpServer {
 public:
  using Render = std::function<std::string()>;
  using Options = MetricsHttpServerOptions;

  // Listens on `address` ("host:port", "[v6 address]:port"; port 0 picks a
  // free one; an empty host means every interface) and serves until
  // destroyed. INVALID_ARGUMENT for a malformed address, UNAVAILABLE if it
  // cannot listen there (the port is taken, or the host is not this one's).
  static absl::StatusOr<std::unique_ptr<MetricsHttpServer>> Start(
      const std::string& address, Render render,
      const Options& options = Options());
  ~MetricsHttpServer();

  MetricsHttpServer(const MetricsHttpServer&) = delete;
  MetricsHttpServer& operator=(const MetricsHttpServer&) = delete;

  // The port it listens on (the one picked, if the address asked for 0).
  int port() const { return port_; }

 private:
  class HttpServer;

  MetricsHttpServer(std::unique_ptr<HttpServer> server, int port, int stop_fd);

  // Readable once the destructor runs: every wait on a client ends on it.
  const int stop_fd_;
  const int port_;
  std::unique_ptr<HttpServer> server_;
  std::thread accept_thread_;
};

}  // namespace kvcache::kvstore

#endif  // KVCACHE_KVSTORE_METRICS_HTTP_SERVER_H_
