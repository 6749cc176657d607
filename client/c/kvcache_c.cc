// kvcache's C ABI (kvcache.h) over the C++ client library and the codec.
//
// Every function turns its C arguments into the library's types, checks
// them, and turns any error into a status code and a message kept per
// thread; no C++ exception leaves the library.
#include <cuda_runtime.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>
#include <limits>
#include <map>
#include <memory>
#include <new>
#include <optional>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/ascii.h"
#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "client/c/kvcache.h"
#include "client/chunk_key.h"
#include "client/host_decode_sink.h"
#include "client/kvcache_client.h"
#include "client/prefix_fetcher.h"
#include "client/profile_store.h"
#include "codec/codec.h"
#include "codec/cuda/gpu_codec.h"
#include "transfer/cuda_status.h"
#include "transfer/gpu_decode_sink.h"
#include "transfer/gpu_storer.h"

namespace kvcache::c_api {
namespace {

thread_local std::string last_error;

int Fail(const absl::Status& status) {
  last_error = status.ToString();
  return static_cast<int>(status.code());
}

// Runs `body` (returning an absl::Status) and turns its outcome, or any
// exception, into a status code.
template <typename Body>
int Guarded(Body&& body) {
  try {
    const absl::Status status = body();
    if (status.ok()) return KVCACHE_OK;
    return Fail(status);
  } catch (const std::bad_alloc&) {
    return Fail(absl::ResourceExhaustedError("out of memory"));
  } catch (const std::exception& e) {
    return Fail(absl::InternalError(e.what()));
  } catch (...) {
    return Fail(absl::InternalError("unexpected exception"));
  }
}

absl::Status NullArgument(absl::string_view what) {
  return absl::InvalidArgumentError(absl::StrCat(what, " is NULL"));
}

// A caller's options struct, read as far as the caller's header knew it
// (struct_size); fields it did not know keep `init`'s defaults.
template <typename T>
absl::StatusOr<T> Versioned(const T* in, void (*init)(T*),
                            absl::string_view what) {
  T out;
  init(&out);
  if (in == nullptr) return out;
  const size_t size = in->struct_size;
  if (size < sizeof(size_t) || size > (1u << 16)) {
    return absl::InvalidArgumentError(
        absl::StrCat(what, ".struct_size is ", size,
                     "; initialise the struct with its _init function"));
  }
  std::memcpy(&out, in, std::min(size, sizeof(T)));
  out.struct_size = sizeof(T);
  return out;
}

std::string String(const char* s) { return s == nullptr ? "" : s; }

absl::StatusOr<std::vector<ChunkKey>> Keys(const uint8_t* keys, size_t n) {
  if (n > 0 && keys == nullptr) return NullArgument("keys");
  std::vector<ChunkKey> out;
  out.reserve(n);
  for (size_t i = 0; i < n; ++i) {
    std::array<uint8_t, ChunkKey::kSize> bytes;
    std::memcpy(bytes.data(), keys + i * ChunkKey::kSize, ChunkKey::kSize);
    out.emplace_back(bytes);
  }
  return out;
}

absl::Duration Seconds(double s) { return absl::Seconds(s); }

std::string Hex(uintptr_t address) {
  return absl::StrCat("0x", absl::Hex(address));
}

absl::StatusOr<codec::DType> DTypeOf(int32_t dtype) {
  if (dtype == KVCACHE_FLOAT16) return codec::DType::kFloat16;
  if (dtype == KVCACHE_BFLOAT16) return codec::DType::kBFloat16;
  return absl::InvalidArgumentError(absl::StrCat(
      "dtype is ", dtype, "; KVCACHE_FLOAT16 (0) or KVCACHE_BFLOAT16 (1)"));
}

absl::StatusOr<FetcherOptions> FetcherOptionsOf(const kvcache_fetch_options* o,
                                                bool for_gpu) {
  FetcherOptions options;
  switch (o->transport) {
    case KVCACHE_TRANSPORT_AUTO:
      options.transport = Transport::kAuto;
      break;
    case KVCACHE_TRANSPORT_SHARED_MEMORY:
      options.transport = Transport::kSharedMemory;
      break;
    case KVCACHE_TRANSPORT_GRPC:
      options.transport = Transport::kGrpc;
      break;
    case KVCACHE_TRANSPORT_NCCL:
      options.transport = Transport::kNccl;
      break;
    default:
      return absl::InvalidArgumentError(
          absl::StrCat("transport is ", o->transport,
                       "; one of KVCACHE_TRANSPORT_AUTO, _SHARED_MEMORY, "
                       "_GRPC, _NCCL"));
  }
  if (!(o->lease_s > 0)) {
    return absl::InvalidArgumentError(
        absl::StrCat("lease_s must be positive, not ", o->lease_s));
  }
  options.lease = Seconds(o->lease_s);
  options.register_for_gpu = for_gpu;
  return options;
}

// What both fetches are asked for, checked.
struct FetchArguments {
  std::vector<ChunkKey> keys;
  FetcherOptions options;
  const ::kvcache_profile* profile = nullptr;
  int decode_threads = 1;
  transfer::LayerReadyCallback on_layer;  // fetch_to_device only
};

absl::StatusOr<FetchArguments> ParseFetch(const ::kvcache_client* client,
                                          const uint8_t* keys, size_t n,
                                          const kvcache_fetch_options* options,
                                          bool for_gpu) {
  if (client == nullptr) return NullArgument("client");
  absl::StatusOr<std::vector<ChunkKey>> parsed = Keys(keys, n);
  if (!parsed.ok()) return parsed.status();
  absl::StatusOr<kvcache_fetch_options> versioned =
      Versioned(options, kvcache_fetch_options_init, "fetch options");
  if (!versioned.ok()) return versioned.status();
  absl::StatusOr<FetcherOptions> fetcher_options =
      FetcherOptionsOf(&*versioned, for_gpu);
  if (!fetcher_options.ok()) return fetcher_options.status();
  if (versioned->decode_threads < 1 || versioned->decode_threads > 256) {
    return absl::InvalidArgumentError(absl::StrCat(
        "decode_threads is ", versioned->decode_threads, ", not in [1, 256]"));
  }
  transfer::LayerReadyCallback on_layer;
  if (versioned->on_layer != nullptr) {
    if (!for_gpu) {
      return absl::InvalidArgumentError(
          "on_layer is for kvcache_fetch_to_device, which restores layer by "
          "layer on the GPU");
    }
    on_layer = [callback = versioned->on_layer,
                user = versioned->on_layer_user](uint32_t layer,
                                                 CUevent_st* ready) {
      callback(user, layer, ready);
    };
  }
  return FetchArguments{*std::move(parsed), *std::move(fetcher_options),
                        versioned->profile, versioned->decode_threads,
                        std::move(on_layer)};
}

void WriteReport(const FetchReport& r, float first_batch_ms,
                 kvcache_fetch_report* out) {
  if (out == nullptr) return;
  out->gpu_tier_chunks = r.gpu_tier_chunks;
  out->shared_memory_chunks = r.shared_memory_chunks;
  out->grpc_chunks = r.grpc_chunks;
  out->nccl_chunks = r.nccl_chunks;
  out->bytes = r.bytes;
  out->first_batch_ms = first_batch_ms;
}

// Things costly to set up (fetchers, GPU staging), kept idle between calls
// by key, at most `max_idle` a key: a call borrows an idle one or makes its
// own, so threads sharing a client work at once rather than queue behind
// one. Thread-safe.
template <typename Key, typename T>
class IdlePool {
 public:
  explicit IdlePool(size_t max_idle) : max_idle_(max_idle) {}

  // nullptr if none is idle.
  std::unique_ptr<T> Take(const Key& key) {
    absl::MutexLock lock(&mu_);
    auto it = idle_.find(key);
    if (it == idle_.end() || it->second.empty()) return nullptr;
    std::unique_ptr<T> item = std::move(it->second.back());
    it->second.pop_back();
    return item;
  }

  void Return(const Key& key, std::unique_ptr<T> item) {
    absl::MutexLock lock(&mu_);
    std::vector<std::unique_ptr<T>>& idle = idle_[key];
    if (idle.size() < max_idle_) idle.push_back(std::move(item));
  }

 private:
  const size_t max_idle_;
  absl::Mutex mu_;
  std::map<Key, std::vector<std::unique_ptr<T>>> idle_ ABSL_GUARDED_BY(mu_);
};

// Whether what served a call that ended in `s` can serve the next: errors
// of the request or its data say nothing of it; after any other (a node
// gone, a lease run out, a CUDA error) the next call starts afresh.
bool Reusable(const absl::Status& s) {
  return s.ok() || absl::IsNotFound(s) || absl::IsInvalidArgument(s) ||
         absl::IsDataLoss(s);
}

// PrefixFetchers kept across calls. Making one maps the node's CPU tier
// (NodeInfo, then a Unix socket), and on the GPU path page-locks all of it,
// which for a tier of many GiB costs far more than a fetch. Thread-safe.
class FetcherPool {
 public:
  explicit FetcherPool(std::shared_ptr<KvCacheClient> client)
      : client_(std::move(client)) {}

