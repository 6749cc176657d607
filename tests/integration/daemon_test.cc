// Drives a real kvcached process over loopback gRPC, with the client library
// and with kvcachectl, the way workers and operators use it.
#include <arpa/inet.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cstdio>
#include <fstream>
#include <memory>
#include <random>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/time/clock.h"
#include "client/chunk_key.h"
#include "client/kvcache_client.h"
#include "codec/codec.h"
#include "codec/crc32c.h"
#include "codec/test_data.h"
#include "grpc/health/v1/health.grpc.pb.h"
#include "kvcache/v1/kvcache.grpc.pb.h"
#include "tests/testing/daemon_process.h"
#include "tests/testing/own_connection.h"

namespace kvcache {
namespace {

using ::kvcache::testing::DaemonProcess;

constexpr char kDaemon[] = "kvstore/kvcached";
constexpr char kCtl[] = "client/kvcachectl";

std::string RandomBytes(size_t n, uint32_t seed) {
  std::mt19937_64 rng(seed);
  std::string s(n, '\0');
  for (size_t i = 0; i < n; i += 8) {
    const uint64_t v = rng();
    std::memcpy(&s[i], &v, std::min<size_t>(8, n - i));
  }
  return s;
}

std::vector<ChunkKey> PromptKeys(int chunks, int32_t first_token = 1) {
  KeySpace space;
  space.model_id = "daemon-test";
  space.chunk_tokens = 4;
  std::vector<int32_t> tokens(4 * chunks);
  for (size_t i = 0; i < tokens.size(); ++i) tokens[i] = first_token + i;
  return *ChunkKeysForTokens(space, tokens);
}

std::unique_ptr<KvCacheClient> ConnectTo(const DaemonProcess& daemon) {
  ClientOptions options;
  options.address = daemon.address();
  options.timeout = absl::Seconds(60);
  auto client = KvCacheClient::Connect(options);
  EXPECT_TRUE(client.ok()) << client.status();
  return client.ok() ? std::move(*client) : nullptr;
}

// One daemon shared by the tests below; each test uses its own keys.
class DaemonTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    auto daemon = DaemonProcess::Start(
        kDaemon, {"--set=cpu_tier { capacity_bytes: 536870912 }",
                  "--set=limits { max_chunk_bytes: 100663296 "
                  "max_keys_per_request: 64 }"});
    ASSERT_TRUE(daemon.ok()) << daemon.status();
    daemon_ = new DaemonProcess(std::move(*daemon));
  }
  static void TearDownTestSuite() {
    delete daemon_;
    daemon_ = nullptr;
  }

  void SetUp() override {
    ASSERT_NE(daemon_, nullptr);
    client_ = ConnectTo(*daemon_);
    ASSERT_NE(client_, nullptr);
    channel_ = grpc::CreateChannel(daemon_->address(),
                                   grpc::InsecureChannelCredentials());
    stub_ = v1::KvCache::NewStub(channel_);
  }

  // The daemon still stores and serves after whatever a test threw at it.
  void ExpectStillServing() {
    const ChunkKey key = ContentKey(absl::StrCat("alive-", rand()));
    ASSERT_TRUE(client_->Put({{key, "still here"}}).ok());
    auto got = client_->Get({key});
    ASSERT_TRUE(got.ok()) << got.status();
    EXPECT_EQ(got->front().bytes, "still here");
  }

  // Sends raw Put messages, bypassing the client's checks.
  grpc::Status RawPut(const std::vector<v1::PutRequest>& messages) {
    grpc::ClientContext context;
    v1::PutResponse response;
    auto writer = stub_->Put(&context, &response);
    for (const v1::PutRequest& m : messages) {
      if (!writer->Write(m)) break;
    }
    writer->WritesDone();
    return writer->Finish();
  }

  static DaemonProcess* daemon_;
  std::unique_ptr<KvCacheClient> client_;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<v1::KvCache::Stub> stub_;
};

DaemonProcess* DaemonTest::daemon_ = nullptr;

