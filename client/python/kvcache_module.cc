// The `kvcache` Python module: chunk keys, the client, and the codec, for
// inference engines written in Python (a vLLM or SGLang connector).
//
// Every call that talks to the daemon releases the GIL, so a connector can
// fetch on one thread while the engine runs on another. Errors map to typed
// exceptions (kvcache.NotFoundError, ...) carrying the daemon's message.
#include <cuda_runtime.h>
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>
#include <cstdint>
#include <cstring>
#include <limits>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "client/chunk_key.h"
#include "client/host_decode_sink.h"
#include "client/kvcache_client.h"
#include "client/prefix_fetcher.h"
#include "codec/codec.h"
#include "codec/cuda/gpu_codec.h"
#include "transfer/gpu_decode_sink.h"
#include "transfer/gpu_storer.h"

namespace kvcache::python {
namespace {

namespace py = pybind11;

// Python exception types, one per status code a caller may want to handle.
struct Exceptions {
  py::object error;
  py::object invalid_argument;
  py::object not_found;
  py::object resource_exhausted;
  py::object failed_precondition;
  py::object data_loss;
  py::object unavailable;
};
Exceptions* exceptions = nullptr;

[[noreturn]] void Raise(const absl::Status& status) {
  py::object type = exceptions->error;
  switch (status.code()) {
    case absl::StatusCode::kInvalidArgument:
      type = exceptions->invalid_argument;
      break;
    case absl::StatusCode::kNotFound:
      type = exceptions->not_found;
      break;
    case absl::StatusCode::kResourceExhausted:
      type = exceptions->resource_exhausted;
      break;
    case absl::StatusCode::kFailedPrecondition:
      type = exceptions->failed_precondition;
      break;
    case absl::StatusCode::kDataLoss:
      type = exceptions->data_loss;
      break;
    case absl::StatusCode::kUnavailable:
    case absl::StatusCode::kDeadlineExceeded:
      type = exceptions->unavailable;
      break;
    default:
      break;
  }
  PyErr_SetString(type.ptr(), status.ToString().c_str());
  throw py::error_already_set();
}

void Check(const absl::Status& status) {
  if (!status.ok()) Raise(status);
}

template <typename T>
T Value(absl::StatusOr<T> result) {
  if (!result.ok()) Raise(result.status());
  return *std::move(result);
}

std::vector<ChunkKey> ToKeys(const std::vector<py::bytes>& keys) {
  std::vector<ChunkKey> out;
  out.reserve(keys.size());
  for (const py::bytes& key : keys) {
    out.push_back(Value(ChunkKey::FromBytes(std::string(key))));
  }
  return out;
}

py::bytes ToBytes(const ChunkKey& key) {
  return py::bytes(std::string(key.AsBytes()));
}

absl::Duration Seconds(double s) { return absl::Seconds(s); }

// str(value), as Python prints it.
std::string Str(py::handle value) { return std::string(py::str(value)); }

codec::DType ParseDType(const std::string& name) {
  if (name == "float16") return codec::DType::kFloat16;
  if (name == "bfloat16") return codec::DType::kBFloat16;
  Raise(absl::InvalidArgumentError(absl::StrCat(
      "dtype must be \"float16\" or \"bfloat16\", not \"", name, "\"")));
}

// An int, or anything with __index__ (numpy integers, torch's data_ptr()),
// in [min, max].
int64_t ToInt(py::handle value, absl::string_view what, int64_t min,
              int64_t max) {
  PyObject* index = PyNumber_Index(value.ptr());
  if (index == nullptr) {
    PyErr_Clear();
    Raise(absl::InvalidArgumentError(
        absl::StrCat(what, " must be an int, not ", Str(value.get_type()))));
  }
  const py::object owned = py::reinterpret_steal<py::object>(index);
  int overflow = 0;
  const long long v = PyLong_AsLongLongAndOverflow(index, &overflow);
  if (overflow != 0 || v < min || v > max) {
    Raise(absl::InvalidArgumentError(absl::StrCat(
        what, " is ", Str(owned), ", not in [", min, ", ", max, "]")));
  }
  return v;
}

// A device address as PyTorch's data_ptr() gives it; 0 is refused.
uintptr_t ToPointer(py::handle value, absl::string_view what) {
  PyObject* index = PyNumber_Index(value.ptr());
  if (index == nullptr) {
    PyErr_Clear();
    Raise(absl::InvalidArgumentError(absl::StrCat(
        what, " must be a device address as an int (data_ptr())")));
  }
  const py::object owned = py::reinterpret_steal<py::object>(index);
  const unsigned long long v = PyLong_AsUnsignedLongLong(index);
  if (PyErr_Occurred() != nullptr) {
    PyErr_Clear();
    Raise(absl::InvalidArgumentError(
        absl::StrCat(what, " is not a valid address")));
  }
  if (v == 0) {
    Raise(absl::InvalidArgumentError(absl::StrCat(what, " is a null pointer")));
  }
  return static_cast<uintptr_t>(v);
}

std::string Hex(uintptr_t address) {
  return absl::StrCat("0x", absl::Hex(address));
}

Transport ParseTransport(const std::string& name) {
  if (name == "auto") return Transport::kAuto;
  if (name == "shared_memory") return Transport::kSharedMemory;
  if (name == "grpc") return Transport::kGrpc;
  if (name == "nccl") return Transport::kNccl;
  Raise(absl::InvalidArgumentError(
      absl::StrCat("transport must be \"auto\", \"shared_memory\", "
                   "\"grpc\" or \"nccl\", not \"",
                   name, "\"")));
}

FetcherOptions MakeFetcherOptions(const std::string& transport, double lease_s,
                                  bool for_gpu) {
  if (!(lease_s > 0)) {
    Raise(absl::InvalidArgumentError(
        absl::StrCat("lease_s must be positive, not ", lease_s)));
  }
  FetcherOptions options;
  options.transport = ParseTransport(transport);
  options.lease = Seconds(lease_s);
  options.register_for_gpu = for_gpu;
  return options;
}

py::dict ReportDict(const FetchReport& report) {
  py::dict out;
  out["gpu_tier_chunks"] = report.gpu_tier_chunks;
  out["shared_memory_chunks"] = report.shared_memory_chunks;
  out["grpc_chunks"] = report.grpc_chunks;
  out["nccl_chunks"] = report.nccl_chunks;
  out["bytes"] = report.bytes;
  return out;
}

// Things costly to set up (fetchers, GPU staging), kept idle between calls
// by key, at most `max_idle` a key: a call borrows an idle one or makes its
// own, so threads sharing a Client work at once rather than queue behind
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

// One caller array of fetch(), checked to take a chunk of its shape.
struct OutArray {
  absl::Span<uint16_t> values;
  std::array<int64_t, 4> dims;  // [layers, 2, tokens, channels]
  bool float16 = false;         // else uint16, which takes either dtype
};

std::string DimsName(const std::array<int64_t, 4>& dims) {
  return absl::StrCat("[", absl::StrJoin(dims, ", "), "]");
}

// Checks fetch()'s `out` before anything is fetched: one writeable,
// C-contiguous 16-bit array per chunk, all of one model (same layers,
// channels and dtype; tokens may differ, as a prompt's last chunk does).
// `keep` holds the arrays for the duration of the fetch.
std::vector<OutArray> CheckOutArrays(const py::sequence& out, size_t chunks,
                                     std::vector<py::array>& keep) {
  if (static_cast<size_t>(py::len(out)) != chunks) {
    Raise(absl::InvalidArgumentError(
        absl::StrCat(chunks, " keys but ", py::len(out),
                     " arrays in out; give one per key")));
  }
  std::vector<OutArray> arrays;
  for (size_t i = 0; i < chunks; ++i) {
    py::object item = out[i];
    if (!py::isinstance<py::array>(item)) {
      Raise(absl::InvalidArgumentError(absl::StrCat(
          "out[", i, "] is a ", Str(item.get_type()), ", not a numpy array")));
    }
    py::array array = py::reinterpret_borrow<py::array>(item);
    const py::dtype dtype = array.dtype();
    const bool is_16_bit = dtype.itemsize() == 2 &&
                           (dtype.kind() == 'f' || dtype.kind() == 'u') &&
                           py::cast<bool>(dtype.attr("isnative"));
    if (!is_16_bit || array.ndim() != 4 || array.shape(1) != 2) {
      Raise(absl::InvalidArgumentError(
          absl::StrCat("out[", i, "] is a ", Str(dtype), " array shaped ",
                       Str(array.attr("shape")),
                       "; fetch decodes into float16 or uint16 arrays shaped "
                       "[layers, 2, tokens, kv_heads * head_dim]")));
    }
    if (!(array.flags() & py::array::c_style) || !array.writeable()) {
      Raise(absl::InvalidArgumentError(absl::StrCat(
          "out[", i, "] must be C-contiguous and writeable (np.empty(...) or ",
          "np.ascontiguousarray)")));
    }
    OutArray a;
    a.values = absl::MakeSpan(static_cast<uint16_t*>(array.mutable_data()),
                              static_cast<size_t>(array.size()));
    a.dims = {array.shape(0), array.shape(1), array.shape(2), array.shape(3)};
    a.float16 = dtype.kind() == 'f';
    if (i > 0 &&
        (a.dims[0] != arrays[0].dims[0] || a.dims[3] != arrays[0].dims[3] ||
         a.float16 != arrays[0].float16)) {
      Raise(absl::InvalidArgumentError(absl::StrCat(
          "out[", i, "] is ", DimsName(a.dims), " ", Str(dtype),
          " but out[0] is ", DimsName(arrays[0].dims), " ",
          arrays[0].float16 ? "float16" : "uint16",
          "; chunks of one prompt share layers, channels and dtype")));
    }
    arrays.push_back(a);
    keep.push_back(std::move(array));
  }
  return arrays;
}

std::vector<absl::Span<uint16_t>> Spans(const std::vector<OutArray>& arrays) {
  std::vector<absl::Span<uint16_t>> spans;
  for (const OutArray& a : arrays) spans.push_back(a.values);
  return spans;
}

// Decodes into fetch()'s arrays after checking each chunk's recorded shape
// against its array: the codec sees only a span of values, so an array of
// the right size but another shape would take them in the wrong places.
class CheckedHostSink : public ChunkSink {
 public:
  explicit CheckedHostSink(std::vector<OutArray> arrays)
      : arrays_(std::move(arrays)), host_(Spans(arrays_)) {}

