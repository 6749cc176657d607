// ggml's tensor element types: how many bytes a block of elements takes in a
// GGUF file, and dequantization of the types this library can decode to
// float32 (F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0).
//
// The block layouts follow ggml (ggml-common.h, ggml-quants.c) byte for byte;
// each is written down next to its decoder in ggml_types.cc. Results are the
// same bits as ggml's reference dequantizers and gguf-py's.
//
// Thread safety: stateless; every function may be called concurrently.
#ifndef KVCACHE_CLIENT_EXAMPLES_MODEL_GGML_TYPES_H_
#define KVCACHE_CLIENT_EXAMPLES_MODEL_GGML_TYPES_H_

#include <cstdint>
#include <string>

#include "absl/status/status.h"
#include "absl/strings/string_view.h"
#include "absl/types/span.h"

namespace kvcache::model {

// ggml's type ids as stored in a GGUF tensor info. Ids 4 and 5 (the removed
// Q4_2 and Q4_3) and those above kQ1_0 are not types; a file using them is
// rejected. Only some types can be dequantized (see CanDequantize).
enum class GgmlType : uint32_t {
  kF32 = 0,
  kF16 = 1,
  kQ4_0 = 2,
  kQ4_1 = 3,
  kQ5_0 = 6,
  kQ5_1 = 7,
  kQ8_0 = 8,
  kQ8_1 = 9,
  kQ2_K = 10,
  kQ3_K = 11,
  kQ4_K = 12,
  kQ5_K = 13,
  kQ6_K = 14,
  kQ8_K = 15,
  kIQ2_XXS = 16,
  kIQ2_XS = 17,
  kIQ3_XXS = 18,
  kIQ1_S = 19,
  kIQ4_NL = 20,
  kIQ3_S = 21,
  kIQ2_S = 22,
  kIQ4_XS = 23,
  kI8 = 24,
  kI16 = 25,
  kI32 = 26,
  kI64 = 27,
  kF64 = 28,
  kIQ1_M = 29,
  kBF16 = 30,
  kTQ1_0 = 34,
  kTQ2_0 = 35,
  kMXFP4 = 39,
  kNVFP4 = 40,
  kQ1_0 = 41,
};

// How a type packs elements: each run of `block_elements` consecutive
// elements along ne[0] is stored in `block_bytes` bytes.
struct GgmlTypeTraits {
  GgmlType type;
  const char* name;  // as ggml spells it: "Q4_1", "F32", ...
  uint32_t block_elements;
  uint32_t block_bytes;
};

// The traits of a type id read from a file; nullptr if ggml has no such type.
const GgmlTypeTraits* FindGgmlType(uint32_t id);

// The type's name ("Q8_0"), or "type N" for an id ggml does not define.
std::string GgmlTypeName(GgmlType type);

// True if DequantizeToF32 decodes `type`.
bool CanDequantize(GgmlType type);

// Decodes `data`, a whole number of blocks of `type` holding out.size()
// elements, into float32, in storage order. INVALID_ARGUMENT if the sizes do
// not match; UNIMPLEMENTED if the type cannot be dequantized.
absl::Status DequantizeToF32(GgmlType type, absl::string_view data,
                             absl::Span<float> out);

}  // namespace kvcache::model

#endif  // KVCACHE_CLIENT_EXAMPLES_MODEL_GGML_TYPES_H_
