// How long a worker waits for a 32K-token prefix of Llama-3-8B-shaped KV
// (32 layers, 8 KV heads, head dim 128, fp16: 4 GiB) to land in its GPU,
// restored from a real kvcached on this host by each path, side by side
// with copying the raw fp16 over the same path and with recomputing it.
//
// Chunks are the real dumps tiled to the Llama shape and encoded at the
// default level; every restore is checked against the CPU decoder. Needs a
// GPU: run through tests/gpu/run.sh (which passes --kvcached). With two
// GPUs it also restores over NCCL from a node on the other GPU.
#include <cuda_runtime.h>
#include <signal.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/strip.h"
#include "client/chunk_key.h"
#include "client/kvcache_client.h"
#include "client/prefix_fetcher.h"
#include "codec/codec.h"
#include "codec/cuda/gpu_codec.h"
#include "codec/cuda/test_util.h"
#include "codec/kv_dump.h"
#include "tests/testing/daemon_process.h"
#include "tests/testing/fio_process.h"
#include "tests/testing/raw_disk_read.h"
#include "transfer/gpu_decode_sink.h"
#include "transfer/gpu_storer.h"

namespace kvcache {
namespace {

using codec::ChunkShape;
using codec::DType;
using codec::gpu::KvChunkRef;
using codec::gpu::KvLayout;
using testing::DaemonProcess;

using codec::gpu::kLlama8B;
constexpr int kChunks = 128;  // 32K tokens
constexpr int kDistinct = 8;  // distinct chunk contents, tiled
constexpr int kReps = 3;

void Die(const absl::Status& s, const char* what) {
  if (s.ok()) return;
  std::fprintf(stderr, "%s: %s\n", what, s.ToString().c_str());
  std::exit(1);
}

double Seconds(std::chrono::steady_clock::time_point since) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - since)
      .count();
}

// Progress on stderr, so a slow stage shows where it is.
void Note(const char* what) {
  static const auto start = std::chrono::steady_clock::now();
  std::fprintf(stderr, "e2e_bench: %6.1f s %s\n", Seconds(start), what);
}

double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

// "median (lowest-highest)" of v times `scale`.
std::string MedianAndRange(std::vector<double> v, double scale = 1) {
  std::sort(v.begin(), v.end());
  return absl::StrFormat("%.2f (%.2f-%.2f)", scale * Median(v),
                         scale * v.front(), scale * v.back());
}

// Copies raw chunks into device memory at their place: the peer that moves
// uncompressed fp16 over the same path as a restore.
class RawUploadSink : public ChunkSink {
 public:
  RawUploadSink(uint8_t* device, uint64_t chunk_bytes, uint8_t* pinned)
      : device_(device), chunk_bytes_(chunk_bytes), pinned_(pinned) {}
  absl::Status Consume(size_t index, absl::string_view bytes,
                       bool stable) override {
    const void* source = bytes.data();
    if (!stable) {
      std::memcpy(pinned_ + index * chunk_bytes_, bytes.data(), bytes.size());
      source = pinned_ + index * chunk_bytes_;
    }
    cudaMemcpyAsync(device_ + index * chunk_bytes_, source, bytes.size(),
                    cudaMemcpyHostToDevice);
    return absl::OkStatus();
  }
  absl::Status Finish() override {
    return cudaDeviceSynchronize() == cudaSuccess
               ? absl::OkStatus()
               : absl::InternalError("raw upload failed");
  }

 private:
  uint8_t* device_;
  uint64_t chunk_bytes_;
  uint8_t* pinned_;
};

// Passes chunks on to a GpuDecodeSink, noting when the first arrived: the
// sink's own clock starts at its first chunk, so a fetch's wait on the node
// before it (a Locate reading from NVMe) is added from here.
class FirstChunkClock : public ChunkSink {
 public:
  explicit FirstChunkClock(ChunkSink& sink)
      : sink_(sink), start_(std::chrono::steady_clock::now()) {}
  absl::Status Consume(size_t index, absl::string_view bytes,
                       bool stable) override {
    Note();
    return sink_.Consume(index, bytes, stable);
  }
  bool accepts_device_memory() const override {
    return sink_.accepts_device_memory();
  }
  absl::Status ConsumeOnDevice(size_t index, const void* device_bytes,
                               uint64_t size) override {
    Note();
    return sink_.ConsumeOnDevice(index, device_bytes, size);
  }
  absl::Status ConsumeWrittenOnDevice(
      size_t first, absl::Span<const uint64_t> sizes,
      absl::FunctionRef<absl::Status(void*, uint64_t, CUstream_st*)> write)
      override {
    Note();
    return sink_.ConsumeWrittenOnDevice(first, sizes, write);
  }
  absl::Status Flush() override { return sink_.Flush(); }
  absl::Status Finish() override {
    finish_ms_ = std::chrono::duration<double, std::milli>(
                     std::chrono::steady_clock::now() - start_)
                     .count();
    return sink_.Finish();
  }