  absl::Status Consume(size_t index, absl::string_view bytes,
                       bool stable) override {
    if (index < arrays_.size()) {
      absl::StatusOr<codec::ChunkShape> shape = codec::PeekShape(bytes);
      if (!shape.ok()) {
        return absl::Status(
            shape.status().code(),
            absl::StrCat("chunk ", index, ": ", shape.status().message()));
      }
      const OutArray& a = arrays_[index];
      const std::array<int64_t, 4> dims = {
          shape->layers, 2, shape->tokens,
          int64_t{shape->kv_heads} * shape->head_dim};
      const bool bf16 = shape->dtype == codec::DType::kBFloat16;
      if (dims != a.dims || (bf16 && a.float16)) {
        return absl::InvalidArgumentError(absl::StrCat(
            "chunk ", index, " is ", DimsName(dims), " ",
            codec::DTypeName(shape->dtype), " but out[", index, "] is ",
            DimsName(a.dims), " ", a.float16 ? "float16" : "uint16",
            bf16 ? " (bfloat16 chunks decode into uint16 arrays)" : ""));
      }
    }
    return host_.Consume(index, bytes, stable);
  }
  absl::Status Finish() override { return host_.Finish(); }

 private:
  const std::vector<OutArray> arrays_;
  HostDecodeSink host_;
};

// Where fetch_to_device() puts the chunks: the layout and each chunk's
// place in it, with the host lists (per-layer bases, block tables) that
// must go to the GPU first, and every device address given, to check.
struct DeviceTarget {
  codec::gpu::KvLayout layout;
  std::vector<uint16_t*> layer_bases;  // empty: layout.layer_bases is set
  std::vector<codec::gpu::KvChunkRef> refs;
  std::vector<std::vector<int32_t>> block_ids;  // per chunk; empty: on GPU
  std::vector<std::pair<uintptr_t, std::string>> addresses;
};

constexpr std::array<const char*, 13> kLayoutFields = {
    "kind",         "layers",       "kv_heads",     "head_dim",     "dtype",
    "layer_bases",  "base",         "layer_stride", "block_stride", "kv_stride",
    "token_stride", "block_tokens", "num_blocks"};
constexpr std::array<const char*, 4> kBlockFields = {"tokens", "values",
                                                     "block_ids", "first_slot"};

// `fields` as a dict of strings, refusing names not in `known`.
template <size_t N>
py::dict CheckFields(const py::dict& fields,
                     const std::array<const char*, N>& known,
                     absl::string_view what) {
  for (const auto item : fields) {
    bool found = false;
    if (py::isinstance<py::str>(item.first)) {
      const std::string name = py::cast<std::string>(item.first);
      for (const char* k : known) found = found || name == k;
    }
    if (!found) {
      Raise(absl::InvalidArgumentError(absl::StrCat(
          what, " has no field ", std::string(py::repr(item.first)),
          "; its fields: ", absl::StrJoin(known, ", "))));
    }
  }
  return fields;
}

// The layout from a dict and keyword arguments, as codec::gpu::KvLayout.
DeviceTarget ParseLayout(const py::object& layout, const py::kwargs& kwargs) {
  py::dict fields;
  if (!layout.is_none()) {
    if (!py::isinstance<py::dict>(layout)) {
      Raise(absl::InvalidArgumentError(
          "layout must be a dict of layout fields, or pass them as keyword "
          "arguments"));
    }
    for (const auto item : py::reinterpret_borrow<py::dict>(layout)) {
      fields[item.first] = item.second;
    }
  }
  for (const auto item : kwargs) {
    if (fields.contains(item.first)) {
      Raise(absl::InvalidArgumentError(
          absl::StrCat("layout field ", Str(item.first),
                       " given both in layout and as a keyword argument")));
    }
    fields[item.first] = item.second;
  }
  CheckFields(fields, kLayoutFields, "a layout");
  auto has = [&](const char* name) { return fields.contains(name); };
  auto get = [&](const char* name) -> py::object { return fields[name]; };
  auto required = [&](const char* name, int64_t max) -> uint32_t {
    if (!has(name)) {
      Raise(
          absl::InvalidArgumentError(absl::StrCat("the layout needs ", name)));
    }
    return static_cast<uint32_t>(ToInt(get(name), name, 1, max));
  };

  DeviceTarget target;
  codec::gpu::KvLayout& l = target.layout;
  const std::string kind = has("kind") ? Str(get("kind")) : "contiguous";
  l.layers = required("layers", codec::kMaxLayers);
  l.kv_heads = required("kv_heads", codec::kMaxChannels);
  l.head_dim = required("head_dim", codec::kMaxChannels);
  if (uint64_t{l.kv_heads} * l.head_dim > codec::kMaxChannels) {
    Raise(absl::InvalidArgumentError(
        absl::StrCat("kv_heads * head_dim is over ", codec::kMaxChannels)));
  }
  l.dtype =
      has("dtype") ? ParseDType(Str(get("dtype"))) : codec::DType::kFloat16;
  if (kind == "contiguous") {
    for (const char* name :
         {"layer_bases", "base", "layer_stride", "block_stride", "kv_stride",
          "token_stride", "block_tokens", "num_blocks"}) {
      if (has(name)) {
        Raise(absl::InvalidArgumentError(absl::StrCat(
            "layout field ", name, " is for kind=\"paged\" only")));
      }
    }
    return target;
  }
  if (kind != "paged") {
    Raise(absl::InvalidArgumentError(
        absl::StrCat("layout kind must be \"contiguous\" or \"paged\", not \"",
                     kind, "\"")));
  }
  l.kind = codec::gpu::KvLayout::Kind::kPaged;
  l.block_tokens = required("block_tokens", codec::kMaxTokens);
  // Block ids are int32 on the GPU.
  l.num_blocks = required("num_blocks", std::numeric_limits<int32_t>::max());
  // Defaults: vLLM's and FlashInfer's [num_blocks, 2, block_tokens, kv_heads,
  // head_dim] per layer, layers one after another for `base`.
  l.token_stride = l.Channels();
  l.kv_stride = int64_t{l.block_tokens} * l.token_stride;
  l.block_stride = 2 * l.kv_stride;
  l.layer_stride = int64_t{l.num_blocks} * l.block_stride;
  constexpr int64_t kMin = std::numeric_limits<int64_t>::min();
  constexpr int64_t kMax = std::numeric_limits<int64_t>::max();
  for (auto [name, stride] : {std::pair{"token_stride", &l.token_stride},
                              std::pair{"kv_stride", &l.kv_stride},
                              std::pair{"block_stride", &l.block_stride},
                              std::pair{"layer_stride", &l.layer_stride}}) {
    if (has(name)) *stride = ToInt(get(name), name, kMin, kMax);
  }
  if (has("layer_bases") == has("base")) {
    Raise(absl::InvalidArgumentError(
        "a paged layout needs either layer_bases (a cache per layer) or base "
        "(one allocation for all layers)"));
  }
  if (has("base")) {
    const uintptr_t base = ToPointer(get("base"), "layout base");
    l.base = reinterpret_cast<uint16_t*>(base);
    target.addresses.emplace_back(base, "layout base");
  } else if (PyIndex_Check(get("layer_bases").ptr())) {
    const uintptr_t bases = ToPointer(get("layer_bases"), "layer_bases");
    l.layer_bases = reinterpret_cast<uint16_t* const*>(bases);
    target.addresses.emplace_back(bases, "layer_bases");
  } else {
    const py::object bases = get("layer_bases");
    if (!py::isinstance<py::sequence>(bases) ||
        static_cast<size_t>(py::len(bases)) != l.layers) {
      Raise(absl::InvalidArgumentError(absl::StrCat(
          "layer_bases must be a list of the ", l.layers,
          " layers' data_ptr(), or the data_ptr() of a CUDA int64 tensor "
          "holding them")));
    }
    const py::sequence list = py::reinterpret_borrow<py::sequence>(bases);
    for (size_t i = 0; i < l.layers; ++i) {
      const std::string what = absl::StrCat("layer_bases[", i, "]");
      const uintptr_t base = ToPointer(list[i], what);
      target.layer_bases.push_back(reinterpret_cast<uint16_t*>(base));
      target.addresses.emplace_back(base, what);
    }
  }
  return target;
}

// Each chunk's place (codec::gpu::KvChunkRef) from `blocks`, one dict per
// chunk.
void ParseBlocks(const py::object& blocks, size_t chunks,
                 DeviceTarget& target) {
  const codec::gpu::KvLayout& l = target.layout;
  const bool paged = l.kind == codec::gpu::KvLayout::Kind::kPaged;
  if (blocks.is_none() || !py::isinstance<py::sequence>(blocks) ||
      static_cast<size_t>(py::len(blocks)) != chunks) {
    Raise(absl::InvalidArgumentError(absl::StrCat(
        "blocks must be a list of ", chunks, " dicts, one per key: ",
        paged ? "{'tokens', 'block_ids', 'first_slot'}"
              : "{'tokens', 'values'}")));
  }
  const py::sequence list = py::reinterpret_borrow<py::sequence>(blocks);
  target.refs.resize(chunks);
  target.block_ids.resize(chunks);
  for (size_t i = 0; i < chunks; ++i) {
    const std::string at = absl::StrCat("blocks[", i, "]");
    const py::object item = list[i];
    if (!py::isinstance<py::dict>(item)) {
      Raise(absl::InvalidArgumentError(absl::StrCat(at, " must be a dict")));
    }
    const py::dict fields =
        CheckFields(py::reinterpret_borrow<py::dict>(item), kBlockFields, at);
    codec::gpu::KvChunkRef& ref = target.refs[i];
    if (!fields.contains("tokens")) {
      Raise(absl::InvalidArgumentError(absl::StrCat(at, " needs tokens")));
    }
    ref.tokens = static_cast<uint32_t>(
        ToInt(fields["tokens"], at + "['tokens']", 1, codec::kMaxTokens));
    const char* wanted = paged ? "block_ids" : "values";
    for (const char* name : {"values", "block_ids", "first_slot"}) {
      const bool belongs =
          paged ? name != std::string("values") : name == std::string("values");
      if (fields.contains(name) && !belongs) {
        Raise(absl::InvalidArgumentError(absl::StrCat(
            at, "['", name, "'] is for a ", paged ? "contiguous" : "paged",
            " layout; this one is ", paged ? "paged" : "contiguous")));
      }
    }
    if (!fields.contains(wanted)) {
      Raise(absl::InvalidArgumentError(
          absl::StrCat(at, " needs ", wanted, " (where the chunk goes)")));
    }
    const std::string what = absl::StrCat(at, "['", wanted, "']");
    if (!paged) {
      const uintptr_t values = ToPointer(fields["values"], what);
      ref.values = reinterpret_cast<uint16_t*>(values);
      target.addresses.emplace_back(values, what);
      continue;
    }
    if (fields.contains("first_slot")) {
      ref.first_slot = static_cast<uint32_t>(
          ToInt(fields["first_slot"], at + "['first_slot']", 0,
                std::numeric_limits<int32_t>::max()));
    }
    const py::object ids = fields["block_ids"];
    if (PyIndex_Check(ids.ptr())) {
      const uintptr_t device = ToPointer(ids, what);
      ref.block_ids = reinterpret_cast<const int32_t*>(device);
      target.addresses.emplace_back(device, what);
      continue;
    }
    // A host list: the blocks holding slots [first_slot, first_slot +
    // tokens), checked here since the GPU would read past a short one.
    const uint64_t needed =
        (uint64_t{ref.first_slot} + ref.tokens + l.block_tokens - 1) /
        l.block_tokens;
    if (!py::isinstance<py::sequence>(ids) ||
        static_cast<uint64_t>(py::len(ids)) < needed) {
      Raise(absl::InvalidArgumentError(absl::StrCat(
          what, " must be a list of at least ", needed,
          " block ids (first_slot + tokens over block_tokens), or the "
          "data_ptr() of a CUDA int32 tensor")));
    }
    const py::sequence id_list = py::reinterpret_borrow<py::sequence>(ids);
    std::vector<int32_t>& host = target.block_ids[i];
    for (size_t j = 0; j < needed; ++j) {
      host.push_back(static_cast<int32_t>(ToInt(id_list[j],
                                                absl::StrCat(what, "[", j, "]"),
                                                0, int64_t{l.num_blocks} - 1)));
    }
  }
}

// Host lists a layout or chunk refers to (per-layer bases, block tables),
// gathered for one fetch and copied to the GPU in one piece. The device
// copy stays for the next fetch: freeing it would wait for the whole GPU.
class DeviceUploads {
 public:
  DeviceUploads() = default;
  DeviceUploads(const DeviceUploads&) = delete;
  DeviceUploads& operator=(const DeviceUploads&) = delete;
  ~DeviceUploads() { cudaFree(device_); }

