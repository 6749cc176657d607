// Starts a real kvcached binary on a free port (of loopback, or of another
// address, in another network namespace if asked) and stops it again, so
// whole-system tests and benchmarks talk to the daemon exactly as workers
// do. Also runs the other programs they compare with (redis-server, fio).
#ifndef KVCACHE_TESTS_TESTING_DAEMON_PROCESS_H_
#define KVCACHE_TESTS_TESTING_DAEMON_PROCESS_H_

#include <sys/types.h>

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"

namespace kvcache::testing {

struct StartOptions {
  // The address kvcached listens on (with a free port) and is reached at.
  std::string host = "127.0.0.1";
  // A network namespace by name (under /run/netns, as `ip netns add` makes
  // it) to run the process in; empty: the caller's.
  std::string network_namespace;
};

class DaemonProcess {
 public:
  // Starts `binary` (a path relative to the test's working directory, e.g.
  // "kvstore/kvcached") with `--listen=HOST:0` plus `args`, and waits until
  // it reports its port. Its stderr goes to the test log.
  static absl::StatusOr<DaemonProcess> Start(
      const std::string& binary, const std::vector<std::string>& args,
      const StartOptions& options = {});

  // Starts `binary` with exactly `args` (in `network_namespace` if not
  // empty) and returns at once, for programs that are not kvcached; the
  // caller knows when they are ready. address() is empty.
  static absl::StatusOr<DaemonProcess> Spawn(
      const std::string& binary, const std::vector<std::string>& args,
      const std::string& network_namespace = "");

  DaemonProcess(DaemonProcess&& other) noexcept;
  DaemonProcess& operator=(DaemonProcess&&) = delete;
  // Kills the daemon (SIGKILL) if it is still running.
  ~DaemonProcess();

  // "HOST:PORT".
  const std::string& address() const { return address_; }
  pid_t pid() const { return pid_; }

  void Signal(int signal_number) const;

  // Waits for the daemon to exit; returns its exit code, or
  // DEADLINE_EXCEEDED if it is still running after `timeout`.
  absl::StatusOr<int> WaitForExit(absl::Duration timeout);

 private:
  DaemonProcess(pid_t pid, std::string address)
      : pid_(pid), address_(std::move(address)) {}

  // Called once the process has exited: removes the shared-memory socket
  // that a killed daemon leaves behind.
  void RemoveLeftovers();

  pid_t pid_ = -1;
  std::string address_;
  // The daemon's default shared-memory socket, /tmp/kvcached-PORT.sock.
  std::string socket_path_;
};

// A numeric field of /proc/PID/status, in its own unit ("VmRSS" in kB,
// "Threads"); none once the process is gone.
std::optional<uint64_t> ProcStatusField(pid_t pid, absl::string_view field);

// A TCP port of `host` (an IPv4 address) nothing listens on right now, for
// servers that need their port up front.
int FreePort(const std::string& host);
inline int FreeLoopbackPort() { return FreePort("127.0.0.1"); }

}  // namespace kvcache::testing

#endif  // KVCACHE_TESTS_TESTING_DAEMON_PROCESS_H_
