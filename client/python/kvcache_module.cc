// The `kvcache` Python module: chunk keys, the client, and the codec, for
// inference engines written in Python (a vLLM or SGLang connector).
//
// Every call that talks to the daemon releases the GIL, so a connector can
// fetch on one thread while the engine runs on another. Errors map to typed
// exceptions (kvcache.NotFoundError, ...) carrying the daemon's message.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/time/time.h"
#include "client/chunk_key.h"
#include "client/kvcache_client.h"
#include "codec/codec.h"

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

// Owns a connection; thin layer over KvCacheClient.
class Client {
 public:
  Client(const std::string& address, double timeout_s,
         double connect_timeout_s) {
    ClientOptions options;
    options.address = address;
    options.timeout = Seconds(timeout_s);
    options.connect_timeout = Seconds(connect_timeout_s);
    absl::StatusOr<std::unique_ptr<KvCacheClient>> client;
    {
      py::gil_scoped_release release;
      client = KvCacheClient::Connect(options);
    }
    client_ = Value(std::move(client));
  }

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
           const std::vector<py::bytes>& chunks, double pin_ttl_s,
           bool chained) {
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
      status = client_->Put(puts, PutOptions{Seconds(pin_ttl_s)});
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

 private:
  std::unique_ptr<KvCacheClient> client_;
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

codec::DType ParseDType(const std::string& name) {
  if (name == "float16") return codec::DType::kFloat16;
  if (name == "bfloat16") return codec::DType::kBFloat16;
  Raise(absl::InvalidArgumentError(absl::StrCat(
      "dtype must be \"float16\" or \"bfloat16\", not \"", name, "\"")));
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
  out["dtype"] = shape.dtype == codec::DType::kFloat16 ? "float16" : "bfloat16";
  return out;
}

}  // namespace

void DefineModule(py::module_& m) {
  m.doc() =
      "kvcache: store and fetch LLM KV-cache chunks by prompt prefix.\n\n"
      "chunk_keys() names a prompt's chunks; Client talks to a kvcached "
      "daemon;\nencode()/decode() compress chunks with kvcache's codec.";

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
      "The node cannot take this request now (e.g. it is draining).", nullptr);
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
      .def(py::init<const std::string&, double, double>(),
           py::arg("address") = "127.0.0.1:50051", py::arg("timeout_s") = 30.0,
           py::arg("connect_timeout_s") = 5.0,
           "Connects and waits until the daemon answers; raises "
           "UnavailableError if it does not within connect_timeout_s.")
      .def("lookup", &Client::Lookup, py::arg("keys"),
           "The longest cached prefix of `keys`: {'prefix_chunks': n, "
           "'chunks': [{'size_bytes', 'tier', 'pinned'}, ...]}.")
      .def("put", &Client::Put, py::arg("keys"), py::arg("chunks"),
           py::arg("pin_ttl_s") = 0.0, py::arg("chained") = true,
           "Stores chunks[i] under keys[i]; pinned for pin_ttl_s seconds if "
           "positive (a chat session).\nchained: keys are consecutive chunks "
           "of one prompt (as from chunk_keys), so the node evicts\nthe "
           "prefix from its end; pass False for unrelated chunks.")
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
           "bytes_out.");

  m.def("encode", &Encode, py::arg("values"), py::arg("kv_heads"),
        py::arg("head_dim"), py::arg("level") = "default",
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