  absl::StatusOr<FetchReport> Fetch(const FetcherOptions& options,
                                    absl::Span<const ChunkKey> keys,
                                    ChunkSink& sink) {
    const Key key{options.transport, options.register_for_gpu,
                  absl::ToInt64Milliseconds(options.lease)};
    std::unique_ptr<PrefixFetcher> fetcher = idle_.Take(key);
    if (fetcher == nullptr) {
      absl::StatusOr<std::unique_ptr<PrefixFetcher>> created =
          PrefixFetcher::Create(client_, options);
      if (!created.ok()) return created.status();
      fetcher = *std::move(created);
    }
    absl::StatusOr<FetchReport> report = fetcher->Fetch(keys, sink);
    if (Reusable(report.status())) idle_.Return(key, std::move(fetcher));
    return report;
  }

 private:
  // Transport, registered for the GPU, lease in milliseconds.
  using Key = std::tuple<Transport, bool, int64_t>;

  const std::shared_ptr<KvCacheClient> client_;
  // More than the threads that fetch at once would never be used.
  IdlePool<Key, PrefixFetcher> idle_{4};
};

std::string DimsName(const std::array<int64_t, 4>& dims) {
  return absl::StrCat("[", absl::StrJoin(dims, ", "), "]");
}

std::array<int64_t, 4> DimsOf(const kvcache_host_chunk& c) {
  return {c.layers, 2, c.tokens, c.channels};
}

// Checks fetch()'s destinations before anything is fetched: one per chunk,
// all of one model (same layers, channels and dtype; tokens may differ, as
// a prompt's last chunk does).
absl::Status CheckHostChunks(const kvcache_host_chunk* out, size_t n) {
  if (n > 0 && out == nullptr) return NullArgument("out");
  for (size_t i = 0; i < n; ++i) {
    const kvcache_host_chunk& c = out[i];
    if (c.values == nullptr) return NullArgument(absl::StrCat("out[", i, "]"));
    if (c.layers == 0 || c.tokens == 0 || c.channels == 0) {
      return absl::InvalidArgumentError(absl::StrCat(
          "out[", i, "] is ", DimsName(DimsOf(c)), "; no dimension may be 0"));
    }
    if (i > 0 && (c.layers != out[0].layers || c.channels != out[0].channels ||
                  (c.float16_only != 0) != (out[0].float16_only != 0))) {
      return absl::InvalidArgumentError(absl::StrCat(
          "out[", i, "] is ", DimsName(DimsOf(c)), " but out[0] is ",
          DimsName(DimsOf(out[0])),
          "; chunks of one prompt share layers, channels and dtype"));
    }
  }
  return absl::OkStatus();
}

// Decodes into fetch()'s buffers after checking each chunk's recorded shape
// against its buffer: the codec sees only a span of values, so a buffer of
// the right size but another shape would take them in the wrong places.
class CheckedHostSink : public ChunkSink {
 public:
  CheckedHostSink(const kvcache_host_chunk* out, size_t n,
                  HostDecodeOptions options)
      : out_(out, out + n), host_(Spans(out_), options) {}

  absl::Status Consume(size_t index, absl::string_view bytes,
                       bool stable) override {
    if (index < out_.size()) {
      absl::StatusOr<codec::ChunkShape> shape = codec::PeekShape(bytes);
      if (!shape.ok()) {
        return absl::Status(
            shape.status().code(),
            absl::StrCat("chunk ", index, ": ", shape.status().message()));
      }
      const kvcache_host_chunk& c = out_[index];
      const std::array<int64_t, 4> dims = {
          shape->layers, 2, shape->tokens,
          int64_t{shape->kv_heads} * shape->head_dim};
      const bool bf16 = shape->dtype == codec::DType::kBFloat16;
      if (dims != DimsOf(c) || (bf16 && c.float16_only != 0)) {
        return absl::InvalidArgumentError(absl::StrCat(
            "chunk ", index, " is ", DimsName(dims), " ",
            codec::DTypeName(shape->dtype), " but out[", index, "] is ",
            DimsName(DimsOf(c)), " ",
            c.float16_only != 0 ? "float16" : "16-bit",
            bf16 ? " (bfloat16 chunks decode into raw 16-bit buffers)" : ""));
      }
    }
    return host_.Consume(index, bytes, stable);
  }
  absl::Status Finish() override { return host_.Finish(); }

 private:
  static std::vector<absl::Span<uint16_t>> Spans(
      const std::vector<kvcache_host_chunk>& out) {
    std::vector<absl::Span<uint16_t>> spans;
    for (const kvcache_host_chunk& c : out) {
      spans.push_back(absl::MakeSpan(
          c.values, size_t{c.layers} * 2 * c.tokens * c.channels));
    }
    return spans;
  }

