// A reader for GGUF, the single-file model format of llama.cpp and ggml, so
// that example workers can load real models (the reference one is
// SmolLM2-135M-Instruct, Q4_1) without linking ggml. It gives the metadata
// (typed key/value pairs: hyperparameters, tokenizer vocabulary and merges)
// and the tensors, dequantized to float32 on request.
//
// The format (versions 2 and 3, little-endian), after ggml's docs/gguf.md:
//   header   "GGUF", uint32 version, uint64 tensor_count, uint64 kv_count
//   kv_count times: string key, uint32 value type, value
//   tensor_count times: string name, uint32 n_dims, n_dims x uint64 ne,
//            uint32 ggml type, uint64 offset
//   zero padding up to a multiple of the alignment, then the data section.
// A string is a uint64 byte count and the bytes, with no terminator; an
// array is a uint32 element type, a uint64 count and the elements. A
// tensor's offset counts from the data section's start and is a multiple of
// the alignment (the general.alignment key, 32 by default).
//
// Metadata is parsed when the file is opened; tensor data is read from the
// file only by ReadF32 / ReadRaw. Every count, length, type, shape and offset
// is checked against the file before it is used, so a truncated, damaged or
// hostile file gives an error, never a crash, and nothing is allocated in
// proportion to a count the file has not got the bytes to back. Errors about
// the file's contents are INVALID_ARGUMENT (a value that makes no sense) or
// DATA_LOSS (the file ends before what it describes), and read
// "FILE: offset N: what is wrong".
//
// Thread safety: a GgufFile is immutable once opened. Every method is const
// and may be called from several threads at once; copies share the open
// file, which is closed when the last copy goes.
#ifndef KVCACHE_CLIENT_EXAMPLES_MODEL_GGUF_H_
#define KVCACHE_CLIENT_EXAMPLES_MODEL_GGUF_H_

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "client/examples/model/ggml_types.h"

namespace kvcache::model {

// The bytes behind a GgufFile: a file on disk or a string in memory
// (defined in gguf.cc).
class GgufByteSource;

// The type tag of a metadata value.
enum class GgufValueType : uint32_t {
  kUint8 = 0,
  kInt8,
  kUint16,
  kInt16,
  kUint32,
  kInt32,
  kFloat32,
  kBool,
  kString,
  kArray,
  kUint64,
  kInt64,
  kFloat64,
};

// "uint32", "string", ...; "type N" for a tag outside the enum.
std::string GgufValueTypeName(GgufValueType type);

// One tensor's entry in the file's table. Its shape is as ggml writes it:
// ne[0] first, and ne[0] is the fastest-varying (contiguous) dimension, so a
// weight of shape [in, out] holds `out` rows of `in` elements.
struct GgufTensorInfo {
  std::string name;
  std::vector<uint64_t> dims;  // ne[0], ne[1], ...; at most 4
  GgmlType type = GgmlType::kF32;
  uint64_t offset = 0;  // from the data section's start
  uint64_t bytes = 0;   // the data's size, from type and dims

  // The product of dims (1 for a tensor with no dims). Parsing guarantees it
  // fits in int64.
  uint64_t elements() const;
};

class GgufFile {
 public:
  // Opens `path` and parses its header, metadata and tensor table; the file
  // stays open for ReadF32. NOT_FOUND if it does not exist, another errno
  // code if it cannot be opened, INVALID_ARGUMENT if it is not a regular
  // file; otherwise the file's errors (see the top of this header).
  static absl::StatusOr<GgufFile> Open(const std::string& path);

  // Parses a whole GGUF file held in memory. `name_for_errors` stands for
  // the file in error messages. Errors as for Open.
  static absl::StatusOr<GgufFile> Parse(
      std::string bytes, std::string name_for_errors = "<memory>");

  // The name errors use: Open's path or Parse's name_for_errors.
  const std::string& name() const { return name_; }
  uint32_t version() const { return version_; }
  // general.alignment if present, else 32; always a power of two.
  uint64_t alignment() const { return alignment_; }
  // Where the data section starts in the file.
  uint64_t data_offset() const { return data_offset_; }