v1::PutRequest Header(absl::string_view key, uint64_t size, uint32_t crc) {
  v1::PutRequest m;
  m.mutable_header()->set_key(std::string(key));
  m.mutable_header()->set_size_bytes(size);
  m.mutable_header()->set_crc32c(crc);
  return m;
}

v1::PutRequest Data(absl::string_view bytes) {
  v1::PutRequest m;
  m.set_data(std::string(bytes));
  return m;
}

TEST_F(DaemonTest, PutGetIsByteExactFrom1KiBTo64MiB) {
  for (size_t size : {size_t{1} << 10, (size_t{1} << 20) + 7, size_t{5} << 20,
                      size_t{64} << 20}) {
    const std::string bytes = RandomBytes(size, size);
    const ChunkKey key = ContentKey(bytes);
    ASSERT_TRUE(client_->Put({{key, bytes}}).ok()) << size;
    auto got = client_->Get({key});
    ASSERT_TRUE(got.ok()) << got.status();
    ASSERT_EQ(got->size(), 1u);
    EXPECT_EQ(got->front().tier, v1::TIER_CPU);
    EXPECT_TRUE(got->front().bytes == bytes) << "size " << size;
  }
}

TEST_F(DaemonTest, SeveralChunksInOneStream) {
  const std::vector<ChunkKey> keys = PromptKeys(3, 100);
  std::vector<std::string> payloads;
  std::vector<ChunkToPut> chunks;
  for (size_t i = 0; i < keys.size(); ++i) {
    payloads.push_back(RandomBytes(300'000 + i, 7 + i));
  }
  for (size_t i = 0; i < keys.size(); ++i) {
    chunks.push_back({keys[i], payloads[i]});
  }
  ASSERT_TRUE(client_->Put(chunks).ok());
  auto got = client_->Get(keys);
  ASSERT_TRUE(got.ok()) << got.status();
  ASSERT_EQ(got->size(), keys.size());
  for (size_t i = 0; i < keys.size(); ++i) {
    EXPECT_EQ((*got)[i].key, keys[i]);
    EXPECT_TRUE((*got)[i].bytes == payloads[i]) << i;
  }
}

TEST_F(DaemonTest, LookupFindsLongestCachedPrefix) {
  const std::vector<ChunkKey> keys = PromptKeys(5, 1000);
  for (int i : {0, 1, 2, 4}) {  // chunk 3 missing
    ASSERT_TRUE(client_->Put({{keys[i], absl::StrCat("chunk", i)}}).ok());
  }
  auto result = client_->Lookup(keys);
  ASSERT_TRUE(result.ok()) << result.status();
  EXPECT_EQ(result->prefix_chunks, 3u);
  ASSERT_EQ(result->chunks.size(), 3u);
  EXPECT_EQ(result->chunks[1].size_bytes(), 6u);
  EXPECT_EQ(result->chunks[2].crc32c(), codec::Crc32c("chunk2"));

  // A prompt that diverges after two chunks shares exactly those two.
  std::vector<ChunkKey> other = keys;
  other[2] = PromptKeys(5, 5000)[2];
  EXPECT_EQ(client_->Lookup(other)->prefix_chunks, 2u);

  ASSERT_EQ(*client_->Delete({keys[1]}), 1u);
  EXPECT_EQ(client_->Lookup(keys)->prefix_chunks, 1u);
}

TEST_F(DaemonTest, LookupReportsTheCodecSummaryOfCodecChunks) {
  const codec::ChunkShape shape{2, 40, 2, 8, codec::DType::kBFloat16};
  absl::StatusOr<std::string> stream = codec::EncodeChunk(
      shape, codec::SyntheticChunk(shape, 5), codec::Level::kHigh);
  ASSERT_TRUE(stream.ok()) << stream.status();
  const std::vector<ChunkKey> keys = PromptKeys(2, 7000);
  ASSERT_TRUE(
      client_->Put({{keys[0], *stream}, {keys[1], RandomBytes(4096, 1)}}).ok());
  auto result = client_->Lookup(keys);
  ASSERT_TRUE(result.ok()) << result.status();
  ASSERT_EQ(result->chunks.size(), 2u);
  ASSERT_TRUE(result->chunks[0].has_codec());
  const v1::CodecSummary& summary = result->chunks[0].codec();
  EXPECT_EQ(summary.layers(), 2u);
  EXPECT_EQ(summary.tokens(), 40u);
  EXPECT_EQ(summary.kv_heads(), 2u);
  EXPECT_EQ(summary.head_dim(), 8u);
  EXPECT_EQ(summary.dtype(), "bfloat16");
  EXPECT_EQ(summary.level(), "high");
  EXPECT_FALSE(result->chunks[1].has_codec()) << "opaque bytes";
}

TEST_F(DaemonTest, DeletedAndUnknownKeysAreNotFound) {
  const ChunkKey key = ContentKey("to delete");
  ASSERT_TRUE(client_->Put({{key, "to delete"}}).ok());
  EXPECT_EQ(*client_->Delete({key}), 1u);
  EXPECT_EQ(*client_->Delete({key}), 0u);
  auto got = client_->Get({key});
  EXPECT_EQ(got.status().code(), absl::StatusCode::kNotFound);
  EXPECT_TRUE(absl::StrContains(got.status().message(), "keys[0]"))
      << got.status();
  EXPECT_EQ(client_->Pin({ContentKey("never stored")}, absl::Minutes(1))
                .status()
                .code(),
            absl::StatusCode::kNotFound);
}

TEST_F(DaemonTest, MalformedPutsAreInvalidArgumentAndDaemonKeepsServing) {
  const std::string key(32, 'k');
  struct Case {
    const char* what;
    std::vector<v1::PutRequest> messages;
    grpc::StatusCode code;
  };
  const std::vector<Case> cases = {
      {"short key",
       {Header("abc", 3, 0), Data("abc")},
       grpc::StatusCode::INVALID_ARGUMENT},
      {"data before header", {Data("abc")}, grpc::StatusCode::INVALID_ARGUMENT},
      {"empty message", {v1::PutRequest()}, grpc::StatusCode::INVALID_ARGUMENT},
      {"oversized chunk",
       {Header(key, uint64_t{1} << 30, 0)},
       grpc::StatusCode::INVALID_ARGUMENT},
      {"empty chunk", {Header(key, 0, 0)}, grpc::StatusCode::INVALID_ARGUMENT},
      {"more data than declared",
       {Header(key, 2, 0), Data("abc")},
       grpc::StatusCode::INVALID_ARGUMENT},
      {"stream ends early",
       {Header(key, 10, 0), Data("abc")},
       grpc::StatusCode::INVALID_ARGUMENT},
      {"header inside a chunk",
       {Header(key, 10, 0), Data("abc"), Header(key, 3, 0)},
       grpc::StatusCode::INVALID_ARGUMENT},
      {"checksum mismatch",
       {Header(key, 3, codec::Crc32c("abc") ^ 1), Data("abc")},
       grpc::StatusCode::DATA_LOSS},
  };
  for (const Case& c : cases) {
    const grpc::Status status = RawPut(c.messages);
    EXPECT_EQ(status.error_code(), c.code)
        << c.what << ": " << status.error_message();
    EXPECT_FALSE(status.error_message().empty()) << c.what;
  }
  // Nothing half-received became visible.
  auto stored = ChunkKey::FromBytes(key);
  EXPECT_EQ(client_->Get({*stored}).status().code(),
            absl::StatusCode::kNotFound);
  ExpectStillServing();
}

TEST_F(DaemonTest, MalformedParentKeyIsInvalidArgument) {
  v1::PutRequest header =
      Header(ContentKey("child").AsBytes(), 5, codec::Crc32c("child"));
  header.mutable_header()->set_parent_key("too short");
  const grpc::Status status = RawPut({header, Data("child")});
  EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_TRUE(absl::StrContains(status.error_message(), "parent_key"))
      << status.error_message();
  ExpectStillServing();
}

// One small request naming a stored chunk many times must not make the node
// send (or lease) it once per copy.
TEST_F(DaemonTest, RepeatedKeysInAGetAreInvalidArgument) {
  const std::string bytes = RandomBytes(1 << 20, 5);
  const ChunkKey key = ContentKey(bytes);
  ASSERT_TRUE(client_->Put({{key, bytes}}).ok());
  grpc::ClientContext context;
  v1::GetRequest repeated;
  for (int i = 0; i < 64; ++i) repeated.add_keys(std::string(key.AsBytes()));
  auto reader = stub_->Get(&context, repeated);
  v1::GetResponse response;
  size_t received = 0;
  while (reader->Read(&response)) received += response.ByteSizeLong();
  const grpc::Status status = reader->Finish();
  EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_TRUE(absl::StrContains(status.error_message(), "keys[1] repeats"))
      << status.error_message();
  EXPECT_EQ(received, 0u);
  EXPECT_EQ(client_->Get({key})->front().bytes, bytes);
}

// A Get hands the tier's memory to gRPC without copying it: a chunk deleted,
// and its memory taken by other chunks, while its Get is in flight must
// still arrive intact, in either framing (header alone, or with the first
// piece).
TEST_F(DaemonTest, ChunkDeletedDuringItsGetStillArrivesIntact) {
  for (bool header_carries_data : {false, true}) {
    SCOPED_TRACE(header_carries_data);
    const std::string bytes = RandomBytes(32 << 20, header_carries_data);
    const ChunkKey key = ContentKey(bytes);
    ASSERT_TRUE(client_->Put({{key, bytes}}).ok());
    grpc::ClientContext context;
    v1::GetRequest request;
    request.add_keys(std::string(key.AsBytes()));
    request.set_header_carries_data(header_carries_data);
    auto reader = stub_->Get(&context, request);
    v1::GetResponse message;
    ASSERT_TRUE(reader->Read(&message));
    ASSERT_TRUE(message.has_header());
    EXPECT_EQ(message.has_data(), header_carries_data);
    std::string received = message.data();

    ASSERT_EQ(client_->Delete({key}).value_or(0), 1u);
    for (int i = 0; i < 16; ++i) {
      const std::string other = RandomBytes(32 << 20, 100 + i);
      ASSERT_TRUE(client_->Put({{ContentKey(other), other}}).ok());
    }
    while (reader->Read(&message)) {
      EXPECT_FALSE(message.has_header());
      received += message.data();
    }
    ASSERT_TRUE(reader->Finish().ok());
    EXPECT_EQ(received.size(), bytes.size());
    EXPECT_TRUE(received == bytes) << "the bytes changed under the stream";
  }
}

TEST_F(DaemonTest, KeyKeepsItsFirstCopyUnlessThePutAsksToReplace) {
  const ChunkKey key = ContentKey("keep-first");
  const std::string first = RandomBytes(64 << 10, 11);
  const std::string second = RandomBytes(64 << 10, 12);
  auto put = [&](const std::string& bytes, bool replace) {
    grpc::ClientContext context;
    v1::PutResponse response;
    auto writer = stub_->Put(&context, &response);
    v1::PutRequest header;
    header.mutable_header()->set_key(std::string(key.AsBytes()));
    header.mutable_header()->set_size_bytes(bytes.size());
    header.mutable_header()->set_crc32c(codec::Crc32c(bytes));
    header.mutable_header()->set_replace(replace);
    v1::PutRequest data;
    data.set_data(bytes);
    EXPECT_TRUE(writer->Write(header) && writer->Write(data));
    writer->WritesDone();
    EXPECT_TRUE(writer->Finish().ok());
    return response;
  };
  v1::PutResponse response = put(first, false);
  EXPECT_EQ(response.chunks_stored(), 1u);
  EXPECT_EQ(response.chunks_kept(), 0u);
  // A later writer cannot swap the bytes under the key...
  response = put(second, false);
  EXPECT_EQ(response.chunks_stored(), 0u);
  EXPECT_EQ(response.chunks_kept(), 1u);
  EXPECT_EQ(client_->Get({key})->front().bytes, first);
  // ...unless it asks to.
  response = put(second, true);
  EXPECT_EQ(response.chunks_stored(), 1u);
  EXPECT_EQ(client_->Get({key})->front().bytes, second);
}

TEST_F(DaemonTest, OnlyTheConnectionThatTookALeaseReleasesIt) {
  const std::string bytes = RandomBytes(64 << 10, 13);
  const ChunkKey key = ContentKey(bytes);
  ASSERT_TRUE(client_->Put({{key, bytes}}).ok());
  auto connect = [&] {
    return v1::KvCache::NewStub(testing::OwnConnection(daemon_->address()));
  };
  auto owner = connect();
  auto other = connect();
  grpc::ClientContext locate_context;
  v1::LocateRequest locate;
  locate.add_keys(std::string(key.AsBytes()));
  locate.set_lease_ms(60000);
  v1::LocateResponse located;
  ASSERT_TRUE(owner->Locate(&locate_context, locate, &located).ok());
  ASSERT_NE(located.lease_id(), 0u);

  auto release = [&](v1::KvCache::Stub& stub) {
    grpc::ClientContext context;
    v1::ReleaseRequest request;
    request.set_lease_id(located.lease_id());
    v1::ReleaseResponse response;
    EXPECT_TRUE(stub.Release(&context, request, &response).ok());
    return response.released();
  };
  EXPECT_FALSE(release(*other));
  EXPECT_TRUE(release(*owner));
  EXPECT_FALSE(release(*owner));
}

TEST_F(DaemonTest, MalformedKeyListsAreInvalidArgument) {
  std::vector<ChunkKey> too_many(65, ContentKey("x"));
  auto lookup = client_->Lookup(too_many);
  EXPECT_EQ(lookup.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(
      absl::StrContains(lookup.status().message(), "max_keys_per_request"))
      << lookup.status();

  grpc::ClientContext context;
  v1::GetRequest bad_get;
  bad_get.add_keys("not a key");
  auto reader = stub_->Get(&context, bad_get);
  v1::GetResponse ignored;
  while (reader->Read(&ignored)) {
  }
  EXPECT_EQ(reader->Finish().error_code(), grpc::StatusCode::INVALID_ARGUMENT);

  grpc::ClientContext pin_context;
  v1::PinRequest zero_ttl;
  zero_ttl.add_keys(std::string(32, 'k'));
  v1::PinResponse pin_response;
  EXPECT_EQ(stub_->Pin(&pin_context, zero_ttl, &pin_response).error_code(),
            grpc::StatusCode::INVALID_ARGUMENT);
  ExpectStillServing();
}

TEST_F(DaemonTest, HealthCheckReportsServing) {
  auto health = grpc::health::v1::Health::NewStub(channel_);
  grpc::ClientContext context;
  grpc::health::v1::HealthCheckResponse response;
  ASSERT_TRUE(
      health->Check(&context, grpc::health::v1::HealthCheckRequest(), &response)
          .ok());
  EXPECT_EQ(response.status(), grpc::health::v1::HealthCheckResponse::SERVING);
}

TEST_F(DaemonTest, AdminReportsUsageAndConfig) {
  auto info = client_->NodeInfo();
  ASSERT_TRUE(info.ok()) << info.status();
  EXPECT_FALSE(info->node_id().empty());
  auto usage = client_->TierUsage();
  ASSERT_TRUE(usage.ok());
  ASSERT_EQ(usage->tiers_size(), 1);
  EXPECT_EQ(usage->tiers(0).capacity_bytes(), 536870912u);
  auto config = client_->Config();
  ASSERT_TRUE(config.ok());
  EXPECT_TRUE(absl::StrContains(*config, "max_keys_per_request: 64"))
      << *config;
}

// Runs kvcachectl and returns its exit code and stdout.
std::pair<int, std::string> RunCtl(const std::string& address,
                                   const std::string& args) {
  const std::string command =
      absl::StrCat(kCtl, " --addr=", address, " ", args, " 2>&1");
  FILE* pipe = popen(command.c_str(), "r");
  std::string out;
  char buffer[4096];
  size_t n;
  while ((n = fread(buffer, 1, sizeof(buffer), pipe)) > 0)
    out.append(buffer, n);
  const int status = pclose(pipe);
  return {WEXITSTATUS(status), out};
}

TEST_F(DaemonTest, KvcachectlPutLookupGetPinRmStatus) {
  const std::string dir =
      getenv("TEST_TMPDIR") ? getenv("TEST_TMPDIR") : "/tmp";
  const std::string in = dir + "/ctl_in.bin", out = dir + "/ctl_out.bin";
  const std::string bytes = RandomBytes(3 << 20, 99);
  std::ofstream(in, std::ios::binary) << bytes;
  const std::string key = ContentKey(bytes).ToHex();

  auto [put_code, put_out] = RunCtl(daemon_->address(), "put " + in);
  ASSERT_EQ(put_code, 0) << put_out;
  EXPECT_TRUE(absl::StrContains(put_out, key)) << put_out;

  auto [lookup_code, lookup_out] = RunCtl(daemon_->address(), "lookup " + key);
  EXPECT_EQ(lookup_code, 0);
  EXPECT_TRUE(absl::StrContains(lookup_out, "prefix 1 of 1")) << lookup_out;

  auto [get_code, get_out] =
      RunCtl(daemon_->address(), "get " + key + " --out=" + out);
  ASSERT_EQ(get_code, 0) << get_out;
  std::stringstream fetched;
  fetched << std::ifstream(out, std::ios::binary).rdbuf();
  EXPECT_TRUE(fetched.str() == bytes);

  auto [pin_code, pin_out] =
      RunCtl(daemon_->address(), "pin " + key + " --ttl=5m");
  EXPECT_EQ(pin_code, 0) << pin_out;
  EXPECT_TRUE(absl::StrContains(
      RunCtl(daemon_->address(), "lookup " + key).second, "pinned"));

  auto [status_code, status_out] = RunCtl(daemon_->address(), "status");
  EXPECT_EQ(status_code, 0) << status_out;
  EXPECT_TRUE(absl::StrContains(status_out, "tier cpu")) << status_out;

  auto [rm_code, rm_out] = RunCtl(daemon_->address(), "rm " + key);
  EXPECT_EQ(rm_code, 0);
  EXPECT_TRUE(absl::StrContains(rm_out, "deleted 1 of 1")) << rm_out;

  auto [missing_code, missing_out] =
      RunCtl(daemon_->address(), "get " + key + " --out=" + out);
  EXPECT_EQ(missing_code, 1);
  EXPECT_TRUE(absl::StrContains(missing_out, "NOT_FOUND")) << missing_out;

  auto [bad_code, bad_out] = RunCtl(daemon_->address(), "rm nothex");
  EXPECT_EQ(bad_code, 2);
  EXPECT_TRUE(absl::StrContains(bad_out, "INVALID_ARGUMENT")) << bad_out;
}

// A refused connection fails at once, not after the connect timeout, and
// --timeout bounds the wait for an address that never answers.
TEST(KvcachectlTest, FailsFastWhenNothingListens) {
  // A port nothing listens on: bound, never listened.
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof(addr);
  ASSERT_EQ(bind(fd, reinterpret_cast<sockaddr*>(&addr), len), 0);
  getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len);
  const std::string refused = absl::StrCat("127.0.0.1:", ntohs(addr.sin_port));
  absl::Time start = absl::Now();
  auto [code, out] = RunCtl(refused, "status");
  EXPECT_NE(code, 0);
  EXPECT_TRUE(absl::StrContains(out, "cannot reach kvcached")) << out;
  EXPECT_LT(absl::Now() - start, absl::Seconds(2));

  // Listening but never answering (connections complete in the kernel, the
  // HTTP/2 handshake never does): --timeout bounds the wait, here 500 ms
  // rather than the default 5 s.
  ASSERT_EQ(listen(fd, 8), 0);
  start = absl::Now();
  auto [silent_code, silent_out] = RunCtl(refused, "status --timeout=500ms");
  EXPECT_NE(silent_code, 0);
  EXPECT_TRUE(absl::StrContains(silent_out, "within 500ms")) << silent_out;
  EXPECT_LT(absl::Now() - start, absl::Seconds(3));
  close(fd);
}

TEST_F(DaemonTest, KvcachectlLookupPrintsTheCodecSummary) {
  const codec::ChunkShape shape{3, 24, 2, 8, codec::DType::kFloat16};
  absl::StatusOr<std::string> stream = codec::EncodeChunk(
      shape, codec::SyntheticChunk(shape, 9), codec::Level::kDefault);
  ASSERT_TRUE(stream.ok()) << stream.status();
  const std::vector<ChunkKey> keys = PromptKeys(2, 7100);
  ASSERT_TRUE(
      client_->Put({{keys[0], *stream}, {keys[1], RandomBytes(4096, 2)}}).ok());
  auto [code, out] = RunCtl(
      daemon_->address(), "lookup " + keys[0].ToHex() + " " + keys[1].ToHex());
  EXPECT_EQ(code, 0) << out;
  const std::vector<std::string> lines = absl::StrSplit(out, '\n');
  ASSERT_GE(lines.size(), 3u) << out;
  EXPECT_TRUE(absl::StrContains(lines[1], keys[0].ToHex())) << out;
  EXPECT_TRUE(absl::StrContains(lines[1], "codec=3x24x2x8 float16 default"))
      << out;
  EXPECT_TRUE(absl::StrContains(lines[2], keys[1].ToHex())) << out;
  EXPECT_FALSE(absl::StrContains(lines[2], "codec=")) << out;
}

TEST(DaemonEvictionTest, PinnedChunkSurvivesEviction) {
  auto daemon = DaemonProcess::Start(
      kDaemon, {"--set=cpu_tier { capacity_bytes: 4194304 }"});
  ASSERT_TRUE(daemon.ok()) << daemon.status();
  auto client = ConnectTo(*daemon);
  ASSERT_NE(client, nullptr);
  const std::string session = RandomBytes(1 << 20, 1);
  const ChunkKey session_key = ContentKey(session);
  ASSERT_TRUE(
      client->Put({{session_key, session}}, PutOptions{absl::Minutes(5)}).ok());
  std::vector<ChunkKey> filler;
  for (int i = 0; i < 10; ++i) {
    const std::string bytes = RandomBytes(1 << 20, 100 + i);
    filler.push_back(ContentKey(bytes));
    ASSERT_TRUE(client->Put({{filler.back(), bytes}}).ok()) << i;
  }
  auto got = client->Get({session_key});
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_TRUE(got->front().bytes == session);
  EXPECT_EQ(client->Lookup({filler[0]})->prefix_chunks, 0u);  // evicted
  EXPECT_EQ(client->Lookup({filler[9]})->prefix_chunks, 1u);
  auto stats = client->Stats();
  ASSERT_TRUE(stats.ok());
  EXPECT_GE(stats->evictions(), 7u);

  // With the tier full of pins, a put that cannot fit is refused.
  for (size_t i = 7; i < filler.size(); ++i) {
    ASSERT_TRUE(client->Pin({filler[i]}, absl::Minutes(5)).ok());
  }
  const std::string big = RandomBytes(2 << 20, 77);
  EXPECT_EQ(client->Put({{ContentKey(big), big}}).code(),
            absl::StatusCode::kResourceExhausted);
}

TEST(DaemonEvictionTest, PromptsAreEvictedFromTheirEnd) {
  auto daemon = DaemonProcess::Start(
      kDaemon, {"--set=cpu_tier { capacity_bytes: 4194304 }"});
  ASSERT_TRUE(daemon.ok()) << daemon.status();
  auto client = ConnectTo(*daemon);
  ASSERT_NE(client, nullptr);
  const std::vector<ChunkKey> keys = PromptKeys(3);
  std::vector<std::string> chunks;
  for (int i = 0; i < 3; ++i) chunks.push_back(RandomBytes(1 << 20, 40 + i));
  ASSERT_TRUE(client->Put(PromptChunks(keys, 0, chunks)).ok());
  // The second unrelated chunk needs room: plain LRU would take the
  // prompt's first chunk and leave nothing usable; the prompt loses its last
  // chunk instead.
  for (int i = 0; i < 2; ++i) {
    const std::string other = RandomBytes(1 << 20, 50 + i);
    ASSERT_TRUE(client->Put({{ContentKey(other), other}}).ok());
  }
  auto lookup = client->Lookup(keys);
  ASSERT_TRUE(lookup.ok()) << lookup.status();
  EXPECT_EQ(lookup->prefix_chunks, 2u);
}

TEST(DaemonShutdownTest, SigtermLetsInFlightPutFinishThenRefuses) {
  auto daemon =
      DaemonProcess::Start(kDaemon, {"--set=shutdown_grace_seconds: 5"});
  ASSERT_TRUE(daemon.ok()) << daemon.status();
  auto channel = grpc::CreateChannel(daemon->address(),
                                     grpc::InsecureChannelCredentials());
  auto stub = v1::KvCache::NewStub(channel);
  const std::string bytes = RandomBytes(2 << 20, 5);
  grpc::ClientContext context;
  v1::PutResponse response;
  auto writer = stub->Put(&context, &response);
  ASSERT_TRUE(writer->Write(
      Header(ContentKey(bytes).AsBytes(), bytes.size(), codec::Crc32c(bytes))));
  ASSERT_TRUE(writer->Write(Data(absl::string_view(bytes).substr(0, 1 << 20))));

  daemon->Signal(SIGTERM);
  absl::SleepFor(absl::Milliseconds(300));
  // A new call is refused while the old one is still in flight.
  ClientOptions options;
  options.address = daemon->address();
  options.connect_timeout = absl::Milliseconds(500);
  auto late = KvCacheClient::Connect(options);
  if (late.ok()) {
    EXPECT_FALSE((*late)->Stats().ok());
  }

  ASSERT_TRUE(writer->Write(Data(absl::string_view(bytes).substr(1 << 20))));
  writer->WritesDone();
  const grpc::Status status = writer->Finish();
  EXPECT_TRUE(status.ok()) << status.error_message();
  EXPECT_EQ(response.chunks_stored(), 1u);

  auto exit_code = daemon->WaitForExit(absl::Seconds(10));
  ASSERT_TRUE(exit_code.ok()) << exit_code.status();
  EXPECT_EQ(*exit_code, 0);
}

TEST(DaemonStartupTest, BadConfigFailsWithFieldName) {
  const std::string command =
      absl::StrCat(kDaemon, " --set='cpu_tier { capacity_bytes: 0 }' 2>&1");
  FILE* pipe = popen(command.c_str(), "r");
  char buffer[1024] = {};
  EXPECT_GT(fread(buffer, 1, sizeof(buffer) - 1, pipe), 0u);
  EXPECT_EQ(WEXITSTATUS(pclose(pipe)), 2);
  EXPECT_TRUE(absl::StrContains(buffer, "cpu_tier.capacity_bytes")) << buffer;
}

TEST(DaemonStartupTest, UnusableGpuStartsWithoutTheGpuTierAndSaysWhy) {
  // No host has device 4096, so this holds with a GPU or without one. The
  // daemon serves until `timeout` stops it.
  const std::string command = absl::StrCat(
      "timeout -s TERM 3 ", kDaemon,
      " --listen=127.0.0.1:0 --set='gpu_tier { capacity_bytes: 1048576 "
      "device: 4096 }' 2>&1");
  FILE* pipe = popen(command.c_str(), "r");
  std::string output;
  char buffer[1024];
  for (size_t n; (n = fread(buffer, 1, sizeof(buffer), pipe)) > 0;) {
    output.append(buffer, n);
  }
  // 124: `timeout` had to stop it, so it was still serving after 3 s.
  EXPECT_EQ(WEXITSTATUS(pclose(pipe)), 124) << output;
  EXPECT_TRUE(absl::StrContains(output, "starting without the GPU tier"))
      << output;
  EXPECT_TRUE(absl::StrContains(output, "listening=127.0.0.1:")) << output;
  EXPECT_TRUE(absl::StrContains(output, "stopped")) << output;
}

}  // namespace
}  // namespace kvcache