  const std::vector<kvcache_host_chunk> out_;
  HostDecodeSink host_;
};

// Where fetch_to_device or a storer puts or finds chunks: the layout and
// each chunk's place in it, with the host lists (per-layer bases, block
// tables) that must go to the GPU first, and every device address given,
// to check.
struct DeviceTarget {
  codec::gpu::KvLayout layout;
  std::vector<uint16_t*> layer_bases;  // empty: layout.layer_bases is set
  std::vector<codec::gpu::KvChunkRef> refs;
  std::vector<std::vector<int32_t>> block_ids;  // per chunk; empty: on GPU
  std::vector<std::pair<uintptr_t, std::string>> addresses;
};

absl::Status CheckRange(absl::string_view what, uint64_t value, uint64_t min,
                        uint64_t max) {
  if (value < min || value > max) {
    return absl::InvalidArgumentError(
        absl::StrCat(what, " is ", value, ", not in [", min, ", ", max, "]"));
  }
  return absl::OkStatus();
}

absl::StatusOr<DeviceTarget> ParseLayout(const kvcache_device_layout* in) {
  if (in == nullptr) return NullArgument("layout");
  absl::StatusOr<kvcache_device_layout> parsed =
      Versioned(in, kvcache_device_layout_init, "layout");
  if (!parsed.ok()) return parsed.status();
  const kvcache_device_layout& c = *parsed;
  DeviceTarget target;
  codec::gpu::KvLayout& l = target.layout;
  for (auto [what, value, max] :
       {std::tuple{"layout.layers", c.layers, codec::kMaxLayers},
        std::tuple{"layout.kv_heads", c.kv_heads, codec::kMaxChannels},
        std::tuple{"layout.head_dim", c.head_dim, codec::kMaxChannels}}) {
    if (absl::Status s = CheckRange(what, value, 1, max); !s.ok()) return s;
  }
  if (uint64_t{c.kv_heads} * c.head_dim > codec::kMaxChannels) {
    return absl::InvalidArgumentError(absl::StrCat(
        "layout.kv_heads * layout.head_dim is over ", codec::kMaxChannels));
  }
  l.layers = c.layers;
  l.kv_heads = c.kv_heads;
  l.head_dim = c.head_dim;
  absl::StatusOr<codec::DType> dtype = DTypeOf(c.dtype);
  if (!dtype.ok()) return dtype.status();
  l.dtype = *dtype;
  const int bases = (c.layer_bases != nullptr) +
                    (c.device_layer_bases != nullptr) + (c.base != 0);
  if (c.kind == KVCACHE_LAYOUT_CONTIGUOUS) {
    if (bases != 0 || c.block_tokens != 0 || c.num_blocks != 0 ||
        c.token_stride != 0 || c.kv_stride != 0 || c.block_stride != 0 ||
        c.layer_stride != 0) {
      return absl::InvalidArgumentError(
          "a contiguous layout has no bases, blocks or strides (those are "
          "for KVCACHE_LAYOUT_PAGED)");
    }
    return target;
  }
  if (c.kind != KVCACHE_LAYOUT_PAGED) {
    return absl::InvalidArgumentError(absl::StrCat(
        "layout.kind is ", c.kind,
        "; KVCACHE_LAYOUT_CONTIGUOUS (0) or KVCACHE_LAYOUT_PAGED (1)"));
  }
  l.kind = codec::gpu::KvLayout::Kind::kPaged;
  if (absl::Status s = CheckRange("layout.block_tokens", c.block_tokens, 1,
                                  codec::kMaxTokens);
      !s.ok()) {
    return s;
  }
  // Block ids are int32 on the GPU.
  if (absl::Status s = CheckRange("layout.num_blocks", c.num_blocks, 1,
                                  std::numeric_limits<int32_t>::max());
      !s.ok()) {
    return s;
  }
  l.block_tokens = c.block_tokens;
  l.num_blocks = c.num_blocks;
  // Defaults: vLLM's and FlashInfer's [num_blocks, 2, block_tokens, kv_heads,
  // head_dim] per layer, layers one after another for `base`.
  l.token_stride = c.token_stride != 0 ? c.token_stride : l.Channels();
  l.kv_stride =
      c.kv_stride != 0 ? c.kv_stride : int64_t{l.block_tokens} * l.token_stride;
  l.block_stride = c.block_stride != 0 ? c.block_stride : 2 * l.kv_stride;
  l.layer_stride = c.layer_stride != 0 ? c.layer_stride
                                       : int64_t{l.num_blocks} * l.block_stride;
  if (bases != 1) {
    return absl::InvalidArgumentError(
        "a paged layout needs exactly one of layer_bases (a host array of "
        "each layer's cache), device_layer_bases (the same on the GPU) or "
        "base (one allocation for all layers)");
  }
  if (c.base != 0) {
    l.base = reinterpret_cast<uint16_t*>(c.base);
    target.addresses.emplace_back(c.base, "layout.base");
  } else if (c.device_layer_bases != nullptr) {
    l.layer_bases = reinterpret_cast<uint16_t* const*>(c.device_layer_bases);
    target.addresses.emplace_back(
        reinterpret_cast<uintptr_t>(c.device_layer_bases),
        "layout.device_layer_bases");
  } else {
    for (size_t i = 0; i < l.layers; ++i) {
      const std::string what = absl::StrCat("layout.layer_bases[", i, "]");
      if (c.layer_bases[i] == 0) return NullArgument(what);
      target.layer_bases.push_back(
          reinterpret_cast<uint16_t*>(c.layer_bases[i]));
      target.addresses.emplace_back(c.layer_bases[i], what);
    }
  }
  return target;
}

// Each chunk's place (codec::gpu::KvChunkRef) in target's layout.
absl::Status ParseChunks(const kvcache_device_chunk* chunks, size_t n,
                         DeviceTarget& target) {
  if (n > 0 && chunks == nullptr) return NullArgument("chunks");
  const codec::gpu::KvLayout& l = target.layout;
  const bool paged = l.kind == codec::gpu::KvLayout::Kind::kPaged;
  target.refs.resize(n);
  target.block_ids.resize(n);
  for (size_t i = 0; i < n; ++i) {
    const std::string at = absl::StrCat("chunks[", i, "]");
    const kvcache_device_chunk& c = chunks[i];
    codec::gpu::KvChunkRef& ref = target.refs[i];
    if (absl::Status s =
            CheckRange(at + ".tokens", c.tokens, 1, codec::kMaxTokens);
        !s.ok()) {
      return s;
    }
    ref.tokens = c.tokens;
    if (!paged) {
      if (c.block_ids != nullptr || c.device_block_ids != 0 ||
          c.first_slot != 0) {
        return absl::InvalidArgumentError(absl::StrCat(
            at,
            " has block ids or a first slot, which are for a paged "
            "layout; this one is contiguous"));
      }
      if (c.values == 0) return NullArgument(at + ".values");
      ref.values = reinterpret_cast<uint16_t*>(c.values);
      target.addresses.emplace_back(c.values, at + ".values");
      continue;
    }
    if (c.values != 0) {
      return absl::InvalidArgumentError(absl::StrCat(
          at, ".values is for a contiguous layout; this one is paged"));
    }
    if (absl::Status s =
            CheckRange(at + ".first_slot", c.first_slot, 0,
                       std::numeric_limits<int32_t>::max() - c.tokens);
        !s.ok()) {
      return s;
    }
    ref.first_slot = c.first_slot;
    if ((c.block_ids != nullptr) == (c.device_block_ids != 0)) {
      return absl::InvalidArgumentError(
          absl::StrCat(at,
                       " needs exactly one of block_ids (a host array) or "
                       "device_block_ids (an int32 array on the GPU)"));
    }
    if (c.device_block_ids != 0) {
      ref.block_ids = reinterpret_cast<const int32_t*>(c.device_block_ids);
      target.addresses.emplace_back(c.device_block_ids,
                                    at + ".device_block_ids");
      continue;
    }
    // A host list: the blocks holding slots [first_slot, first_slot +
    // tokens), checked here since the GPU would read past a short one.
    const uint64_t needed =
        (uint64_t{ref.first_slot} + ref.tokens + l.block_tokens - 1) /
        l.block_tokens;
    if (c.n_block_ids < needed) {
      return absl::InvalidArgumentError(absl::StrCat(
          at, " has ", c.n_block_ids, " block ids; it needs at least ", needed,
          " (first_slot + tokens over block_tokens)"));
    }
    std::vector<int32_t>& host = target.block_ids[i];
    for (size_t j = 0; j < needed; ++j) {
      if (c.block_ids[j] < 0 ||
          static_cast<uint32_t>(c.block_ids[j]) >= l.num_blocks) {
        return absl::InvalidArgumentError(
            absl::StrCat(at, ".block_ids[", j, "] is ", c.block_ids[j],
                         ", not in [0, ", l.num_blocks - 1, "]"));
      }
      host.push_back(c.block_ids[j]);
    }
  }
  return absl::OkStatus();
}

// Host lists a layout or chunk refers to (per-layer bases, block tables),
// gathered for one call and copied to the GPU in one piece. The device copy
// stays for the next call: freeing it would wait for the whole GPU.
class DeviceUploads {
 public:
  DeviceUploads() = default;
  DeviceUploads(const DeviceUploads&) = delete;
  DeviceUploads& operator=(const DeviceUploads&) = delete;
  ~DeviceUploads() { cudaFree(device_); }

  // Forgets the lists of the last call, which must be done reading them.
  void Clear() { host_.clear(); }

  // Queues `bytes` at `data`; returns their offset in the device copy.
  size_t Add(const void* data, size_t bytes) {
    const size_t offset = (host_.size() + 7) / 8 * 8;
    host_.resize(offset + bytes);
    std::memcpy(host_.data() + offset, data, bytes);
    return offset;
  }

  // Copies what was queued in `stream`'s order, so the work that follows on
  // that stream sees it.
  absl::Status Upload(codec::gpu::Stream stream) {
    if (host_.empty()) return absl::OkStatus();
    cudaError_t e = cudaSuccess;
    if (host_.size() > capacity_) {
      cudaFree(device_);
      device_ = nullptr;
      capacity_ = 0;
      e = cudaMalloc(&device_, host_.size());
      if (e == cudaSuccess) capacity_ = host_.size();
    }
    if (e == cudaSuccess) {
      e = cudaMemcpyAsync(device_, host_.data(), host_.size(),
                          cudaMemcpyHostToDevice, stream);
    }
    if (e != cudaSuccess) {
      return absl::InternalError(absl::StrCat(
          "copying block tables to the GPU: ", cudaGetErrorString(e)));
    }
    return absl::OkStatus();
  }

  template <typename T>
  T* At(size_t offset) const {
    return reinterpret_cast<T*>(static_cast<char*>(device_) + offset);
  }

 private:
  std::vector<char> host_;
  void* device_ = nullptr;
  size_t capacity_ = 0;
};

// What fetch_to_device keeps between calls on one GPU: a decode sink, whose
// staging slots (device and pinned memory) take far longer to allocate than
// a short fetch, and the device copy of block tables.
struct DeviceFetch {
  std::unique_ptr<transfer::GpuDecodeSink> sink;
  DeviceUploads uploads;
};
// By device ordinal. Each idle one holds its sink's slots: a few hundred
// MiB of device and pinned memory.
using DeviceFetchPool = IdlePool<int, DeviceFetch>;

// FAILED_PRECONDITION unless the CUDA runtime finds a GPU: `call` needs
// one, `instead` says what works without.
absl::Status CheckGpu(absl::string_view call, absl::string_view instead) {
  int count = 0;
  const cudaError_t e = cudaGetDeviceCount(&count);
  if (e != cudaSuccess) {
    cudaGetLastError();  // not sticky; leave no error for later calls
    return absl::FailedPreconditionError(absl::StrCat(
        call, " needs a CUDA GPU, and the CUDA runtime found none (",
        cudaGetErrorString(e), "); ", instead));
  }
  if (count == 0) {
    return absl::FailedPreconditionError(absl::StrCat(
        call, " needs a CUDA GPU, and this host has none; ", instead));
  }
  return absl::OkStatus();
}

// The one device holding every address given (-1 if none is given): the
// call runs there. Host memory, or addresses on two GPUs, are
// INVALID_ARGUMENT.
absl::StatusOr<int> DestinationDevice(
    const std::vector<std::pair<uintptr_t, std::string>>& addresses) {
  int device = -1;
  std::string first;
  for (const auto& [address, what] : addresses) {
    cudaPointerAttributes attributes;
    const cudaError_t e = cudaPointerGetAttributes(
        &attributes, reinterpret_cast<const void*>(address));
    if (e != cudaSuccess) {
      cudaGetLastError();
      return absl::InvalidArgumentError(
          absl::StrCat(what, " (", Hex(address), "): ", cudaGetErrorString(e)));
    }
    if (attributes.type != cudaMemoryTypeDevice &&
        attributes.type != cudaMemoryTypeManaged) {
      return absl::InvalidArgumentError(
          absl::StrCat(what, " (", Hex(address),
                       ") is not GPU memory; pass a CUDA tensor's data_ptr()"));
    }
    if (device >= 0 && attributes.device != device) {
      return absl::InvalidArgumentError(
          absl::StrCat(what, " is on GPU ", attributes.device, " but ", first,
                       " is on GPU ", device, "; use one GPU at a time"));
    }
    device = attributes.device;
    if (first.empty()) first = what;
  }
  return device;
}

// Makes a GPU the calling thread's current one for a call (a thread that
// never chose one has 0), and the previous one current again after it.
class CurrentDevice {
 public:
  CurrentDevice() = default;
  CurrentDevice(const CurrentDevice&) = delete;
  CurrentDevice& operator=(const CurrentDevice&) = delete;
  ~CurrentDevice() {
    if (entered_ && previous_ != device_) cudaSetDevice(previous_);
  }

