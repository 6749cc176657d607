// libFuzzer target: parses arbitrary bytes as a GGUF file, then reads back
// everything the file claims to hold, metadata through every getter and
// each tensor through ReadF32. Any crash, sanitizer report, hang or huge
// allocation is a bug. Built and run by tests/fuzz/run_fuzz.sh gguf.
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "client/examples/model/gguf.h"

namespace {

// ReadF32's output is bounded by a small multiple of the input, but the
// fuzzer's time is better spent on parsing than on dequantizing big tensors.
constexpr uint64_t kMaxElements = uint64_t{1} << 20;

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using kvcache::model::GgufFile;
  using kvcache::model::GgufTensorInfo;
  absl::StatusOr<GgufFile> file = GgufFile::Parse(
      std::string(reinterpret_cast<const char*>(data), size), "fuzz.gguf");
  if (!file.ok()) return 0;
  for (const std::string& key : file->Keys()) {
    // Results are ignored: only their safety is under test.
    (void)file->GetType(key);
    (void)file->GetArrayElementType(key);
    (void)file->GetInt(key);
    (void)file->GetFloat(key);
    (void)file->GetBool(key);
    (void)file->GetString(key);
    (void)file->GetStringArray(key);
    (void)file->GetIntArray(key);
    (void)file->GetFloatArray(key);
  }
  for (const GgufTensorInfo& tensor : file->tensors()) {
    if (tensor.elements() > kMaxElements) continue;
    absl::StatusOr<std::vector<float>> values = file->ReadF32(tensor.name);
    if (values.ok() && values->size() != tensor.elements()) __builtin_trap();
  }
  return 0;
}