  // Forgets the lists of the last fetch, which must be done reading them.
  void Clear() { host_.clear(); }

  // Queues `bytes` at `data`; returns their offset in the device copy.
  size_t Add(const void* data, size_t bytes) {
    const size_t offset = (host_.size() + 7) / 8 * 8;
    host_.resize(offset + bytes);
    std::memcpy(host_.data() + offset, data, bytes);
    return offset;
  }

  // Copies what was queued in `stream`'s order, so the decode that follows
  // on that stream sees it.
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

// The one device holding every address given: the fetch runs there. A CPU
// tensor's data_ptr(), or addresses on two GPUs, are INVALID_ARGUMENT.
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
                       " is on GPU ", device, "; fetch to one GPU at a time"));
    }
    device = attributes.device;
    if (first.empty()) first = what;
  }
  return device;
}

// Makes a GPU the calling thread's current one for a call (a thread that
// never called torch.cuda.set_device has 0), and the previous one current
// again after it.
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

// fetch_to_device's work, with the GIL released: on the destination's GPU,
// uploads host block tables, then fetches through a GpuDecodeSink.
absl::StatusOr<DeviceReport> FetchToDeviceUnlocked(
    FetcherPool& pool, DeviceFetchPool& devices, const FetcherOptions& options,
    absl::Span<const ChunkKey> keys, const DeviceTarget& target,
    codec::gpu::Stream stream) {
  absl::StatusOr<int> device = DestinationDevice(target.addresses);
  if (!device.ok()) return device.status();
  // The sink allocates and launches on the current device.
  CurrentDevice current;
  if (absl::Status s = current.Enter(*device, stream); !s.ok()) return s;

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
        transfer::GpuDecodeSink::Create(layout, std::move(refs), stream);
    if (!sink.ok()) return sink.status();
    fetch->sink = *std::move(sink);
  } else if (absl::Status s =
                 fetch->sink->Reset(layout, std::move(refs), stream);
             !s.ok()) {
    return s;
  }
  absl::StatusOr<FetchReport> report = pool.Fetch(options, keys, *fetch->sink);
  const float first_batch_ms = fetch->sink->first_batch_ms();
  if (Reusable(report.status())) devices.Return(*device, std::move(fetch));
  if (!report.ok()) return report.status();
  return DeviceReport{*report, first_batch_ms};
}

