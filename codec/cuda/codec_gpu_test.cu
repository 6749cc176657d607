// The GPU codec against the CPU reference: decoded values and encoded bytes
// must match bit for bit, hostile streams must fail exactly when the CPU
// decoder fails, and a failing chunk must not disturb its neighbours.
// Needs a GPU; tests/gpu/run.sh builds it here and runs it on one.
#include <algorithm>
#include <numeric>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "codec/calibrate.h"
#include "codec/codec.h"
#include "codec/crc32c.h"
#include "codec/cuda/crc32c_math.h"
#include "codec/cuda/gpu_codec.h"
#include "codec/cuda/test_util.h"
#include "codec/kv_dump.h"
#include "codec/test_data.h"
#include "gtest/gtest.h"

namespace kvcache::codec::gpu {
namespace {

constexpr Level kAllLevels[] = {Level::kLossless, Level::kNearLossless,
                                Level::kHigh,     Level::kDefault,
                                Level::kCompact,  Level::kTiny};
constexpr uint16_t kPoison = 0x7E55;

// A GPU test without a GPU fails: it is run on purpose, by tests/gpu/run.sh.
#define REQUIRE_GPU()                                                      \
  ASSERT_TRUE(HaveGpu()) << "no CUDA device: run this on a GPU host with " \
                            "tests/gpu/run.sh"

std::string Encode(const ChunkShape& s, const std::vector<uint16_t>& v,
                   Level level) {
  absl::StatusOr<std::string> e = EncodeChunk(s, v, level);
  EXPECT_TRUE(e.ok()) << e.status();
  return e.ok() ? *e : std::string();
}

ChunkShape WithTokens(ChunkShape s, uint32_t tokens) {
  s.tokens = tokens;
  return s;
}

KvLayout LayoutOf(const ChunkShape& s) {
  return KvLayout::Contiguous(s.layers, s.kv_heads, s.head_dim, s.dtype);
}

// What the CPU decoder makes of a stream for a chunk of `want` shape: the
// values, or nothing if it rejects the stream or its shape differs.
bool CpuDecode(const std::string& stream, const ChunkShape& want,
               std::vector<uint16_t>* out,
               const ModelProfile* profile = nullptr) {
  absl::StatusOr<ChunkShape> shape = PeekShape(stream);
  if (!shape.ok() || !(*shape == want)) return false;
  out->assign(want.NumValues(), 0);
  return DecodeChunk(stream, absl::MakeSpan(*out), profile).ok();
}

struct GpuResult {
  std::vector<int32_t> status;
  std::vector<std::vector<uint16_t>> values;  // Contiguous, per chunk.
};

// Decodes streams (chunk i holding tokens[i] tokens) into contiguous
// poisoned buffers. Odd chunks start one element past a 16-byte boundary.
GpuResult GpuDecode(const KvLayout& layout,
                    const std::vector<std::string>& streams,
                    const std::vector<uint32_t>& tokens, uint64_t skew = 1,
                    const DeviceProfile* profile = nullptr) {
  const size_t n = streams.size();
  StagedStreams staged = StageStreams(streams, skew);
  std::vector<uint64_t> at(n);
  uint64_t total = 0;
  for (size_t i = 0; i < n; ++i) {
    at[i] = total + (i % 2);
    total = (at[i] +
             2 * layout.layers * uint64_t{tokens[i]} * layout.Channels() + 7) &
            ~uint64_t{7};
  }
  DeviceBuffer dest(2 * total + 16);
  std::vector<uint16_t> poison(total, kPoison);
  KVCACHE_CUDA_OR_DIE(
      cudaMemcpy(dest.get(), poison.data(), 2 * total, cudaMemcpyHostToDevice));
  for (size_t i = 0; i < n; ++i) {
    staged.jobs[i].dest.tokens = tokens[i];
    staged.jobs[i].dest.values = dest.get<uint16_t>() + at[i];
  }
  DeviceBuffer ws(DecodeWorkspaceBytes(layout, staged.jobs, profile));
  DeviceBuffer status(4 * n);
  const absl::Status st = DecodeBatch(layout, staged.jobs, ws.get(), ws.bytes(),
                                      status.get<int32_t>(), nullptr, profile);
  EXPECT_TRUE(st.ok()) << st;
  KVCACHE_CUDA_OR_DIE(cudaDeviceSynchronize());
  GpuResult r;
  r.status.resize(n);
  KVCACHE_CUDA_OR_DIE(
      cudaMemcpy(r.status.data(), status.get(), 4 * n, cudaMemcpyDeviceToHost));
  std::vector<uint16_t> all(total);
  KVCACHE_CUDA_OR_DIE(
      cudaMemcpy(all.data(), dest.get(), 2 * total, cudaMemcpyDeviceToHost));
  for (size_t i = 0; i < n; ++i) {
    const uint64_t len =
        2 * layout.layers * uint64_t{tokens[i]} * layout.Channels();
    r.values.emplace_back(all.begin() + at[i], all.begin() + at[i] + len);
  }
  return r;
}

// Decodes `streams` on the GPU and checks each chunk against the CPU:
// accepted by both with equal values, or rejected by both with the chunk's
// destination untouched.
// Transform streams decode with `profile` on the CPU and `device_profile`
// on the GPU.
void ExpectGpuMatchesCpu(const ChunkShape& shape,
                         const std::vector<std::string>& streams,
                         const std::vector<uint32_t>& tokens,
                         const std::string& what,
                         const ModelProfile* profile = nullptr,
                         const DeviceProfile* device_profile = nullptr) {
  const GpuResult gpu =
      GpuDecode(LayoutOf(shape), streams, tokens, 1, device_profile);
  for (size_t i = 0; i < streams.size(); ++i) {
    std::vector<uint16_t> want;
    const bool cpu_ok =
        CpuDecode(streams[i], WithTokens(shape, tokens[i]), &want, profile);
    ASSERT_EQ(gpu.status[i] == kOk, cpu_ok)
        << what << " chunk " << i << ": GPU says "
        << ChunkErrorName(gpu.status[i]);
    if (cpu_ok) {
      const auto diff =
          std::mismatch(want.begin(), want.end(), gpu.values[i].begin());
      ASSERT_TRUE(diff.first == want.end())
          << what << " chunk " << i << ": first difference at value "
          << diff.first - want.begin() << " of " << want.size() << ": CPU "
          << *diff.first << ", GPU " << *diff.second;
    } else {
      ASSERT_TRUE(std::all_of(gpu.values[i].begin(), gpu.values[i].end(),
                              [](uint16_t v) { return v == kPoison; }))
          << what << " chunk " << i << ": failed chunk wrote its destination";
    }
  }
}

TEST(GpuDecodeTest, SyntheticShapesEveryLevel) {
  REQUIRE_GPU();
  // Odd shapes: channels not a multiple of 8, a single token, tokens not a
  // multiple of the token group, wide heads.
  const ChunkShape shapes[] = {
      {2, 40, 2, 8, DType::kFloat16},
      {3, 33, 3, 5, DType::kBFloat16},
      {1, 17, 1, 128, DType::kBFloat16},
      {2, 300, 8, 16, DType::kFloat16},
      {2, 64, 8, 128, DType::kFloat16},
      {1, 5, 1, 1, DType::kFloat16},
      // Channels a multiple of 8, channel groups (100) not.
      {1, 20, 2, 100, DType::kFloat16},
  };
  for (const ChunkShape& shape : shapes) {
    for (Level level : kAllLevels) {
      std::vector<std::string> streams;
      std::vector<uint32_t> tokens;
      for (uint32_t t : {shape.tokens, 1u, 16u, 17u, shape.tokens - 1}) {
        if (t == 0) continue;
        const ChunkShape s = WithTokens(shape, t);
        streams.push_back(Encode(s, SyntheticChunk(s, t * 31 + 7), level));
        tokens.push_back(t);
      }
      ExpectGpuMatchesCpu(
          shape, streams, tokens,
          absl::StrCat(LevelName(level), " ", shape.layers, "x", shape.tokens,
                       "x", shape.kv_heads, "x", shape.head_dim));
    }
  }
}

std::vector<KvDump> LoadDumps() {
  std::vector<KvDump> dumps;
  absl::StatusOr<std::string> dir = FindKvDataDir();
  EXPECT_TRUE(dir.ok()) << dir.status();
  if (!dir.ok()) return dumps;
  absl::StatusOr<std::vector<std::string>> manifests = ListManifests(*dir);
  EXPECT_TRUE(manifests.ok() && !manifests->empty());
  if (!manifests.ok()) return dumps;
  for (const std::string& m : *manifests) {
    absl::StatusOr<KvDump> d = LoadKvDump(m);
    EXPECT_TRUE(d.ok()) << d.status();
    if (d.ok()) dumps.push_back(*std::move(d));
  }
  return dumps;
}

TEST(GpuDecodeTest, RealDumpsEveryLevelBothDtypes) {
  REQUIRE_GPU();
  const std::vector<KvDump> dumps = LoadDumps();
  ASSERT_FALSE(dumps.empty());
  for (DType dtype : {DType::kFloat16, DType::kBFloat16}) {
    ChunkShape shape = dumps[0].shape;
    shape.dtype = dtype;
    for (Level level : kAllLevels) {
      std::vector<std::string> streams;
      std::vector<uint32_t> tokens;
      for (const KvDump& d : dumps) {
        // 256-token chunks, plus odd cuts.
        for (const auto& [t0, t1] : std::vector<std::pair<uint32_t, uint32_t>>{
                 {0, 256}, {256, 512}, {100, 101}, {3, 258}}) {
          const ChunkShape s = WithTokens(shape, t1 - t0);
          std::vector<uint16_t> v = SliceTokens(d, t0, t1);
          if (dtype == DType::kBFloat16) v = ToBFloat16(v);
          streams.push_back(Encode(s, v, level));
          tokens.push_back(t1 - t0);
        }
      }
      ExpectGpuMatchesCpu(shape, streams, tokens,
                          absl::StrCat("dumps ", LevelName(level)));
    }
  }
}

// A profile calibrated on synthetic chunks of `shape` (seeds other than
// the tests'), RoPE with base 10000 in `rope` layout.
ModelProfile SyntheticProfile(const ChunkShape& shape, RopeLayout rope) {
  ProfileCalibrator calibrator(
      shape.layers, shape.kv_heads, shape.head_dim, rope,
      rope == RopeLayout::kNone
          ? std::vector<double>{}
          : RopeInverseFrequencies(10000, shape.head_dim));
  for (uint32_t seed = 1000; calibrator.tokens() < 2 * shape.head_dim + 64;
       ++seed) {
    const ChunkShape s = WithTokens(shape, 128);
    EXPECT_TRUE(calibrator.Add(s, SyntheticChunk(s, seed), 0).ok());
  }
  absl::StatusOr<ModelProfile> p = calibrator.Finish();
  EXPECT_TRUE(p.ok()) << p.status();
  return *std::move(p);
}

std::string EncodeAt(const ChunkShape& s, const std::vector<uint16_t>& v,
                     Level level, const ModelProfile& profile,
                     uint32_t first_position) {
  EncodeOptions options;
  options.profile = &profile;
  options.first_position = first_position;
  absl::StatusOr<std::string> e = EncodeChunk(s, v, level, options);
  EXPECT_TRUE(e.ok()) << e.status();
  return e.ok() ? *e : std::string();
}

// Transform streams (format v3): every profile level, RoPE layouts, first
// positions inside and past the exactly stored ones, odd token counts.
TEST(GpuTransformTest, ProfileLevelsMatchTheCpuBitForBit) {
  REQUIRE_GPU();
  const std::pair<ChunkShape, RopeLayout> cases[] = {
      {{3, 0, 3, 64, DType::kFloat16}, RopeLayout::kAdjacentPairs},
      {{2, 0, 8, 128, DType::kBFloat16}, RopeLayout::kHalves},
      {{2, 0, 5, 16, DType::kFloat16}, RopeLayout::kNone},
      {{1, 0, 2, 256, DType::kFloat16}, RopeLayout::kAdjacentPairs},
  };
  for (const auto& [shape, rope] : cases) {
    const ModelProfile profile = SyntheticProfile(shape, rope);
    absl::StatusOr<std::unique_ptr<DeviceProfile>> device =
        DeviceProfile::Upload(profile);
    ASSERT_TRUE(device.ok()) << device.status();
    for (Level level :
         {Level::kProfileFine, Level::kProfileBalanced, Level::kProfileSmall}) {
      std::vector<std::string> streams;
      std::vector<uint32_t> tokens;
      for (const auto& [t, position] :
           std::vector<std::pair<uint32_t, uint32_t>>{
               {256, 0}, {37, 2}, {1, 0}, {16, 1000}, {200, 123456}}) {
        const ChunkShape s = WithTokens(shape, t);
        streams.push_back(EncodeAt(s, SyntheticChunk(s, t * 13 + position),
                                   level, profile, position));
        tokens.push_back(t);
      }
      ExpectGpuMatchesCpu(shape, streams, tokens,
                          absl::StrCat(LevelName(level), " ", shape.layers, "x",
                                       shape.kv_heads, "x", shape.head_dim),
                          &profile, device->get());
    }
  }
}

TEST(GpuTransformTest, RealDumpsWithACalibratedProfile) {
  REQUIRE_GPU();
  const std::vector<KvDump> dumps = LoadDumps();
  ASSERT_GE(dumps.size(), 2u);
  const ChunkShape& shape = dumps[0].shape;
  // llama2.c models: RoPE base 10000 on adjacent pairs.
  ProfileCalibrator calibrator(shape.layers, shape.kv_heads, shape.head_dim,
                               RopeLayout::kAdjacentPairs,
                               RopeInverseFrequencies(10000, shape.head_dim));
  ASSERT_TRUE(calibrator.Add(dumps[1].shape, dumps[1].kv, 0).ok());
  const ModelProfile profile = *calibrator.Finish();
  std::unique_ptr<DeviceProfile> device = *DeviceProfile::Upload(profile);
  std::vector<std::string> streams;
  std::vector<uint32_t> tokens;
  for (const auto& [t0, t1] : std::vector<std::pair<uint32_t, uint32_t>>{
           {0, 256}, {256, 512}, {100, 101}, {3, 258}}) {
    const ChunkShape s = WithTokens(shape, t1 - t0);
    streams.push_back(EncodeAt(s, SliceTokens(dumps[0], t0, t1),
                               Level::kProfileBalanced, profile, t0));
    tokens.push_back(t1 - t0);
  }
  ExpectGpuMatchesCpu(shape, streams, tokens, "stories260K", &profile,
                      device.get());
}

// A transform stream without its profile fails alone, never decodes to
// other values, and leaves its neighbours alone.
TEST(GpuTransformTest, StreamsNeedTheirProfile) {
  REQUIRE_GPU();
  const ChunkShape shape{2, 64, 3, 64, DType::kFloat16};
  const ModelProfile profile =
      SyntheticProfile(shape, RopeLayout::kAdjacentPairs);
  const ModelProfile other = SyntheticProfile(shape, RopeLayout::kHalves);
  ASSERT_NE(profile.id, other.id);
  std::unique_ptr<DeviceProfile> wrong = *DeviceProfile::Upload(other);
  const std::vector<uint16_t> values = SyntheticChunk(shape, 4);
  const std::vector<std::string> streams = {
      Encode(shape, values, Level::kHigh),
      EncodeAt(shape, values, Level::kProfileBalanced, profile, 64),
      Encode(shape, values, Level::kLossless)};
  const std::vector<uint32_t> tokens(3, 64);
  const std::vector<const DeviceProfile*> given_profiles = {nullptr,
                                                            wrong.get()};
  for (const DeviceProfile* given : given_profiles) {
    const GpuResult gpu = GpuDecode(LayoutOf(shape), streams, tokens, 1, given);
    EXPECT_EQ(gpu.status[0], kOk);
    EXPECT_EQ(gpu.status[1], kNeedsProfile);
    EXPECT_EQ(gpu.status[2], kOk);
    EXPECT_TRUE(std::all_of(gpu.values[1].begin(), gpu.values[1].end(),
                            [](uint16_t v) { return v == kPoison; }));
    EXPECT_EQ(gpu.values[2], values);
  }
}

// Paged destinations: chunks land in shuffled blocks, starting mid-block;
// every other slot of the cache must keep its poison.

TEST(GpuDecodeTest, PagedLayouts) {
  REQUIRE_GPU();
  const ChunkShape shape{3, 0, 2, 16, DType::kBFloat16};
  const uint32_t block_tokens = 16, num_blocks = 24;
  const std::vector<uint32_t> tokens = {40, 17, 1, 33};
  const std::vector<uint32_t> first_slot = {5, 0, 15, 16};
  // Distinct shuffled blocks for each chunk.
  std::vector<int32_t> ids(num_blocks);
  std::iota(ids.begin(), ids.end(), 0);
  std::shuffle(ids.begin(), ids.end(), std::mt19937(5));
  std::vector<std::vector<int32_t>> tables;
  for (size_t i = 0, next = 0; i < tokens.size(); ++i) {
    const uint32_t used =
        (first_slot[i] + tokens[i] + block_tokens - 1) / block_tokens;
    tables.emplace_back(ids.begin() + next, ids.begin() + next + used);
    next += used;
  }
  std::vector<std::string> streams;
  std::vector<std::vector<uint16_t>> want;
  for (size_t i = 0; i < tokens.size(); ++i) {
    const ChunkShape s = WithTokens(shape, tokens[i]);
    streams.push_back(Encode(s, SyntheticChunk(s, 90 + i), Level::kHigh));
    want.emplace_back();
    ASSERT_TRUE(CpuDecode(streams.back(), s, &want.back()));
  }
  const uint32_t channels = shape.kv_heads * shape.head_dim;
  const uint64_t layer_elems =
      uint64_t{num_blocks} * 2 * block_tokens * channels;
  for (bool layer_major : {false, true}) {
    StagedStreams staged = StageStreams(streams, 3);
    DeviceBuffer cache(2 * layer_elems * shape.layers);
    const std::vector<uint16_t> poison(layer_elems * shape.layers, kPoison);
    KVCACHE_CUDA_OR_DIE(cudaMemcpy(cache.get(), poison.data(), cache.bytes(),
                                   cudaMemcpyHostToDevice));
    std::vector<uint16_t*> bases;
    for (uint32_t l = 0; l < shape.layers; ++l) {
      bases.push_back(cache.get<uint16_t>() + l * layer_elems);
    }
    DeviceBuffer base_array(sizeof(uint16_t*) * bases.size());
    KVCACHE_CUDA_OR_DIE(cudaMemcpy(base_array.get(), bases.data(),
                                   base_array.bytes(), cudaMemcpyHostToDevice));
    const KvLayout layout =
        layer_major
            ? KvLayout::PagedLayerMajor(
                  cache.get<uint16_t>(), num_blocks, block_tokens, shape.layers,
                  shape.kv_heads, shape.head_dim, shape.dtype)
            : KvLayout::PagedPerLayer(
                  base_array.get<uint16_t*>(), num_blocks, block_tokens,
                  shape.layers, shape.kv_heads, shape.head_dim, shape.dtype);
    std::vector<DeviceBuffer> table_bufs;
    for (size_t i = 0; i < tokens.size(); ++i) {
      table_bufs.emplace_back(4 * tables[i].size());
      KVCACHE_CUDA_OR_DIE(cudaMemcpy(table_bufs.back().get(), tables[i].data(),
                                     4 * tables[i].size(),
                                     cudaMemcpyHostToDevice));
      staged.jobs[i].dest.tokens = tokens[i];
      staged.jobs[i].dest.block_ids = table_bufs.back().get<int32_t>();
      staged.jobs[i].dest.first_slot = first_slot[i];
    }
    DeviceBuffer ws(DecodeWorkspaceBytes(layout, staged.jobs));
    DeviceBuffer status(4 * tokens.size());
    ASSERT_TRUE(DecodeBatch(layout, staged.jobs, ws.get(), ws.bytes(),
                            status.get<int32_t>(), nullptr)
                    .ok());
    std::vector<int32_t> st(tokens.size());
    KVCACHE_CUDA_OR_DIE(cudaMemcpy(st.data(), status.get(), 4 * st.size(),
                                   cudaMemcpyDeviceToHost));
    std::vector<uint16_t> got(poison.size());
    KVCACHE_CUDA_OR_DIE(cudaMemcpy(got.data(), cache.get(), cache.bytes(),
                                   cudaMemcpyDeviceToHost));
    std::vector<bool> written(got.size());
    for (size_t i = 0; i < tokens.size(); ++i) {
      ASSERT_EQ(st[i], kOk) << ChunkErrorName(st[i]);
      size_t k = 0;
      for (uint32_t p = 0; p < 2 * shape.layers; ++p) {
        for (uint32_t t = 0; t < tokens[i]; ++t) {
          const uint64_t row = PagedRow(tables[i], p, first_slot[i] + t,
                                        block_tokens, channels, layer_elems);
          for (uint32_t c = 0; c < channels; ++c, ++k) {
            ASSERT_EQ(got[row + c], want[i][k])
                << "layer_major " << layer_major << " chunk " << i << " plane "
                << p << " token " << t << " channel " << c;
            written[row + c] = true;
          }
        }
      }
    }
    for (size_t e = 0; e < got.size(); ++e) {
      if (!written[e]) ASSERT_EQ(got[e], kPoison) << "stray write at " << e;
    }
  }
}

// Decodes `streams` a layer at a time, each stream's bytes arriving layer
// by layer (codec::LayerEnds) into a staging buffer that holds garbage
// until then. After each layer, that layer of every accepted chunk must
// hold the CPU decoder's values and later layers must be untouched.
// Returns the final statuses.
std::vector<int32_t> ExpectLayerByLayerMatchesCpu(
    const ChunkShape& shape, const std::vector<std::string>& streams,
    const std::string& what, const ModelProfile* profile = nullptr,
    const DeviceProfile* device_profile = nullptr) {
  const KvLayout layout = LayoutOf(shape);
  const size_t n = streams.size();
  const uint64_t plane = uint64_t{shape.tokens} * layout.Channels();
  const uint64_t chunk_values = 2 * shape.layers * plane;
  std::vector<std::vector<uint64_t>> ends(n);
  std::vector<std::vector<uint16_t>> want(n);
  std::vector<bool> cpu_ok(n);
  uint64_t staged_bytes = 0;
  std::vector<uint64_t> at(n);
  for (size_t i = 0; i < n; ++i) {
    cpu_ok[i] = CpuDecode(streams[i], shape, &want[i], profile);
    absl::StatusOr<std::vector<uint64_t>> e = LayerEnds(streams[i]);
    // A stream whose layers can't be found arrives whole with layer 0.
    ends[i] =
        e.ok() ? *e : std::vector<uint64_t>(shape.layers, streams[i].size());
    ends[i].back() = streams[i].size();
    at[i] = staged_bytes;
    staged_bytes += (streams[i].size() + 255) / 256 * 256;
  }
  DeviceBuffer staged(staged_bytes + 256);
  KVCACHE_CUDA_OR_DIE(cudaMemset(staged.get(), 0xA5, staged.bytes()));
  DeviceBuffer dest(2 * n * chunk_values);
  std::vector<uint16_t> poison(n * chunk_values, kPoison);
  KVCACHE_CUDA_OR_DIE(cudaMemcpy(dest.get(), poison.data(), 2 * poison.size(),
                                 cudaMemcpyHostToDevice));
  std::vector<DecodeJob> jobs(n);
  for (size_t i = 0; i < n; ++i) {
    jobs[i].stream = staged.get() + at[i];
    jobs[i].stream_bytes = streams[i].size();
    jobs[i].dest.tokens = shape.tokens;
    jobs[i].dest.values = dest.get<uint16_t>() + i * chunk_values;
  }
  const LayerRange one_layer{0, 1, false, false};
  DeviceBuffer ws(
      DecodeWorkspaceBytes(layout, jobs, device_profile, one_layer));
  EXPECT_LT(ws.bytes(), DecodeWorkspaceBytes(layout, jobs, device_profile));
  DeviceBuffer status(4 * n);
  std::vector<int32_t> host_status(n);
  for (uint32_t l = 0; l < shape.layers; ++l) {
    for (size_t i = 0; i < n; ++i) {
      const uint64_t from = l == 0 ? 0 : std::min(ends[i][l - 1], ends[i][l]);
      // The checksum comes with the last layer.
      const uint64_t to =
          l + 1 == shape.layers ? streams[i].size() : ends[i][l];
      if (to > from) {
        KVCACHE_CUDA_OR_DIE(cudaMemcpy(staged.get() + at[i] + from,
                                       streams[i].data() + from, to - from,
                                       cudaMemcpyHostToDevice));
      }
    }
    const LayerRange range{l, 1, l > 0, l + 1 == shape.layers};
    const absl::Status st =
        DecodeBatch(layout, jobs, ws.get(), ws.bytes(), status.get<int32_t>(),
                    nullptr, device_profile, range);
    EXPECT_TRUE(st.ok()) << st;
    KVCACHE_CUDA_OR_DIE(cudaDeviceSynchronize());
    std::vector<uint16_t> got(n * chunk_values);
    KVCACHE_CUDA_OR_DIE(cudaMemcpy(got.data(), dest.get(), 2 * got.size(),
                                   cudaMemcpyDeviceToHost));
    KVCACHE_CUDA_OR_DIE(cudaMemcpy(host_status.data(), status.get(), 4 * n,
                                   cudaMemcpyDeviceToHost));
    for (size_t i = 0; i < n; ++i) {
      const uint16_t* chunk = got.data() + i * chunk_values;
      if (cpu_ok[i]) {
        EXPECT_EQ(host_status[i], kOk)
            << what << " chunk " << i << " layer " << l << ": "
            << ChunkErrorName(host_status[i]);
        const uint64_t begin = 2 * l * plane, end = 2 * (l + 1) * plane;
        EXPECT_TRUE(
            std::equal(chunk + begin, chunk + end, want[i].begin() + begin))
            << what << " chunk " << i << " layer " << l;
      }
      // Layers still to come are untouched.
      EXPECT_TRUE(std::all_of(chunk + 2 * (l + 1) * plane, chunk + chunk_values,
                              [](uint16_t v) { return v == kPoison; }))
          << what << " chunk " << i << " after layer " << l;
    }
  }
  for (size_t i = 0; i < n; ++i) {
    EXPECT_EQ(host_status[i] == kOk, cpu_ok[i])
        << what << " chunk " << i << ": " << ChunkErrorName(host_status[i]);
  }
  return host_status;
}

TEST(GpuDecodeTest, LayerByLayerMatchesTheCpu) {
  REQUIRE_GPU();
  const ChunkShape shape{5, 300, 2, 64, DType::kFloat16};
  std::vector<std::string> streams;
  for (Level level : kAllLevels) {
    streams.push_back(Encode(
        shape, SyntheticChunk(shape, static_cast<uint32_t>(streams.size())),
        level));
  }
  // Damage: a flipped byte in layer 3's blocks (found by the checksum once
  // the last layer is in, after layers 0 to 2 were written), and a bad
  // header (found before anything is written).
  std::string late = streams[3];
  absl::StatusOr<std::vector<uint64_t>> ends = LayerEnds(late);
  ASSERT_TRUE(ends.ok()) << ends.status();
  late[((*ends)[2] + (*ends)[3]) / 2] ^= 0x01;
  streams.push_back(late);
  std::string header = streams[1];
  header[0] = 'X';
  streams.push_back(header);
  streams.push_back(streams[0]);
  const std::vector<int32_t> status =
      ExpectLayerByLayerMatchesCpu(shape, streams, "levels");
  EXPECT_TRUE(status[6] == kChecksum || status[6] == kBadBlock)
      << ChunkErrorName(status[6]);
  EXPECT_EQ(status[7], kBadHeader);

  for (RopeLayout rope : {RopeLayout::kHalves, RopeLayout::kAdjacentPairs}) {
    const ModelProfile profile = SyntheticProfile(shape, rope);
    absl::StatusOr<std::unique_ptr<DeviceProfile>> device =
        DeviceProfile::Upload(profile);
    ASSERT_TRUE(device.ok()) << device.status();
    std::vector<std::string> transform;
    for (Level level :
         {Level::kProfileFine, Level::kProfileBalanced, Level::kProfileSmall}) {
      transform.push_back(EncodeAt(
          shape, SyntheticChunk(shape, 40 + static_cast<uint32_t>(level)),
          level, profile, 700 * static_cast<uint32_t>(transform.size())));
    }
    ExpectLayerByLayerMatchesCpu(shape, transform, "transform", &profile,
                                 device->get());
  }
}

void FixCrc(std::string* s) {
  const uint32_t crc = Crc32c(absl::string_view(*s).substr(0, s->size() - 4));
  for (int i = 0; i < 4; ++i) {
    (*s)[s->size() - 4 + i] = static_cast<char>(crc >> 8 * i);
  }
}

// Damaged streams next to good ones: each fails or succeeds exactly as on
// the CPU, and good neighbours decode.
TEST(GpuDecodeTest, HostileStreamsFailAlone) {
  REQUIRE_GPU();
  const ChunkShape shape{2, 40, 2, 8, DType::kFloat16};
  std::vector<std::string> streams;
  std::vector<uint32_t> tokens;
  auto add = [&](std::string s) {
    streams.push_back(std::move(s));
    tokens.push_back(shape.tokens);
  };
  const std::string good =
      Encode(shape, SyntheticChunk(shape, 1), Level::kHigh);
  const std::string lossless =
      Encode(shape, SyntheticChunk(shape, 2), Level::kLossless);
  add(good);
  add(good.substr(0, good.size() - 1));
  add(good.substr(0, 30));
  add(good + "x");
  add("");
  std::string flipped = good;
  flipped[good.size() / 2] ^= 0x10;
  add(flipped);
  std::string magic = good;
  magic[0] = 'X';
  add(magic);
  std::string version = good;
  version[4] = 3;
  FixCrc(&version);
  add(version);
  // Wrong shape for this layout (more tokens).
  add(Encode(WithTokens(shape, 41), SyntheticChunk(WithTokens(shape, 41), 3),
             Level::kHigh));
  add(lossless);
  // Mutations behind a valid checksum reach the table and block checks.
  std::mt19937 rng(11);
  for (int i = 0; i < 400; ++i) {
    std::string s = i % 2 ? good : lossless;
    const int edits = 1 + rng() % 3;
    for (int e = 0; e < edits; ++e) {
      const size_t at = 52 + rng() % (s.size() - 56);
      switch (rng() % 3) {
        case 0:
          s[at] ^= static_cast<char>(1 << (rng() % 8));
          break;
        case 1:
          s[at] = static_cast<char>(rng());
          break;
        default:
          s[at] = static_cast<char>(s[at] + 1);
      }
    }
    FixCrc(&s);
    add(s);
  }
  add(good);
  ExpectGpuMatchesCpu(shape, streams, tokens, "hostile");
}

struct GpuEncoded {
  std::vector<int32_t> status;
  std::vector<std::string> streams;
};

// Encodes chunks (values in contiguous layout) on the GPU; capacities[i]
// defaults to MaxEncodedBytes.
GpuEncoded GpuEncode(const KvLayout& layout,
                     const std::vector<std::vector<uint16_t>>& chunks,
                     const std::vector<uint32_t>& tokens, Level level,
                     std::vector<uint64_t> capacities = {}) {
  const size_t n = chunks.size();
  std::vector<DeviceBuffer> values, outs;
  std::vector<EncodeJob> jobs(n);
  for (size_t i = 0; i < n; ++i) {
    values.emplace_back(2 * chunks[i].size());
    KVCACHE_CUDA_OR_DIE(cudaMemcpy(values.back().get(), chunks[i].data(),
                                   2 * chunks[i].size(),
                                   cudaMemcpyHostToDevice));
    const ChunkShape shape{layout.layers, tokens[i], layout.kv_heads,
                           layout.head_dim, layout.dtype};
    const uint64_t capacity =
        i < capacities.size() ? capacities[i] : MaxEncodedBytes(shape);
    outs.emplace_back(capacity);
    jobs[i].src.tokens = tokens[i];
    jobs[i].src.values = values.back().get<uint16_t>();
    jobs[i].out = outs.back().get();
    jobs[i].out_capacity = capacity;
  }
  DeviceBuffer ws(EncodeWorkspaceBytes(layout, jobs));
  DeviceBuffer status(4 * n), lengths(8 * n);
  const absl::Status st =
      EncodeBatch(layout, jobs, level, ws.get(), ws.bytes(),
                  lengths.get<uint64_t>(), status.get<int32_t>(), nullptr);
  EXPECT_TRUE(st.ok()) << st;
  KVCACHE_CUDA_OR_DIE(cudaDeviceSynchronize());
  GpuEncoded r;
  r.status.resize(n);
  std::vector<uint64_t> len(n);
  KVCACHE_CUDA_OR_DIE(
      cudaMemcpy(r.status.data(), status.get(), 4 * n, cudaMemcpyDeviceToHost));
  KVCACHE_CUDA_OR_DIE(
      cudaMemcpy(len.data(), lengths.get(), 8 * n, cudaMemcpyDeviceToHost));
  for (size_t i = 0; i < n; ++i) {
    r.streams.emplace_back(len[i], '\0');
    KVCACHE_CUDA_OR_DIE(cudaMemcpy(r.streams.back().data(), outs[i].get(),
                                   len[i], cudaMemcpyDeviceToHost));
  }
  return r;
}

// GPU-encoded streams must equal the CPU's byte for byte.
void ExpectEncodeMatchesCpu(const ChunkShape& shape,
                            const std::vector<std::vector<uint16_t>>& chunks,
                            const std::vector<uint32_t>& tokens, Level level,
                            const std::string& what) {
  const GpuEncoded gpu = GpuEncode(LayoutOf(shape), chunks, tokens, level);
  for (size_t i = 0; i < chunks.size(); ++i) {
    ASSERT_EQ(gpu.status[i], kOk)
        << what << " chunk " << i << ": " << ChunkErrorName(gpu.status[i]);
    const std::string want =
        Encode(WithTokens(shape, tokens[i]), chunks[i], level);
    ASSERT_EQ(gpu.streams[i].size(), want.size()) << what << " chunk " << i;
    const auto diff =
        std::mismatch(want.begin(), want.end(), gpu.streams[i].begin());
    ASSERT_TRUE(diff.first == want.end())
        << what << " chunk " << i << ": first different byte at "
        << diff.first - want.begin() << " of " << want.size();
  }
}

TEST(GpuEncodeTest, TransformLevelsAreTheCpuEncodersOnly) {
  REQUIRE_GPU();
  const ChunkShape shape{1, 16, 1, 8, DType::kFloat16};
  DeviceBuffer values(shape.RawBytes()), out(MaxEncodedBytes(shape));
  DeviceBuffer ws(256), status(4), lengths(8);
  EncodeJob job;
  job.src.tokens = shape.tokens;
  job.src.values = values.get<uint16_t>();
  job.out = out.get<uint8_t>();
  job.out_capacity = out.bytes();
  const absl::Status st = EncodeBatch(
      LayoutOf(shape), {job}, Level::kProfileBalanced, ws.get(), ws.bytes(),
      lengths.get<uint64_t>(), status.get<int32_t>(), nullptr);
  EXPECT_TRUE(absl::IsInvalidArgument(st)) << st;
}

TEST(GpuEncodeTest, SyntheticShapesEveryLevel) {
  REQUIRE_GPU();
  const ChunkShape shapes[] = {
      {2, 40, 2, 8, DType::kFloat16},    {3, 33, 3, 5, DType::kBFloat16},
      {1, 17, 1, 128, DType::kBFloat16}, {2, 300, 8, 16, DType::kFloat16},
      {2, 64, 8, 128, DType::kFloat16},  {1, 5, 1, 1, DType::kFloat16},
      {1, 20, 2, 100, DType::kFloat16},
  };
  for (const ChunkShape& shape : shapes) {
    for (Level level : kAllLevels) {
      std::vector<std::vector<uint16_t>> chunks;
      std::vector<uint32_t> tokens;
      for (uint32_t t : {shape.tokens, 1u, 16u, 17u}) {
        chunks.push_back(SyntheticChunk(WithTokens(shape, t), t * 13 + 5));
        tokens.push_back(t);
      }
      ExpectEncodeMatchesCpu(
          shape, chunks, tokens, level,
          absl::StrCat(LevelName(level), " ", shape.layers, "x", shape.tokens,
                       "x", shape.kv_heads, "x", shape.head_dim));
    }
  }
}

TEST(GpuEncodeTest, RealDumpsEveryLevelBothDtypes) {
  REQUIRE_GPU();
  const std::vector<KvDump> dumps = LoadDumps();
  ASSERT_FALSE(dumps.empty());
  for (DType dtype : {DType::kFloat16, DType::kBFloat16}) {
    ChunkShape shape = dumps[0].shape;
    shape.dtype = dtype;
    for (Level level : kAllLevels) {
      std::vector<std::vector<uint16_t>> chunks;
      std::vector<uint32_t> tokens;
      for (const KvDump& d : dumps) {
        for (const auto& [t0, t1] : std::vector<std::pair<uint32_t, uint32_t>>{
                 {0, 256}, {256, 512}, {100, 101}, {3, 258}}) {
          std::vector<uint16_t> v = SliceTokens(d, t0, t1);
          if (dtype == DType::kBFloat16) v = ToBFloat16(v);
          chunks.push_back(std::move(v));
          tokens.push_back(t1 - t0);
        }
      }
      ExpectEncodeMatchesCpu(shape, chunks, tokens, level,
                             absl::StrCat("dumps ", LevelName(level)));
    }
  }
}

// Encoding reads paged caches too, and chunks that do not fit their buffers
// (known before encoding, or only after) fail alone.
TEST(GpuEncodeTest, PagedSourceAndSmallOutput) {
  REQUIRE_GPU();
  const ChunkShape shape{2, 0, 2, 16, DType::kFloat16};
  const uint32_t block_tokens = 16, num_blocks = 8;
  const std::vector<uint32_t> tokens = {40, 9};
  const std::vector<uint32_t> first_slot = {3, 0};
  const std::vector<std::vector<int32_t>> tables = {{5, 1, 6}, {2}};
  const uint32_t channels = shape.kv_heads * shape.head_dim;
  const uint64_t layer_elems =
      uint64_t{num_blocks} * 2 * block_tokens * channels;
  std::vector<uint16_t> cache(layer_elems * shape.layers, kPoison);
  std::vector<std::vector<uint16_t>> chunks;
  for (size_t i = 0; i < tokens.size(); ++i) {
    chunks.push_back(SyntheticChunk(WithTokens(shape, tokens[i]), 40 + i));
    size_t k = 0;
    for (uint32_t p = 0; p < 2 * shape.layers; ++p) {
      for (uint32_t t = 0; t < tokens[i]; ++t) {
        const uint64_t row = PagedRow(tables[i], p, first_slot[i] + t,
                                      block_tokens, channels, layer_elems);
        for (uint32_t c = 0; c < channels; ++c) cache[row + c] = chunks[i][k++];
      }
    }
  }
  DeviceBuffer dev_cache(2 * cache.size());
  KVCACHE_CUDA_OR_DIE(cudaMemcpy(dev_cache.get(), cache.data(),
                                 dev_cache.bytes(), cudaMemcpyHostToDevice));
  const KvLayout layout = KvLayout::PagedLayerMajor(
      dev_cache.get<uint16_t>(), num_blocks, block_tokens, shape.layers,
      shape.kv_heads, shape.head_dim, shape.dtype);
  std::vector<DeviceBuffer> table_bufs, outs;
  const std::string chunk1 =
      Encode(WithTokens(shape, tokens[1]), chunks[1], Level::kDefault);
  // Jobs 2 and 3 repeat chunks 0 and 1 with buffers too small for the
  // header, and one byte too small for the stream.
  std::vector<EncodeJob> jobs(4);
  for (size_t i = 0; i < jobs.size(); ++i) {
    const size_t c = i % 2;
    table_bufs.emplace_back(4 * tables[c].size());
    KVCACHE_CUDA_OR_DIE(cudaMemcpy(table_bufs.back().get(), tables[c].data(),
                                   4 * tables[c].size(),
                                   cudaMemcpyHostToDevice));
    jobs[i].src.tokens = tokens[c];
    jobs[i].src.block_ids = table_bufs.back().get<int32_t>();
    jobs[i].src.first_slot = first_slot[c];
    jobs[i].out_capacity = i == 2 ? 200
                           : i == 3
                               ? chunk1.size() - 1
                               : MaxEncodedBytes(WithTokens(shape, tokens[c]));
    outs.emplace_back(jobs[i].out_capacity);
    jobs[i].out = outs.back().get();
  }
  DeviceBuffer ws(EncodeWorkspaceBytes(layout, jobs));
  DeviceBuffer status(4 * jobs.size()), lengths(8 * jobs.size());
  ASSERT_TRUE(EncodeBatch(layout, jobs, Level::kDefault, ws.get(), ws.bytes(),
                          lengths.get<uint64_t>(), status.get<int32_t>(),
                          nullptr)
                  .ok());
  std::vector<int32_t> st(jobs.size());
  std::vector<uint64_t> len(jobs.size());
  KVCACHE_CUDA_OR_DIE(cudaMemcpy(st.data(), status.get(), 4 * st.size(),
                                 cudaMemcpyDeviceToHost));
  KVCACHE_CUDA_OR_DIE(cudaMemcpy(len.data(), lengths.get(), 8 * len.size(),
                                 cudaMemcpyDeviceToHost));
  for (size_t i = 2; i < 4; ++i) {
    EXPECT_EQ(st[i], kOutputTooSmall) << i;
    EXPECT_EQ(len[i], 0u) << i;
  }
  for (size_t i = 0; i < 2; ++i) {
    ASSERT_EQ(st[i], kOk) << ChunkErrorName(st[i]);
    std::string got(len[i], '\0');
    KVCACHE_CUDA_OR_DIE(
        cudaMemcpy(got.data(), outs[i].get(), len[i], cudaMemcpyDeviceToHost));
    EXPECT_TRUE(
        got == Encode(WithTokens(shape, tokens[i]), chunks[i], Level::kDefault))
        << "chunk " << i;
  }
}

// Lossy levels make finite garbage of non-finite inputs (codec.h), but the
// same garbage on both sides; extreme finite values must round alike.
TEST(GpuCodecTest, NonFiniteAndExtremeValuesMatchCpu) {
  REQUIRE_GPU();
  for (DType dtype : {DType::kFloat16, DType::kBFloat16}) {
    const ChunkShape shape{2, 48, 2, 64, dtype};
    const std::vector<uint16_t> specials =
        dtype == DType::kFloat16
            ? std::vector<uint16_t>{0x7C00, 0xFC00, 0x7E01, 0xFD55, 0x7BFF,
                                    0xFBFF, 0x0001, 0x8000, 0x03FF}
            : std::vector<uint16_t>{0x7F80, 0xFF80, 0x7FC1, 0xFFA5, 0x7F7F,
                                    0xFF7F, 0x0001, 0x8000, 0x007F};
    std::vector<std::vector<uint16_t>> chunks;
    std::vector<uint32_t> tokens;
    std::mt19937 rng(17);
    for (int variant = 0; variant < 3; ++variant) {
      std::vector<uint16_t> v = SyntheticChunk(shape, 70 + variant);
      // Sprinkled specials (variant 0), then whole planes of them.
      for (size_t i = 0; i < v.size(); ++i) {
        if (variant == 0 ? rng() % 97 == 0 : i / (v.size() / 4) == 1) {
          v[i] = specials[rng() % specials.size()];
        }
      }
      if (variant == 2) {
        for (size_t i = 0; i < v.size() / 4; ++i) v[i] = specials[4];
      }
      chunks.push_back(std::move(v));
      tokens.push_back(shape.tokens);
    }
    for (Level level : kAllLevels) {
      const std::string what = absl::StrCat("specials ", LevelName(level),
                                            " dtype ", static_cast<int>(dtype));
      ExpectEncodeMatchesCpu(shape, chunks, tokens, level, what);
      std::vector<std::string> streams;
      for (const auto& v : chunks) streams.push_back(Encode(shape, v, level));
      ExpectGpuMatchesCpu(shape, streams, tokens, what);
    }
  }
}

}  // namespace
}  // namespace kvcache::codec::gpu