  // INVALID_ARGUMENT if `stream` (nullptr: the default stream) is on
  // another GPU.
  absl::Status Enter(int device, codec::gpu::Stream stream) {
    cudaError_t e = cudaGetDevice(&previous_);
    if (e == cudaSuccess && previous_ != device) e = cudaSetDevice(device);
    if (e != cudaSuccess) {
      return absl::InternalError(
          absl::StrCat("selecting GPU ", device, ": ", cudaGetErrorString(e)));
    }
    entered_ = true;
    device_ = device;
    if (stream != nullptr) {
      int stream_device = -1;
      if (cudaStreamGetDevice(stream, &stream_device) == cudaSuccess &&
          stream_device != device) {
        return absl::InvalidArgumentError(
            absl::StrCat("stream is on GPU ", stream_device,
                         " but the blocks are on GPU ", device));
      }
      cudaGetLastError();
    }
    return absl::OkStatus();
  }

 private:
  bool entered_ = false;
  int previous_ = 0;
  int device_ = 0;
};

struct DeviceReport {
  FetchReport report;
  float first_batch_ms = 0;
};

// A model profile's copies on the GPUs that fetch_to_device decoded with
// it, each uploaded on first use. Thread-safe.
class DeviceProfiles {
 public:
  explicit DeviceProfiles(const codec::ModelProfile& profile)
      : profile_(profile) {}

  // The copy on `device`, the current GPU.
  absl::StatusOr<const codec::gpu::DeviceProfile*> On(int device) const {
    absl::MutexLock lock(&mu_);
    std::unique_ptr<codec::gpu::DeviceProfile>& copy = copies_[device];
    if (copy == nullptr) {
      absl::StatusOr<std::unique_ptr<codec::gpu::DeviceProfile>> uploaded =
          codec::gpu::DeviceProfile::Upload(profile_);
      if (!uploaded.ok()) {
        copies_.erase(device);
        return uploaded.status();
      }
      copy = *std::move(uploaded);
    }
    return copy.get();
  }

 private:
  const codec::ModelProfile& profile_;
  mutable absl::Mutex mu_;
  mutable std::map<int, std::unique_ptr<codec::gpu::DeviceProfile>> copies_
      ABSL_GUARDED_BY(mu_);
};

// fetch_to_device's work: on the destination's GPU, uploads host block
// tables (and the profile, if given and not there yet), then fetches
// through a GpuDecodeSink.
absl::StatusOr<DeviceReport> FetchToDevice(
    FetcherPool& pool, DeviceFetchPool& devices, const FetcherOptions& options,
    absl::Span<const ChunkKey> keys, const DeviceTarget& target,
    codec::gpu::Stream stream, const DeviceProfiles* profiles,
    const transfer::LayerReadyCallback& on_layer) {
  absl::StatusOr<int> device = DestinationDevice(target.addresses);
  if (!device.ok()) return device.status();
  // The sink allocates and launches on the current device.
  CurrentDevice current;
  if (absl::Status s = current.Enter(*device, stream); !s.ok()) return s;
  const codec::gpu::DeviceProfile* profile = nullptr;
  if (profiles != nullptr) {
    absl::StatusOr<const codec::gpu::DeviceProfile*> on_device =
        profiles->On(*device);
    if (!on_device.ok()) return on_device.status();
    profile = *on_device;
  }

  std::unique_ptr<DeviceFetch> fetch = devices.Take(*device);
  if (fetch == nullptr) fetch = std::make_unique<DeviceFetch>();
  DeviceUploads& uploads = fetch->uploads;
  uploads.Clear();
  codec::gpu::KvLayout layout = target.layout;
  size_t bases_at = 0;
  if (!target.layer_bases.empty()) {
    bases_at = uploads.Add(target.layer_bases.data(),
                           target.layer_bases.size() * sizeof(uint16_t*));
  }
  std::vector<size_t> ids_at(target.refs.size());
  for (size_t i = 0; i < target.refs.size(); ++i) {
    const std::vector<int32_t>& ids = target.block_ids[i];
    if (!ids.empty()) {
      ids_at[i] = uploads.Add(ids.data(), ids.size() * sizeof(int32_t));
    }
  }
  if (absl::Status s = uploads.Upload(stream); !s.ok()) return s;
  if (!target.layer_bases.empty()) {
    layout.layer_bases = uploads.At<uint16_t* const>(bases_at);
  }
  std::vector<codec::gpu::KvChunkRef> refs = target.refs;
  for (size_t i = 0; i < refs.size(); ++i) {
    if (!target.block_ids[i].empty()) {
      refs[i].block_ids = uploads.At<const int32_t>(ids_at[i]);
    }
  }

  if (fetch->sink == nullptr) {
    absl::StatusOr<std::unique_ptr<transfer::GpuDecodeSink>> sink =
        transfer::GpuDecodeSink::Create(
            layout, std::move(refs), stream,
            {.profile = profile, .on_layer = on_layer});
    if (!sink.ok()) return sink.status();
    fetch->sink = *std::move(sink);
  } else if (absl::Status s = fetch->sink->Reset(layout, std::move(refs),
                                                 stream, profile, on_layer);
             !s.ok()) {
    return s;
  }
  absl::StatusOr<FetchReport> report = pool.Fetch(options, keys, *fetch->sink);
  const float first_batch_ms = fetch->sink->first_batch_ms();
  if (Reusable(report.status())) devices.Return(*device, std::move(fetch));
  if (!report.ok()) return report.status();
  return DeviceReport{*report, first_batch_ms};
}

// Stores chunks straight from a worker's GPU blocks in one layout through a
// transfer::GpuStorer. Thread-safe.
class Storer {
 public:
  static absl::StatusOr<std::unique_ptr<Storer>> Create(
      std::shared_ptr<KvCacheClient> client, DeviceTarget target,
      const transfer::GpuStorerOptions& options) {
    auto storer = std::unique_ptr<Storer>(new Storer(target.layout));
    // The layout's GPU, or the calling thread's where the layout names no
    // address (contiguous chunks name theirs at store()).
    absl::StatusOr<int> device = DestinationDevice(target.addresses);
    if (!device.ok()) return device.status();
    storer->device_ = *device;
    if (storer->device_ < 0 && cudaGetDevice(&storer->device_) != cudaSuccess) {
      return absl::FailedPreconditionError("this thread has no current GPU");
    }
    CurrentDevice current;
    if (absl::Status s = current.Enter(storer->device_, nullptr); !s.ok()) {
      return s;
    }
    if (!target.layer_bases.empty()) {
      // Lives as long as the storer, which reads it at every encode.
      DeviceUploads& bases = storer->bases_;
      bases.Add(target.layer_bases.data(),
                target.layer_bases.size() * sizeof(uint16_t*));
      if (absl::Status s = bases.Upload(nullptr); !s.ok()) return s;
      if (cudaStreamSynchronize(nullptr) != cudaSuccess) {
        return absl::InternalError("copying layer bases to the GPU failed");
      }
      storer->layout_.layer_bases = bases.At<uint16_t* const>(0);
    }
    absl::StatusOr<std::unique_ptr<transfer::GpuStorer>> gpu_storer =
        transfer::GpuStorer::Create(std::move(client), storer->layout_,
                                    options);
    if (!gpu_storer.ok()) return gpu_storer.status();
    storer->storer_ = *std::move(gpu_storer);
    return storer;
  }

  const codec::gpu::KvLayout& layout() const { return layout_; }