  // Milliseconds from this clock's making to the first chunk.
  double wait_ms() const { return wait_ms_; }
  // And to the fetch's last step, Finish: when it has handed over every
  // chunk.
  double finish_ms() const { return finish_ms_; }

 private:
  void Note() {
    if (noted_) return;
    noted_ = true;
    wait_ms_ = std::chrono::duration<double, std::milli>(
                   std::chrono::steady_clock::now() - start_)
                   .count();
  }

  ChunkSink& sink_;
  const std::chrono::steady_clock::time_point start_;
  bool noted_ = false;
  double wait_ms_ = 0;
  double finish_ms_ = 0;
};

struct Row {
  std::string path;
  double restore_s = 0;
  double raw_s = 0;  // raw fp16 over the same path
  std::string raw_what;
  double first_ms = 0;
  std::string transport;
};

class Bench {
 public:
  Bench(std::string kvcached) : kvcached_(std::move(kvcached)) {}

  void Prepare() {
    absl::StatusOr<std::string> dir = codec::FindKvDataDir();
    Die(dir.status(), "kv data");
    absl::StatusOr<std::vector<std::string>> manifests =
        codec::ListManifests(*dir);
    Die(manifests.status(), "manifests");
    std::vector<codec::KvDump> dumps;
    for (const std::string& m : *manifests) {
      absl::StatusOr<codec::KvDump> d = codec::LoadKvDump(m);
      Die(d.status(), "dump");
      dumps.push_back(*std::move(d));
    }
    streams_.resize(kDistinct);
    expected_.resize(kDistinct);
    std::vector<std::thread> threads;
    for (int i = 0; i < kDistinct; ++i) {
      threads.emplace_back([&, i] {
        const std::vector<uint16_t> values = codec::gpu::TiledChunk(
            dumps[i % dumps.size()], kLlama8B, 256 * (i / dumps.size()));
        streams_[i] =
            *codec::EncodeChunk(kLlama8B, values, codec::Level::kDefault);
        expected_[i].resize(values.size());
        Die(codec::DecodeChunk(streams_[i], absl::MakeSpan(expected_[i])),
            "cpu decode");
      });
    }
    for (auto& t : threads) t.join();
    KeySpace space;
    space.model_id = "e2e-bench";
    space.chunk_tokens = kLlama8B.tokens;
    std::vector<int32_t> tokens(kChunks * kLlama8B.tokens);
    for (size_t i = 0; i < tokens.size(); ++i) tokens[i] = i % 50000;
    keys_ = *ChunkKeysForTokens(space, tokens);
    space.model_id = "e2e-bench-raw";
    raw_keys_ = *ChunkKeysForTokens(space, tokens);
    space.model_id = "e2e-bench-store";
    store_keys_ = *ChunkKeysForTokens(space, tokens);
    space.model_id = "e2e-bench-store-raw";
    raw_store_keys_ = *ChunkKeysForTokens(space, tokens);
    for (int i = 0; i < kChunks; ++i) {
      compressed_bytes_ += streams_[i % kDistinct].size();
    }
    KVCACHE_CUDA_OR_DIE(cudaMalloc(&dest_, Raw()));
    KVCACHE_CUDA_OR_DIE(cudaMallocHost(&pinned_, Raw()));
    for (int i = 0; i < kChunks; ++i) {
      const auto* v = expected_[i % kDistinct].data();
      std::memcpy(pinned_ + i * kLlama8B.RawBytes(), v, kLlama8B.RawBytes());
    }
  }

  static uint64_t Raw() { return kChunks * kLlama8B.RawBytes(); }
  uint64_t compressed_bytes() const { return compressed_bytes_; }

  std::unique_ptr<DaemonProcess> StartDaemon(std::vector<std::string> args) {
    absl::StatusOr<DaemonProcess> d = DaemonProcess::Start(kvcached_, args);
    Die(d.status(), "starting kvcached");
    return std::make_unique<DaemonProcess>(*std::move(d));
  }

  std::shared_ptr<KvCacheClient> Connect(const DaemonProcess& daemon) {
    ClientOptions options;
    options.address = daemon.address();
    options.timeout = absl::Minutes(5);
    options.piece_bytes = 4 << 20;
    absl::StatusOr<std::unique_ptr<KvCacheClient>> c =
        KvCacheClient::Connect(options);
    Die(c.status(), "connect");
    return *std::move(c);
  }

  void PutCompressed(KvCacheClient& client) {
    for (int i = 0; i < kChunks; i += 16) {
      std::vector<ChunkToPut> puts;
      for (int j = i; j < i + 16; ++j) {
        puts.push_back({keys_[j], streams_[j % kDistinct]});
      }
      Die(client.Put(puts), "put");
    }
  }