// Client.storer(): stores chunks straight from a worker's GPU blocks in one
// layout through a transfer::GpuStorer, which encodes them on the worker's
// stream and puts them in the background. Thread-safe.
class Storer {
 public:
  Storer(std::shared_ptr<KvCacheClient> client, DeviceTarget target,
         transfer::GpuStorerOptions options)
      : layout_(target.layout) {
    // The layout's GPU, or the calling thread's where the layout names no
    // address (contiguous chunks name theirs at store()).
    device_ = Value(DestinationDevice(target.addresses));
    if (device_ < 0 && cudaGetDevice(&device_) != cudaSuccess) {
      Raise(absl::FailedPreconditionError("this thread has no current GPU"));
    }
    absl::StatusOr<std::unique_ptr<transfer::GpuStorer>> storer;
    {
      py::gil_scoped_release release;
      CurrentDevice current;
      absl::Status s = current.Enter(device_, nullptr);
      if (s.ok() && !target.layer_bases.empty()) {
        // Lives as long as the storer, which reads it at every encode.
        bases_.Add(target.layer_bases.data(),
                   target.layer_bases.size() * sizeof(uint16_t*));
        s = bases_.Upload(nullptr);
        if (s.ok() && cudaStreamSynchronize(nullptr) != cudaSuccess) {
          s = absl::InternalError("copying layer bases to the GPU failed");
        }
        layout_.layer_bases = bases_.At<uint16_t* const>(0);
      }
      storer = s.ok() ? transfer::GpuStorer::Create(std::move(client), layout_,
                                                    options)
                      : s;
    }
    storer_ = Value(std::move(storer));
  }

  const codec::gpu::KvLayout& layout() const { return layout_; }

  uint64_t Store(std::vector<ChunkKey> keys, DeviceTarget target,
                 codec::gpu::Stream stream, std::optional<ChunkKey> parent,
                 double pin_ttl_s) {
    if (!(pin_ttl_s >= 0)) {
      Raise(absl::InvalidArgumentError(
          absl::StrCat("pin_ttl_s must be 0 or more, not ", pin_ttl_s)));
    }
    absl::StatusOr<transfer::GpuStorer::Ticket> ticket;
    {
      py::gil_scoped_release release;
      ticket = StoreUnlocked(std::move(keys), target, stream, parent,
                             PutOptions{Seconds(pin_ttl_s)});
    }
    return Value(std::move(ticket));
  }

  py::dict Wait(uint64_t ticket) {
    absl::StatusOr<transfer::StoreReport> report;
    {
      py::gil_scoped_release release;
      report = storer_->Wait(ticket);
    }
    const transfer::StoreReport r = Value(std::move(report));
    py::dict out;
    out["chunks"] = r.chunks;
    out["raw_bytes"] = r.raw_bytes;
    out["stored_bytes"] = r.stored_bytes;
    return out;
  }

  uint64_t device_bytes() const { return storer_->device_bytes(); }

