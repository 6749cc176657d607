// A real kvcached with tenants, admins and per-tenant limits, on loopback:
// every call authenticates; a tenant cannot see or touch another tenant's
// chunks through any call, and another tenant's key answers exactly as an
// absent key; shared namespaces exist only for the tenants granted them;
// admin calls are refused to tenants; per-tenant call and request-rate
// limits hold one tenant back without touching the others.
#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>

#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "client/chunk_key.h"
#include "client/kvcache_client.h"
#include "cluster/stored_key.h"
#include "codec/crc32c.h"
#include "kvcache/v1/kvcache.grpc.pb.h"
#include "kvstore/access_control.h"
#include "tests/testing/daemon_process.h"
#include "tests/testing/tenant_access.h"
#include "transfer/local_lookup.h"

namespace kvcache {
namespace {

using ::kvcache::kvstore::Sha256Hex;
using ::kvcache::testing::DaemonProcess;
using ::kvcache::testing::TenantEntry;
using ::kvcache::testing::TokenCaller;

constexpr char kDaemon[] = "kvstore/kvcached";
constexpr char kAlice[] = "alice-token-0123456789";
constexpr char kBob[] = "bob-token-0123456789";
constexpr char kCarol[] = "carol-token-0123456789";
constexpr char kAdmin[] = "admin-token-0123456789";
constexpr char kLimited[] = "limited-token-0123456789";

std::string AccessConfig() {
  return absl::StrCat(
      "--set=access { ",
      TenantEntry("alice", kAlice, "shared_namespaces: \"public\""),
      TenantEntry("bob", kBob, "shared_namespaces: \"public\""),
      TenantEntry("carol", kCarol),
      TenantEntry("limited", kLimited,
                  "max_concurrent_calls: 2 max_requests_per_second: 5"),
      "admin_token_sha256: \"", Sha256Hex(kAdmin), "\" }");
}

std::string Key(const std::string& name) {
  return std::string(ContentKey(name).AsBytes());
}

// One authenticated caller, with the calls the tests below make.
class Caller : public TokenCaller {
 public:
  using TokenCaller::TokenCaller;

  grpc::Status Put(const std::string& key, const std::string& bytes,
                   v1::PutResponse* response = nullptr) {
    grpc::ClientContext context;
    Prepare(context);
    v1::PutResponse ignored;
    auto writer = data().Put(&context, response ? response : &ignored);
    v1::PutRequest header;
    header.mutable_header()->set_key(key);
    header.mutable_header()->set_size_bytes(bytes.size());
    header.mutable_header()->set_crc32c(codec::Crc32c(bytes));
    v1::PutRequest data;
    data.set_data(bytes);
    if (writer->Write(header)) writer->Write(data);
    writer->WritesDone();
    return writer->Finish();
  }

  // The chunk's bytes, or the status that ended the stream.
  grpc::Status Get(const std::string& key, std::string* bytes) {
    grpc::ClientContext context;
    Prepare(context);
    v1::GetRequest request;
    request.add_keys(key);
    auto reader = data().Get(&context, request);
    v1::GetResponse message;
    bytes->clear();
    while (reader->Read(&message)) {
      if (message.has_data()) bytes->append(message.data());
    }
    return reader->Finish();
  }

  // Runs `call` with a prepared context; returns its status and a
  // description of its answer, to compare answers between keys.
  template <typename Request, typename Response>
  std::string Unary(grpc::Status (v1::KvCache::Stub::*call)(
                        grpc::ClientContext*, const Request&, Response*),
                    const Request& request) {
    grpc::ClientContext context;
    Prepare(context);
    Response response;
    const grpc::Status s = (data().*call)(&context, request, &response);
    return absl::StrCat(s.error_code(), " ", s.error_message(), " | ",
                        response.ShortDebugString());
  }
};

class AccessTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    auto daemon = DaemonProcess::Start(
        kDaemon, {AccessConfig(), "--set=shared_memory { enabled: false }"});
    ASSERT_TRUE(daemon.ok()) << daemon.status();
    daemon_ = new DaemonProcess(std::move(*daemon));
  }
  static void TearDownTestSuite() {
    delete daemon_;
    daemon_ = nullptr;
  }
  static DaemonProcess* daemon_;
};