  void PutRaw(KvCacheClient& client, const uint8_t* from,
              const std::vector<ChunkKey>& keys) {
    for (int i = 0; i < kChunks; ++i) {
      const char* at =
          reinterpret_cast<const char*>(from + i * kLlama8B.RawBytes());
      Die(client.Put({{keys[i], absl::string_view(at, kLlama8B.RawBytes())}}),
          "put raw");
    }
  }
  void PutRaw(KvCacheClient& client) { PutRaw(client, pinned_, raw_keys_); }

  // Stores the prefix from the worker's GPU blocks through a GpuStorer:
  // seconds until Store returns (the worker's thread is free) into
  // `queued_s`, seconds until every chunk is in the node as the result.
  // The stored chunks must be the CPU encoder's bytes.
  double TimeStore(std::shared_ptr<KvCacheClient> client, double* queued_s,
                   uint64_t* device_bytes) {
    KVCACHE_CUDA_OR_DIE(
        cudaMemcpy(dest_, pinned_, Raw(), cudaMemcpyHostToDevice));
    transfer::GpuStorerOptions options;
    options.slots = 4;
    absl::StatusOr<std::unique_ptr<transfer::GpuStorer>> storer =
        transfer::GpuStorer::Create(client, Layout(), options);
    Die(storer.status(), "GPU storer");
    *device_bytes = (*storer)->device_bytes();
    std::vector<transfer::ChunkFromDevice> chunks(kChunks);
    for (int i = 0; i < kChunks; ++i) {
      chunks[i].key = store_keys_[i];
      if (i > 0) chunks[i].parent = store_keys_[i - 1];
      chunks[i].source.tokens = kLlama8B.tokens;
      chunks[i].source.values = dest_ + i * kLlama8B.NumValues();
    }
    KVCACHE_CUDA_OR_DIE(cudaDeviceSynchronize());
    const auto start = std::chrono::steady_clock::now();
    absl::StatusOr<transfer::GpuStorer::Ticket> ticket =
        (*storer)->Store(std::move(chunks), nullptr);
    Die(ticket.status(), "store");
    *queued_s = Seconds(start);
    Die((*storer)->Wait(*ticket).status(), "store");
    const double stored_s = Seconds(start);
    for (int i : {0, kChunks - 1}) {
      absl::StatusOr<std::vector<FetchedChunk>> got =
          client->Get({store_keys_[i]});
      Die(got.status(), "get stored");
      absl::StatusOr<std::string> cpu = codec::EncodeChunk(
          kLlama8B, expected_[i % kDistinct], codec::Level::kDefault);
      if (!cpu.ok() || (*got)[0].bytes != *cpu) {
        std::fprintf(stderr, "stored chunk %d differs from the CPU encoder's\n",
                     i);
        std::exit(1);
      }
    }
    return stored_s;
  }

  // The raw peer of TimeStore: copy the fp16 down to pinned memory and put
  // it over the same gRPC connection.
  double TimeStoreRaw(KvCacheClient& client) {
    KVCACHE_CUDA_OR_DIE(cudaDeviceSynchronize());
    const auto start = std::chrono::steady_clock::now();
    KVCACHE_CUDA_OR_DIE(
        cudaMemcpy(pinned_, dest_, Raw(), cudaMemcpyDeviceToHost));
    PutRaw(client, pinned_, raw_store_keys_);
    return Seconds(start);
  }

  // Median seconds of restoring the prefix through `fetcher`; checks the
  // values of the last restore.
  double TimeRestore(PrefixFetcher& fetcher, double* first_ms,
                     FetchReport* report) {
    std::vector<double> times, firsts;
    for (int rep = 0; rep < kReps; ++rep) {
      KVCACHE_CUDA_OR_DIE(cudaMemset(dest_, 0, Raw()));
      times.push_back(RestoreOnce(fetcher, &firsts, report));
    }
    Check();
    *first_ms = Median(firsts);
    return Median(times);
  }

  // The worker's blocks: the prefix, contiguous, chunk after chunk.
  static KvLayout Layout() {
    return KvLayout::Contiguous(kLlama8B.layers, kLlama8B.kv_heads,
                                kLlama8B.head_dim, kLlama8B.dtype);
  }

  // Chunk i's place in the contiguous prefix.
  std::vector<KvChunkRef> Destinations() const {
    std::vector<KvChunkRef> dests(kChunks);
    for (int i = 0; i < kChunks; ++i) {
      dests[i].tokens = kLlama8B.tokens;
      dests[i].values = dest_ + i * kLlama8B.NumValues();
    }
    return dests;
  }

  // A sink restoring the prefix into the worker's blocks.
  std::unique_ptr<transfer::GpuDecodeSink> MakeSink(
      transfer::GpuDecodeSinkOptions options = {}) {
    absl::StatusOr<std::unique_ptr<transfer::GpuDecodeSink>> sink =
        transfer::GpuDecodeSink::Create(Layout(), Destinations(), nullptr,
                                        options);
    Die(sink.status(), "sink");
    return *std::move(sink);
  }

