// GGUF file building for tests (see gguf_writer.h).
#include "client/examples/model/gguf_writer.h"

#include <utility>

#include "absl/strings/str_cat.h"

namespace kvcache::model {
namespace {

void PadTo(std::string* s, uint64_t alignment) {
  while (s->size() % alignment != 0) s->push_back('\0');
}

}  // namespace

std::string EncodeString(absl::string_view s) {
  return absl::StrCat(EncodeLe<uint64_t>(s.size()), s);
}

std::string EncodeArray(GgufValueType element_type, uint64_t count,
                        absl::string_view elements) {
  return absl::StrCat(EncodeLe(static_cast<uint32_t>(element_type)),
                      EncodeLe<uint64_t>(count), elements);
}

std::string EncodeStringArray(const std::vector<std::string>& strings) {
  std::string elements;
  for (const std::string& s : strings) elements += EncodeString(s);
  return EncodeArray(GgufValueType::kString, strings.size(), elements);
}

void GgufWriter::AddValue(absl::string_view key, GgufValueType type,
                          std::string encoded) {
  key_values_.push_back(absl::StrCat(
      EncodeString(key), EncodeLe(static_cast<uint32_t>(type)), encoded));
}

void GgufWriter::AddUint32(absl::string_view key, uint32_t value) {
  AddValue(key, GgufValueType::kUint32, EncodeLe(value));
}

void GgufWriter::AddFloat32(absl::string_view key, float value) {
  AddValue(key, GgufValueType::kFloat32, EncodeLe(value));
}

void GgufWriter::AddBool(absl::string_view key, bool value) {
  AddValue(key, GgufValueType::kBool, EncodeLe<uint8_t>(value ? 1 : 0));
}

void GgufWriter::AddString(absl::string_view key, absl::string_view value) {
  AddValue(key, GgufValueType::kString, EncodeString(value));
}

void GgufWriter::AddTensor(Tensor tensor) {
  tensors_.push_back(std::move(tensor));
}

void GgufWriter::AddTensor(absl::string_view name, std::vector<uint64_t> dims,
                           GgmlType type, std::string data) {
  Tensor t;
  t.name = std::string(name);
  t.dims = std::move(dims);
  t.type = static_cast<uint32_t>(type);
  t.data = std::move(data);
  tensors_.push_back(std::move(t));
}

std::string GgufWriter::Build() const {
  // Lay the data section out first: tensor infos carry the offsets.
  std::string data;
  std::vector<uint64_t> offsets;
  for (const Tensor& t : tensors_) {
    PadTo(&data, alignment_);
    offsets.push_back(data.size());
    data += t.data;
  }

  std::string out = "GGUF";
  out += EncodeLe(version_);
  out += EncodeLe<uint64_t>(tensor_count_.value_or(tensors_.size()));
  out += EncodeLe<uint64_t>(kv_count_.value_or(key_values_.size()));
  for (const std::string& kv : key_values_) out += kv;
  for (size_t i = 0; i < tensors_.size(); ++i) {
    const Tensor& t = tensors_[i];
    out += EncodeString(t.name);
    out += EncodeLe(static_cast<uint32_t>(t.dims.size()));
    for (uint64_t d : t.dims) out += EncodeLe(d);
    out += EncodeLe(t.type);
    out += EncodeLe(t.offset.value_or(offsets[i]));
  }
  if (!tensors_.empty()) {
    PadTo(&out, alignment_);
    out += data;
  }
  return out;
}

}  // namespace kvcache::model