DaemonProcess* AccessTest::daemon_ = nullptr;

TEST_F(AccessTest, CallsWithoutKnownCredentialsAreUnauthenticated) {
  for (const char* token : {"", "not-a-token"}) {
    Caller stranger(*daemon_, token);
    std::string bytes;
    EXPECT_EQ(stranger.Put(Key("x"), "bytes").error_code(),
              grpc::StatusCode::UNAUTHENTICATED)
        << token;
    EXPECT_EQ(stranger.Get(Key("x"), &bytes).error_code(),
              grpc::StatusCode::UNAUTHENTICATED);
    v1::LookupRequest lookup;
    lookup.add_keys(Key("x"));
    EXPECT_EQ(stranger.Unary(&v1::KvCache::Stub::Lookup, lookup).substr(0, 3),
              absl::StrCat(grpc::StatusCode::UNAUTHENTICATED, " "));
    grpc::ClientContext context;
    stranger.Prepare(context);
    v1::NodeInfoResponse info;
    EXPECT_EQ(stranger.admin()
                  .NodeInfo(&context, v1::NodeInfoRequest(), &info)
                  .error_code(),
              grpc::StatusCode::UNAUTHENTICATED);
  }
}

TEST_F(AccessTest, AnotherTenantsKeyAnswersExactlyAsAnAbsentOne) {
  Caller alice(*daemon_, kAlice), bob(*daemon_, kBob);
  const std::string secret = Key("alice's prompt"), absent = Key("nobody's");
  const std::string bytes(64 << 10, 'a');
  ASSERT_TRUE(alice.Put(secret, bytes).ok());

  // Every call of Bob's on Alice's key answers what it answers on a key
  // nobody stored: same code, same message, same response.
  auto same_answer =
      [&](const std::function<std::string(const std::string&)>& ask,
          const char* call) { EXPECT_EQ(ask(secret), ask(absent)) << call; };
  same_answer(
      [&](const std::string& key) {
        v1::LookupRequest r;
        r.add_keys(key);
        return bob.Unary(&v1::KvCache::Stub::Lookup, r);
      },
      "Lookup");
  same_answer(
      [&](const std::string& key) {
        v1::LookupEachRequest r;
        r.add_keys(key);
        std::string answer = bob.Unary(&v1::KvCache::Stub::LookupEach, r);
        // LookupEach echoes the key asked about; compare the rest.
        return answer.substr(0, answer.find("key:"));
      },
      "LookupEach");
  same_answer(
      [&](const std::string& key) {
        std::string got;
        const grpc::Status s = bob.Get(key, &got);
        // The message names the key's first bytes; compare the rest.
        const std::string message = s.error_message();
        return absl::StrCat(s.error_code(), message.substr(message.find(')')),
                            got);
      },
      "Get");
  same_answer(
      [&](const std::string& key) {
        v1::PinRequest r;
        r.add_keys(key);
        r.set_ttl_ms(60000);
        std::string answer = bob.Unary(&v1::KvCache::Stub::Pin, r);
        return answer.substr(answer.find(')'));
      },
      "Pin");
  same_answer(
      [&](const std::string& key) {
        v1::UnpinRequest r;
        r.add_keys(key);
        std::string answer = bob.Unary(&v1::KvCache::Stub::Unpin, r);
        return answer.substr(answer.find(')'));
      },
      "Unpin");
  same_answer(
      [&](const std::string& key) {
        v1::DeleteRequest r;
        r.add_keys(key);
        return bob.Unary(&v1::KvCache::Stub::Delete, r);
      },
      "Delete");

  // Bob's Put under the same key stores Bob's own chunk; Alice's stays.
  v1::PutResponse response;
  ASSERT_TRUE(bob.Put(secret, std::string(1024, 'b'), &response).ok());
  EXPECT_EQ(response.chunks_stored(), 1u);
  std::string got;
  ASSERT_TRUE(alice.Get(secret, &got).ok());
  EXPECT_EQ(got, bytes);
  ASSERT_TRUE(bob.Get(secret, &got).ok());
  EXPECT_EQ(got, std::string(1024, 'b'));
}