  // Layer by layer against chunk order, from the same node, in alternating
  // rounds on one kept sink each (as kvcache_fetch_to_device keeps them):
  // the whole restore, and when its first layer (chunk order: first batch
  // of chunks) is ready, from the fetch's start.
  void CompareLayerByLayer(PrefixFetcher& fetcher) {
    uint32_t signalled = 0;
    const transfer::LayerReadyCallback on_layer = [&](uint32_t, CUevent_st*) {
      ++signalled;
    };
    std::unique_ptr<transfer::GpuDecodeSink> in_order = MakeSink();
    std::unique_ptr<transfer::GpuDecodeSink> by_layer =
        MakeSink({.on_layer = on_layer});
    std::vector<double> order_s, layer_s, first_batch_ms, first_layer_ms,
        all_taken_ms;
    constexpr int kWarmRounds = 2, kRounds = 2 * kReps;
    for (int round = 0; round < kWarmRounds + kRounds; ++round) {
      const bool layered = round % 2 == 1;
      transfer::GpuDecodeSink& sink = layered ? *by_layer : *in_order;
      Die(sink.Reset(Layout(), Destinations(), nullptr, nullptr,
                     layered ? on_layer : nullptr),
          "reset");
      KVCACHE_CUDA_OR_DIE(cudaMemset(dest_, 0, Raw()));
      const auto start = std::chrono::steady_clock::now();
      FirstChunkClock clock(sink);
      Die(fetcher.Fetch(keys_, clock).status(), "restore");
      const double s = Seconds(start);
      Check();
      if (round < kWarmRounds) continue;
      (layered ? layer_s : order_s).push_back(s);
      if (layered) {
        first_layer_ms.push_back(clock.wait_ms() + sink.first_batch_ms());
        all_taken_ms.push_back(clock.finish_ms());
      } else {
        first_batch_ms.push_back(clock.wait_ms() + sink.first_batch_ms());
      }
    }
    if (signalled != (kWarmRounds + kRounds) / 2 * kLlama8B.layers) {
      std::fprintf(stderr, "layers signalled %u times\n", signalled);
      std::exit(1);
    }
    std::printf(
        "\nlayer by layer from the CPU tier (shared memory), %d alternating "
        "rounds each: whole restore %s ms against %s ms in chunk order "
        "(%+.1f%%); first layer ready after %s ms (%.1f%% of the restore; "
        "the fetch had handed over every chunk after %s ms); in chunk order "
        "the first batch of %u chunks (all layers) after %s ms\n",
        kReps, MedianAndRange(layer_s, 1e3).c_str(),
        MedianAndRange(order_s, 1e3).c_str(),
        100 * (Median(layer_s) / Median(order_s) - 1),
        MedianAndRange(first_layer_ms).c_str(),
        100 * Median(first_layer_ms) / 1e3 / Median(layer_s),
        MedianAndRange(all_taken_ms).c_str(),
        transfer::GpuDecodeSinkOptions().batch_chunks,
        MedianAndRange(first_batch_ms).c_str());
  }

  double RestoreOnce(PrefixFetcher& fetcher, std::vector<double>* firsts,
                     FetchReport* report) {
    std::unique_ptr<transfer::GpuDecodeSink> sink = MakeSink();
    const auto start = std::chrono::steady_clock::now();
    FirstChunkClock clock(*sink);
    absl::StatusOr<FetchReport> r = fetcher.Fetch(keys_, clock);
    const double s = Seconds(start);
    Die(r.status(), "restore");
    *report = *r;
    firsts->push_back(clock.wait_ms() + sink->first_batch_ms());
    return s;
  }

  double TimeRaw(PrefixFetcher& fetcher) {
    std::vector<double> times;
    uint8_t* pinned = nullptr;
    KVCACHE_CUDA_OR_DIE(cudaMallocHost(&pinned, Raw()));
    for (int rep = 0; rep < 3; ++rep) {
      RawUploadSink sink(reinterpret_cast<uint8_t*>(dest_), kLlama8B.RawBytes(),
                         pinned);
      const auto start = std::chrono::steady_clock::now();
      Die(fetcher.Fetch(raw_keys_, sink).status(), "raw fetch");
      times.push_back(Seconds(start));
    }
    cudaFreeHost(pinned);
    Check();
    return Median(times);
  }

  double TimeH2D() {
    std::vector<double> times;
    for (int rep = 0; rep < kReps; ++rep) {
      const auto start = std::chrono::steady_clock::now();
      KVCACHE_CUDA_OR_DIE(
          cudaMemcpy(dest_, pinned_, Raw(), cudaMemcpyHostToDevice));
      times.push_back(Seconds(start));
    }
    return Median(times);
  }

  double TimeD2D() {
    uint16_t* other = nullptr;
    KVCACHE_CUDA_OR_DIE(cudaMalloc(&other, Raw()));
    std::vector<double> times;
    for (int rep = 0; rep < kReps; ++rep) {
      KVCACHE_CUDA_OR_DIE(cudaDeviceSynchronize());
      const auto start = std::chrono::steady_clock::now();
      KVCACHE_CUDA_OR_DIE(
          cudaMemcpy(other, dest_, Raw(), cudaMemcpyDeviceToDevice));
      KVCACHE_CUDA_OR_DIE(cudaDeviceSynchronize());  // D2D copies return early
      times.push_back(Seconds(start));
    }
    cudaFree(other);
    return Median(times);
  }