  // Metadata. A Get method returns the value of `key` if it has the type the
  // method asks for, NOT_FOUND if there is no such key, and
  // INVALID_ARGUMENT, naming the key and its actual type, otherwise.
  bool Has(absl::string_view key) const;
  absl::StatusOr<GgufValueType> GetType(absl::string_view key) const;
  // Any integer type (not bool); INVALID_ARGUMENT for a uint64 above
  // INT64_MAX.
  absl::StatusOr<int64_t> GetInt(absl::string_view key) const;
  // float32 or float64 exactly, or an integer converted to double.
  absl::StatusOr<double> GetFloat(absl::string_view key) const;
  // A bool; any nonzero byte is true.
  absl::StatusOr<bool> GetBool(absl::string_view key) const;
  absl::StatusOr<std::string> GetString(absl::string_view key) const;
  // Arrays: of strings; of any integer type (each value must fit in int64);
  // of float32/float64 or integers, as double.
  absl::StatusOr<std::vector<std::string>> GetStringArray(
      absl::string_view key) const;
  absl::StatusOr<std::vector<int64_t>> GetIntArray(absl::string_view key) const;
  absl::StatusOr<std::vector<double>> GetFloatArray(
      absl::string_view key) const;
  // For an array, the type of its elements; INVALID_ARGUMENT for a scalar.
  absl::StatusOr<GgufValueType> GetArrayElementType(
      absl::string_view key) const;
  // Every key, in file order.
  std::vector<std::string> Keys() const;

  // Tensors, in file order.
  const std::vector<GgufTensorInfo>& tensors() const { return tensors_; }
  // The tensor called `name`, or nullptr if there is none.
  const GgufTensorInfo* FindTensor(absl::string_view name) const;

  // The tensor dequantized to float32 in storage order, ne[0] fastest: a
  // weight of shape [in, out] comes back as `out` rows of `in` floats, the
  // layout of a row-major [out][in] matrix. NOT_FOUND if there is no such
  // tensor; UNIMPLEMENTED if its type cannot be dequantized (see
  // CanDequantize); DATA_LOSS or an errno status if the file cannot be read
  // (for example, it was truncated after Open).
  absl::StatusOr<std::vector<float>> ReadF32(absl::string_view name) const;

  // The tensor's bytes as stored, for any type. Errors as for ReadF32, less
  // UNIMPLEMENTED.
  absl::StatusOr<std::string> ReadRaw(absl::string_view name) const;

 private:
  friend class GgufParser;

  // One metadata value, kept as the file encodes it; the Get methods
  // convert it.
  struct Value {
    GgufValueType type = GgufValueType::kUint8;
    GgufValueType element_type = GgufValueType::kUint8;  // arrays only
    uint64_t count = 0;                                  // arrays only
    // Numbers and bools, scalar or array: their little-endian bytes as in
    // the file. Strings: the string.
    std::string bytes;
    std::vector<std::string> strings;  // string arrays
  };

  GgufFile() = default;

  absl::StatusOr<const Value*> Find(absl::string_view key) const;
  absl::Status WrongType(absl::string_view key, const Value& value,
                         absl::string_view wanted) const;
  absl::StatusOr<const GgufTensorInfo*> FindForRead(
      absl::string_view name) const;

  std::shared_ptr<const GgufByteSource> source_;
  std::string name_;
  uint32_t version_ = 0;
  uint64_t alignment_ = 32;  // GGUF's default
  uint64_t data_offset_ = 0;
  std::vector<std::string> keys_;
  absl::flat_hash_map<std::string, Value> values_;
  std::vector<GgufTensorInfo> tensors_;
  absl::flat_hash_map<std::string, size_t> tensor_index_;
};

}  // namespace kvcache::model

#endif  // KVCACHE_CLIENT_EXAMPLES_MODEL_GGUF_H_
