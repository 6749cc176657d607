// A fixture for the worker's read path against a real kvcached: a prompt
// of real KV (chunk keys, codec bitstreams, and their decoded values, from
// the first KV dump), a daemon, a client, and fetchers. Shared by the CPU
// fetch tests and the GPU ones.
#ifndef KVCACHE_TESTS_TESTING_FETCH_FIXTURE_H_
#define KVCACHE_TESTS_TESTING_FETCH_FIXTURE_H_

#include <gtest/gtest.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "client/chunk_key.h"
#include "client/kvcache_client.h"
#include "client/prefix_fetcher.h"
#include "codec/codec.h"
#include "tests/testing/daemon_process.h"

namespace kvcache::testing {

// A prompt of real KV, in chunks of 32 tokens.
struct Prompt {
  codec::ChunkShape shape;  // of one chunk
  std::vector<ChunkKey> keys;
  std::vector<std::string> streams;
  std::vector<std::vector<uint16_t>> decoded;
};

// Built once per process; test failures are reported if the dumps are
// missing.
const Prompt& RealPrompt();

class FetchFixture : public ::testing::Test {
 public:
  // The kvcached binary the fixture starts; a runfiles path by default.
  static std::string& DaemonPath();
  // Sets DaemonPath() from a --kvcached=PATH argument, as the GPU test
  // binaries take it.
  static void ReadDaemonFlag(int argc, char** argv);

 protected:
  void SetUp() override;

  // Starts kvcached with a 64 MiB CPU tier and `args` on top, and connects.
  void StartDaemon(std::vector<std::string> args = {});
  // Puts the prompt's first `chunks` chunks.
  void PutPrompt(size_t chunks);
  std::unique_ptr<PrefixFetcher> Fetcher(FetcherOptions options);
  std::unique_ptr<PrefixFetcher> Fetcher(Transport transport);

  const Prompt* prompt_ = nullptr;
  std::unique_ptr<DaemonProcess> daemon_;
  std::shared_ptr<KvCacheClient> client_;
};

}  // namespace kvcache::testing

#endif  // KVCACHE_TESTS_TESTING_FETCH_FIXTURE_H_
