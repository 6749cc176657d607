// Prefill and decode throughput of the chat model on one core, over real
// token ids from a kvdata dump.
//   bazel run -c opt //client/examples/chat:prefill_bench
#include <cstdint>
#include <cstdio>
#include <optional>
#include <vector>

#include "absl/strings/str_cat.h"
#include "benchmark/benchmark.h"
#include "client/examples/chat/llama_model.h"
#include "client/examples/chat/paged_kv_cache.h"
#include "codec/kv_dump.h"

namespace kvcache::chat {
namespace {

std::optional<LlamaModel>& Model() {
  static std::optional<LlamaModel> model;
  return model;
}
std::vector<int32_t>& Tokens() {
  static std::vector<int32_t> tokens;
  return tokens;
}

// Prefill of the first range(0) tokens as one batch.
void BM_Prefill(benchmark::State& state) {
  const LlamaModel& model = *Model();
  const int n = static_cast<int>(state.range(0));
  PagedKvCache cache = *PagedKvCache::Create(model.CacheShape(16, 64));
  const absl::Span<const int32_t> tokens =
      absl::MakeConstSpan(Tokens()).subspan(0, n);
  for (auto _ : state) {
    const SequenceId seq = cache.CreateSequence();
    benchmark::DoNotOptimize(*model.Prefill(&cache, seq, tokens));
    cache.FreeSequence(seq).IgnoreError();
  }
  state.counters["tokens/s"] =
      benchmark::Counter(n, benchmark::Counter::kIsIterationInvariantRate);
}
BENCHMARK(BM_Prefill)->Arg(128)->Arg(512)->Unit(benchmark::kMillisecond);

// The same tokens fed one at a time, as in generation.
void BM_Decode(benchmark::State& state) {
  const LlamaModel& model = *Model();
  const int n = static_cast<int>(state.range(0));
  PagedKvCache cache = *PagedKvCache::Create(model.CacheShape(16, 64));
  for (auto _ : state) {
    const SequenceId seq = cache.CreateSequence();
    for (int i = 0; i < n; ++i) {
      benchmark::DoNotOptimize(*model.Prefill(&cache, seq, {Tokens()[i]}));
    }
    cache.FreeSequence(seq).IgnoreError();
  }
  state.counters["tokens/s"] =
      benchmark::Counter(n, benchmark::Counter::kIsIterationInvariantRate);
}
BENCHMARK(BM_Decode)->Arg(512)->Unit(benchmark::kMillisecond);

int Main(int argc, char** argv) {
  absl::StatusOr<std::string> kvdata = codec::FindKvDataDir();
  if (!kvdata.ok()) {
    std::fprintf(stderr, "%s\n", kvdata.status().ToString().c_str());
    return 1;
  }
  absl::StatusOr<LlamaModel> model =
      LlamaModel::Load(*kvdata + "/stories260K.bin");
  absl::StatusOr<codec::KvDump> dump = codec::LoadKvDump(
      absl::StrCat(*kvdata, "/", "stories260K-s1-512", ".json"));
  if (!model.ok() || !dump.ok()) {
    std::fprintf(stderr, "%s %s\n", model.status().ToString().c_str(),
                 dump.status().ToString().c_str());
    return 1;
  }
  Model().emplace(*std::move(model));
  Tokens() = ReplayInputs(dump->token_ids);
  benchmark::Initialize(&argc, argv);
  benchmark::RunSpecifiedBenchmarks();
  return 0;
}

}  // namespace
}  // namespace kvcache::chat

int main(int argc, char** argv) { return kvcache::chat::Main(argc, argv); }
