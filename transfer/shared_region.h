// Same-host sharing of a node's CPU tier. The node keeps its chunks in one
// shared-memory region (a memfd); a SharedRegionServer hands a read-only
// descriptor of it to any process that connects to a Unix socket, and a
// worker's SharedRegion maps it, so chunks are read (and copied to a GPU)
// straight from the node's memory with no socket in the data path.
//
// Where each chunk sits in the region, and how long it stays there, is the
// Locate RPC's business (kvcache.proto); this file only moves the region.
//
// Wire format of the one message the server sends per connection, with the
// descriptor attached (SCM_RIGHTS):
//   "KVCSHM01" | u64 region size | u8 id length | id bytes  (host byte order)
#ifndef KVCACHE_TRANSFER_SHARED_REGION_H_
#define KVCACHE_TRANSFER_SHARED_REGION_H_

#include <sys/types.h>

#include <atomic>
#include <cstdint>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace kvcache::transfer {

// Daemon side. Thread-safe; serves connections on a thread of its own.
class SharedRegionServer {
 public:
  // Listens on `socket_path` (replacing a stale socket file there) and hands
  // each connecting process of a user in `allowed_uids` (empty: this
  // process's effective user only) a read-only descriptor of `region_fd`,
  // whose first `size` bytes are the region named `region_id` (at most 255
  // bytes). Other users' connections are closed unanswered. The socket file
  // is mode 0600 when only this user is allowed, 0666 otherwise (the peer
  // check then decides). `region_fd` stays owned by the caller and must
  // outlive the server.
  static absl::StatusOr<std::unique_ptr<SharedRegionServer>> Start(
      std::string socket_path, int region_fd, uint64_t size,
      std::string region_id, std::vector<uid_t> allowed_uids = {});
  // Stops serving and removes the socket file; mappings already handed out
  // stay valid.
  ~SharedRegionServer();

  SharedRegionServer(const SharedRegionServer&) = delete;
  SharedRegionServer& operator=(const SharedRegionServer&) = delete;

  const std::string& socket_path() const { return socket_path_; }
  // Connections closed because their user is not allowed.
  uint64_t refused_connections() const { return refused_.load(); }

 private:
  SharedRegionServer(std::string socket_path, int listen_fd, int stop_fd,
                     int read_only_fd, std::string message,
                     std::vector<uid_t> allowed_uids);
  void Serve();

  const std::string socket_path_;
  const int listen_fd_;
  const int stop_fd_;       // eventfd that wakes Serve to stop
  const int read_only_fd_;  // what connecting processes receive
  const std::string message_;
  const std::vector<uid_t> allowed_uids_;
  std::atomic<uint64_t> refused_{0};
  std::thread thread_;
};

// Worker side: the node's region mapped read-only. Thread-safe (immutable).
class SharedRegion {
 public:
  // Connects to the node's socket and maps the region it hands out.
  // UNAVAILABLE if nothing listens there (the node is elsewhere, stopped, or
  // shares no memory); DATA_LOSS if what arrives is not a region.
  static absl::StatusOr<std::unique_ptr<SharedRegion>> Connect(
      const std::string& socket_path);
  ~SharedRegion();

  SharedRegion(const SharedRegion&) = delete;
  SharedRegion& operator=(const SharedRegion&) = delete;

  const std::string& id() const { return id_; }
  uint64_t size() const { return size_; }
  const char* base() const { return base_; }

  // The region's bytes [offset, offset + bytes); OUT_OF_RANGE if that is
  // not inside the region (a lying or stale extent).
  absl::StatusOr<absl::string_view> View(uint64_t offset, uint64_t bytes) const;

 private:
  SharedRegion(std::string id, const char* base, uint64_t size)
      : id_(std::move(id)), base_(base), size_(size) {}

  const std::string id_;
  const char* const base_;
  const uint64_t size_;
};

}  // namespace kvcache::transfer

#endif  // KVCACHE_TRANSFER_SHARED_REGION_H_