  // The raw peer of a restore over NCCL from another GPU: the fp16 copied
  // from GPU `peer` into the worker's blocks (over NVLink where there is
  // one).
  double TimePeerCopy(int peer) {
    int here = 0;
    KVCACHE_CUDA_OR_DIE(cudaGetDevice(&here));
    KVCACHE_CUDA_OR_DIE(cudaSetDevice(peer));
    uint16_t* there = nullptr;
    KVCACHE_CUDA_OR_DIE(cudaMalloc(&there, Raw()));
    KVCACHE_CUDA_OR_DIE(cudaSetDevice(here));
    int can = 0;
    KVCACHE_CUDA_OR_DIE(cudaDeviceCanAccessPeer(&can, here, peer));
    if (can) (void)cudaDeviceEnablePeerAccess(peer, 0);
    std::vector<double> times;
    for (int rep = 0; rep < kReps; ++rep) {
      KVCACHE_CUDA_OR_DIE(cudaDeviceSynchronize());
      const auto start = std::chrono::steady_clock::now();
      KVCACHE_CUDA_OR_DIE(cudaMemcpyPeer(dest_, here, there, peer, Raw()));
      KVCACHE_CUDA_OR_DIE(cudaDeviceSynchronize());
      times.push_back(Seconds(start));
    }
    cudaFree(there);
    return Median(times);
  }

  // Decode alone, from compressed chunks already in device memory: what a
  // restore from a GPU tier would cost at best.
  double TimeDecodeFromDevice() {
    std::vector<uint64_t> at;
    uint64_t total = 0;
    for (int i = 0; i < kChunks; ++i) {
      at.push_back(total);
      total += (streams_[i % kDistinct].size() + 255) / 256 * 256;
    }
    uint8_t* compressed = nullptr;
    KVCACHE_CUDA_OR_DIE(cudaMalloc(&compressed, total));
    for (int i = 0; i < kChunks; ++i) {
      const std::string& s = streams_[i % kDistinct];
      KVCACHE_CUDA_OR_DIE(cudaMemcpy(compressed + at[i], s.data(), s.size(),
                                     cudaMemcpyHostToDevice));
    }
    std::vector<codec::gpu::DecodeJob> jobs(kChunks);
    for (int i = 0; i < kChunks; ++i) {
      jobs[i].stream = compressed + at[i];
      jobs[i].stream_bytes = streams_[i % kDistinct].size();
      jobs[i].dest.tokens = kLlama8B.tokens;
      jobs[i].dest.values = dest_ + i * kLlama8B.NumValues();
    }
    const KvLayout layout = Layout();
    // Batches as the sink decodes chunks that are already on the GPU.
    const int batch = transfer::GpuDecodeSinkOptions().device_batch_chunks;
    const uint64_t ws_bytes = codec::gpu::DecodeWorkspaceBytes(
        layout, absl::MakeConstSpan(jobs).first(batch));
    void* ws = nullptr;
    int32_t* status = nullptr;
    KVCACHE_CUDA_OR_DIE(cudaMalloc(&ws, ws_bytes));
    KVCACHE_CUDA_OR_DIE(cudaMalloc(&status, 4 * kChunks));
    std::vector<double> times;
    for (int rep = 0; rep < kReps; ++rep) {
      KVCACHE_CUDA_OR_DIE(cudaDeviceSynchronize());
      const auto start = std::chrono::steady_clock::now();
      for (int i = 0; i < kChunks; i += batch) {
        Die(codec::gpu::DecodeBatch(layout,
                                    absl::MakeConstSpan(jobs).subspan(i, batch),
                                    ws, ws_bytes, status + i, nullptr),
            "decode");
      }
      KVCACHE_CUDA_OR_DIE(cudaDeviceSynchronize());
      times.push_back(Seconds(start));
    }
    cudaFree(ws);
    cudaFree(status);
    cudaFree(compressed);
    Check();
    return Median(times);
  }

  // Every restored chunk equals the CPU decoder's output.
  void Check() {
    std::vector<uint16_t> got(kLlama8B.NumValues());
    for (int i = 0; i < kChunks; ++i) {
      KVCACHE_CUDA_OR_DIE(
          cudaMemcpy(got.data(), dest_ + i * kLlama8B.NumValues(),
                     kLlama8B.RawBytes(), cudaMemcpyDeviceToHost));
      if (got != expected_[i % kDistinct]) {
        std::fprintf(stderr, "chunk %d restored wrong\n", i);
        std::exit(1);
      }
    }
  }