  absl::StatusOr<transfer::GpuStorer::Ticket> Store(
      const std::vector<ChunkKey>& keys, const DeviceTarget& target,
      codec::gpu::Stream stream, const std::optional<ChunkKey>& parent,
      const PutOptions& options) {
    absl::StatusOr<int> device = DestinationDevice(target.addresses);
    if (!device.ok()) return device.status();
    if (*device >= 0 && *device != device_) {
      return absl::InvalidArgumentError(
          absl::StrCat("the blocks are on GPU ", *device,
                       " but this storer's layout is on GPU ", device_));
    }
    CurrentDevice current;
    if (absl::Status s = current.Enter(device_, stream); !s.ok()) return s;
    // Block tables given as host lists go to the GPU on the worker's stream
    // and are freed on it after the encode that reads them: no wait.
    std::vector<int32_t> ids;
    std::vector<size_t> ids_at(target.refs.size());
    for (size_t i = 0; i < target.refs.size(); ++i) {
      ids_at[i] = ids.size();
      ids.insert(ids.end(), target.block_ids[i].begin(),
                 target.block_ids[i].end());
    }
    int32_t* device_ids = nullptr;
    if (!ids.empty()) {
      cudaError_t e =
          cudaMallocAsync(&device_ids, ids.size() * sizeof(int32_t), stream);
      if (e == cudaSuccess) {
        e = cudaMemcpyAsync(device_ids, ids.data(),
                            ids.size() * sizeof(int32_t),
                            cudaMemcpyHostToDevice, stream);
      }
      if (e != cudaSuccess) {
        if (device_ids != nullptr) cudaFreeAsync(device_ids, stream);
        return absl::InternalError(absl::StrCat(
            "copying block tables to the GPU: ", cudaGetErrorString(e)));
      }
    }
    std::vector<transfer::ChunkFromDevice> chunks(keys.size());
    for (size_t i = 0; i < keys.size(); ++i) {
      chunks[i].key = keys[i];
      chunks[i].parent = i == 0 ? parent : std::optional<ChunkKey>(keys[i - 1]);
      chunks[i].source = target.refs[i];
      if (!target.block_ids[i].empty()) {
        chunks[i].source.block_ids = device_ids + ids_at[i];
      }
    }
    absl::StatusOr<transfer::GpuStorer::Ticket> ticket =
        storer_->Store(std::move(chunks), stream, options);
    if (device_ids != nullptr) cudaFreeAsync(device_ids, stream);
    return ticket;
  }

  absl::StatusOr<transfer::StoreReport> Wait(transfer::GpuStorer::Ticket t) {
    return storer_->Wait(t);
  }

  uint64_t device_bytes() const { return storer_->device_bytes(); }

 private:
  explicit Storer(const codec::gpu::KvLayout& layout) : layout_(layout) {}

  codec::gpu::KvLayout layout_;
  int device_ = 0;
  DeviceUploads bases_;
  std::unique_ptr<transfer::GpuStorer> storer_;
};

}  // namespace
}  // namespace kvcache::c_api

using kvcache::ChunkKey;
using kvcache::KvCacheClient;
using kvcache::c_api::DeviceTarget;
using kvcache::c_api::Guarded;
using kvcache::c_api::Keys;
using kvcache::c_api::NullArgument;
using kvcache::c_api::String;
using kvcache::c_api::Versioned;

struct kvcache_buffer {
  std::string bytes;
};

struct kvcache_client {
  explicit kvcache_client(std::shared_ptr<KvCacheClient> c)
      : client(std::move(c)), fetchers(client) {}

  // The profile store of a (namespace, model id), made on first use and
  // kept, so each profile is fetched once.
  kvcache::ProfileStore& Profiles(const kvcache::KeySpace& space) {
    absl::MutexLock lock(&profiles_mu);
    std::unique_ptr<kvcache::ProfileStore>& store =
        profiles[{space.name_space, space.model_id}];
    if (store == nullptr) {
      store = std::make_unique<kvcache::ProfileStore>(client.get(), space);
    }
    return *store;
  }

  const std::shared_ptr<KvCacheClient> client;
  kvcache::c_api::FetcherPool fetchers;
  kvcache::c_api::DeviceFetchPool devices{2};
  absl::Mutex profiles_mu;
  std::map<std::pair<std::string, std::string>,
           std::unique_ptr<kvcache::ProfileStore>>
      profiles ABSL_GUARDED_BY(profiles_mu);
};

struct kvcache_profile {
  std::shared_ptr<const kvcache::codec::ModelProfile> profile;
  kvcache::c_api::DeviceProfiles on_device{*profile};
};

namespace {

// A caller's key space as the C++ library takes it.
absl::StatusOr<kvcache::KeySpace> KeySpaceOf(const kvcache_key_space* space) {
  if (space == nullptr) return NullArgument("space");
  absl::StatusOr<kvcache_key_space> s =
      Versioned(space, kvcache_key_space_init, "key space");
  if (!s.ok()) return s.status();
  kvcache::KeySpace key_space;
  if (s->name_space != nullptr) key_space.name_space = s->name_space;
  key_space.model_id = String(s->model_id);
  if (s->dtype != nullptr) key_space.dtype = s->dtype;
  key_space.layers = s->layers;
  key_space.kv_heads = s->kv_heads;
  key_space.head_dim = s->head_dim;
  key_space.tp_rank = s->tp_rank;
  key_space.tp_size = s->tp_size;
  key_space.chunk_tokens = s->chunk_tokens;
  return key_space;
}

void CopyId(const kvcache::codec::ProfileId& id, char id_hex[33]) {
  const std::string hex = kvcache::codec::ProfileIdHex(id);
  std::memcpy(id_hex, hex.c_str(), hex.size() + 1);
}

// Shared by kvcache_encode and kvcache_encode_with_profile.
absl::Status EncodeWith(const kvcache_chunk_shape* shape,
                        const uint16_t* values, size_t n_values,
                        const char* level,
                        const kvcache::codec::EncodeOptions& options,
                        kvcache_buffer** stream) {
  if (shape == nullptr) return NullArgument("shape");
  if (stream == nullptr) return NullArgument("stream");
  *stream = nullptr;
  if (values == nullptr && n_values > 0) return NullArgument("values");
  kvcache::codec::ChunkShape s;
  s.layers = shape->layers;
  s.tokens = shape->tokens;
  s.kv_heads = shape->kv_heads;
  s.head_dim = shape->head_dim;
  absl::StatusOr<kvcache::codec::DType> dtype =
      kvcache::c_api::DTypeOf(shape->dtype);
  if (!dtype.ok()) return dtype.status();
  s.dtype = *dtype;
  if (!kvcache::codec::ShapeWithinLimits(s)) {
    return absl::InvalidArgumentError(
        absl::StrCat("shape [layers ", s.layers, ", tokens ", s.tokens,
                     ", kv_heads ", s.kv_heads, ", head_dim ", s.head_dim,
                     "] has an empty dimension or is past the codec's limits"));
  }
  if (n_values != s.NumValues()) {
    return absl::InvalidArgumentError(
        absl::StrCat(n_values, " values, but the shape holds ", s.NumValues(),
                     " (layers * 2 * tokens * kv_heads * "
                     "head_dim)"));
  }
  absl::StatusOr<kvcache::codec::Level> parsed_level =
      kvcache::codec::ParseLevel(level == nullptr ? "near-lossless" : level);
  if (!parsed_level.ok()) return parsed_level.status();
  absl::StatusOr<std::string> encoded = kvcache::codec::EncodeChunk(
      s, absl::MakeConstSpan(values, n_values), *parsed_level, options);
  if (!encoded.ok()) return encoded.status();
  *stream = new kvcache_buffer{*std::move(encoded)};
  return absl::OkStatus();
}

// Shared by kvcache_decode and kvcache_decode_with_profile.
absl::Status DecodeWith(const void* stream, size_t size, uint16_t* values,
                        size_t n_values,
                        const kvcache::codec::ModelProfile* profile) {
  if (stream == nullptr && size > 0) return NullArgument("stream");
  if (values == nullptr && n_values > 0) return NullArgument("values");
  const absl::string_view bytes(static_cast<const char*>(stream), size);
  absl::StatusOr<kvcache::codec::ChunkShape> s =
      kvcache::codec::PeekShape(bytes);
  if (!s.ok()) return s.status();
  if (s->NumValues() != n_values) {
    return absl::InvalidArgumentError(absl::StrCat(
        "the stream holds ", s->NumValues(), " values, not ", n_values));
  }
  return kvcache::codec::DecodeChunk(bytes, absl::MakeSpan(values, n_values),
                                     profile);
}

}  // namespace

struct kvcache_storer {
  std::unique_ptr<kvcache::c_api::Storer> storer;
};

