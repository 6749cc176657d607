// libFuzzer entry point for what etcd answers, which a node and a cluster
// client read and must survive whatever it is (a broken etcd, a proxy in the
// way, records other software wrote). Built and run by
// tests/fuzz/run_fuzz.sh etcd_reply.
//
// The first byte picks a mode, the rest is the answer:
//   below 0x80: the rest is a reply body, read by every reply parser and, as
//     a range, its values as node records (what a membership refresh does);
//   0x80 and up: the rest is a raw HTTP response, sent by a fake etcd on
//     loopback to one EtcdClient call (the byte's low bits pick which), so
//     the HTTP reader (status line, headers, chunked bodies) is fuzzed too.
// Beyond not crashing: an error reply is never OK, a granted lease has an id,
// and a node record that parses prints and parses back the same.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "cluster/etcd_client.h"
#include "cluster/membership.h"

namespace kvcache::cluster {
namespace {

// Answers each connection on a loopback port with the raw bytes last set,
// after reading the request whole (closing on unread bytes would reset the
// connection before the client reads the answer). Lives as long as the
// process.
class FakeEtcd {
 public:
  FakeEtcd() {
    listener_ = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t len = sizeof(addr);
    if (listener_ < 0 ||
        bind(listener_, reinterpret_cast<sockaddr*>(&addr), len) != 0 ||
        listen(listener_, 16) != 0 ||
        getsockname(listener_, reinterpret_cast<sockaddr*>(&addr), &len) != 0) {
      std::abort();
    }
    endpoint_ = absl::StrCat("127.0.0.1:", ntohs(addr.sin_port));
    std::thread([this] { Serve(); }).detach();
  }

  const std::string& endpoint() const { return endpoint_; }

  void set_answer(std::string answer) {
    absl::MutexLock lock(&mu_);
    answer_ = std::move(answer);
  }

 private:
  void Serve() {
    while (true) {
      const int conn = accept4(listener_, nullptr, nullptr, SOCK_CLOEXEC);
      if (conn < 0) continue;
      ReadRequest(conn);
      std::string answer;
      {
        absl::MutexLock lock(&mu_);
        answer = answer_;
      }
      for (size_t sent = 0; sent < answer.size();) {
        const ssize_t n = send(conn, answer.data() + sent, answer.size() - sent,
                               MSG_NOSIGNAL);
        if (n <= 0) break;
        sent += n;
      }
      close(conn);
    }
  }

  // Reads the headers, then as many body bytes as Content-Length says.
  static void ReadRequest(int conn) {
    std::string request;
    char buffer[4096];
    size_t want = std::string::npos;
    while (request.size() < want) {
      const ssize_t n = recv(conn, buffer, sizeof(buffer), 0);
      if (n <= 0) return;
      request.append(buffer, n);
      const size_t head_end = request.find("\r\n\r\n");
      const size_t field = request.find("Content-Length: ");
      if (head_end == std::string::npos || field == std::string::npos) {
        continue;
      }
      const size_t value = field + 16;
      size_t length = 0;
      if (!absl::SimpleAtoi(
              request.substr(value, request.find("\r\n", value) - value),
              &length)) {
        return;
      }
      want = head_end + 4 + length;
    }
  }

  int listener_ = -1;
  std::string endpoint_;
  absl::Mutex mu_;
  std::string answer_ ABSL_GUARDED_BY(mu_);
};

// What a membership refresh does with a range's values.
void ReadNodeRecords(const std::vector<KeyValue>& kvs) {
  for (const KeyValue& kv : kvs) {
    absl::StatusOr<NodeRecord> record = NodeRecord::FromJson(kv.value);
    if (!record.ok()) continue;
    absl::StatusOr<NodeRecord> again = NodeRecord::FromJson(record->ToJson());
    if (!again.ok() || !(*again == *record)) std::abort();
  }
}

void ParseBody(absl::string_view body) {
  absl::StatusOr<int64_t> lease = ParseLeaseGrantReply(body);
  if (lease.ok() && *lease == 0) std::abort();
  (void)ParseKeepAliveReply(body, 1);
  int skipped = 0;
  absl::StatusOr<std::vector<KeyValue>> kvs = ParseRangeReply(body, &skipped);
  if (kvs.ok()) ReadNodeRecords(*kvs);
  if (ParseErrorReply(500, body).ok()) std::abort();
}

void CallFakeEtcd(uint8_t call, absl::string_view answer) {
  static FakeEtcd* const etcd = new FakeEtcd;
  etcd->set_answer(std::string(answer));
  // The answer is all there at once, so a slow reply is a stuck reader.
  EtcdClient client(EtcdOptions{{etcd->endpoint()}, absl::Seconds(5)});
  switch (call % 5) {
    case 0: {
      absl::StatusOr<int64_t> lease = client.GrantLease(absl::Seconds(10));
      if (lease.ok() && *lease == 0) std::abort();
      break;
    }
    case 1:
      (void)client.KeepAlive(7);
      break;
    case 2:
      (void)client.RevokeLease(7);
      break;
    case 3:
      (void)client.Put("/kvcache/c/nodes/a", "{}", 7);
      break;
    default: {
      absl::StatusOr<std::vector<KeyValue>> kvs =
          client.RangePrefix("/kvcache/c/nodes/");
      if (kvs.ok()) ReadNodeRecords(*kvs);
      break;
    }
  }
}

}  // namespace
}  // namespace kvcache::cluster

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size == 0) return 0;
  const absl::string_view rest(reinterpret_cast<const char*>(data) + 1,
                               size - 1);
  if (data[0] < 0x80) {
    kvcache::cluster::ParseBody(rest);
  } else {
    kvcache::cluster::CallFakeEtcd(data[0] & 0x7f, rest);
  }
  return 0;
}
