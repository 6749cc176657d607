// Model profiles kept in a real kvcached: published by one worker, fetched
// by another to decode the chunks that name them, kept apart per model and
// tenant, and refused when what the daemon returns is not the profile.
#include "client/profile_store.h"

#include <memory>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "client/chunk_key.h"
#include "client/kvcache_client.h"
#include "codec/calibrate.h"
#include "codec/codec.h"
#include "codec/kv_dump.h"
#include "gtest/gtest.h"
#include "tests/testing/daemon_process.h"

namespace kvcache {
namespace {

using ::kvcache::testing::DaemonProcess;

// A profile of one stories260K dump (a llama2.c model: RoPE base 10000 on
// adjacent pairs), and that dump.
struct StoriesProfile {
  codec::KvDump dump;
  codec::ModelProfile profile;
};

StoriesProfile MakeProfile(const char* name) {
  absl::StatusOr<std::string> dir = codec::FindKvDataDir();
  EXPECT_TRUE(dir.ok()) << dir.status();
  absl::StatusOr<codec::KvDump> dump =
      codec::LoadKvDump(absl::StrCat(*dir, "/", name, ".json"));
  EXPECT_TRUE(dump.ok()) << dump.status();
  const codec::ChunkShape& s = dump->shape;
  codec::ProfileCalibrator calibrator(
      s.layers, s.kv_heads, s.head_dim, codec::RopeLayout::kAdjacentPairs,
      codec::RopeInverseFrequencies(10000, s.head_dim));
  EXPECT_TRUE(calibrator.Add(s, dump->kv, 0).ok());
  return {*std::move(dump), *calibrator.Finish()};
}

class ProfileStoreTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    auto daemon = DaemonProcess::Start("kvstore/kvcached", {});
    ASSERT_TRUE(daemon.ok()) << daemon.status();
    daemon_ = new DaemonProcess(std::move(*daemon));
  }
  static void TearDownTestSuite() {
    delete daemon_;
    daemon_ = nullptr;
  }

  static std::unique_ptr<KvCacheClient> Connect() {
    ClientOptions options;
    options.address = daemon_->address();
    auto client = KvCacheClient::Connect(options);
    EXPECT_TRUE(client.ok()) << client.status();
    return std::move(*client);
  }

  static KeySpace Space(const std::string& name_space,
                        const std::string& model) {
    KeySpace space;
    space.name_space = name_space;
    space.model_id = model;
    return space;
  }

  static DaemonProcess* daemon_;
};
DaemonProcess* ProfileStoreTest::daemon_ = nullptr;

TEST_F(ProfileStoreTest, AnotherWorkerDecodesWithThePublishedProfile) {
  const StoriesProfile p = MakeProfile("stories260K-s2-512");
  const KeySpace space = Space("tenant-a", "stories260K");
  auto writer = Connect();
  ProfileStore published(writer.get(), space);
  ASSERT_TRUE(published.Publish(p.profile).ok());

  // The writer stores a chunk at a transform level.
  codec::ChunkShape shape = p.dump.shape;
  shape.tokens = 64;
  const std::vector<uint16_t> values = codec::SliceTokens(p.dump, 64, 128);
  codec::EncodeOptions options;
  options.profile = &p.profile;
  options.first_position = 64;
  absl::StatusOr<std::string> stream = codec::EncodeChunk(
      shape, values, codec::Level::kProfileBalanced, options);
  ASSERT_TRUE(stream.ok()) << stream.status();
  const ChunkKey key = ContentKey(*stream);
  ASSERT_TRUE(writer->Put({{key, *stream}}).ok());

  // A reader with nothing in memory: the stream names its profile, the
  // profile comes from kvcache.
  auto reader_client = Connect();
  ProfileStore reader(reader_client.get(), space);
  absl::StatusOr<std::vector<FetchedChunk>> got = reader_client->Get({key});
  ASSERT_TRUE(got.ok()) << got.status();
  absl::StatusOr<codec::StreamSummary> summary =
      codec::PeekSummary(got->front().bytes);
  ASSERT_TRUE(summary.ok() && summary->profile_id.has_value());
  absl::StatusOr<std::shared_ptr<const codec::ModelProfile>> profile =
      reader.Get(*summary->profile_id);
  ASSERT_TRUE(profile.ok()) << profile.status();
  std::vector<uint16_t> decoded(values.size());
  ASSERT_TRUE(codec::DecodeChunk(got->front().bytes, absl::MakeSpan(decoded),
                                 profile->get())
                  .ok());
  std::vector<uint16_t> direct(values.size());
  ASSERT_TRUE(
      codec::DecodeChunk(*stream, absl::MakeSpan(direct), &p.profile).ok());
  EXPECT_EQ(decoded, direct);
  // Later calls come from memory: the same object.
  EXPECT_EQ(reader.Get(*summary->profile_id)->get(), profile->get());

  absl::StatusOr<std::shared_ptr<const codec::ModelProfile>> current =
      reader.Current();
  ASSERT_TRUE(current.ok()) << current.status();
  EXPECT_EQ((*current)->id, p.profile.id);
}

