// libFuzzer entry point for the local lookup socket's request handling: each
// input is sent as raw bytes, then end of stream, over a Unix socket to a
// LocalLookupServer running in this process, which any process of an
// allowed user can do. Built and run by tests/fuzz/run_fuzz.sh local_lookup.
//
// Beyond not crashing, the server's promises: it greets, then answers each
// well-formed request with a count no larger than the request's keys (here
// exactly the leading keys whose first byte is even) and closes the
// connection at the first malformed one, within a deadline.
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "transfer/local_lookup.h"
#include "transfer/unix_socket.h"

namespace kvcache::transfer {
namespace {

constexpr absl::Duration kAnswerDeadline = absl::Seconds(4);
constexpr size_t kGreetingBytes = 4 + 1 + 4;  // "KVLK", length, "fuzz"

[[noreturn]] void Fail(const char* why) {
  std::fprintf(stderr, "local lookup fuzzer: %s\n", why);
  std::abort();
}

const std::string& SocketPath() {
  static const std::string path =
      absl::StrCat("/tmp/kvcache-lookup-fuzz-", getpid(), ".sock");
  return path;
}

// A key is held when its first byte is even.
size_t CountHeld(absl::Span<const absl::string_view> keys) {
  size_t n = 0;
  while (n < keys.size() && keys[n][0] % 2 == 0) ++n;
  return n;
}

void StartServer() {
  static LocalLookupServer* const server = [] {
    absl::StatusOr<std::unique_ptr<LocalLookupServer>> started =
        LocalLookupServer::Start(SocketPath(), "fuzz", CountHeld);
    if (!started.ok()) Fail("cannot start the server");
    return started->release();
  }();
  (void)server;
}

// What the server must answer to `input`: a count for each whole,
// well-formed request before the first malformed or partial one.
std::string Expected(absl::string_view input) {
  std::string answers;
  while (input.size() >= 8) {
    uint32_t n;
    std::memcpy(&n, input.data() + 4, 4);
    if (input.substr(0, 4) != "KVLQ" || n < 1 || n > kMaxLocalLookupKeys ||
        input.size() < 8 + size_t{n} * 32) {
      break;
    }
    uint32_t held = 0;
    while (held < n && input[8 + size_t{held} * 32] % 2 == 0) ++held;
    answers.append(reinterpret_cast<const char*>(&held), 4);
    input.remove_prefix(8 + size_t{n} * 32);
  }
  return answers;
}

// Sends `input`, ends the stream, and returns everything the server sent
// after its greeting before closing.
std::string Exchange(absl::string_view input) {
  absl::StatusOr<int> fd = ConnectUnix(SocketPath());
  if (!fd.ok()) Fail("cannot connect");
  // The server may close before reading everything; a send that fails then
  // is expected.
  for (size_t sent = 0; sent < input.size();) {
    const ssize_t n =
        send(*fd, input.data() + sent, input.size() - sent, MSG_NOSIGNAL);
    if (n <= 0) break;
    sent += n;
  }
  shutdown(*fd, SHUT_WR);
  std::string received;
  const absl::Time deadline = absl::Now() + kAnswerDeadline;
  char buffer[4096];
  while (true) {
    const int64_t left = absl::ToInt64Milliseconds(deadline - absl::Now());
    pollfd p = {*fd, POLLIN, 0};
    if (left <= 0 || poll(&p, 1, static_cast<int>(left)) <= 0) {
      Fail("the connection is still open past the deadline");
    }
    const ssize_t n = recv(*fd, buffer, sizeof(buffer), 0);
    if (n <= 0) break;  // closed (or reset with our bytes unread)
    received.append(buffer, n);
  }
  close(*fd);
  if (received.size() < kGreetingBytes ||
      received.compare(0, kGreetingBytes,
                       std::string("KVLK\x04"
                                   "fuzz",
                                   9)) != 0) {
    Fail("no greeting");
  }
  return received.substr(kGreetingBytes);
}

}  // namespace
}  // namespace kvcache::transfer

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace kvcache::transfer;
  StartServer();
  const absl::string_view input(reinterpret_cast<const char*>(data), size);
  const std::string answers = Exchange(input);
  const std::string expected = Expected(input);
  // A reset can cut the answers short, never change them.
  if (answers.size() > expected.size() ||
      expected.compare(0, answers.size(), answers) != 0) {
    Fail("answers differ from the requests' counts");
  }
  return 0;
}