 private:
  absl::StatusOr<transfer::GpuStorer::Ticket> StoreUnlocked(
      std::vector<ChunkKey> keys, const DeviceTarget& target,
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

  codec::gpu::KvLayout layout_;
  int device_ = 0;
  DeviceUploads bases_;
  std::unique_ptr<transfer::GpuStorer> storer_;
};

// Client's keyword arguments, as ClientOptions.
ClientOptions OptionsOf(const std::string& address, double timeout_s,
                        double connect_timeout_s,
                        const std::optional<std::string>& ca_file,
                        const std::optional<std::string>& cert_file,
                        const std::optional<std::string>& key_file,
                        const std::optional<std::string>& server_name,
                        const std::optional<std::string>& token,
                        const std::optional<std::string>& token_file,
                        const std::optional<std::string>& key_namespace) {
  ClientOptions options;
  options.address = address;
  options.timeout = Seconds(timeout_s);
  options.connect_timeout = Seconds(connect_timeout_s);
  options.ca_file = ca_file.value_or("");
  options.cert_file = cert_file.value_or("");
  options.key_file = key_file.value_or("");
  options.server_name = server_name.value_or("");
  options.token = token.value_or("");
  options.token_file = token_file.value_or("");
  options.key_namespace = key_namespace.value_or("");
  return options;
}

// A connection as `options` say; waits, without the GIL, for the node to
// answer.
std::shared_ptr<KvCacheClient> Connect(const ClientOptions& options) {
  absl::StatusOr<std::unique_ptr<KvCacheClient>> client;
  {
    py::gil_scoped_release release;
    client = KvCacheClient::Connect(options);
  }
  return Value(std::move(client));
}

// Owns a connection; thin layer over KvCacheClient and, for fetches,
// PrefixFetcher (which shares the connection).
class Client {
 public:
  explicit Client(const ClientOptions& options)
      : client_(Connect(options)), fetchers_(client_) {}

  py::dict Lookup(const std::vector<py::bytes>& keys) {
    const std::vector<ChunkKey> parsed = ToKeys(keys);
    absl::StatusOr<LookupResult> result;
    {
      py::gil_scoped_release release;
      result = client_->Lookup(parsed);
    }
    LookupResult r = Value(std::move(result));
    py::list chunks;
    for (const v1::ChunkInfo& info : r.chunks) {
      py::dict chunk;
      chunk["size_bytes"] = info.size_bytes();
      chunk["tier"] = v1::Tier_Name(info.tier());
      chunk["pinned"] = info.pinned();
      chunks.append(chunk);
    }
    py::dict out;
    out["prefix_chunks"] = r.prefix_chunks;
    out["chunks"] = chunks;
    return out;
  }

  void Put(const std::vector<py::bytes>& keys,
           const std::vector<py::bytes>& chunks, double pin_ttl_s, bool chained,
           bool replace) {
    if (keys.size() != chunks.size()) {
      Raise(absl::InvalidArgumentError(
          absl::StrCat(keys.size(), " keys but ", chunks.size(), " chunks")));
    }
    const std::vector<ChunkKey> parsed = ToKeys(keys);
    std::vector<ChunkToPut> puts;
    for (size_t i = 0; i < parsed.size(); ++i) {
      char* data = nullptr;
      Py_ssize_t size = 0;
      PyBytes_AsStringAndSize(chunks[i].ptr(), &data, &size);
      puts.push_back({parsed[i], absl::string_view(data, size)});
      if (chained && i > 0) puts.back().parent = parsed[i - 1];
    }
    absl::Status status;
    {
      // The bytes objects stay alive (held by `chunks`) while unlocked.
      py::gil_scoped_release release;
      status = client_->Put(puts, PutOptions{Seconds(pin_ttl_s), replace});
    }
    Check(status);
  }

  std::vector<py::bytes> Get(const std::vector<py::bytes>& keys) {
    const std::vector<ChunkKey> parsed = ToKeys(keys);
    absl::StatusOr<std::vector<FetchedChunk>> result;
    {
      py::gil_scoped_release release;
      result = client_->Get(parsed);
    }
    std::vector<py::bytes> out;
    for (const FetchedChunk& chunk : Value(std::move(result))) {
      out.emplace_back(chunk.bytes);
    }
    return out;
  }

  uint32_t Delete(const std::vector<py::bytes>& keys) {
    const std::vector<ChunkKey> parsed = ToKeys(keys);
    absl::StatusOr<uint32_t> result;
    {
      py::gil_scoped_release release;
      result = client_->Delete(parsed);
    }
    return Value(std::move(result));
  }

  double Pin(const std::vector<py::bytes>& keys, double ttl_s) {
    const std::vector<ChunkKey> parsed = ToKeys(keys);
    absl::StatusOr<absl::Time> result;
    {
      py::gil_scoped_release release;
      result = client_->Pin(parsed, Seconds(ttl_s));
    }
    return absl::ToDoubleSeconds(Value(std::move(result)) - absl::UnixEpoch());
  }

  void Unpin(const std::vector<py::bytes>& keys) {
    const std::vector<ChunkKey> parsed = ToKeys(keys);
    absl::Status status;
    {
      py::gil_scoped_release release;
      status = client_->Unpin(parsed);
    }
    Check(status);
  }

  py::dict Stats() {
    absl::StatusOr<v1::StatsResponse> result;
    {
      py::gil_scoped_release release;
      result = client_->Stats();
    }
    const v1::StatsResponse stats = Value(std::move(result));
    py::dict out;
    out["chunks"] = stats.chunks();
    out["hits"] = stats.hits();
    out["misses"] = stats.misses();
    out["evictions"] = stats.evictions();
    out["bytes_in"] = stats.bytes_in();
    out["bytes_out"] = stats.bytes_out();
    return out;
  }

  py::dict Fetch(const std::vector<py::bytes>& keys, const py::sequence& out,
                 const std::string& transport, double lease_s) {
    const std::vector<ChunkKey> parsed = ToKeys(keys);
    const FetcherOptions options =
        MakeFetcherOptions(transport, lease_s, /*for_gpu=*/false);
    std::vector<py::array> keep;  // alive while the GIL is released
    std::vector<OutArray> arrays = CheckOutArrays(out, parsed.size(), keep);
    if (parsed.empty()) return ReportDict({});
    CheckedHostSink sink(std::move(arrays));
    absl::StatusOr<FetchReport> report;
    {
      py::gil_scoped_release release;
      report = fetchers_.Fetch(options, parsed, sink);
    }
    return ReportDict(Value(std::move(report)));
  }

  py::dict FetchToDevice(const std::vector<py::bytes>& keys,
                         const py::object& layout, const py::object& blocks,
                         uintptr_t stream, const std::string& transport,
                         double lease_s, const py::kwargs& layout_fields) {
    const std::vector<ChunkKey> parsed = ToKeys(keys);
    const FetcherOptions options =
        MakeFetcherOptions(transport, lease_s, /*for_gpu=*/true);
    // Arguments first, so their errors read the same with or without a GPU.
    DeviceTarget target = ParseLayout(layout, layout_fields);
    ParseBlocks(blocks, parsed.size(), target);
    Check(CheckGpu("fetch_to_device", "decode on the CPU with fetch()"));
    py::dict out = ReportDict({});
    out["first_batch_ms"] = 0.0;
    if (parsed.empty()) return out;
    absl::StatusOr<DeviceReport> report;
    {
      py::gil_scoped_release release;
      report =
          FetchToDeviceUnlocked(fetchers_, devices_, options, parsed, target,
                                reinterpret_cast<codec::gpu::Stream>(stream));
    }
    const DeviceReport r = Value(std::move(report));
    out = ReportDict(r.report);
    out["first_batch_ms"] = r.first_batch_ms;
    return out;
  }

