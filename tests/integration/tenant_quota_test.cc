// Quotas under tenants that write without stopping, on a real kvcached:
// alice streams chunks far past her CPU-tier quota from two connections
// while bob reads his working set, which stays fully cached and readable
// throughout; a tenant without a quota cannot push bob out either; an admin
// sees each tenant's usage against its quota; a tenant cannot name another
// as a chunk's owner; pinned chunks that fill a quota make the next Put
// RESOURCE_EXHAUSTED naming the quota.
#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>

#include <atomic>
#include <cstdio>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "client/chunk_key.h"
#include "codec/crc32c.h"
#include "kvcache/v1/kvcache.grpc.pb.h"
#include "kvstore/access_control.h"
#include "tests/testing/daemon_process.h"
#include "tests/testing/tenant_access.h"

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
constexpr char kDave[] = "dave-token-0123456789";
constexpr char kAdmin[] = "admin-token-0123456789";

constexpr uint64_t kChunk = 64 << 10;
constexpr uint64_t kQuota = 1 << 20;  // 16 chunks

// A 4 MiB CPU tier: alice and bob may hold 1 MiB each, dave 256 KiB,
// carol has no quota.
std::vector<std::string> Flags() {
  auto tenant = [](const std::string& name, const std::string& token,
                   uint64_t cpu_quota) {
    return TenantEntry(name, token,
                       absl::StrCat("cpu_quota_bytes: ", cpu_quota));
  };
  return {absl::StrCat("--set=access { ", tenant("alice", kAlice, kQuota),
                       tenant("bob", kBob, kQuota), tenant("carol", kCarol, 0),
                       tenant("dave", kDave, kQuota / 4),
                       "admin_token_sha256: \"", Sha256Hex(kAdmin), "\" }"),
          "--set=cpu_tier { capacity_bytes: 4194304 }",
          "--set=shared_memory { enabled: false }"};
}

std::string Key(const std::string& name) {
  return std::string(ContentKey(name).AsBytes());
}

std::string ChunkBytes(const std::string& name) {
  std::string bytes(kChunk, '\0');
  uint32_t x = codec::Crc32c(name) | 1;
  for (char& c : bytes) {
    x ^= x << 13;
    x ^= x >> 17;
    x ^= x << 5;
    c = static_cast<char>(x);
  }
  return bytes;
}

class Tenant : public TokenCaller {
 public:
  using TokenCaller::TokenCaller;

  // Stores the chunks named `names` in one stream; `owner` goes in every
  // header.
  grpc::Status Put(const std::vector<std::string>& names,
                   uint64_t pin_ttl_ms = 0, const std::string& owner = "") {
    grpc::ClientContext context;
    Prepare(context);
    v1::PutResponse response;
    auto writer = data().Put(&context, &response);
    for (const std::string& name : names) {
      const std::string bytes = ChunkBytes(name);
      v1::PutRequest header;
      header.mutable_header()->set_key(Key(name));
      header.mutable_header()->set_size_bytes(bytes.size());
      header.mutable_header()->set_crc32c(codec::Crc32c(bytes));
      header.mutable_header()->set_pin_ttl_ms(pin_ttl_ms);
      header.mutable_header()->set_owner(owner);
      v1::PutRequest data;
      data.set_data(bytes);
      if (!writer->Write(header) || !writer->Write(data)) break;
    }
    writer->WritesDone();
    return writer->Finish();
  }

  // Whether every chunk of `names` comes back byte-exact, in one Get.
  bool GetsAll(const std::vector<std::string>& names) {
    grpc::ClientContext context;
    Prepare(context);
    v1::GetRequest request;
    for (const std::string& name : names) request.add_keys(Key(name));
    auto reader = data().Get(&context, request);
    v1::GetResponse message;
    std::vector<std::string> got;
    while (reader->Read(&message)) {
      if (message.has_header()) got.emplace_back();
      if (message.has_data()) got.back() += message.data();
    }
    if (!reader->Finish().ok() || got.size() != names.size()) return false;
    for (size_t i = 0; i < names.size(); ++i) {
      if (got[i] != ChunkBytes(names[i])) return false;
    }
    return true;
  }