TEST_F(AccessTest, SharedNamespaceExistsOnlyForTheTenantsGrantedIt) {
  Caller alice_public(*daemon_, kAlice, "public");
  Caller bob_public(*daemon_, kBob, "public");
  Caller bob_own(*daemon_, kBob);
  Caller carol_public(*daemon_, kCarol, "public");
  const std::string prompt = Key("shared system prompt");
  ASSERT_TRUE(alice_public.Put(prompt, "system prompt KV").ok());
  std::string got;
  ASSERT_TRUE(bob_public.Get(prompt, &got).ok());
  EXPECT_EQ(got, "system prompt KV");
  // Outside the shared namespace Bob has no such chunk.
  EXPECT_EQ(bob_own.Get(prompt, &got).error_code(),
            grpc::StatusCode::NOT_FOUND);
  // Carol was not granted it.
  const grpc::Status denied = carol_public.Get(prompt, &got);
  EXPECT_EQ(denied.error_code(), grpc::StatusCode::PERMISSION_DENIED);
  EXPECT_NE(denied.error_message().find("public"), std::string::npos);
}

TEST_F(AccessTest, AdminCallsAreRefusedToTenantsAndDataCallsToAdmins) {
  Caller alice(*daemon_, kAlice), admin(*daemon_, kAdmin);
  auto admin_calls = [](Caller& caller) {
    std::vector<grpc::StatusCode> codes;
    {
      grpc::ClientContext c;
      caller.Prepare(c);
      v1::GetConfigResponse r;
      codes.push_back(caller.admin()
                          .GetConfig(&c, v1::GetConfigRequest(), &r)
                          .error_code());
    }
    {
      grpc::ClientContext c;
      caller.Prepare(c);
      v1::TierUsageResponse r;
      codes.push_back(caller.admin()
                          .GetTierUsage(&c, v1::TierUsageRequest(), &r)
                          .error_code());
    }
    {
      grpc::ClientContext c;
      caller.Prepare(c);
      v1::StatsResponse r;
      codes.push_back(
          caller.data().Stats(&c, v1::StatsRequest(), &r).error_code());
    }
    return codes;
  };
  for (grpc::StatusCode code : admin_calls(alice)) {
    EXPECT_EQ(code, grpc::StatusCode::PERMISSION_DENIED);
  }
  for (grpc::StatusCode code : admin_calls(admin)) {
    EXPECT_EQ(code, grpc::StatusCode::OK);
  }
  EXPECT_EQ(admin.Put(Key("admin data"), "x").error_code(),
            grpc::StatusCode::PERMISSION_DENIED);
  // The configuration an admin reads holds token hashes, never tokens.
  grpc::ClientContext c;
  admin.Prepare(c);
  v1::GetConfigResponse config;
  ASSERT_TRUE(
      admin.admin().GetConfig(&c, v1::GetConfigRequest(), &config).ok());
  EXPECT_NE(config.config_textproto().find(Sha256Hex(kAlice)),
            std::string::npos);
  EXPECT_EQ(config.config_textproto().find(kAlice), std::string::npos);
}

TEST_F(AccessTest, NodeTellsEachTenantItsNamespace) {
  Caller alice(*daemon_, kAlice), admin(*daemon_, kAdmin);
  grpc::ClientContext c1, c2;
  alice.Prepare(c1);
  admin.Prepare(c2);
  v1::NodeInfoResponse info;
  ASSERT_TRUE(alice.admin().NodeInfo(&c1, v1::NodeInfoRequest(), &info).ok());
  EXPECT_EQ(info.key_namespace(), "tenant/alice");
  ASSERT_TRUE(admin.admin().NodeInfo(&c2, v1::NodeInfoRequest(), &info).ok());
  EXPECT_EQ(info.key_namespace(), "");
}