extern "C" {

uint32_t kvcache_abi_version(void) { return KVCACHE_ABI_VERSION; }

const char* kvcache_last_error(void) {
  return kvcache::c_api::last_error.c_str();
}

const char* kvcache_status_name(int status) {
  static constexpr std::array<const char*, 17> kNames = {"OK",
                                                         "CANCELLED",
                                                         "UNKNOWN",
                                                         "INVALID_ARGUMENT",
                                                         "DEADLINE_EXCEEDED",
                                                         "NOT_FOUND",
                                                         "ALREADY_EXISTS",
                                                         "PERMISSION_DENIED",
                                                         "RESOURCE_EXHAUSTED",
                                                         "FAILED_PRECONDITION",
                                                         "ABORTED",
                                                         "OUT_OF_RANGE",
                                                         "UNIMPLEMENTED",
                                                         "INTERNAL",
                                                         "UNAVAILABLE",
                                                         "DATA_LOSS",
                                                         "UNAUTHENTICATED"};
  if (status < 0 || static_cast<size_t>(status) >= kNames.size()) {
    return "UNKNOWN";
  }
  return kNames[status];
}

const uint8_t* kvcache_buffer_data(const kvcache_buffer* b) {
  return b == nullptr ? nullptr
                      : reinterpret_cast<const uint8_t*>(b->bytes.data());
}
size_t kvcache_buffer_size(const kvcache_buffer* b) {
  return b == nullptr ? 0 : b->bytes.size();
}
void kvcache_buffer_free(kvcache_buffer* b) { delete b; }

void kvcache_key_space_init(kvcache_key_space* space) {
  const kvcache::KeySpace defaults;
  *space = kvcache_key_space{};
  space->struct_size = sizeof(*space);
  space->tp_rank = defaults.tp_rank;
  space->tp_size = defaults.tp_size;
  space->chunk_tokens = defaults.chunk_tokens;
}

int kvcache_chunk_keys(const kvcache_key_space* space, const int32_t* tokens,
                       size_t n_tokens, uint8_t* keys_out, size_t max_keys,
                       size_t* n_keys) {
  return Guarded([&]() -> absl::Status {
    if (space == nullptr) return NullArgument("space");
    if (n_tokens > 0 && tokens == nullptr) return NullArgument("tokens");
    if (n_keys == nullptr) return NullArgument("n_keys");
    absl::StatusOr<kvcache::KeySpace> key_space = KeySpaceOf(space);
    if (!key_space.ok()) return key_space.status();
    absl::StatusOr<std::vector<ChunkKey>> keys = kvcache::ChunkKeysForTokens(
        *key_space, absl::MakeConstSpan(tokens, n_tokens));
    if (!keys.ok()) return keys.status();
    *n_keys = keys->size();
    if (keys->size() > max_keys) {
      return absl::InvalidArgumentError(
          absl::StrCat(n_tokens, " tokens make ", keys->size(),
                       " keys; keys_out has room for ", max_keys));
    }
    if (!keys->empty() && keys_out == nullptr) return NullArgument("keys_out");
    for (size_t i = 0; i < keys->size(); ++i) {
      const absl::string_view bytes = (*keys)[i].AsBytes();
      std::memcpy(keys_out + i * KVCACHE_KEY_BYTES, bytes.data(),
                  KVCACHE_KEY_BYTES);
    }
    return absl::OkStatus();
  });
}

void kvcache_client_options_init(kvcache_client_options* options) {
  const kvcache::ClientOptions defaults;
  *options = kvcache_client_options{};
  options->struct_size = sizeof(*options);
  options->timeout_s = absl::ToDoubleSeconds(defaults.timeout);
  options->connect_timeout_s = absl::ToDoubleSeconds(defaults.connect_timeout);
}

int kvcache_connect(const kvcache_client_options* options,
                    kvcache_client** client) {
  return Guarded([&]() -> absl::Status {
    if (client == nullptr) return NullArgument("client");
    *client = nullptr;
    absl::StatusOr<kvcache_client_options> o =
        Versioned(options, kvcache_client_options_init, "client options");
    if (!o.ok()) return o.status();
    if (!(o->timeout_s > 0) || !(o->connect_timeout_s > 0)) {
      return absl::InvalidArgumentError(
          "timeout_s and connect_timeout_s must be positive");
    }
    kvcache::ClientOptions c;
    if (o->address != nullptr) c.address = o->address;
    c.timeout = kvcache::c_api::Seconds(o->timeout_s);
    c.connect_timeout = kvcache::c_api::Seconds(o->connect_timeout_s);
    c.ca_file = String(o->ca_file);
    c.cert_file = String(o->cert_file);
    c.key_file = String(o->key_file);
    c.server_name = String(o->server_name);
    c.token = String(o->token);
    c.token_file = String(o->token_file);
    c.key_namespace = String(o->key_namespace);
    absl::StatusOr<std::unique_ptr<KvCacheClient>> connected =
        KvCacheClient::Connect(c);
    if (!connected.ok()) return connected.status();
    *client = new kvcache_client(
        std::shared_ptr<KvCacheClient>(std::move(*connected)));
    return absl::OkStatus();
  });
}

void kvcache_client_free(kvcache_client* client) { delete client; }

const char* kvcache_tier_name(int tier) {
  if (!kvcache::v1::Tier_IsValid(tier)) tier = KVCACHE_TIER_UNSPECIFIED;
  // The protocol's names, which live as long as the program.
  return kvcache::v1::Tier_Name(static_cast<kvcache::v1::Tier>(tier)).c_str();
}

int kvcache_lookup(kvcache_client* client, const uint8_t* keys, size_t n,
                   size_t* prefix_chunks, kvcache_chunk_info* infos) {
  return Guarded([&]() -> absl::Status {
    if (client == nullptr) return NullArgument("client");
    if (prefix_chunks == nullptr) return NullArgument("prefix_chunks");
    absl::StatusOr<std::vector<ChunkKey>> parsed = Keys(keys, n);
    if (!parsed.ok()) return parsed.status();
    if (infos == nullptr) {
      absl::StatusOr<size_t> count = client->client->CountCached(*parsed);
      if (!count.ok()) return count.status();
      *prefix_chunks = *count;
      return absl::OkStatus();
    }
    absl::StatusOr<kvcache::LookupResult> r = client->client->Lookup(*parsed);
    if (!r.ok()) return r.status();
    *prefix_chunks = r->prefix_chunks;
    for (size_t i = 0; i < r->chunks.size() && i < n; ++i) {
      const kvcache::v1::ChunkInfo& info = r->chunks[i];
      infos[i].size_bytes = info.size_bytes();
      // kvcache_tier numbers the tiers as the protocol does.
      infos[i].tier = kvcache::v1::Tier_IsValid(info.tier())
                          ? static_cast<int32_t>(info.tier())
                          : KVCACHE_TIER_UNSPECIFIED;
      infos[i].pinned = info.pinned() ? 1 : 0;
    }
    return absl::OkStatus();
  });
}

void kvcache_put_options_init(kvcache_put_options* options) {
  *options = kvcache_put_options{};
  options->struct_size = sizeof(*options);
  options->chained = 1;
}

int kvcache_put(kvcache_client* client, const uint8_t* keys, size_t n,
                const void* const* chunks, const size_t* sizes,
                const kvcache_put_options* options) {
  return Guarded([&]() -> absl::Status {
    if (client == nullptr) return NullArgument("client");
    if (n > 0 && (chunks == nullptr || sizes == nullptr)) {
      return NullArgument("chunks or sizes");
    }
    absl::StatusOr<kvcache_put_options> o =
        Versioned(options, kvcache_put_options_init, "put options");
    if (!o.ok()) return o.status();
    if (!(o->pin_ttl_s >= 0)) {
      return absl::InvalidArgumentError(
          absl::StrCat("pin_ttl_s must be 0 or more, not ", o->pin_ttl_s));
    }
    absl::StatusOr<std::vector<ChunkKey>> parsed = Keys(keys, n);
    if (!parsed.ok()) return parsed.status();
    std::vector<kvcache::ChunkToPut> puts;
    puts.reserve(n);
    for (size_t i = 0; i < n; ++i) {
      if (chunks[i] == nullptr && sizes[i] > 0) {
        return NullArgument(absl::StrCat("chunks[", i, "]"));
      }
      puts.push_back(
          {(*parsed)[i],
           absl::string_view(static_cast<const char*>(chunks[i]), sizes[i])});
      if (o->chained != 0 && i > 0) puts.back().parent = (*parsed)[i - 1];
    }
    return client->client->Put(
        puts, kvcache::PutOptions{kvcache::c_api::Seconds(o->pin_ttl_s),
                                  o->replace != 0});
  });
}

int kvcache_get(kvcache_client* client, const uint8_t* keys, size_t n,
                kvcache_buffer** out) {
  return Guarded([&]() -> absl::Status {
    if (client == nullptr) return NullArgument("client");
    if (n > 0 && out == nullptr) return NullArgument("out");
    std::fill(out, out + n, nullptr);
    absl::StatusOr<std::vector<ChunkKey>> parsed = Keys(keys, n);
    if (!parsed.ok()) return parsed.status();
    absl::StatusOr<std::vector<kvcache::FetchedChunk>> got =
        client->client->Get(*parsed);
    if (!got.ok()) return got.status();
    if (got->size() != n) {
      return absl::InternalError(
          absl::StrCat("asked for ", n, " chunks, got ", got->size()));
    }
    std::vector<std::unique_ptr<kvcache_buffer>> buffers;
    for (kvcache::FetchedChunk& chunk : *got) {
      buffers.push_back(std::make_unique<kvcache_buffer>());
      buffers.back()->bytes = std::move(chunk.bytes);
    }
    for (size_t i = 0; i < n; ++i) out[i] = buffers[i].release();
    return absl::OkStatus();
  });
}

int kvcache_delete(kvcache_client* client, const uint8_t* keys, size_t n,
                   uint32_t* deleted) {
  return Guarded([&]() -> absl::Status {
    if (client == nullptr) return NullArgument("client");
    absl::StatusOr<std::vector<ChunkKey>> parsed = Keys(keys, n);
    if (!parsed.ok()) return parsed.status();
    absl::StatusOr<uint32_t> r = client->client->Delete(*parsed);
    if (!r.ok()) return r.status();
    if (deleted != nullptr) *deleted = *r;
    return absl::OkStatus();
  });
}

int kvcache_pin(kvcache_client* client, const uint8_t* keys, size_t n,
                double ttl_s, double* expiry_unix_s) {
  return Guarded([&]() -> absl::Status {
    if (client == nullptr) return NullArgument("client");
    if (!(ttl_s > 0)) {
      return absl::InvalidArgumentError(
          absl::StrCat("ttl_s must be positive, not ", ttl_s));
    }
    absl::StatusOr<std::vector<ChunkKey>> parsed = Keys(keys, n);
    if (!parsed.ok()) return parsed.status();
    absl::StatusOr<absl::Time> r =
        client->client->Pin(*parsed, kvcache::c_api::Seconds(ttl_s));
    if (!r.ok()) return r.status();
    if (expiry_unix_s != nullptr) {
      *expiry_unix_s = absl::ToDoubleSeconds(*r - absl::UnixEpoch());
    }
    return absl::OkStatus();
  });
}

int kvcache_unpin(kvcache_client* client, const uint8_t* keys, size_t n) {
  return Guarded([&]() -> absl::Status {
    if (client == nullptr) return NullArgument("client");
    absl::StatusOr<std::vector<ChunkKey>> parsed = Keys(keys, n);
    if (!parsed.ok()) return parsed.status();
    return client->client->Unpin(*parsed);
  });
}

int kvcache_get_stats(kvcache_client* client, kvcache_stats* stats) {
  return Guarded([&]() -> absl::Status {
    if (client == nullptr) return NullArgument("client");
    if (stats == nullptr) return NullArgument("stats");
    absl::StatusOr<kvcache::v1::StatsResponse> r = client->client->Stats();
    if (!r.ok()) return r.status();
    stats->chunks = r->chunks();
    stats->hits = r->hits();
    stats->misses = r->misses();
    stats->evictions = r->evictions();
    stats->bytes_in = r->bytes_in();
    stats->bytes_out = r->bytes_out();
    return absl::OkStatus();
  });
}

void kvcache_fetch_options_init(kvcache_fetch_options* options) {
  *options = kvcache_fetch_options{};
  options->struct_size = sizeof(*options);
  options->transport = KVCACHE_TRANSPORT_AUTO;
  options->lease_s = 30;
  options->decode_threads = 1;
}

int kvcache_fetch(kvcache_client* client, const uint8_t* keys, size_t n,
                  const kvcache_host_chunk* out,
                  const kvcache_fetch_options* options,
                  kvcache_fetch_report* report) {
  return Guarded([&]() -> absl::Status {
    absl::StatusOr<kvcache::c_api::FetchArguments> fetch =
        kvcache::c_api::ParseFetch(client, keys, n, options,
                                   /*for_gpu=*/false);
    if (!fetch.ok()) return fetch.status();
    if (absl::Status s = kvcache::c_api::CheckHostChunks(out, n); !s.ok()) {
      return s;
    }
    kvcache::c_api::WriteReport({}, 0, report);
    if (n == 0) return absl::OkStatus();
    kvcache::c_api::CheckedHostSink sink(
        out, n,
        {.profile = fetch->profile == nullptr ? nullptr
                                              : fetch->profile->profile.get(),
         .threads = fetch->decode_threads});
    absl::StatusOr<kvcache::FetchReport> r =
        client->fetchers.Fetch(fetch->options, fetch->keys, sink);
    if (!r.ok()) return r.status();
    kvcache::c_api::WriteReport(*r, 0, report);
    return absl::OkStatus();
  });
}

void kvcache_device_layout_init(kvcache_device_layout* layout) {
  *layout = kvcache_device_layout{};
  layout->struct_size = sizeof(*layout);
  layout->kind = KVCACHE_LAYOUT_CONTIGUOUS;
  layout->dtype = KVCACHE_FLOAT16;
}

int kvcache_fetch_to_device(kvcache_client* client, const uint8_t* keys,
                            size_t n, const kvcache_device_layout* layout,
                            const kvcache_device_chunk* chunks, void* stream,
                            const kvcache_fetch_options* options,
                            kvcache_fetch_report* report) {
  return Guarded([&]() -> absl::Status {
    absl::StatusOr<kvcache::c_api::FetchArguments> fetch =
        kvcache::c_api::ParseFetch(client, keys, n, options, /*for_gpu=*/true);
    if (!fetch.ok()) return fetch.status();
    // Arguments first, so their errors read the same with or without a GPU.
    absl::StatusOr<DeviceTarget> target = kvcache::c_api::ParseLayout(layout);
    if (!target.ok()) return target.status();
    if (absl::Status s = kvcache::c_api::ParseChunks(chunks, n, *target);
        !s.ok()) {
      return s;
    }
    if (absl::Status s = kvcache::c_api::CheckGpu(
            "fetch_to_device", "decode on the CPU with fetch()");
        !s.ok()) {
      return s;
    }
    kvcache::c_api::WriteReport({}, 0, report);
    if (n == 0) return absl::OkStatus();
    absl::StatusOr<kvcache::c_api::DeviceReport> r =
        kvcache::c_api::FetchToDevice(
            client->fetchers, client->devices, fetch->options, fetch->keys,
            *target, static_cast<kvcache::codec::gpu::Stream>(stream),
            fetch->profile == nullptr ? nullptr : &fetch->profile->on_device,
            fetch->on_layer);
    if (!r.ok()) return r.status();
    kvcache::c_api::WriteReport(r->report, r->first_batch_ms, report);
    return absl::OkStatus();
  });
}

int kvcache_stream_wait_event(void* stream, void* event) {
  return Guarded([&]() -> absl::Status {
    if (event == nullptr) return NullArgument("event");
    return kvcache::CudaError(
        cudaStreamWaitEvent(static_cast<cudaStream_t>(stream),
                            static_cast<cudaEvent_t>(event), 0),
        "waiting for a layer's event");
  });
}

void kvcache_storer_options_init(kvcache_storer_options* options) {
  const kvcache::transfer::GpuStorerOptions defaults;
  *options = kvcache_storer_options{};
  options->struct_size = sizeof(*options);
  options->chunk_tokens = defaults.chunk_tokens;
  options->batch_chunks = defaults.batch_chunks;
  options->slots = defaults.slots;
}

int kvcache_storer_create(kvcache_client* client,
                          const kvcache_device_layout* layout,
                          const kvcache_storer_options* options,
                          kvcache_storer** storer) {
  return Guarded([&]() -> absl::Status {
    if (client == nullptr) return NullArgument("client");
    if (storer == nullptr) return NullArgument("storer");
    *storer = nullptr;
    absl::StatusOr<DeviceTarget> target = kvcache::c_api::ParseLayout(layout);
    if (!target.ok()) return target.status();
    absl::StatusOr<kvcache_storer_options> o =
        Versioned(options, kvcache_storer_options_init, "storer options");
    if (!o.ok()) return o.status();
    kvcache::transfer::GpuStorerOptions gpu_options;
    absl::StatusOr<kvcache::codec::Level> level = kvcache::codec::ParseLevel(
        o->level == nullptr ? "near-lossless" : o->level);
    if (!level.ok()) return level.status();
    gpu_options.level = *level;
    if (o->chunk_tokens == 0 || o->chunk_tokens > kvcache::codec::kMaxTokens ||
        o->batch_chunks == 0 || o->slots == 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("chunk_tokens must be 1 to ", kvcache::codec::kMaxTokens,
                       ", batch_chunks and slots 1 or more"));
    }
    gpu_options.chunk_tokens = o->chunk_tokens;
    gpu_options.batch_chunks = o->batch_chunks;
    gpu_options.slots = o->slots;
    if (absl::Status s = kvcache::c_api::CheckGpu(
            "storer", "encode on the CPU with encode() and put()");
        !s.ok()) {
      return s;
    }
    absl::StatusOr<std::unique_ptr<kvcache::c_api::Storer>> created =
        kvcache::c_api::Storer::Create(client->client, *std::move(target),
                                       gpu_options);
    if (!created.ok()) return created.status();
    *storer = new kvcache_storer{*std::move(created)};
    return absl::OkStatus();
  });
}

