#include "tests/testing/network_namespace.h"

#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstdio>
#include <cstring>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/strip.h"

namespace kvcache::testing {
namespace {

constexpr char kIp[] = "/sbin/ip";
// The namespace's end of the link; device names are per namespace.
constexpr char kDevice[] = "eth0";
// The /30 subnets of 10.77.0.0/16.
constexpr int kSubnets = 1 << 14;

// Runs `ip ARGS`; returns its output, or an error quoting it.
absl::StatusOr<std::string> Ip(const std::string& args) {
  const std::string command = absl::StrCat(kIp, " ", args, " 2>&1");
  FILE* pipe = popen(command.c_str(), "r");
  if (pipe == nullptr) {
    return absl::InternalError(
        absl::StrCat("cannot run ", command, ": ", std::strerror(errno)));
  }
  std::string out;
  char buffer[4096];
  while (size_t n = fread(buffer, 1, sizeof(buffer), pipe)) {
    out.append(buffer, n);
  }
  const int status = pclose(pipe);
  if (status != 0) {
    return absl::InternalError(
        absl::StrCat("`", kIp, " ", args, "` failed (exit status ",
                     WIFEXITED(status) ? WEXITSTATUS(status) : status,
                     "): ", absl::StripTrailingAsciiWhitespace(out)));
  }
  return out;
}

// Address `host` (1 or 2) of /30 subnet `subnet` of 10.77.0.0/16.
std::string SubnetAddress(int subnet, int host) {
  return absl::StrCat("10.77.", subnet / 64, ".", subnet % 64 * 4 + host);
}

}  // namespace

absl::StatusOr<std::unique_ptr<NetworkNamespace>> NetworkNamespace::Create() {
  static std::atomic<int> created{0};
  const int n = created++;
  std::unique_ptr<NetworkNamespace> ns(new NetworkNamespace);
  // Named after the process, so that test runs side by side do not collide.
  ns->name_ = absl::StrCat("kvcache-", getpid(), "-", n);
  ns->host_device_ = absl::StrCat("kvc", getpid(), "-", n);  // <= 15 chars

  // Another namespace's link shows as an address of this side.
  const absl::StatusOr<std::string> used = Ip("-4 -o addr show");
  if (!used.ok()) return used.status();
  int subnet = (getpid() * 4 + n) % kSubnets;
  for (int tried = 0; absl::StrContains(
           *used, absl::StrCat(" ", SubnetAddress(subnet, 1), "/"));
       ++tried) {
    if (tried == kSubnets) {
      return absl::ResourceExhaustedError("every subnet of 10.77.0.0/16 used");
    }
    subnet = (subnet + 1) % kSubnets;
  }
  ns->host_address_ = SubnetAddress(subnet, 1);
  ns->address_ = SubnetAddress(subnet, 2);

  // On failure the destructor removes whatever was made.
  for (const std::string& args : {
           absl::StrCat("netns add ", ns->name_),
           absl::StrCat("link add ", ns->host_device_, " type veth peer name ",
                        kDevice, " netns ", ns->name_),
           absl::StrCat("addr add ", ns->host_address_, "/30 dev ",
                        ns->host_device_),
           absl::StrCat("link set ", ns->host_device_, " up"),
           absl::StrCat("-n ", ns->name_, " addr add ", ns->address_,
                        "/30 dev ", kDevice),
           absl::StrCat("-n ", ns->name_, " link set ", kDevice, " up"),
       }) {
    if (absl::StatusOr<std::string> s = Ip(args); !s.ok()) return s.status();
  }
  return ns;
}

NetworkNamespace::~NetworkNamespace() {
  // Deleting one end deletes both, even while a process in the namespace
  // keeps the namespace itself alive.
  Ip(absl::StrCat("link del ", host_device_)).IgnoreError();
  Ip(absl::StrCat("netns del ", name_)).IgnoreError();
}

absl::Status NetworkNamespace::Cut() {
  return Ip(absl::StrCat("-n ", name_, " link set ", kDevice, " down"))
      .status();
}

absl::Status NetworkNamespace::Restore() {
  return Ip(absl::StrCat("-n ", name_, " link set ", kDevice, " up")).status();
}

}  // namespace kvcache::testing
