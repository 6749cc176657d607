// GPU codec throughput on Llama-8B-shaped chunks (32 layers, 8 KV heads,
// head dim 128, 256 tokens, fp16) tiled from the real dumps, per level and
// batch size, next to a device-to-device copy of the decoded bytes and a
// pinned host-to-device copy of the raw fp16, and a pipelined restore of
// the compressed chunks from pinned host memory (copy + decode). GB/s are of
// fp16 values (decoded output, or encoder input). Times are medians of CUDA
// events.
//
//   codec_gpu_bench [--kvdata=DIR] [--batches=16,64,128] [--reps=N]
//                   [--levels=default,lossless,...]
#include <algorithm>
#include <cstdio>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_split.h"
#include "codec/calibrate.h"
#include "codec/codec.h"
#include "codec/cuda/gpu_codec.h"
#include "codec/cuda/test_util.h"
#include "codec/kv_dump.h"

namespace kvcache::codec::gpu {
namespace {

// Median milliseconds of `reps` runs of fn, each timed with events on the
// default stream after one warm-up run.
template <typename Fn>
double MedianMs(int reps, Fn fn) {
  cudaEvent_t start, stop;
  KVCACHE_CUDA_OR_DIE(cudaEventCreate(&start));
  KVCACHE_CUDA_OR_DIE(cudaEventCreate(&stop));
  fn();
  KVCACHE_CUDA_OR_DIE(cudaDeviceSynchronize());
  std::vector<double> ms;
  for (int r = 0; r < reps; ++r) {
    KVCACHE_CUDA_OR_DIE(cudaEventRecord(start));
    fn();
    KVCACHE_CUDA_OR_DIE(cudaEventRecord(stop));
    KVCACHE_CUDA_OR_DIE(cudaEventSynchronize(stop));
    float t = 0;
    KVCACHE_CUDA_OR_DIE(cudaEventElapsedTime(&t, start, stop));
    ms.push_back(t);
  }
  cudaEventDestroy(start);
  cudaEventDestroy(stop);
  std::sort(ms.begin(), ms.end());
  return ms[ms.size() / 2];
}

double GBps(uint64_t bytes, double ms) { return bytes / (ms * 1e6); }

struct Row {
  Level level;
  int batch;
  double ratio;
  double decode_gbps;
  double restore_gbps;
  double encode_gbps;
  double d2d_gbps;
  double h2d_gbps;
};

// Copy baselines for `bytes`: device to device, and pinned host to device.
void CopyBaselines(uint64_t bytes, int reps, double* d2d, double* h2d) {
  DeviceBuffer a(bytes), b(bytes);
  KVCACHE_CUDA_OR_DIE(cudaMemset(a.get(), 1, bytes));
  *d2d =
      GBps(bytes, MedianMs(reps, [&] {
             cudaMemcpyAsync(b.get(), a.get(), bytes, cudaMemcpyDeviceToDevice);
           }));
  void* host = nullptr;
  KVCACHE_CUDA_OR_DIE(cudaMallocHost(&host, bytes));
  std::memset(host, 1, bytes);
  *h2d = GBps(bytes, MedianMs(reps, [&] {
                cudaMemcpyAsync(b.get(), host, bytes, cudaMemcpyHostToDevice);
              }));
  cudaFreeHost(host);
}

// Median ms of decoding n chunks (chunk i = streams[i % size]) on the GPU;
// checks the first chunk against the CPU's values. Negative on failure.
double TimeDecode(const KvLayout& layout,
                  const std::vector<std::string>& streams,
                  const std::vector<uint16_t>& want, int n, Level level,
                  int reps, const DeviceProfile* profile) {
  const uint64_t raw = kLlama8B.RawBytes();
  std::vector<std::string> batch_streams;
  for (int i = 0; i < n; ++i) {
    batch_streams.push_back(streams[i % streams.size()]);
  }
  StagedStreams staged = StageStreams(batch_streams, 256);
  DeviceBuffer dest(raw * n);
  for (int i = 0; i < n; ++i) {
    staged.jobs[i].dest.tokens = kLlama8B.tokens;
    staged.jobs[i].dest.values = dest.get<uint16_t>() + i * raw / 2;
  }
  DeviceBuffer ws(DecodeWorkspaceBytes(layout, staged.jobs, profile));
  DeviceBuffer status(4 * n);
  const double ms = MedianMs(reps, [&] {
    const absl::Status st =
        DecodeBatch(layout, staged.jobs, ws.get(), ws.bytes(),
                    status.get<int32_t>(), nullptr, profile);
    if (!st.ok()) {
      std::fprintf(stderr, "%s\n", std::string(st.message()).c_str());
      std::abort();
    }
  });
  std::vector<int32_t> st(n);
  KVCACHE_CUDA_OR_DIE(
      cudaMemcpy(st.data(), status.get(), 4 * n, cudaMemcpyDeviceToHost));
  for (int i = 0; i < n; ++i) {
    if (st[i] != kOk) {
      std::fprintf(stderr, "chunk %d: %s\n", i, ChunkErrorName(st[i]));
      return -1;
    }
  }
  std::vector<uint16_t> got(want.size());
  KVCACHE_CUDA_OR_DIE(
      cudaMemcpy(got.data(), dest.get(), raw, cudaMemcpyDeviceToHost));
  if (got != want) {
    std::fprintf(stderr, "%s: GPU decode differs from CPU\n",
                 std::string(LevelName(level)).c_str());
    return -1;
  }
  return ms;
}

// Median ms of restoring n chunks from pinned host memory into the GPU:
// compressed streams are copied up in groups on one stream while the
// previous group decodes on another, the way a worker restores a prefix
// from the CPU tier. Checks every chunk's status. Negative on failure.
double TimeRestoreFromHost(const KvLayout& layout,
                           const std::vector<std::string>& streams, int n,
                           int reps, const DeviceProfile* profile) {
  constexpr int kGroup = 8;
  const uint64_t raw = kLlama8B.RawBytes();
  std::vector<uint64_t> at;
  uint64_t total = 0;
  for (int i = 0; i < n; ++i) {
    at.push_back(total);
    total += (streams[i % streams.size()].size() + 255) / 256 * 256;
  }
  at.push_back(total);
  uint8_t* host = nullptr;
  KVCACHE_CUDA_OR_DIE(cudaMallocHost(&host, total));
  for (int i = 0; i < n; ++i) {
    const std::string& s = streams[i % streams.size()];
    std::memcpy(host + at[i], s.data(), s.size());
  }
  DeviceBuffer compressed(total), dest(raw * n), status(4 * n);
  std::vector<DecodeJob> jobs(n);
  for (int i = 0; i < n; ++i) {
    jobs[i].stream = compressed.get() + at[i];
    jobs[i].stream_bytes = streams[i % streams.size()].size();
    jobs[i].dest.tokens = kLlama8B.tokens;
    jobs[i].dest.values = dest.get<uint16_t>() + i * raw / 2;
  }
  const int groups = (n + kGroup - 1) / kGroup;
  uint64_t ws_bytes = 0;
  for (int g = 0; g < groups; ++g) {
    const int first = g * kGroup, count = std::min(kGroup, n - first);
    ws_bytes = std::max(
        ws_bytes,
        DecodeWorkspaceBytes(layout, absl::MakeConstSpan(&jobs[first], count),
                             profile));
  }
  DeviceBuffer ws(ws_bytes);
  cudaStream_t copy_stream, decode_stream;
  KVCACHE_CUDA_OR_DIE(cudaStreamCreate(&copy_stream));
  KVCACHE_CUDA_OR_DIE(cudaStreamCreate(&decode_stream));
  std::vector<cudaEvent_t> copied(groups);
  for (cudaEvent_t& e : copied) {
    KVCACHE_CUDA_OR_DIE(cudaEventCreateWithFlags(&e, cudaEventDisableTiming));
  }
  // Both streams are blocking, so events on the default stream bracket them.
  const double ms = MedianMs(reps, [&] {
    for (int g = 0; g < groups; ++g) {
      const int first = g * kGroup, count = std::min(kGroup, n - first);
      cudaMemcpyAsync(compressed.get() + at[first], host + at[first],
                      at[first + count] - at[first], cudaMemcpyHostToDevice,
                      copy_stream);
      cudaEventRecord(copied[g], copy_stream);
      cudaStreamWaitEvent(decode_stream, copied[g]);
      const absl::Status st = DecodeBatch(
          layout, absl::MakeConstSpan(&jobs[first], count), ws.get(),
          ws.bytes(), status.get<int32_t>() + first, decode_stream, profile);
      if (!st.ok()) {
        std::fprintf(stderr, "%s\n", std::string(st.message()).c_str());
        std::abort();
      }
    }
  });
  std::vector<int32_t> st(n);
  KVCACHE_CUDA_OR_DIE(
      cudaMemcpy(st.data(), status.get(), 4 * n, cudaMemcpyDeviceToHost));
  for (cudaEvent_t e : copied) cudaEventDestroy(e);
  cudaStreamDestroy(copy_stream);
  cudaStreamDestroy(decode_stream);
  cudaFreeHost(host);
  for (int i = 0; i < n; ++i) {
    if (st[i] != kOk) {
      std::fprintf(stderr, "restore chunk %d: %s\n", i, ChunkErrorName(st[i]));
      return -1;
    }
  }
  return ms;
}

// Median ms of encoding n chunks (chunk i = chunks[i % size]) on the GPU;
// checks the first stream against the CPU's. Negative on failure.
double TimeEncode(const KvLayout& layout,
                  const std::vector<std::vector<uint16_t>>& chunks,
                  const std::vector<std::string>& cpu_streams, int n,
                  Level level, int reps) {
  const uint64_t raw = kLlama8B.RawBytes();
  const uint64_t capacity = MaxEncodedBytes(kLlama8B);
  DeviceBuffer values(raw * n), out(capacity * n);
  std::vector<EncodeJob> jobs(n);
  for (int i = 0; i < n; ++i) {
    jobs[i].src.tokens = kLlama8B.tokens;
    jobs[i].src.values = values.get<uint16_t>() + i * raw / 2;
    jobs[i].out = out.get() + i * capacity;
    jobs[i].out_capacity = capacity;
    KVCACHE_CUDA_OR_DIE(cudaMemcpy(jobs[i].src.values,
                                   chunks[i % chunks.size()].data(), raw,
                                   cudaMemcpyHostToDevice));
  }
  DeviceBuffer ws(EncodeWorkspaceBytes(layout, jobs));
  DeviceBuffer status(4 * n), lengths(8 * n);
  const double ms = MedianMs(reps, [&] {
    const absl::Status st =
        EncodeBatch(layout, jobs, level, ws.get(), ws.bytes(),
                    lengths.get<uint64_t>(), status.get<int32_t>(), nullptr);
    if (!st.ok()) {
      std::fprintf(stderr, "%s\n", std::string(st.message()).c_str());
      std::abort();
    }
  });
  int32_t st0 = 0;
  uint64_t len0 = 0;
  KVCACHE_CUDA_OR_DIE(
      cudaMemcpy(&st0, status.get(), 4, cudaMemcpyDeviceToHost));
  KVCACHE_CUDA_OR_DIE(
      cudaMemcpy(&len0, lengths.get(), 8, cudaMemcpyDeviceToHost));
  std::string got(len0, '\0');
  KVCACHE_CUDA_OR_DIE(
      cudaMemcpy(got.data(), out.get(), len0, cudaMemcpyDeviceToHost));
  if (st0 != kOk || got != cpu_streams[0]) {
    std::fprintf(stderr, "%s: GPU encode (%s, %zu bytes) differs from CPU\n",
                 std::string(LevelName(level)).c_str(), ChunkErrorName(st0),
                 got.size());
    return -1;
  }
  return ms;
}

int Run(int argc, char** argv) {
  std::vector<int> batches = {16, 64, 128};
  std::vector<Level> levels = {
      Level::kLossless,    Level::kNearLossless,    Level::kHigh,
      Level::kDefault,     Level::kCompact,         Level::kTiny,
      Level::kProfileFine, Level::kProfileBalanced, Level::kProfileSmall};
  int reps = 10;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg.rfind("--kvdata=", 0) == 0) {
      setenv("KVCACHE_KVDATA", arg.substr(9).c_str(), 1);
    } else if (arg.rfind("--batches=", 0) == 0) {
      batches.clear();
      for (absl::string_view b : absl::StrSplit(arg.substr(10), ',')) {
        int v = 0;
        if (!absl::SimpleAtoi(b, &v) || v <= 0) {
          std::fprintf(stderr, "bad --batches\n");
          return 2;
        }
        batches.push_back(v);
      }
    } else if (arg.rfind("--levels=", 0) == 0) {
      levels.clear();
      for (absl::string_view name : absl::StrSplit(arg.substr(9), ',')) {
        absl::StatusOr<Level> level = ParseLevel(name);
        if (!level.ok()) {
          std::fprintf(stderr, "%s\n",
                       std::string(level.status().message()).c_str());
          return 2;
        }
        levels.push_back(*level);
      }
    } else if (arg.rfind("--reps=", 0) == 0) {
      if (!absl::SimpleAtoi(arg.substr(7), &reps) || reps <= 0) {
        std::fprintf(stderr, "bad --reps\n");
        return 2;
      }
    } else {
      std::fprintf(stderr,
                   "usage: %s [--kvdata=DIR] [--batches=16,64,128] "
                   "[--reps=N] [--levels=default,...]\n",
                   argv[0]);
      return 2;
    }
  }
  absl::StatusOr<std::string> dir = FindKvDataDir();
  if (!dir.ok()) {
    std::fprintf(stderr, "%s\n", std::string(dir.status().message()).c_str());
    return 1;
  }
  absl::StatusOr<std::vector<std::string>> manifests = ListManifests(*dir);
  if (!manifests.ok() || manifests->empty()) {
    std::fprintf(stderr, "no dumps in %s\n", dir->c_str());
    return 1;
  }
  // Distinct chunks: each dump from token 0 and from token 256.
  std::vector<std::vector<uint16_t>> chunks;
  for (const std::string& m : *manifests) {
    absl::StatusOr<KvDump> d = LoadKvDump(m);
    if (!d.ok()) {
      std::fprintf(stderr, "%s\n", std::string(d.status().message()).c_str());
      return 1;
    }
    for (uint32_t t0 : {0u, 256u}) {
      chunks.push_back(TiledChunk(*d, kLlama8B, t0));
    }
  }
  cudaDeviceProp prop;
  KVCACHE_CUDA_OR_DIE(cudaGetDeviceProperties(&prop, 0));
  const uint64_t raw = kLlama8B.RawBytes();
  std::printf(
      "device: %s, %d SMs; chunk %ux%ux%ux%u fp16 = %.1f MiB, %zu "
      "distinct chunks from %s\n",
      prop.name, prop.multiProcessorCount, kLlama8B.layers, kLlama8B.tokens,
      kLlama8B.kv_heads, kLlama8B.head_dim, raw / 1048576.0, chunks.size(),
      dir->c_str());
  std::vector<std::pair<double, double>> copies;
  for (int batch : batches) {
    double d2d = 0, h2d = 0;
    CopyBaselines(raw * batch, reps, &d2d, &h2d);
    copies.emplace_back(d2d, h2d);
  }