int kvcache_storer_store(kvcache_storer* storer, const uint8_t* keys, size_t n,
                         const kvcache_device_chunk* chunks, void* stream,
                         const uint8_t* parent, double pin_ttl_s,
                         uint64_t* ticket) {
  return Guarded([&]() -> absl::Status {
    if (storer == nullptr) return NullArgument("storer");
    if (ticket == nullptr) return NullArgument("ticket");
    if (!(pin_ttl_s >= 0)) {
      return absl::InvalidArgumentError(
          absl::StrCat("pin_ttl_s must be 0 or more, not ", pin_ttl_s));
    }
    absl::StatusOr<std::vector<ChunkKey>> parsed = Keys(keys, n);
    if (!parsed.ok()) return parsed.status();
    DeviceTarget target;
    target.layout = storer->storer->layout();
    if (absl::Status s = kvcache::c_api::ParseChunks(chunks, n, target);
        !s.ok()) {
      return s;
    }
    std::optional<ChunkKey> first_parent;
    if (parent != nullptr) first_parent = Keys(parent, 1)->front();
    absl::StatusOr<kvcache::transfer::GpuStorer::Ticket> t =
        storer->storer->Store(
            *parsed, target, static_cast<kvcache::codec::gpu::Stream>(stream),
            first_parent,
            kvcache::PutOptions{kvcache::c_api::Seconds(pin_ttl_s)});
    if (!t.ok()) return t.status();
    *ticket = *t;
    return absl::OkStatus();
  });
}

