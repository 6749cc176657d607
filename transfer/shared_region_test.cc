#include "transfer/shared_region.h"

#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <string>
#include <thread>

#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"

namespace kvcache::transfer {
namespace {

// Under /tmp: a Unix socket path must fit in 108 bytes, which Bazel's test
// directory does not.
std::string TempSocketPath(absl::string_view name) {
  return absl::StrCat("/tmp/kvcache-", name, ".", getpid(), ".sock");
}

// A memfd holding `contents`, as the daemon's CPU tier would.
class Memfd {
 public:
  explicit Memfd(const std::string& contents)
      : fd_(memfd_create("shared-region-test", MFD_CLOEXEC)) {
    EXPECT_GE(fd_, 0);
    EXPECT_EQ(write(fd_, contents.data(), contents.size()),
              static_cast<ssize_t>(contents.size()));
  }
  ~Memfd() { close(fd_); }
  int fd() const { return fd_; }

 private:
  const int fd_;
};

TEST(SharedRegionTest, WorkerSeesTheNodesBytesReadOnly) {
  std::string contents(3 * 4096, '\0');
  for (size_t i = 0; i < contents.size(); ++i) contents[i] = char(i * 7);
  Memfd region(contents);
  const std::string path = TempSocketPath("region");
  absl::StatusOr<std::unique_ptr<SharedRegionServer>> server =
      SharedRegionServer::Start(path, region.fd(), contents.size(), "r-1");
  ASSERT_TRUE(server.ok()) << server.status();

  absl::StatusOr<std::unique_ptr<SharedRegion>> mapped =
      SharedRegion::Connect(path);
  ASSERT_TRUE(mapped.ok()) << mapped.status();
  EXPECT_EQ((*mapped)->id(), "r-1");
  EXPECT_EQ((*mapped)->size(), contents.size());
  absl::StatusOr<absl::string_view> view = (*mapped)->View(4000, 5000);
  ASSERT_TRUE(view.ok()) << view.status();
  EXPECT_EQ(*view, absl::string_view(contents).substr(4000, 5000));

  // The node's later writes show through the mapping: it is the same memory.
  ASSERT_EQ(pwrite(region.fd(), "fresh", 5, 100), 5);
  EXPECT_EQ(std::string((*mapped)->base() + 100, 5), "fresh");

  // The descriptor handed out is read-only, so the mapping cannot be made
  // writable.
  EXPECT_NE(mprotect(const_cast<char*>((*mapped)->base()), 4096,
                     PROT_READ | PROT_WRITE),
            0);
  EXPECT_EQ(errno, EACCES);
}

TEST(SharedRegionTest, OnlyThisUserMayConnectByDefault) {
  Memfd region(std::string(4096, 'x'));
  const std::string path = TempSocketPath("mode");
  absl::StatusOr<std::unique_ptr<SharedRegionServer>> server =
      SharedRegionServer::Start(path, region.fd(), 4096, "r-mode");
  ASSERT_TRUE(server.ok()) << server.status();
  struct stat socket_file;
  ASSERT_EQ(stat(path.c_str(), &socket_file), 0);
  EXPECT_EQ(socket_file.st_mode & 0777, 0600u);
  EXPECT_TRUE(SharedRegion::Connect(path).ok());
}

TEST(SharedRegionTest, UsersNotAllowedGetNothing) {
  Memfd region(std::string(4096, 'x'));
  const std::string path = TempSocketPath("uids");
  // Some other user only: this process's own connection is refused.
  absl::StatusOr<std::unique_ptr<SharedRegionServer>> server =
      SharedRegionServer::Start(path, region.fd(), 4096, "r-uids",
                                {geteuid() + 4242});
  ASSERT_TRUE(server.ok()) << server.status();
  absl::StatusOr<std::unique_ptr<SharedRegion>> mapped =
      SharedRegion::Connect(path);
  ASSERT_FALSE(mapped.ok());
  EXPECT_EQ(mapped.status().code(), absl::StatusCode::kPermissionDenied)
      << mapped.status();
  EXPECT_NE(mapped.status().message().find("shared_memory.allowed_uids"),
            std::string::npos);
  EXPECT_EQ((*server)->refused_connections(), 1u);
}

TEST(SharedRegionTest, ExtentsOutsideTheRegionAreRejected) {
  Memfd region(std::string(8192, 'x'));
  const std::string path = TempSocketPath("bounds");
  auto server = SharedRegionServer::Start(path, region.fd(), 8192, "r-2");
  ASSERT_TRUE(server.ok()) << server.status();
  auto mapped = SharedRegion::Connect(path);
  ASSERT_TRUE(mapped.ok()) << mapped.status();
  EXPECT_TRUE((*mapped)->View(8192, 0).ok());
  EXPECT_EQ((*mapped)->View(8192, 1).status().code(),
            absl::StatusCode::kOutOfRange);
  EXPECT_EQ((*mapped)->View(1, UINT64_MAX).status().code(),
            absl::StatusCode::kOutOfRange);
  EXPECT_EQ((*mapped)->View(UINT64_MAX, 2).status().code(),
            absl::StatusCode::kOutOfRange);
}

TEST(SharedRegionTest, MappingOutlivesTheServerAndItsSocket) {
  Memfd region(std::string(4096, 'k'));
  const std::string path = TempSocketPath("outlive");
  auto server = SharedRegionServer::Start(path, region.fd(), 4096, "r-3");
  ASSERT_TRUE(server.ok()) << server.status();
  auto mapped = SharedRegion::Connect(path);
  ASSERT_TRUE(mapped.ok()) << mapped.status();
  server->reset();
  EXPECT_NE(access(path.c_str(), F_OK), 0) << "socket file left behind";
  EXPECT_EQ((*mapped)->base()[4095], 'k');
  EXPECT_EQ(SharedRegion::Connect(path).status().code(),
            absl::StatusCode::kUnavailable);
}

TEST(SharedRegionTest, ReplacesAStaleSocketFile) {
  Memfd region(std::string(4096, 's'));
  const std::string path = TempSocketPath("stale");
  {
    auto first = SharedRegionServer::Start(path, region.fd(), 4096, "old");
    ASSERT_TRUE(first.ok()) << first.status();
    // A node killed with SIGKILL leaves its socket file: simulate it.
    ASSERT_EQ(link(path.c_str(), (path + ".keep").c_str()), 0);
  }
  ASSERT_EQ(rename((path + ".keep").c_str(), path.c_str()), 0);
  auto second = SharedRegionServer::Start(path, region.fd(), 4096, "new");
  ASSERT_TRUE(second.ok()) << second.status();
  auto mapped = SharedRegion::Connect(path);
  ASSERT_TRUE(mapped.ok()) << mapped.status();
  EXPECT_EQ((*mapped)->id(), "new");
}

TEST(SharedRegionTest, NoServerIsUnavailable) {
  EXPECT_EQ(SharedRegion::Connect(TempSocketPath("nobody")).status().code(),
            absl::StatusCode::kUnavailable);
  EXPECT_EQ(SharedRegion::Connect("").status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(SharedRegionTest, SomethingElseOnTheSocketIsRejected) {
  const std::string path = TempSocketPath("imposter");
  const int listener = socket(AF_UNIX, SOCK_STREAM, 0);
  sockaddr_un address{};
  address.sun_family = AF_UNIX;
  std::strcpy(address.sun_path, path.c_str());
  unlink(path.c_str());
  ASSERT_EQ(
      bind(listener, reinterpret_cast<sockaddr*>(&address), sizeof(address)),
      0);
  ASSERT_EQ(listen(listener, 1), 0);
  std::thread imposter([listener] {
    const int connection = accept(listener, nullptr, nullptr);
    const char reply[] = "HTTP/1.1 200 OK\r\n\r\n";
    EXPECT_GT(write(connection, reply, sizeof(reply)), 0);
    close(connection);
  });
  EXPECT_EQ(SharedRegion::Connect(path).status().code(),
            absl::StatusCode::kDataLoss);
  imposter.join();
  close(listener);
  unlink(path.c_str());
}

}  // namespace
}  // namespace kvcache::transfer