  // A damaged chunk in the prefix fails the restore, naming the chunk.
  void CheckCorruptChunkFails(KvCacheClient& client, PrefixFetcher& fetcher) {
    std::string damaged = streams_[5 % kDistinct];
    damaged[damaged.size() / 3] ^= 0x40;
    Die(client.Put({{keys_[5], damaged}},
                   PutOptions{absl::ZeroDuration(), /*replace=*/true}),
        "put damaged");
    absl::StatusOr<FetchReport> r = fetcher.Fetch(keys_, *MakeSink());
    if (r.ok() || !absl::IsDataLoss(r.status()) ||
        r.status().message().find("chunk 5") == std::string::npos) {
      std::fprintf(stderr, "damaged chunk not reported: %s\n",
                   r.status().ToString().c_str());
      std::exit(1);
    }
    std::printf("check: a damaged chunk fails the restore: %s\n",
                r.status().ToString().c_str());
    Die(client.Put({{keys_[5], streams_[5 % kDistinct]}},
                   PutOptions{absl::ZeroDuration(), /*replace=*/true}),
        "put back");
  }

  const std::vector<ChunkKey>& keys() const { return keys_; }

 private:
  const std::string kvcached_;
  std::vector<std::string> streams_;
  std::vector<std::vector<uint16_t>> expected_;
  std::vector<ChunkKey> keys_, raw_keys_, store_keys_, raw_store_keys_;
  uint64_t compressed_bytes_ = 0;
  uint16_t* dest_ = nullptr;
  uint8_t* pinned_ = nullptr;
};

std::unique_ptr<PrefixFetcher> MakeFetcher(
    std::shared_ptr<KvCacheClient> c, Transport transport,
    uint64_t nvme_window_bytes = FetcherOptions{}.nvme_window_bytes) {
  FetcherOptions options;
  options.transport = transport;
  options.nvme_window_bytes = nvme_window_bytes;
  options.register_for_gpu = true;
  options.lease = absl::Minutes(1);
  absl::StatusOr<std::unique_ptr<PrefixFetcher>> f =
      PrefixFetcher::Create(std::move(c), options);
  Die(f.status(), "fetcher");
  return *std::move(f);
}

