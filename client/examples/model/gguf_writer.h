// Builds GGUF files in memory, for tests and the fuzz corpus. It writes what
// it is given without checking it, so it makes damaged files as easily as
// valid ones: wrong counts, misaligned or out-of-range offsets, unknown type
// ids, any dims.
//
// Thread safety: a GgufWriter is a plain value; use one per thread.
#ifndef KVCACHE_CLIENT_EXAMPLES_MODEL_GGUF_WRITER_H_
#define KVCACHE_CLIENT_EXAMPLES_MODEL_GGUF_WRITER_H_

#include <cstdint>
#include <cstring>
#include <optional>
#include <string>
#include <vector>

#include "absl/strings/string_view.h"
#include "client/examples/model/gguf.h"

namespace kvcache::model {

// The little-endian bytes of an integer or floating-point value, as GGUF
// stores numbers.
template <typename T>
std::string EncodeLe(T value) {
  // Hosts are little-endian (x86, Arm Linux), so the copy is the encoding.
  std::string out(sizeof(T), '\0');
  std::memcpy(out.data(), &value, sizeof(T));
  return out;
}

// A GGUF string: uint64 length, then the bytes.
std::string EncodeString(absl::string_view s);

// A GGUF array value: element type, count, then `elements` (the elements'
// encodings, concatenated) as given.
std::string EncodeArray(GgufValueType element_type, uint64_t count,
                        absl::string_view elements);

// An array of strings.
std::string EncodeStringArray(const std::vector<std::string>& strings);

class GgufWriter {
 public:
  struct Tensor {
    std::string name;
    std::vector<uint64_t> dims;  // ne[0] first
    uint32_t type = 0;           // a GgmlType id, or any number
    std::string data;  // placed at the next aligned offset of the data section
    // Written in the tensor info instead of where `data` actually went.
    std::optional<uint64_t> offset;
  };

  void set_version(uint32_t version) { version_ = version; }
  // Where tensor data is placed. Add general.alignment to the metadata to
  // tell readers about anything but the default 32.
  void set_alignment(uint64_t alignment) { alignment_ = alignment; }
  // Written in the header instead of the real counts.
  void set_kv_count(uint64_t count) { kv_count_ = count; }
  void set_tensor_count(uint64_t count) { tensor_count_ = count; }

  // A key, its type tag and the value's encoding (EncodeLe, EncodeString,
  // EncodeArray ...).
  void AddValue(absl::string_view key, GgufValueType type, std::string encoded);
  void AddUint32(absl::string_view key, uint32_t value);
  void AddFloat32(absl::string_view key, float value);
  void AddBool(absl::string_view key, bool value);
  void AddString(absl::string_view key, absl::string_view value);

  void AddTensor(Tensor tensor);
  // A tensor of a real type with dims `dims` and `data` at the next offset.
  void AddTensor(absl::string_view name, std::vector<uint64_t> dims,
                 GgmlType type, std::string data);

  // The whole file.
  std::string Build() const;

 private:
  uint32_t version_ = 3;
  uint64_t alignment_ = 32;
  std::optional<uint64_t> kv_count_;
  std::optional<uint64_t> tensor_count_;
  std::vector<std::string> key_values_;  // encoded
  std::vector<Tensor> tensors_;
};

}  // namespace kvcache::model

#endif  // KVCACHE_CLIENT_EXAMPLES_MODEL_GGUF_WRITER_H_