  // The CPU tier's usage, as GetTierUsage answers it to this caller.
  grpc::Status CpuUsage(v1::TierUsage* cpu) {
    grpc::ClientContext context;
    Prepare(context);
    v1::TierUsageResponse response;
    const grpc::Status s =
        admin().GetTierUsage(&context, v1::TierUsageRequest(), &response);
    for (const v1::TierUsage& tier : response.tiers()) {
      if (tier.tier() == v1::TIER_CPU) *cpu = tier;
    }
    return s;
  }
};

std::vector<std::string> Names(const std::string& prefix, int from, int to) {
  std::vector<std::string> names;
  for (int i = from; i < to; ++i) names.push_back(absl::StrCat(prefix, i));
  return names;
}

v1::TenantTierUsage UsageOf(const v1::TierUsage& tier,
                            const std::string& name) {
  for (const v1::TenantTierUsage& tenant : tier.tenants()) {
    if (tenant.tenant() == name) return tenant;
  }
  return v1::TenantTierUsage();
}

TEST(TenantQuotaTest, TenantWritingWithoutStoppingNeverFlushesAnother) {
  auto daemon = DaemonProcess::Start(kDaemon, Flags());
  ASSERT_TRUE(daemon.ok()) << daemon.status();
  Tenant alice(*daemon, kAlice), bob(*daemon, kBob), carol(*daemon, kCarol),
      admin(*daemon, kAdmin);
  const std::vector<std::string> working_set = Names("bob-", 0, 16);
  ASSERT_TRUE(bob.Put(working_set).ok());
  ASSERT_TRUE(bob.GetsAll(working_set));

  // Alice writes 24 times her quota from two connections, in streams of 16
  // chunks, while bob keeps reading his working set.
  std::atomic<bool> writing{true};
  std::atomic<int> bob_reads{0}, bob_misses{0};
  std::thread reader([&] {
    while (writing.load()) {
      if (!bob.GetsAll(working_set)) ++bob_misses;
      ++bob_reads;
    }
  });
  std::vector<std::thread> writers;
  std::atomic<int> refused{0};
  for (int w = 0; w < 2; ++w) {
    writers.emplace_back([&, w] {
      Tenant writer(*daemon, kAlice);
      for (int batch = 0; batch < 12; ++batch) {
        const int first = (w * 12 + batch) * 16;
        if (!writer.Put(Names("alice-", first, first + 16)).ok()) ++refused;
      }
    });
  }
  for (std::thread& t : writers) t.join();
  writing.store(false);
  reader.join();
  EXPECT_EQ(refused.load(), 0);
  EXPECT_GT(bob_reads.load(), 0);
  EXPECT_EQ(bob_misses.load(), 0) << "of " << bob_reads.load() << " reads";

  // Only admins see every tenant's usage.
  v1::TierUsage cpu;
  EXPECT_EQ(alice.CpuUsage(&cpu).error_code(),
            grpc::StatusCode::PERMISSION_DENIED);
  ASSERT_TRUE(admin.CpuUsage(&cpu).ok());
  EXPECT_LE(UsageOf(cpu, "alice").used_bytes(), kQuota);
  EXPECT_EQ(UsageOf(cpu, "alice").quota_bytes(), kQuota);
  EXPECT_EQ(UsageOf(cpu, "bob").used_bytes(), kQuota);
  EXPECT_EQ(UsageOf(cpu, "bob").chunks(), 16u);
  // Alice's own chunks made the room: she still holds a full quota of
  // them, and her latest are there for her.
  EXPECT_EQ(UsageOf(cpu, "alice").chunks(), 16u);
  ASSERT_TRUE(alice.Put(Names("alice-last-", 0, 4)).ok());
  EXPECT_TRUE(alice.GetsAll(Names("alice-last-", 0, 4)));

  // Carol, without a quota, fills what the quotas leave and then evicts
  // her own chunks; bob's stay.
  ASSERT_TRUE(carol.Put(Names("carol-", 0, 128)).ok());
  EXPECT_TRUE(bob.GetsAll(working_set));
  ASSERT_TRUE(admin.CpuUsage(&cpu).ok());
  EXPECT_GT(UsageOf(cpu, "carol").used_bytes(), 0u);
  EXPECT_LE(UsageOf(cpu, "carol").used_bytes() +
                UsageOf(cpu, "alice").used_bytes() +
                UsageOf(cpu, "bob").used_bytes(),
            cpu.capacity_bytes());
  EXPECT_EQ(UsageOf(cpu, "bob").used_bytes(), kQuota);
}

