#include "tests/testing/daemon_process.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <sched.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <fstream>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"

namespace kvcache::testing {
namespace {

std::string TempDir() {
  const char* dir = getenv("TEST_TMPDIR");
  return dir ? dir : "/tmp";
}

}  // namespace

absl::StatusOr<DaemonProcess> DaemonProcess::Spawn(
    const std::string& binary, const std::vector<std::string>& args,
    const std::string& network_namespace) {
  std::vector<std::string> argv_strings = {binary};
  argv_strings.insert(argv_strings.end(), args.begin(), args.end());
  std::vector<char*> argv;
  for (std::string& s : argv_strings) argv.push_back(s.data());
  argv.push_back(nullptr);

  int netns_fd = -1;
  if (!network_namespace.empty()) {
    const std::string path = "/run/netns/" + network_namespace;
    netns_fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (netns_fd < 0) {
      return absl::NotFoundError(
          absl::StrCat("network namespace ", path, ": ", std::strerror(errno)));
    }
  }
  // Made before fork: the child of a threaded process must not allocate.
  const std::string setns_error = "setns " + network_namespace;
  const std::string exec_error = "exec " + binary;
  const pid_t parent = getpid();
  const pid_t pid = fork();
  if (pid == 0) {
    // A test or benchmark that dies (a failed check, exit()) takes its
    // processes with it: left running, they would hold its ports and the
    // pipe its output goes to. (The signal comes when the forking thread
    // ends; every caller starts its processes from a thread that lives as
    // long as they should.)
    if (prctl(PR_SET_PDEATHSIG, SIGKILL) != 0 || getppid() != parent) {
      _exit(127);
    }
    if (netns_fd >= 0 && setns(netns_fd, CLONE_NEWNET) != 0) {
      std::perror(setns_error.c_str());
      _exit(127);
    }
    execv(binary.c_str(), argv.data());
    std::perror(exec_error.c_str());
    _exit(127);
  }
  if (netns_fd >= 0) close(netns_fd);
  if (pid < 0) return absl::InternalError("fork failed");
  return DaemonProcess(pid, "");
}

absl::StatusOr<DaemonProcess> DaemonProcess::Start(
    const std::string& binary, const std::vector<std::string>& args,
    const StartOptions& options) {
  static int started = 0;
  const std::string port_file =
      absl::StrCat(TempDir(), "/kvcached-", getpid(), "-", started++, ".port");
  std::remove(port_file.c_str());

  std::vector<std::string> daemon_args = {
      absl::StrCat("--listen=", options.host, ":0"),
      "--port_file=" + port_file};
  daemon_args.insert(daemon_args.end(), args.begin(), args.end());
  absl::StatusOr<DaemonProcess> daemon =
      Spawn(binary, daemon_args, options.network_namespace);
  if (!daemon.ok()) return daemon.status();

  const absl::Time deadline = absl::Now() + absl::Seconds(20);
  while (absl::Now() < deadline) {
    int port = 0;
    if (std::ifstream(port_file) >> port && port > 0) {
      daemon->address_ = absl::StrCat(options.host, ":", port);
      daemon->socket_path_ = absl::StrCat("/tmp/kvcached-", port, ".sock");
      std::remove(port_file.c_str());
      return daemon;
    }
    int status = 0;
    if (waitpid(daemon->pid_, &status, WNOHANG) == daemon->pid_) {
      daemon->pid_ = -1;
      return absl::InternalError(
          absl::StrCat(binary, " exited during start-up with status ", status));
    }
    absl::SleepFor(absl::Milliseconds(20));
  }
  return absl::DeadlineExceededError(
      absl::StrCat(binary, " did not report a port within 20s"));
}

DaemonProcess::DaemonProcess(DaemonProcess&& other) noexcept
    : pid_(other.pid_),
      address_(std::move(other.address_)),
      socket_path_(std::move(other.socket_path_)) {
  other.pid_ = -1;
}

DaemonProcess::~DaemonProcess() {
  if (pid_ > 0) {
    kill(pid_, SIGKILL);
    waitpid(pid_, nullptr, 0);
    RemoveLeftovers();
  }
}

void DaemonProcess::RemoveLeftovers() {
  if (!socket_path_.empty()) std::remove(socket_path_.c_str());
}

void DaemonProcess::Signal(int signal_number) const {
  if (pid_ > 0) kill(pid_, signal_number);
}

absl::StatusOr<int> DaemonProcess::WaitForExit(absl::Duration timeout) {
  const absl::Time deadline = absl::Now() + timeout;
  while (pid_ > 0) {
    int status = 0;
    if (waitpid(pid_, &status, WNOHANG) == pid_) {
      pid_ = -1;
      RemoveLeftovers();
      return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
    }
    if (absl::Now() > deadline) {
      return absl::DeadlineExceededError("daemon still running");
    }
    absl::SleepFor(absl::Milliseconds(20));
  }
  return absl::FailedPreconditionError("daemon not running");
}

std::optional<uint64_t> ProcStatusField(pid_t pid, absl::string_view field) {
  std::ifstream status(absl::StrCat("/proc/", pid, "/status"));
  const std::string prefix = absl::StrCat(field, ":");
  std::string line;
  while (std::getline(status, line)) {
    if (!absl::StartsWith(line, prefix)) continue;
    uint64_t value = 0;
    absl::string_view number = absl::StripAsciiWhitespace(
        absl::string_view(line).substr(prefix.size()));
    number = number.substr(0, number.find(" kB"));
    if (!absl::SimpleAtoi(number, &value)) return std::nullopt;
    return value;
  }
  return std::nullopt;
}

int FreePort(const std::string& host) {
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  inet_pton(AF_INET, host.c_str(), &addr.sin_addr);
  bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr));
  socklen_t len = sizeof(addr);
  getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len);
  close(fd);
  return ntohs(addr.sin_port);
}

}  // namespace kvcache::testing