  std::unique_ptr<Storer> MakeStorer(const py::object& layout,
                                     const std::string& level,
                                     uint32_t chunk_tokens,
                                     uint32_t batch_chunks, uint32_t slots,
                                     const py::kwargs& layout_fields) {
    DeviceTarget target = ParseLayout(layout, layout_fields);
    transfer::GpuStorerOptions options;
    options.level = Value(codec::ParseLevel(level));
    if (chunk_tokens == 0 || chunk_tokens > codec::kMaxTokens ||
        batch_chunks == 0 || slots == 0) {
      Raise(absl::InvalidArgumentError(
          absl::StrCat("chunk_tokens must be 1 to ", codec::kMaxTokens,
                       ", batch_chunks and slots 1 or more")));
    }
    options.chunk_tokens = chunk_tokens;
    options.batch_chunks = batch_chunks;
    options.slots = slots;
    Check(CheckGpu("storer", "encode on the CPU with encode() and put()"));
    return std::make_unique<Storer>(client_, std::move(target), options);
  }

 private:
  const std::shared_ptr<KvCacheClient> client_;
  FetcherPool fetchers_;
  DeviceFetchPool devices_{2};
};

std::vector<py::bytes> ChunkKeys(const std::vector<int32_t>& tokens,
                                 const std::string& model_id,
                                 uint32_t chunk_tokens,
                                 const std::string& name_space,
                                 const std::string& dtype, uint32_t layers,
                                 uint32_t kv_heads, uint32_t head_dim,
                                 uint32_t tp_rank, uint32_t tp_size) {
  KeySpace space;
  space.name_space = name_space;
  space.model_id = model_id;
  space.dtype = dtype;
  space.layers = layers;
  space.kv_heads = kv_heads;
  space.head_dim = head_dim;
  space.tp_rank = tp_rank;
  space.tp_size = tp_size;
  space.chunk_tokens = chunk_tokens;
  std::vector<py::bytes> out;
  for (const ChunkKey& key : Value(ChunkKeysForTokens(space, tokens))) {
    out.push_back(ToBytes(key));
  }
  return out;
}

// A chunk is a C-contiguous array of 16-bit patterns shaped
// [layers, 2, tokens, kv_heads * head_dim]: numpy float16, or uint16 for
// bf16 (numpy has no bfloat16).
py::bytes Encode(py::array values, uint32_t kv_heads, uint32_t head_dim,
                 const std::string& level, const std::string& dtype) {
  if (values.itemsize() != 2 || values.ndim() != 4 || values.shape(1) != 2 ||
      !(values.flags() & py::array::c_style)) {
    Raise(absl::InvalidArgumentError(
        "values must be a C-contiguous 16-bit array shaped [layers, 2, "
        "tokens, kv_heads * head_dim]"));
  }
  if (head_dim == 0 ||
      static_cast<uint64_t>(values.shape(3)) != uint64_t{kv_heads} * head_dim) {
    Raise(absl::InvalidArgumentError(
        absl::StrCat("last dimension is ", values.shape(3), ", not kv_heads ",
                     kv_heads, " x head_dim ", head_dim)));
  }
  codec::ChunkShape shape;
  shape.layers = static_cast<uint32_t>(values.shape(0));
  shape.tokens = static_cast<uint32_t>(values.shape(2));
  shape.kv_heads = kv_heads;
  shape.head_dim = head_dim;
  shape.dtype = ParseDType(dtype);
  const codec::Level parsed_level = Value(codec::ParseLevel(level));
  const auto* data = static_cast<const uint16_t*>(values.data());
  absl::StatusOr<std::string> stream;
  {
    py::gil_scoped_release release;
    stream = codec::EncodeChunk(shape, absl::MakeConstSpan(data, values.size()),
                                parsed_level);
  }
  return py::bytes(Value(std::move(stream)));
}

py::array Decode(const py::bytes& stream) {
  const std::string bytes = stream;
  const codec::ChunkShape shape = Value(codec::PeekShape(bytes));
  const std::vector<py::ssize_t> dims = {
      shape.layers, 2, shape.tokens,
      static_cast<py::ssize_t>(shape.kv_heads) * shape.head_dim};
  py::array out = shape.dtype == codec::DType::kFloat16
                      ? py::array(py::dtype("float16"), dims)
                      : py::array(py::dtype("uint16"), dims);
  auto* data = static_cast<uint16_t*>(out.mutable_data());
  absl::Status status;
  {
    py::gil_scoped_release release;
    status = codec::DecodeChunk(bytes, absl::MakeSpan(data, out.size()));
  }
  Check(status);
  return out;
}

py::dict PeekShape(const py::bytes& stream) {
  const codec::ChunkShape shape = Value(codec::PeekShape(std::string(stream)));
  py::dict out;
  out["layers"] = shape.layers;
  out["tokens"] = shape.tokens;
  out["kv_heads"] = shape.kv_heads;
  out["head_dim"] = shape.head_dim;
  out["dtype"] = std::string(codec::DTypeName(shape.dtype));
  return out;
}

}  // namespace