int Run(int argc, char** argv) {
  std::string kvcached = "kvstore/kvcached";
  std::string nvme_dir = "/tmp/kvcache-e2e-nvme";
  std::string fio = testing::FioReadJob{}.fio;
  for (int i = 1; i < argc; ++i) {
    absl::string_view value = argv[i];
    if (absl::ConsumePrefix(&value, "--kvcached=")) {
      kvcached = std::string(value);
    } else if (absl::ConsumePrefix(&value, "--nvme_dir=")) {
      nvme_dir = std::string(value);
    } else if (absl::ConsumePrefix(&value, "--fio=")) {
      fio = std::string(value);
    }
  }
  cudaDeviceProp prop;
  KVCACHE_CUDA_OR_DIE(cudaGetDeviceProperties(&prop, 0));
  Bench bench(kvcached);
  Note("encoding the prefix");
  bench.Prepare();
  const double gib = Bench::Raw() / double(1 << 30);
  std::printf(
      "device: %s; prefix: %d chunks x 256 tokens = 32K tokens of Llama-3-8B "
      "KV (%.2f GiB fp16), default level: %.1f MiB compressed (%.2fx)\n",
      prop.name, kChunks, gib, bench.compressed_bytes() / 1048576.0,
      double(Bench::Raw()) / bench.compressed_bytes());
  auto gbps = [](double s) { return Bench::Raw() / s / 1e9; };
  std::vector<Row> rows;

  // CPU tier on this host: shared memory, and gRPC on loopback.
  {
    auto daemon =
        bench.StartDaemon({"--set=cpu_tier { capacity_bytes: 6442450944 }",
                           "--set=limits { max_chunk_bytes: 67108864 }",
                           // The raw peer leases all 4 GiB at once.
                           "--set=shared_memory { max_leased_percent: 90 }"});
    auto client = bench.Connect(*daemon);
    Note("storing the prefix, compressed and raw");
    bench.PutCompressed(*client);
    bench.PutRaw(*client);
    Note("restoring from the CPU tier");
    const double h2d = bench.TimeH2D();
    for (Transport t : {Transport::kSharedMemory, Transport::kGrpc}) {
      auto fetcher = MakeFetcher(client, t);
      Note(t == Transport::kGrpc ? "over gRPC" : "over shared memory");
      Row row;
      FetchReport report;
      row.restore_s = bench.TimeRestore(*fetcher, &row.first_ms, &report);
      if (t == Transport::kSharedMemory) {
        row.path = "(b) CPU tier, same host (shared memory)";
        row.transport = absl::StrCat(report.shared_memory_chunks, " shm");
        row.raw_s = h2d;
        row.raw_what = "cudaMemcpy pinned->GPU";
        rows.push_back(row);
        Row raw_shm = row;
        raw_shm.path = "    raw fp16 from the shared CPU tier";
        raw_shm.restore_s = bench.TimeRaw(*fetcher);
        raw_shm.raw_s = h2d;
        raw_shm.first_ms = 0;
        rows.push_back(raw_shm);
        Note("layer by layer");
        bench.CompareLayerByLayer(*fetcher);
        bench.CheckCorruptChunkFails(*client, *fetcher);
      } else {
        row.path = "(c) node over gRPC (loopback)";
        row.transport = absl::StrCat(report.grpc_chunks, " grpc");
        row.raw_s = bench.TimeRaw(*fetcher);
        row.raw_what = "raw fp16 over gRPC";
        rows.push_back(row);
      }
    }
  }

  // GPU tier on this host: the worker decodes the chunks in place in the
  // node's device memory, opened through CUDA IPC.
  double decode_alone_s = 0, gpu_tier_s = 0;
  {
    auto daemon = bench.StartDaemon(
        {"--set=cpu_tier { capacity_bytes: 1073741824 }",
         "--set=gpu_tier { capacity_bytes: 2147483648 max_admit_percent: 100 "
         "}",
         "--set=limits { max_chunk_bytes: 67108864 }",
         "--set=shared_memory { max_leased_percent: 90 }"});
    auto client = bench.Connect(*daemon);
    Note("storing the prefix in the GPU tier");
    bench.PutCompressed(*client);
    Note("restoring from the GPU tier");
    auto fetcher = MakeFetcher(client, Transport::kAuto);
    Row row;
    FetchReport report;
    row.path = "(a) GPU tier, same host (CUDA IPC, decoded in place)";
    row.restore_s = gpu_tier_s =
        bench.TimeRestore(*fetcher, &row.first_ms, &report);
    row.transport = absl::StrCat(report.gpu_tier_chunks, " gpu, ",
                                 report.shared_memory_chunks, " shm");
    row.raw_s = bench.TimeD2D();
    row.raw_what = "cudaMemcpy GPU->GPU";
    rows.push_back(row);
    Note("decoding from device memory");
    Row alone;
    alone.path = "    GPU decode alone (chunks in the worker's memory)";
    alone.restore_s = decode_alone_s = bench.TimeDecodeFromDevice();
    alone.transport = "none";
    rows.push_back(alone);
  }

  // GPU tier of a node on another GPU: the chunks come GPU to GPU over an
  // NCCL link into the worker's staging, and decode there.
  int devices = 0;
  KVCACHE_CUDA_OR_DIE(cudaGetDeviceCount(&devices));
  if (devices >= 2) {
    auto daemon = bench.StartDaemon(
        {"--set=cpu_tier { capacity_bytes: 1073741824 }",
         "--set=gpu_tier { capacity_bytes: 2147483648 max_admit_percent: 100 "
         "device: 1 }",
         "--set=limits { max_chunk_bytes: 67108864 }"});
    auto client = bench.Connect(*daemon);
    Note("storing the prefix in the GPU tier of GPU 1");
    bench.PutCompressed(*client);
    Note("restoring over NCCL");
    auto fetcher = MakeFetcher(client, Transport::kNccl);
    Row row;
    FetchReport report;
    row.path = "(e) GPU tier on another GPU (NCCL, then decoded)";
    row.restore_s = bench.TimeRestore(*fetcher, &row.first_ms, &report);
    row.transport = absl::StrCat(report.nccl_chunks, " nccl");
    row.raw_s = bench.TimePeerCopy(1);
    row.raw_what = "cudaMemcpyPeer GPU1->GPU0";
    rows.push_back(row);
  } else {
    std::printf("(e) NCCL from another GPU: not run, this host has %d GPU\n",
                devices);
  }

  // NVMe tier: a restarted node has everything on disk and nothing in
  // memory; each restore reads the chunks up with io_uring.
  // The disk's own sequential rate: fio's, or the same job issued from
  // here on a host without fio.
  const bool have_fio = std::filesystem::exists(fio);
  std::vector<double> disk_gbps;
  {
    Note("restoring from the NVMe tier");
    std::filesystem::remove_all(nvme_dir);
    const std::vector<std::string> args = {
        "--set=cpu_tier { capacity_bytes: 2147483648 }",
        absl::StrCat("--set=nvme_tier { data_dir: '", nvme_dir,
                     "' slab_bytes: 1073741824 slab_count: 2 "
                     "write_through: true }")};
    {
      auto daemon = bench.StartDaemon(args);
      bench.PutCompressed(*bench.Connect(*daemon));
      daemon->Signal(SIGTERM);
      (void)daemon->WaitForExit(absl::Seconds(60));
    }
    // Located in windows (the default), and in one Locate for the peer;
    // fio reads the same slab before each restore.
    for (const uint64_t window :
         {FetcherOptions{}.nvme_window_bytes, uint64_t{0}}) {
      std::vector<double> times, firsts;
      FetchReport report;
      for (int rep = 0; rep < 3; ++rep) {
        const std::string slab = nvme_dir + "/slab-000";
        const uint64_t bytes = bench.compressed_bytes() >> 20 << 20;
        absl::StatusOr<testing::DiskReadResult> read =
            have_fio
                ? testing::RunFioRead({.fio = fio,
                                       .file = slab,
                                       .bytes = bytes,
                                       .report_path = nvme_dir + "-fio.json"})
                : testing::RawSequentialRead(slab, bytes);
        Die(read.status(), "sequential read of the slab");
        disk_gbps.push_back(read->GbPerSecond());
        auto daemon = bench.StartDaemon(args);
        auto fetcher =
            MakeFetcher(bench.Connect(*daemon), Transport::kAuto, window);
        times.push_back(bench.RestoreOnce(*fetcher, &firsts, &report));
        daemon->Signal(SIGTERM);
        (void)daemon->WaitForExit(absl::Seconds(60));
      }
      bench.Check();
      Row row;
      row.path = window > 0 ? absl::StrCat(
                                  "(d) NVMe tier (cold: node just restarted),"
                                  " located ",
                                  window >> 20, " MiB at a time")
                            : "(d) NVMe tier (cold), located in one call";
      row.restore_s = Median(times);
      row.first_ms = Median(firsts);
      row.transport = absl::StrCat(report.shared_memory_chunks, " shm, ",
                                   report.locate_calls, " Locate calls");
      rows.push_back(row);
    }
    std::filesystem::remove_all(nvme_dir);
  }

  // Store: the worker's prefix, in its GPU blocks, encoded on its GPU and
  // put into a node on this host over gRPC in the background.
  double store_s = 0, store_queued_s = 0, store_raw_s = 0;
  uint64_t storer_device_bytes = 0;
  {
    Note("storing from GPU blocks");
    auto daemon =
        bench.StartDaemon({"--set=cpu_tier { capacity_bytes: 6442450944 }",
                           "--set=limits { max_chunk_bytes: 67108864 }"});
    auto client = bench.Connect(*daemon);
    store_s = bench.TimeStore(client, &store_queued_s, &storer_device_bytes);
    Note("storing raw fp16");
    store_raw_s = bench.TimeStoreRaw(*client);
  }

  // Prefill FLOPs: 2 per parameter per token (8.03e9 parameters), plus
  // causal attention, 4 * layers * hidden * tokens^2 / 2.
  const double tokens = 32768, hidden = 4096, layers = 32;
  const double flops =
      2 * 8.03e9 * tokens + 4 * layers * hidden * tokens * tokens / 2;
  const double recompute_s = flops / (989e12 * 0.5);

  std::printf(
      "\n| path | restore s | effective GB/s | first batch ms (from the "
      "fetch's "
      "start) | raw fp16 same "
      "path | raw s | raw GB/s | speedup | chunks via |\n|---|---|---|---|---|"
      "---|---|---|---|\n");
  for (const Row& r : rows) {
    std::string raw_s, raw_gbps, speedup;
    if (r.raw_s > 0) {
      raw_s = absl::StrFormat("%.4f", r.raw_s);
      raw_gbps = absl::StrFormat("%.1f", gbps(r.raw_s));
      speedup = absl::StrFormat("%.2fx", r.raw_s / r.restore_s);
    }
    std::printf("| %s | %.4f | %.1f | %.2f | %s | %s | %s | %s | %s |\n",
                r.path.c_str(), r.restore_s, gbps(r.restore_s), r.first_ms,
                r.raw_what.c_str(), raw_s.c_str(), raw_gbps.c_str(),
                speedup.c_str(), r.transport.c_str());
  }
  std::printf(
      "\nGPU tier restore: %.0f%% of the GPU decoder's throughput alone\n",
      100 * decode_alone_s / gpu_tier_s);
  std::printf(
      "\n%s, sequential O_DIRECT reads of the cold NVMe rows' slab (1 MiB, "
      "queue depth 32, io_uring), once before each restore: %s GB/s; the "
      "cold restores carry %.1f MiB of compressed bytes\n",
      have_fio ? "fio"
               : "no fio here; the same job from this process "
                 "(RawSequentialRead)",
      MedianAndRange(disk_gbps).c_str(), bench.compressed_bytes() / 1048576.0);
  std::printf(
      "\nstore from GPU blocks (GPU encode, background put over gRPC, %.2f "
      "GiB of device memory for 4 slots of 8 chunks): worker's thread free "
      "after %.4f s, all stored after %.4f s (%.1f GB/s of KV); raw fp16 "
      "copied down and put over gRPC: %.4f s (%.1f GB/s), %.2fx\n",
      storer_device_bytes / double(1 << 30), store_queued_s, store_s,
      gbps(store_s), store_raw_s, gbps(store_raw_s), store_raw_s / store_s);
  std::printf(
      "\nrecompute (prefill of 32K tokens, %.2e FLOPs at 50%% of the H100's "
      "989 TFLOPS dense bf16): %.2f s\n",
      flops, recompute_s);
  return 0;
}

}  // namespace
}  // namespace kvcache

int main(int argc, char** argv) { return kvcache::Run(argc, argv); }