TEST(TenantQuotaTest, TenantCannotNameAnOwnerAndPinsCanFillItsQuota) {
  auto daemon = DaemonProcess::Start(kDaemon, Flags());
  ASSERT_TRUE(daemon.ok()) << daemon.status();
  Tenant alice(*daemon, kAlice), dave(*daemon, kDave);
  // Charging chunks to bob's quota, or dodging her own, is refused.
  const grpc::Status spoofed = alice.Put({"spoof"}, 0, "bob");
  EXPECT_EQ(spoofed.error_code(), grpc::StatusCode::PERMISSION_DENIED)
      << spoofed.error_message();

  // Dave may hold 4 chunks; 4 pinned ones leave no room for a fifth.
  ASSERT_TRUE(dave.Put(Names("dave-", 0, 4), /*pin_ttl_ms=*/600000).ok());
  const grpc::Status full = dave.Put({"dave-4"});
  EXPECT_EQ(full.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED);
  EXPECT_NE(full.error_message().find("cpu_quota_bytes"), std::string::npos)
      << full.error_message();
  EXPECT_TRUE(dave.GetsAll(Names("dave-", 0, 4)));
  // Others write on regardless.
  EXPECT_TRUE(alice.Put({"alice-after"}).ok());
}

TEST(TenantQuotaTest, ChunkOverEveryQuotaIsRefusedAtItsHeader) {
  auto daemon = DaemonProcess::Start(kDaemon, Flags());
  ASSERT_TRUE(daemon.ok()) << daemon.status();
  Tenant dave(*daemon, kDave);  // 256 KiB of CPU tier, and no other tier
  grpc::ClientContext context;
  dave.Prepare(context);
  v1::PutResponse response;
  auto writer = dave.data().Put(&context, &response);
  v1::PutRequest header;
  header.mutable_header()->set_key(Key("too big for dave"));
  header.mutable_header()->set_size_bytes(kQuota);
  ASSERT_TRUE(writer->Write(header));
  writer->WritesDone();
  const grpc::Status refused = writer->Finish();
  EXPECT_EQ(refused.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED);
  EXPECT_NE(refused.error_message().find("cpu_quota_bytes"), std::string::npos)
      << refused.error_message();
  // Within the quota it is stored.
  EXPECT_TRUE(dave.Put({"small enough"}).ok());
}

TEST(TenantQuotaTest, KvcachectlStatusShowsEachTenantsUsage) {
  auto daemon = DaemonProcess::Start(kDaemon, Flags());
  ASSERT_TRUE(daemon.ok()) << daemon.status();
  Tenant bob(*daemon, kBob);
  ASSERT_TRUE(bob.Put(Names("bob-", 0, 4)).ok());
  const std::string command =
      absl::StrCat("client/kvcachectl --addr=", daemon->address(),
                   " --token=", kAdmin, " status 2>&1");
  FILE* pipe = popen(command.c_str(), "r");
  ASSERT_NE(pipe, nullptr);
  std::string out;
  char buffer[4096];
  while (size_t n = fread(buffer, 1, sizeof(buffer), pipe))
    out.append(buffer, n);
  EXPECT_EQ(pclose(pipe), 0) << out;
  EXPECT_NE(out.find("tenant bob: 0.2 MiB in 4 chunks of a 1.0 MiB quota"),
            std::string::npos)
      << out;
}

}  // namespace
}  // namespace kvcache