void DefineModule(py::module_& m) {
  m.doc() =
      "kvcache: store and fetch LLM KV-cache chunks by prompt prefix.\n\n"
      "chunk_keys() names a prompt's chunks; Client talks to a kvcached "
      "daemon\n(put, lookup, and fetch or fetch_to_device to restore a "
      "prefix);\nencode()/decode() compress chunks with kvcache's codec.";

  static Exceptions types;
  types.error = py::reinterpret_borrow<py::object>(PyErr_NewExceptionWithDoc(
      "kvcache.Error", "Base class of kvcache errors.", PyExc_RuntimeError,
      nullptr));
  auto subclass = [&](const char* name, const char* doc, PyObject* also) {
    py::tuple bases = also ? py::make_tuple(types.error, py::handle(also))
                           : py::make_tuple(types.error);
    return py::reinterpret_steal<py::object>(PyErr_NewExceptionWithDoc(
        (std::string("kvcache.") + name).c_str(), doc, bases.ptr(), nullptr));
  };
  types.invalid_argument = subclass(
      "InvalidArgumentError", "A malformed request: bad key, shape or option.",
      PyExc_ValueError);
  types.not_found = subclass(
      "NotFoundError", "A chunk the daemon does not hold.", PyExc_KeyError);
  types.resource_exhausted = subclass(
      "ResourceExhaustedError",
      "No room even after eviction (everything pinned, or a chunk too big).",
      nullptr);
  types.failed_precondition = subclass(
      "FailedPreconditionError",
      "The request cannot be served as asked here and now: the node is "
      "draining, transport='shared_memory' where the node lends no memory, "
      "or fetch_to_device on a host without a GPU.",
      nullptr);
  types.data_loss = subclass(
      "DataLossError",
      "Damaged bytes: a checksum mismatch or a corrupt codec stream.", nullptr);
  types.unavailable =
      subclass("UnavailableError", "The daemon cannot be reached or timed out.",
               PyExc_ConnectionError);
  exceptions = &types;
  m.attr("Error") = types.error;
  m.attr("InvalidArgumentError") = types.invalid_argument;
  m.attr("NotFoundError") = types.not_found;
  m.attr("ResourceExhaustedError") = types.resource_exhausted;
  m.attr("FailedPreconditionError") = types.failed_precondition;
  m.attr("DataLossError") = types.data_loss;
  m.attr("UnavailableError") = types.unavailable;

  m.def("chunk_keys", &ChunkKeys, py::arg("tokens"), py::arg("model_id"),
        py::arg("chunk_tokens") = 256, py::arg("name_space") = "default",
        py::arg("dtype") = "float16", py::arg("layers") = 0,
        py::arg("kv_heads") = 0, py::arg("head_dim") = 0,
        py::arg("tp_rank") = 0, py::arg("tp_size") = 1,
        "Keys (32-byte bytes) of the chunks of `tokens`, chunk_tokens each "
        "(the last may be shorter).\nChunk i's key chains its whole prefix, "
        "so prompts sharing a prefix share keys.\nEvery other argument is part "
        "of the key space: workers share chunks only if all match.");

  py::class_<Client>(m, "Client",
                     "A connection to a kvcached daemon. Thread-safe; calls "
                     "release the GIL.")
      .def(py::init([](const std::string& address, double timeout_s,
                       double connect_timeout_s,
                       const std::optional<std::string>& ca_file,
                       const std::optional<std::string>& cert_file,
                       const std::optional<std::string>& key_file,
                       const std::optional<std::string>& server_name,
                       const std::optional<std::string>& token,
                       const std::optional<std::string>& token_file,
                       const std::optional<std::string>& key_namespace) {
             return std::make_unique<Client>(OptionsOf(
                 address, timeout_s, connect_timeout_s, ca_file, cert_file,
                 key_file, server_name, token, token_file, key_namespace));
           }),
           py::arg("address") = "127.0.0.1:50051", py::arg("timeout_s") = 30.0,
           py::arg("connect_timeout_s") = 5.0, py::kw_only(),
           py::arg("ca_file") = py::none(), py::arg("cert_file") = py::none(),
           py::arg("key_file") = py::none(),
           py::arg("server_name") = py::none(), py::arg("token") = py::none(),
           py::arg("token_file") = py::none(),
           py::arg("key_namespace") = py::none(),
           "Connects and waits until the daemon answers; raises "
           "UnavailableError if it does not within connect_timeout_s\n"
           "(saying so when the TLS handshake is what failed).\n"
           "ca_file turns TLS on: the PEM CA the node's certificate chains "
           "to; cert_file and key_file\nare a client certificate for mutual "
           "TLS; server_name is the name the node's certificate\nmust carry "
           "if not the host in address. token (or token_file, read once) is "
           "sent with\nevery call as a bearer token. A credential file that "
           "cannot be used raises an error\nnaming it. key_namespace names "
           "a shared namespace the tenant was granted.")
      .def("lookup", &Client::Lookup, py::arg("keys"),
           "The longest cached prefix of `keys`: {'prefix_chunks': n, "
           "'chunks': [{'size_bytes', 'tier', 'pinned'}, ...]}.")
      .def("put", &Client::Put, py::arg("keys"), py::arg("chunks"),
           py::arg("pin_ttl_s") = 0.0, py::arg("chained") = true,
           py::arg("replace") = false,
           "Stores chunks[i] under keys[i]; pinned for pin_ttl_s seconds if "
           "positive (a chat session).\nchained: keys are consecutive chunks "
           "of one prompt (as from chunk_keys), so the node evicts\nthe "
           "prefix from its end; pass False for unrelated chunks.\nA key "
           "the node already holds keeps its first copy unless replace is "
           "True.")
      .def("get", &Client::Get, py::arg("keys"),
           "The chunks' bytes, in order; NotFoundError if any is missing, "
           "DataLossError if one was found damaged.")
      .def("delete", &Client::Delete, py::arg("keys"),
           "Removes the chunks; returns how many were held.")
      .def("pin", &Client::Pin, py::arg("keys"), py::arg("ttl_s"),
           "Keeps the chunks from eviction for ttl_s seconds; returns the "
           "expiry as Unix seconds.")
      .def("unpin", &Client::Unpin, py::arg("keys"), "Clears the chunks' pins.")
      .def("stats", &Client::Stats,
           "Node counters: chunks, hits, misses, evictions, bytes_in, "
           "bytes_out.")
      .def(
          "fetch", &Client::Fetch, py::arg("keys"), py::arg("out"),
          py::arg("transport") = "auto", py::arg("lease_s") = 30.0,
          R"doc(Restores the chunks of `keys` into numpy arrays, decoded on the CPU.

keys: a prefix the node holds (lookup()'s prefix_chunks of them).
out: one array per key, which you own: C-contiguous, writeable, shaped as
  decode() returns the chunk, [layers, 2, tokens, kv_heads * head_dim];
  float16 for float16 chunks, or uint16 (the bits of either dtype; numpy
  has no bfloat16). A prompt's last chunk may have fewer tokens.
transport: 'auto' reads the node's memory in place when it runs on this
  host, and streams over gRPC otherwise (or for chunks it cannot lend);
  'shared_memory' insists on memory, raising FailedPreconditionError for
  any chunk it cannot lend (a missing one too); 'grpc' always streams;
  'nccl' is for fetch_to_device only.
lease_s: how long the node keeps the chunks in place for a shared-memory
  read; a fetch that outlasts it fails rather than read reused memory.

Returns {'gpu_tier_chunks', 'shared_memory_chunks', 'grpc_chunks',
'nccl_chunks', 'bytes'}: which transport carried how many chunks
(gpu_tier_chunks and nccl_chunks are always 0 here: only fetch_to_device
reads the node's GPU), and their compressed bytes. Releases the GIL.

Raises InvalidArgumentError for arrays of the wrong shape, dtype or
layout: before fetching where the arrays show it (wrong count, rank,
dtype, or layers/channels differing between them), else when a chunk's
header disagrees, before it is decoded into its array; NotFoundError if a
chunk is missing (evicted since lookup()); DataLossError for a corrupt
one. On any error the fetch failed as a whole, though arrays of earlier
chunks may hold their values.

Threads may fetch through one Client at once.)doc")
      .def(
          "fetch_to_device", &Client::FetchToDevice, py::arg("keys"),
          py::arg("layout") = py::none(), py::arg("blocks") = py::none(),
          py::arg("stream") = 0, py::arg("transport") = "auto",
          py::arg("lease_s") = 30.0,
          R"doc(Restores the chunks of `keys` straight into the engine's GPU KV cache.

Each chunk's compressed bytes are copied to the GPU (from the node's memory
in place on this host, else as they arrive over gRPC) and decoded there,
batches of chunks decoding on `stream` while the next ones copy; chunks in
the node's GPU tier (same host, CUDA IPC) decode where they lie. A node
on another host whose GPU tier opens NCCL links sends chunks GPU to GPU
(transport 'auto' or 'nccl'). Returns when the decode is done (it
synchronizes `stream`): {'gpu_tier_chunks', 'shared_memory_chunks',
'grpc_chunks', 'nccl_chunks', 'bytes', 'first_batch_ms'}, the last the
GPU time from the first copy to the first batch decoded.

keys: a prefix the node holds (lookup()'s prefix_chunks of them).
layout: where the cache lives, as a dict or as keyword arguments:
  layers, kv_heads, head_dim: this worker's (kv_heads of its TP rank)
  dtype: 'float16' (default) or 'bfloat16'
  kind: 'contiguous' (default): each chunk into its own buffer
      [layers, 2, tokens, kv_heads * head_dim];
    or 'paged', with block_tokens (tokens per block), num_blocks, and
    layer_bases: a cache per layer (vLLM, FlashInfer): a list of the
      layers' data_ptr(), or the data_ptr() of a CUDA int64 tensor of them;
    or base: one allocation, layers layer_stride elements apart.
    Element (layer, kv, token slot s of block b, channel c) is at
    layer_base[b * block_stride + kv * kv_stride + s * token_stride + c];
    the strides count 16-bit elements and default to a per-layer cache
    [num_blocks, 2, block_tokens, kv_heads, head_dim] (K and V in
    separate caches: kv_stride is V's base minus K's, in elements).
blocks: one dict per key, where its chunk goes:
  tokens: the chunk's token count (the last chunk may be shorter);
  values (contiguous): data_ptr() of the chunk's buffer;
  block_ids (paged): the blocks of the request, a list of ints or the
    data_ptr() of a CUDA int32 tensor; token t of the chunk goes to slot
    first_slot + t of them (first_slot defaults to 0), so all chunks of a
    request can share one block table with first_slot = i * chunk_tokens.
stream: the cudaStream_t to decode on, as an int
  (torch.cuda.current_stream().cuda_stream); 0 is the default stream.
transport, lease_s: as for fetch(); 'nccl' insists on an NCCL link from
  the node's GPU (FailedPreconditionError if it cannot open one).

All addresses must be on one GPU; the call runs on that GPU. The first
call of a Client page-locks the node's shared memory for the GPU, which
takes a while for a large tier; later calls reuse it.

Raises FailedPreconditionError on a host without a GPU (use fetch());
InvalidArgumentError for a malformed layout or blocks, or an address
that is not GPU memory (checked before anything is fetched);
NotFoundError if a chunk is missing; DataLossError if the GPU rejects a
chunk (corrupt, or of another shape or dtype than the layout), whose
blocks are then left untouched.)doc")
      .def(
          "storer", &Client::MakeStorer, py::arg("layout") = py::none(),
          py::arg("level") = "near-lossless", py::arg("chunk_tokens") = 256,
          py::arg("batch_chunks") = 8, py::arg("slots") = 2,
          R"doc(A Storer: stores chunks straight from the engine's GPU KV cache.

layout: where the cache lives, as for fetch_to_device() (a dict, or
  keyword arguments); a list of layer_bases is copied to the GPU once,
  here, so the caches must stay where they are for the Storer's life.
level: the codec level the chunks are encoded at.
chunk_tokens: the longest chunk store() takes (sizes the GPU slots).
batch_chunks, slots: chunks encoded per launch, and launches in flight.

The Storer holds device memory on the layout's GPU for its slots
(device_bytes): about 2 GiB for 2 slots of 8 Llama-8B chunks of 256
tokens. Raises FailedPreconditionError on a host without a GPU.)doc");

  py::class_<Storer>(m, "Storer",
                     "Stores chunks from GPU blocks; made by Client.storer().")
      .def(
          "store",
          [](Storer& storer, const std::vector<py::bytes>& keys,
             const py::object& blocks, uintptr_t stream,
             const py::object& parent, double pin_ttl_s) {
            std::vector<ChunkKey> parsed = ToKeys(keys);
            DeviceTarget target;
            target.layout = storer.layout();
            ParseBlocks(blocks, parsed.size(), target);
            std::optional<ChunkKey> first_parent;
            if (!parent.is_none()) {
              if (!py::isinstance<py::bytes>(parent)) {
                Raise(absl::InvalidArgumentError(
                    "parent must be a chunk key (bytes) or None"));
              }
              first_parent =
                  ToKeys({py::reinterpret_borrow<py::bytes>(parent)}).front();
            }
            return storer.Store(std::move(parsed), std::move(target),
                                reinterpret_cast<codec::gpu::Stream>(stream),
                                first_parent, pin_ttl_s);
          },
          py::arg("keys"), py::arg("blocks"), py::arg("stream") = 0,
          py::arg("parent") = py::none(), py::arg("pin_ttl_s") = 0.0,
          R"doc(Queues storing the chunks of `keys` from the blocks; returns a ticket.

The chunks are encoded on `stream` (a cudaStream_t as an int; 0 is the
default stream) behind the work already queued there, so call it after
the prefill that wrote them, on the same stream; work queued on the
stream afterwards may overwrite the blocks. It returns once the encode is
queued (it waits only when every slot is busy); the bitstreams are copied
down and put into the node in the background. Chunk i names keys[i - 1]
as its parent, and the first names `parent` (the chunk before them in
their prompt, or None for a prompt's first chunk), so the node evicts a
prompt from its end. pin_ttl_s > 0 stores them pinned that long.

blocks: one dict per key, as for fetch_to_device() (tokens, and values or
  block_ids / first_slot), read instead of written.

Raises InvalidArgumentError for malformed blocks, a chunk longer than
chunk_tokens, or addresses on another GPU than the layout's.)doc")
      .def("wait", &Storer::Wait, py::arg("ticket"),
           R"doc(Waits until a ticket's chunks are stored in the node.

Returns {'chunks', 'raw_bytes', 'stored_bytes'}: chunks put, fp16/bf16
bytes read from the blocks, and compressed bytes stored. A chunk the GPU
could not read (a block id outside the cache) raises InvalidArgumentError
naming it, and none of the ticket's later chunks is stored, so a stored
prompt has no holes; a node's error (UnavailableError, ...) is raised as
it came. A ticket can be waited for once.)doc")
      .def_property_readonly("device_bytes", &Storer::device_bytes,
                             "Device memory the Storer's slots hold.");

  m.def("encode", &Encode, py::arg("values"), py::arg("kv_heads"),
        py::arg("head_dim"), py::arg("level") = "near-lossless",
        py::arg("dtype") = "float16",
        "Compresses one chunk: a C-contiguous 16-bit array shaped [layers, 2, "
        "tokens, kv_heads * head_dim]\n(numpy float16, or uint16 holding "
        "bfloat16 bits with dtype='bfloat16'). Levels: lossless,\n"
        "near-lossless, high, default, compact, tiny.");
  m.def("decode", &Decode, py::arg("stream"),
        "Decodes a stream from encode(): float16 array (uint16 for bfloat16) "
        "shaped [layers, 2, tokens, channels].\nRaises DataLossError for a "
        "corrupt or truncated stream.");
  m.def("peek_shape", &PeekShape, py::arg("stream"),
        "The shape a stream records, after checking its header.");
}

}  // namespace kvcache::python

PYBIND11_MODULE(kvcache, m) { kvcache::python::DefineModule(m); }
