// A real kvcached on loopback against clients that try to grow it without
// bound: Puts that stall mid-chunk, Gets that stop reading, hundreds of
// streams that send only a header, large Puts held open by many clients.
// Each test checks the node refuses or cancels what is over its limits with
// a clear status, stays within its resident-memory and thread bounds, and
// serves everyone else meanwhile.
#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>

#include <cstdio>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "client/chunk_key.h"
#include "client/kvcache_client.h"
#include "codec/crc32c.h"
#include "kvcache/v1/kvcache.grpc.pb.h"
#include "tests/testing/daemon_process.h"
#include "tests/testing/own_connection.h"

namespace kvcache {
namespace {

using ::kvcache::testing::DaemonProcess;

constexpr char kDaemon[] = "kvstore/kvcached";
constexpr uint64_t kMiB = 1 << 20;

// A field of the daemon's /proc/PID/status, which must have it.
uint64_t ProcStatus(pid_t pid, const std::string& field) {
  const std::optional<uint64_t> value = testing::ProcStatusField(pid, field);
  EXPECT_TRUE(value.has_value()) << "no " << field << " for pid " << pid;
  return value.value_or(0);
}

uint64_t ResidentBytes(pid_t pid) { return ProcStatus(pid, "VmRSS") * 1024; }
uint64_t Threads(pid_t pid) { return ProcStatus(pid, "Threads"); }

std::unique_ptr<v1::KvCache::Stub> OwnConnection(const DaemonProcess& daemon) {
  return v1::KvCache::NewStub(testing::OwnConnection(daemon.address()));
}

std::string KeyOf(int i) {
  return std::string(ContentKey(absl::StrCat("limits-", i)).AsBytes());
}

v1::PutRequest Header(const std::string& key, uint64_t size, uint32_t crc) {
  v1::PutRequest request;
  request.mutable_header()->set_key(key);
  request.mutable_header()->set_size_bytes(size);
  request.mutable_header()->set_crc32c(crc);
  return request;
}

v1::PutRequest Data(const std::string& bytes) {
  v1::PutRequest request;
  request.set_data(bytes);
  return request;
}

// A Put stream held open: a header, some of the data, then nothing.
struct StalledPut {
  grpc::ClientContext context;
  v1::PutResponse response;
  std::unique_ptr<grpc::ClientWriter<v1::PutRequest>> writer;
};

std::unique_ptr<StalledPut> StartStalledPut(v1::KvCache::Stub& stub,
                                            const std::string& key,
                                            uint64_t declared, uint64_t sent) {
  auto put = std::make_unique<StalledPut>();
  put->writer = stub.Put(&put->context, &put->response);
  if (!put->writer->Write(Header(key, declared, 0))) return put;
  const std::string piece(kMiB, 'x');
  for (uint64_t done = 0; done < sent; done += piece.size()) {
    if (!put->writer->Write(Data(piece))) break;
  }
  return put;
}

// Ends a stalled Put: status RESOURCE_EXHAUSTED if the node refused it,
// INVALID_ARGUMENT (a chunk cut short) if it was held.
grpc::StatusCode EndStalledPut(StalledPut& put) {
  put.writer->WritesDone();
  return put.writer->Finish().error_code();
}

// A whole chunk in one stream; the status the node answered.
grpc::Status PutChunk(v1::KvCache::Stub& stub, const std::string& key,
                      const std::string& bytes) {
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() +
                       std::chrono::seconds(30));
  v1::PutResponse response;
  auto writer = stub.Put(&context, &response);
  writer->Write(Header(key, bytes.size(), codec::Crc32c(bytes)));
  for (size_t at = 0; at < bytes.size(); at += kMiB) {
    if (!writer->Write(Data(bytes.substr(at, kMiB)))) break;
  }
  writer->WritesDone();
  return writer->Finish();
}

absl::StatusOr<DaemonProcess> StartDaemon(const std::string& limits) {
  return DaemonProcess::Start(kDaemon,
                              {"--set=cpu_tier { capacity_bytes: 268435456 }",
                               absl::StrCat("--set=limits { ", limits, " }")});
}

TEST(LimitsTest, StalledPutIsCancelledAndFreesItsShareOfTheBudget) {
  auto daemon = StartDaemon(
      "max_chunk_bytes: 67108864 max_put_bytes_in_flight: 67108864 "
      "stream_idle_timeout_seconds: 1");
  ASSERT_TRUE(daemon.ok()) << daemon.status();
  auto stalling = OwnConnection(*daemon);
  auto other = OwnConnection(*daemon);

  // Declares the whole budget, sends 8 MiB of it, then stalls.
  std::unique_ptr<StalledPut> stalled =
      StartStalledPut(*stalling, KeyOf(1), 64 * kMiB, 8 * kMiB);
  absl::SleepFor(absl::Milliseconds(300));
  const std::string chunk(kMiB, 'y');
  grpc::Status refused = PutChunk(*other, KeyOf(2), chunk);
  EXPECT_EQ(refused.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED)
      << refused.error_message();
  EXPECT_NE(refused.error_message().find("max_put_bytes_in_flight"),
            std::string::npos)
      << refused.error_message();

  // Within 1-1.25 s of stalling the node cancels the stream...
  absl::SleepFor(absl::Milliseconds(1700));
  const grpc::Status cancelled = stalled->writer->Finish();
  EXPECT_EQ(cancelled.error_code(), grpc::StatusCode::CANCELLED)
      << cancelled.error_message();
  // ...and the budget it held serves the next Put.
  EXPECT_TRUE(PutChunk(*other, KeyOf(2), chunk).ok());
}

TEST(LimitsTest, PutDeclaringMoreThanTheBudgetIsRefusedBeforeAnyData) {
  auto daemon = StartDaemon(
      "max_chunk_bytes: 33554432 max_put_bytes_in_flight: 33554432");
  ASSERT_TRUE(daemon.ok()) << daemon.status();
  auto first = OwnConnection(*daemon);
  auto second = OwnConnection(*daemon);
  std::unique_ptr<StalledPut> holding =
      StartStalledPut(*first, KeyOf(3), 20 * kMiB, 0);
  absl::SleepFor(absl::Milliseconds(200));
  // The header alone is refused: the node buffers nothing for it.
  grpc::ClientContext context;
  v1::PutResponse response;
  auto writer = second->Put(&context, &response);
  writer->Write(Header(KeyOf(4), 20 * kMiB, 0));
  writer->WritesDone();
  const grpc::Status s = writer->Finish();
  EXPECT_EQ(s.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED)
      << s.error_message();
  holding->context.TryCancel();
  holding->writer->Finish();
}

TEST(LimitsTest, GetWhoseClientStopsReadingIsCancelled) {
  auto daemon =
      StartDaemon("max_chunk_bytes: 67108864 stream_idle_timeout_seconds: 1");
  ASSERT_TRUE(daemon.ok()) << daemon.status();
  auto stub = OwnConnection(*daemon);
  const std::string chunk(64 * kMiB, 'z');
  ASSERT_TRUE(PutChunk(*stub, KeyOf(5), chunk).ok());

  grpc::ClientContext context;
  v1::GetRequest request;
  request.add_keys(KeyOf(5));
  auto reader = stub->Get(&context, request);
  v1::GetResponse message;
  ASSERT_TRUE(reader->Read(&message));  // the header; then stop reading
  absl::SleepFor(absl::Milliseconds(2500));
  uint64_t received = 0;
  while (reader->Read(&message)) received += message.data().size();
  const grpc::Status s = reader->Finish();
  EXPECT_EQ(s.error_code(), grpc::StatusCode::CANCELLED) << s.error_message();
  // Only what flow control let through before the stall arrived.
  EXPECT_LT(received, chunk.size());
}

TEST(LimitsTest, HeaderOnlyStreamsCannotMultiplyThreads) {
  auto daemon =
      StartDaemon("max_concurrent_calls: 32 stream_idle_timeout_seconds: 30");
  ASSERT_TRUE(daemon.ok()) << daemon.status();
  const uint64_t threads_before = Threads(daemon->pid());

  // 300 streams over 10 connections, each sending one header and nothing
  // more (without limits: a thread each).
  std::vector<std::unique_ptr<v1::KvCache::Stub>> connections;
  for (int c = 0; c < 10; ++c) connections.push_back(OwnConnection(*daemon));
  std::vector<std::unique_ptr<StalledPut>> streams;
  for (int i = 0; i < 300; ++i) {
    streams.push_back(
        StartStalledPut(*connections[i % 10], KeyOf(100 + i), kMiB, 0));
  }
  absl::SleepFor(absl::Seconds(1));
  const uint64_t threads_during = Threads(daemon->pid());
  std::fprintf(stderr, "threads: %llu before, %llu with 300 streams open\n",
               static_cast<unsigned long long>(threads_before),
               static_cast<unsigned long long>(threads_during));
  EXPECT_LE(threads_during, threads_before + 40)
      << "before " << threads_before << ", during " << threads_during;

  // The node refused the calls it had no thread for; the others are held.
  int refused = 0;
  for (auto& stream : streams) {
    const grpc::StatusCode code = EndStalledPut(*stream);
    if (code == grpc::StatusCode::RESOURCE_EXHAUSTED) ++refused;
  }
  EXPECT_GT(refused, 0);
  // Once they are gone, it serves again.
  absl::SleepFor(absl::Milliseconds(500));
  auto fresh = OwnConnection(*daemon);
  EXPECT_TRUE(PutChunk(*fresh, KeyOf(99), std::string(4096, 'a')).ok());
}

// The scenario that once took a node with a 64 MiB tier from 49 MB to
// 825 MB resident: eight clients each holding a 64 MiB Put open.
TEST(LimitsTest, LargePutsHeldOpenStayWithinTheBudget) {
  constexpr uint64_t kBudget = 128 * kMiB;
  auto daemon = DaemonProcess::Start(
      kDaemon, {"--set=cpu_tier { capacity_bytes: 67108864 }",
                absl::StrCat("--set=limits { max_chunk_bytes: 67108864 "
                             "max_put_bytes_in_flight: ",
                             kBudget,
                             " grpc_memory_bytes: 33554432 "
                             "stream_idle_timeout_seconds: 30 }")});
  ASSERT_TRUE(daemon.ok()) << daemon.status();
  const uint64_t rss_before = ResidentBytes(daemon->pid());

  std::vector<std::unique_ptr<v1::KvCache::Stub>> clients;
  std::vector<std::unique_ptr<StalledPut>> puts(8);
  std::vector<std::thread> threads;
  for (int c = 0; c < 8; ++c) clients.push_back(OwnConnection(*daemon));
  for (int c = 0; c < 8; ++c) {
    threads.emplace_back([&, c] {
      puts[c] =
          StartStalledPut(*clients[c], KeyOf(200 + c), 64 * kMiB, 60 * kMiB);
    });
  }
  for (std::thread& t : threads) t.join();
  absl::SleepFor(absl::Milliseconds(500));
  const uint64_t rss_during = ResidentBytes(daemon->pid());
  std::fprintf(stderr, "resident: %llu MiB before, %llu MiB during\n",
               static_cast<unsigned long long>(rss_before / kMiB),
               static_cast<unsigned long long>(rss_during / kMiB));
  // Two Puts fit the budget; the rest were refused at their header.
  int refused = 0;
  for (auto& put : puts) {
    const grpc::StatusCode code = EndStalledPut(*put);
    if (code == grpc::StatusCode::RESOURCE_EXHAUSTED) ++refused;
  }
  EXPECT_EQ(refused, 6);
  // The budget, gRPC's own buffers and some slack for the allocator.
  const uint64_t bound = kBudget + 32 * kMiB + 64 * kMiB;
  EXPECT_LE(rss_during - rss_before, bound)
      << "resident before " << rss_before / kMiB << " MiB, during "
      << rss_during / kMiB << " MiB";
}

}  // namespace
}  // namespace kvcache