int kvcache_storer_wait(kvcache_storer* storer, uint64_t ticket,
                        kvcache_store_report* report) {
  return Guarded([&]() -> absl::Status {
    if (storer == nullptr) return NullArgument("storer");
    absl::StatusOr<kvcache::transfer::StoreReport> r =
        storer->storer->Wait(ticket);
    if (!r.ok()) return r.status();
    if (report != nullptr) {
      report->chunks = r->chunks;
      report->raw_bytes = r->raw_bytes;
      report->stored_bytes = r->stored_bytes;
    }
    return absl::OkStatus();
  });
}

uint64_t kvcache_storer_device_bytes(const kvcache_storer* storer) {
  return storer == nullptr ? 0 : storer->storer->device_bytes();
}

void kvcache_storer_free(kvcache_storer* storer) { delete storer; }

int kvcache_encode(const kvcache_chunk_shape* shape, const uint16_t* values,
                   size_t n_values, const char* level,
                   kvcache_buffer** stream) {
  return Guarded(
      [&] { return EncodeWith(shape, values, n_values, level, {}, stream); });
}

int kvcache_peek_shape(const void* stream, size_t size,
                       kvcache_chunk_shape* shape) {
  return Guarded([&]() -> absl::Status {
    if (stream == nullptr && size > 0) return NullArgument("stream");
    if (shape == nullptr) return NullArgument("shape");
    absl::StatusOr<kvcache::codec::ChunkShape> s = kvcache::codec::PeekShape(
        absl::string_view(static_cast<const char*>(stream), size));
    if (!s.ok()) return s.status();
    shape->layers = s->layers;
    shape->tokens = s->tokens;
    shape->kv_heads = s->kv_heads;
    shape->head_dim = s->head_dim;
    shape->dtype = s->dtype == kvcache::codec::DType::kBFloat16
                       ? KVCACHE_BFLOAT16
                       : KVCACHE_FLOAT16;
    return absl::OkStatus();
  });
}

int kvcache_decode(const void* stream, size_t size, uint16_t* values,
                   size_t n_values) {
  return Guarded(
      [&] { return DecodeWith(stream, size, values, n_values, nullptr); });
}

int kvcache_profile_parse(const void* bytes, size_t size,
                          kvcache_profile** profile) {
  return Guarded([&]() -> absl::Status {
    if (bytes == nullptr && size > 0) return NullArgument("bytes");
    if (profile == nullptr) return NullArgument("profile");
    *profile = nullptr;
    absl::StatusOr<kvcache::codec::ModelProfile> parsed =
        kvcache::codec::ParseProfile(
            absl::string_view(static_cast<const char*>(bytes), size));
    if (!parsed.ok()) return parsed.status();
    *profile = new kvcache_profile{
        std::make_shared<const kvcache::codec::ModelProfile>(
            *std::move(parsed))};
    return absl::OkStatus();
  });
}

int kvcache_profile_bytes(const kvcache_profile* profile,
                          kvcache_buffer** bytes) {
  return Guarded([&]() -> absl::Status {
    if (profile == nullptr) return NullArgument("profile");
    if (bytes == nullptr) return NullArgument("bytes");
    *bytes =
        new kvcache_buffer{kvcache::codec::SerializeProfile(*profile->profile)};
    return absl::OkStatus();
  });
}

int kvcache_profile_id(const kvcache_profile* profile, char id_hex[33]) {
  return Guarded([&]() -> absl::Status {
    if (profile == nullptr) return NullArgument("profile");
    if (id_hex == nullptr) return NullArgument("id_hex");
    CopyId(profile->profile->id, id_hex);
    return absl::OkStatus();
  });
}

void kvcache_profile_free(kvcache_profile* profile) { delete profile; }

int kvcache_profile_publish(kvcache_client* client,
                            const kvcache_key_space* space,
                            const kvcache_profile* profile) {
  return Guarded([&]() -> absl::Status {
    if (client == nullptr) return NullArgument("client");
    if (profile == nullptr) return NullArgument("profile");
    absl::StatusOr<kvcache::KeySpace> key_space = KeySpaceOf(space);
    if (!key_space.ok()) return key_space.status();
    return client->Profiles(*key_space).Publish(*profile->profile);
  });
}

int kvcache_profile_get(kvcache_client* client, const kvcache_key_space* space,
                        const char* id_hex, kvcache_profile** profile) {
  return Guarded([&]() -> absl::Status {
    if (client == nullptr) return NullArgument("client");
    if (profile == nullptr) return NullArgument("profile");
    *profile = nullptr;
    absl::StatusOr<kvcache::KeySpace> key_space = KeySpaceOf(space);
    if (!key_space.ok()) return key_space.status();
    kvcache::ProfileStore& store = client->Profiles(*key_space);
    absl::StatusOr<std::shared_ptr<const kvcache::codec::ModelProfile>> got;
    if (id_hex == nullptr) {
      got = store.Current();
    } else {
      const absl::string_view hex(id_hex);
      if (hex.size() != 32 ||
          !std::all_of(hex.begin(), hex.end(), absl::ascii_isxdigit)) {
        return absl::InvalidArgumentError(
            absl::StrCat("profile id \"", hex, "\" is not 32 hex digits"));
      }
      const std::string raw = absl::HexStringToBytes(hex);
      kvcache::codec::ProfileId id;
      std::memcpy(id.data(), raw.data(), id.size());
      got = store.Get(id);
    }
    if (!got.ok()) return got.status();
    *profile = new kvcache_profile{*std::move(got)};
    return absl::OkStatus();
  });
}

int kvcache_stream_profile_id(const void* stream, size_t size,
                              char id_hex[33]) {
  return Guarded([&]() -> absl::Status {
    if (stream == nullptr && size > 0) return NullArgument("stream");
    if (id_hex == nullptr) return NullArgument("id_hex");
    absl::StatusOr<kvcache::codec::StreamSummary> summary =
        kvcache::codec::PeekSummary(
            absl::string_view(static_cast<const char*>(stream), size));
    if (!summary.ok()) return summary.status();
    if (!summary->profile_id.has_value()) {
      return absl::NotFoundError("the stream needs no model profile");
    }
    CopyId(*summary->profile_id, id_hex);
    return absl::OkStatus();
  });
}

int kvcache_encode_with_profile(const kvcache_chunk_shape* shape,
                                const uint16_t* values, size_t n_values,
                                const char* level,
                                const kvcache_profile* profile,
                                uint32_t first_position,
                                kvcache_buffer** stream) {
  return Guarded([&] {
    kvcache::codec::EncodeOptions options;
    options.profile = profile == nullptr ? nullptr : profile->profile.get();
    options.first_position = first_position;
    return EncodeWith(shape, values, n_values, level, options, stream);
  });
}

int kvcache_decode_with_profile(const void* stream, size_t size,
                                uint16_t* values, size_t n_values,
                                const kvcache_profile* profile) {
  return Guarded([&] {
    return DecodeWith(stream, size, values, n_values,
                      profile == nullptr ? nullptr : profile->profile.get());
  });
}

}  // extern "C"
