// A minimal HTTP/1.0 responder for Prometheus scrapes: every request, whatever
// its path, is answered with the text a callback renders, then the
// connection is closed. Meant for a scraper on a trusted network, not for
// browsers or the internet.
//
// Threading: one background thread accepts and answers connections one at a
// time; the render callback runs on it and must be thread-safe with respect
// to the rest of the process. The destructor stops the thread.
#ifndef KVCACHE_KVSTORE_METRICS_HTTP_SERVER_H_
#define KVCACHE_KVSTORE_METRICS_HTTP_SERVER_H_

#include <atomic>
#include <functional>
#include <memory>
#include <string>
#include <thread>

#include "absl/status/statusor.h"

namespace kvcache::kvstore {

class MetricsHttpServer {
 public:
  using Render = std::function<std::string()>;

  // Listens on `address` ("host:port", port 0 picks one). INVALID_ARGUMENT
  // for a malformed address, UNAVAILABLE if it cannot bind.
  static absl::StatusOr<std::unique_ptr<MetricsHttpServer>> Start(
      const std::string& address, Render render);
  ~MetricsHttpServer();

  MetricsHttpServer(const MetricsHttpServer&) = delete;
  MetricsHttpServer& operator=(const MetricsHttpServer&) = delete;

  int port() const { return port_; }

 private:
  MetricsHttpServer(int listen_fd, int port, Render render);
  void Serve();
  void Answer(int fd);

  const int listen_fd_;
  const int port_;
  const Render render_;
  std::atomic<bool> stopping_{false};
  std::thread thread_;
};

}  // namespace kvcache::kvstore

#endif  // KVCACHE_KVSTORE_METRICS_HTTP_SERVER_H_