TEST_F(AccessTest, TenantLimitsHoldOneTenantBackAndNotTheOthers) {
  Caller limited(*daemon_, kLimited), alice(*daemon_, kAlice);
  // Requests per second: a burst of 20 gets about 5 through.
  int refused = 0;
  for (int i = 0; i < 20; ++i) {
    v1::LookupRequest r;
    r.add_keys(Key("rate"));
    if (limited.Unary(&v1::KvCache::Stub::Lookup, r)
            .rfind(absl::StrCat(grpc::StatusCode::RESOURCE_EXHAUSTED, " "),
                   0) == 0) {
      ++refused;
    }
  }
  EXPECT_GE(refused, 10);
  // Alice, meanwhile, is not limited.
  for (int i = 0; i < 20; ++i) {
    v1::LookupRequest r;
    r.add_keys(Key("rate"));
    EXPECT_EQ(alice.Unary(&v1::KvCache::Stub::Lookup, r).substr(0, 2), "0 ");
  }

  // Concurrent calls: two open Put streams, the third is refused.
  absl::SleepFor(absl::Seconds(1));  // the bucket refills
  std::vector<std::unique_ptr<grpc::ClientContext>> contexts;
  std::vector<std::unique_ptr<grpc::ClientWriter<v1::PutRequest>>> writers;
  v1::PutResponse response;
  for (int i = 0; i < 3; ++i) {
    contexts.push_back(std::make_unique<grpc::ClientContext>());
    limited.Prepare(*contexts.back());
    writers.push_back(limited.data().Put(contexts.back().get(), &response));
    v1::PutRequest header;
    header.mutable_header()->set_key(Key(absl::StrCat("open-", i)));
    header.mutable_header()->set_size_bytes(1024);
    writers.back()->Write(header);
    absl::SleepFor(absl::Milliseconds(100));
  }
  writers[2]->WritesDone();
  const grpc::Status third = writers[2]->Finish();
  EXPECT_EQ(third.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED);
  EXPECT_NE(third.error_message().find("max_concurrent_calls"),
            std::string::npos)
      << third.error_message();
  for (int i = 0; i < 2; ++i) {
    contexts[i]->TryCancel();
    writers[i]->Finish();
  }
}

// A node with one tenant may share its memory; the tenant's client then
// counts its prefix over the local lookup socket, by its stored keys.
TEST(LocalLookupAccessTest, TenantCountsItsOwnKeysOverTheLocalSocket) {
  auto daemon = DaemonProcess::Start(
      kDaemon,
      {absl::StrCat("--set=access { ", TenantEntry("alice", kAlice), " }")});
  ASSERT_TRUE(daemon.ok()) << daemon.status();
  ClientOptions options;
  options.address = daemon->address();
  options.token = kAlice;
  std::unique_ptr<KvCacheClient> alice = *KvCacheClient::Connect(options);
  std::vector<ChunkKey> keys;
  for (const char* name : {"l0", "l1", "l2"}) keys.push_back(ContentKey(name));
  ASSERT_TRUE(alice->Put({{keys[0], "zero"}, {keys[1], "one"}}).ok());
  options.local_lookups = false;
  std::unique_ptr<KvCacheClient> over_grpc = *KvCacheClient::Connect(options);
  EXPECT_EQ(*alice->CountCached(keys), 2u);
  EXPECT_EQ(*over_grpc->CountCached(keys), 2u);
  EXPECT_EQ(alice->local_lookups(), 1u);
  // The stored keys are the tenant's namespace's, not the keys sent.
  absl::StatusOr<v1::NodeInfoResponse> info = alice->NodeInfo();
  ASSERT_TRUE(info.ok()) << info.status();
  ASSERT_FALSE(info->key_namespace().empty());
  absl::StatusOr<std::unique_ptr<transfer::LocalLookupClient>> raw =
      transfer::LocalLookupClient::Connect(info->local_lookup_socket(),
                                           info->node_id());
  ASSERT_TRUE(raw.ok()) << raw.status();
  EXPECT_EQ(*(*raw)->CountHeld({std::string(keys[0].AsBytes())}), 0u);
  EXPECT_EQ(*(*raw)->CountHeld(
                {cluster::StoredKey(info->key_namespace(), keys[0].AsBytes())}),
            1u);
}

// (kvstore/daemon_config_test checks the message names the field.)
TEST(AccessConfigTest, BadTokenHashStopsTheDaemon) {
  auto daemon = DaemonProcess::Start(
      kDaemon, {"--set=access { tenants { name: \"a\" token_sha256: "
                "\"not-a-hash\" } }"});
  EXPECT_FALSE(daemon.ok());
}

}  // namespace
}  // namespace kvcache