TEST_F(ProfileStoreTest, PublishingAnotherProfileMovesCurrentOnly) {
  const StoriesProfile first = MakeProfile("stories260K-s1-512");
  const StoriesProfile second = MakeProfile("stories260K-s3-512-t0.7");
  const KeySpace space = Space("tenant-a", "stories260K-recalibrated");
  auto client = Connect();
  ProfileStore store(client.get(), space);
  ASSERT_TRUE(store.Publish(first.profile).ok());
  ASSERT_TRUE(store.Publish(second.profile).ok());
  ProfileStore fresh(client.get(), space);
  EXPECT_EQ((*fresh.Current())->id, second.profile.id);
  // Chunks encoded with the first still decode.
  ASSERT_TRUE(fresh.Get(first.profile.id).ok());
}

TEST_F(ProfileStoreTest, ModelsAndTenantsAreKeptApart) {
  const StoriesProfile p = MakeProfile("stories260K-s1-512");
  auto client = Connect();
  ProfileStore a(client.get(), Space("tenant-b", "model-x"));
  ASSERT_TRUE(a.Publish(p.profile).ok());
  for (const KeySpace& other :
       {Space("tenant-c", "model-x"), Space("tenant-b", "model-y")}) {
    ProfileStore b(client.get(), other);
    EXPECT_TRUE(absl::IsNotFound(b.Current().status()));
    absl::Status missing = b.Get(p.profile.id).status();
    EXPECT_TRUE(absl::IsNotFound(missing)) << missing;
    EXPECT_NE(missing.message().find(codec::ProfileIdHex(p.profile.id)),
              absl::string_view::npos);
  }
}

TEST_F(ProfileStoreTest, WhatIsNotTheNamedProfileIsRefused) {
  const StoriesProfile p = MakeProfile("stories260K-s1-512");
  const StoriesProfile q = MakeProfile("stories260K-s2-512");
  const KeySpace space = Space("tenant-d", "model-z");
  auto client = Connect();
  // Another valid profile under p's key, garbage under q's.
  ASSERT_TRUE(client
                  ->Put({{ProfileKey(space, p.profile.id),
                          codec::SerializeProfile(q.profile)}})
                  .ok());
  ASSERT_TRUE(
      client->Put({{ProfileKey(space, q.profile.id), "not a profile"}}).ok());
  ProfileStore store(client.get(), space);
  EXPECT_TRUE(absl::IsDataLoss(store.Get(p.profile.id).status()));
  EXPECT_TRUE(absl::IsDataLoss(store.Get(q.profile.id).status()));
  // A current pointer that is not an id.
  PutOptions replace;
  replace.replace = true;
  ASSERT_TRUE(client->Put({{CurrentProfileKey(space), "short"}}, replace).ok());
  EXPECT_TRUE(absl::IsDataLoss(store.Current().status()));
}

}  // namespace
}  // namespace kvcache