  const KvLayout layout = KvLayout::Contiguous(
      kLlama8B.layers, kLlama8B.kv_heads, kLlama8B.head_dim, kLlama8B.dtype);
  // The transform levels' profile, calibrated on the tiled chunks
  // themselves: their rows time the decoder; the ratio they print is not a
  // quality figure (codec_bench and the chat harness measure those on text
  // the profile never saw).
  ProfileCalibrator calibrator(
      kLlama8B.layers, kLlama8B.kv_heads, kLlama8B.head_dim,
      RopeLayout::kAdjacentPairs,
      RopeInverseFrequencies(500000, kLlama8B.head_dim));
  for (size_t i = 0; i < chunks.size(); ++i) {
    if (!calibrator.Add(kLlama8B, chunks[i], 256 * (i % 2)).ok()) return 1;
  }
  absl::StatusOr<ModelProfile> profile = calibrator.Finish();
  if (!profile.ok()) return 1;
  absl::StatusOr<std::unique_ptr<DeviceProfile>> device_profile =
      DeviceProfile::Upload(*profile);
  if (!device_profile.ok()) return 1;
  std::vector<Row> rows;
  for (Level level : levels) {
    const bool transform = LevelNeedsProfile(level);
    const DeviceProfile* gpu_profile =
        transform ? device_profile->get() : nullptr;
    std::vector<std::string> streams(chunks.size());
    std::vector<std::thread> threads;
    for (size_t i = 0; i < chunks.size(); ++i) {
      threads.emplace_back([&, i] {
        EncodeOptions options;
        options.profile = &*profile;
        options.first_position = 256 * (i % 2);
        absl::StatusOr<std::string> s =
            EncodeChunk(kLlama8B, chunks[i], level, options);
        if (s.ok()) streams[i] = *std::move(s);
      });
    }
    for (std::thread& t : threads) t.join();
    uint64_t compressed = 0;
    for (const std::string& s : streams) {
      if (s.empty()) {
        std::fprintf(stderr, "CPU encode failed\n");
        return 1;
      }
      compressed += s.size();
    }
    std::vector<uint16_t> want(kLlama8B.NumValues());
    if (!DecodeChunk(streams[0], absl::MakeSpan(want), &*profile).ok()) {
      return 1;
    }
    for (size_t b = 0; b < batches.size(); ++b) {
      const int n = batches[b];
      const double ms =
          TimeDecode(layout, streams, want, n, level, reps, gpu_profile);
      if (ms < 0) return 1;
      const double restore_ms =
          TimeRestoreFromHost(layout, streams, n, reps, gpu_profile);
      if (restore_ms < 0) return 1;
      // The GPU encoder writes the levels without a transform.
      const double encode_ms =
          transform ? 0 : TimeEncode(layout, chunks, streams, n, level, reps);
      if (encode_ms < 0) return 1;
      rows.push_back({level, n,
                      static_cast<double>(raw) * streams.size() / compressed,
                      GBps(raw * n, ms), GBps(raw * n, restore_ms),
                      encode_ms > 0 ? GBps(raw * n, encode_ms) : 0,
                      copies[b].first, copies[b].second});
      std::printf(
          "%-13s batch %3d: decode %7.1f GB/s (%.3f ms), restore from pinned "
          "host %6.1f GB/s (%.3f ms), encode %6.1f GB/s (%.3f ms)\n",
          std::string(LevelName(level)).c_str(), n, rows.back().decode_gbps, ms,
          rows.back().restore_gbps, restore_ms, rows.back().encode_gbps,
          encode_ms);
      std::fflush(stdout);
    }
  }
  std::printf(
      "\n| level | ratio | chunks | decode GB/s | restore from pinned host "
      "GB/s (x raw H2D) | encode GB/s | D2D memcpy GB/s | pinned H2D of raw "
      "fp16 GB/s |\n|---|---:|---:|---:|---:|---:|---:|---:|\n");
  for (const Row& r : rows) {
    std::printf(
        "| %s | %.2fx | %d | %.0f | %.0f (%.1fx) | %.1f | %.0f | %.1f "
        "|\n",
        std::string(LevelName(r.level)).c_str(), r.ratio, r.batch,
        r.decode_gbps, r.restore_gbps, r.restore_gbps / r.h2d_gbps,
        r.encode_gbps, r.d2d_gbps, r.h2d_gbps);
  }
  return 0;
}

}  // namespace
}  // namespace kvcache::codec::gpu

int main(int argc, char** argv) { return kvcache::codec::gpu::Run(argc, argv); }
