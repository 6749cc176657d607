#include "tests/testing/fetch_fixture.h"

#include <string>
#include <utility>

#include "absl/strings/string_view.h"
#include "absl/strings/strip.h"
#include "codec/kv_dump.h"

namespace kvcache::testing {

constexpr uint32_t kChunkTokens = 32;

const Prompt& RealPrompt() {
  static const Prompt* prompt = [] {
    auto* p = new Prompt;
    absl::StatusOr<std::string> dir = codec::FindKvDataDir();
    EXPECT_TRUE(dir.ok()) << dir.status();
    absl::StatusOr<std::vector<std::string>> manifests =
        codec::ListManifests(*dir);
    EXPECT_TRUE(manifests.ok() && !manifests->empty());
    absl::StatusOr<codec::KvDump> dump = codec::LoadKvDump(manifests->front());
    EXPECT_TRUE(dump.ok()) << dump.status();
    p->shape = dump->shape;
    p->shape.tokens = kChunkTokens;
    const uint32_t chunks = dump->shape.tokens / kChunkTokens;
    KeySpace space;
    space.model_id = "fetch-test";
    space.chunk_tokens = kChunkTokens;
    std::vector<int32_t> tokens(chunks * kChunkTokens);
    for (size_t i = 0; i < tokens.size(); ++i) tokens[i] = 7 + i;
    p->keys = *ChunkKeysForTokens(space, tokens);
    for (uint32_t c = 0; c < chunks; ++c) {
      const std::vector<uint16_t> values =
          codec::SliceTokens(*dump, c * kChunkTokens, (c + 1) * kChunkTokens);
      p->streams.push_back(
          *codec::EncodeChunk(p->shape, values, codec::Level::kDefault));
      p->decoded.emplace_back(values.size());
      EXPECT_TRUE(codec::DecodeChunk(p->streams.back(),
                                     absl::MakeSpan(p->decoded.back()))
                      .ok());
    }
    return p;
  }();
  return *prompt;
}

std::string& FetchFixture::DaemonPath() {
  static std::string* path = new std::string("kvstore/kvcached");
  return *path;
}

void FetchFixture::ReadDaemonFlag(int argc, char** argv) {
  for (int i = 1; i < argc; ++i) {
    absl::string_view value = argv[i];
    if (absl::ConsumePrefix(&value, "--kvcached=")) {
      DaemonPath() = std::string(value);
    }
  }
}

void FetchFixture::SetUp() {
  prompt_ = &RealPrompt();
  ASSERT_GE(prompt_->keys.size(), 8u);
}

void FetchFixture::StartDaemon(std::vector<std::string> args) {
  // First, so a test's own settings override it.
  args.insert(args.begin(), "--set=cpu_tier { capacity_bytes: 67108864 }");
  absl::StatusOr<DaemonProcess> started =
      DaemonProcess::Start(DaemonPath(), args);
  ASSERT_TRUE(started.ok()) << started.status();
  daemon_ = std::make_unique<DaemonProcess>(*std::move(started));
  ClientOptions options;
  options.address = daemon_->address();
  options.timeout = absl::Seconds(10);
  absl::StatusOr<std::unique_ptr<KvCacheClient>> client =
      KvCacheClient::Connect(options);
  ASSERT_TRUE(client.ok()) << client.status();
  client_ = std::move(*client);
}

void FetchFixture::PutPrompt(size_t chunks) {
  std::vector<ChunkToPut> puts;
  for (size_t i = 0; i < chunks; ++i) {
    puts.push_back({prompt_->keys[i], prompt_->streams[i]});
  }
  absl::Status s = client_->Put(puts);
  ASSERT_TRUE(s.ok()) << s;
}

std::unique_ptr<PrefixFetcher> FetchFixture::Fetcher(FetcherOptions options) {
  absl::StatusOr<std::unique_ptr<PrefixFetcher>> fetcher =
      PrefixFetcher::Create(client_, options);
  EXPECT_TRUE(fetcher.ok()) << fetcher.status();
  return fetcher.ok() ? std::move(*fetcher) : nullptr;
}

std::unique_ptr<PrefixFetcher> FetchFixture::Fetcher(Transport transport) {
  FetcherOptions options;
  options.transport = transport;
  return Fetcher(options);
}

}  // namespace kvcache::testing
