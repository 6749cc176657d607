// ggml type sizes and dequantization (see ggml_types.h).
#include "client/examples/model/ggml_types.h"

#include <cstddef>
#include <cstdint>

#include "absl/strings/str_cat.h"
#include "codec/half.h"

namespace kvcache::model {
namespace {

using codec::BFloat16ToFloat;
using codec::BitsFloat;
using codec::HalfToFloat;

// Block sizes from gguf-py's GGML_QUANT_SIZES (the same as ggml's
// type_traits table); 256-element blocks are the K-quants' QK_K.
constexpr GgmlTypeTraits kTypes[] = {
    {GgmlType::kF32, "F32", 1, 4},
    {GgmlType::kF16, "F16", 1, 2},
    {GgmlType::kQ4_0, "Q4_0", 32, 18},
    {GgmlType::kQ4_1, "Q4_1", 32, 20},
    {GgmlType::kQ5_0, "Q5_0", 32, 22},
    {GgmlType::kQ5_1, "Q5_1", 32, 24},
    {GgmlType::kQ8_0, "Q8_0", 32, 34},
    {GgmlType::kQ8_1, "Q8_1", 32, 40},
    {GgmlType::kQ2_K, "Q2_K", 256, 84},
    {GgmlType::kQ3_K, "Q3_K", 256, 110},
    {GgmlType::kQ4_K, "Q4_K", 256, 144},
    {GgmlType::kQ5_K, "Q5_K", 256, 176},
    {GgmlType::kQ6_K, "Q6_K", 256, 210},
    {GgmlType::kQ8_K, "Q8_K", 256, 292},
    {GgmlType::kIQ2_XXS, "IQ2_XXS", 256, 66},
    {GgmlType::kIQ2_XS, "IQ2_XS", 256, 74},
    {GgmlType::kIQ3_XXS, "IQ3_XXS", 256, 98},
    {GgmlType::kIQ1_S, "IQ1_S", 256, 50},
    {GgmlType::kIQ4_NL, "IQ4_NL", 32, 18},
    {GgmlType::kIQ3_S, "IQ3_S", 256, 110},
    {GgmlType::kIQ2_S, "IQ2_S", 256, 82},
    {GgmlType::kIQ4_XS, "IQ4_XS", 256, 136},
    {GgmlType::kI8, "I8", 1, 1},
    {GgmlType::kI16, "I16", 1, 2},
    {GgmlType::kI32, "I32", 1, 4},
    {GgmlType::kI64, "I64", 1, 8},
    {GgmlType::kF64, "F64", 1, 8},
    {GgmlType::kIQ1_M, "IQ1_M", 256, 56},
    {GgmlType::kBF16, "BF16", 1, 2},
    {GgmlType::kTQ1_0, "TQ1_0", 256, 54},
    {GgmlType::kTQ2_0, "TQ2_0", 256, 66},
    {GgmlType::kMXFP4, "MXFP4", 32, 17},
    {GgmlType::kNVFP4, "NVFP4", 64, 36},
    {GgmlType::kQ1_0, "Q1_0", 128, 18},
};

uint16_t Load16(const uint8_t* p) {
  return static_cast<uint16_t>(p[0] | p[1] << 8);
}

uint32_t Load32(const uint8_t* p) {
  return uint32_t{p[0]} | uint32_t{p[1]} << 8 | uint32_t{p[2]} << 16 |
         uint32_t{p[3]} << 24;
}

// Each decoder turns one block at `b` into its elements at `y`. Every
// element is one float multiply of an exactly representable integer by the
// block's scale, plus (for the _1 types) one float add of its minimum, in
// that order, as ggml and gguf-py compute them; the library is built with
// -ffp-contract=off so the compiler does not fuse the two.

void DecodeF32(const uint8_t* b, float* y) { *y = BitsFloat(Load32(b)); }

void DecodeF16(const uint8_t* b, float* y) { *y = HalfToFloat(Load16(b)); }

void DecodeBF16(const uint8_t* b, float* y) { *y = BFloat16ToFloat(Load16(b)); }

// block_q4_0: fp16 d; uint8 qs[16]. Element j < 16 is the low nibble of
// qs[j], element j + 16 its high nibble; value (q - 8) * d.
void DecodeQ4_0(const uint8_t* b, float* y) {
  const float d = HalfToFloat(Load16(b));
  const uint8_t* qs = b + 2;
  for (int j = 0; j < 16; ++j) {
    y[j] = static_cast<float>((qs[j] & 0x0F) - 8) * d;
    y[j + 16] = static_cast<float>((qs[j] >> 4) - 8) * d;
  }
}

// block_q4_1: fp16 d; fp16 m; uint8 qs[16]. Nibbles as in Q4_0; value
// q * d + m.
void DecodeQ4_1(const uint8_t* b, float* y) {
  const float d = HalfToFloat(Load16(b));
  const float m = HalfToFloat(Load16(b + 2));
  const uint8_t* qs = b + 4;
  for (int j = 0; j < 16; ++j) {
    y[j] = static_cast<float>(qs[j] & 0x0F) * d + m;
    y[j + 16] = static_cast<float>(qs[j] >> 4) * d + m;
  }
}

// block_q5_0: fp16 d; uint8 qh[4] (a little-endian uint32); uint8 qs[16].
// Element j's fifth bit is bit j of qh, above the nibble as in Q4_0; value
// (q - 16) * d.
void DecodeQ5_0(const uint8_t* b, float* y) {
  const float d = HalfToFloat(Load16(b));
  const uint32_t qh = Load32(b + 2);
  const uint8_t* qs = b + 6;
  for (int j = 0; j < 16; ++j) {
    const int q0 = (qs[j] & 0x0F) | ((qh >> j) & 1) << 4;
    const int q1 = (qs[j] >> 4) | ((qh >> (j + 16)) & 1) << 4;
    y[j] = static_cast<float>(q0 - 16) * d;
    y[j + 16] = static_cast<float>(q1 - 16) * d;
  }
}

// block_q5_1: fp16 d; fp16 m; uint8 qh[4]; uint8 qs[16]. Bits as in Q5_0;
// value q * d + m.
void DecodeQ5_1(const uint8_t* b, float* y) {
  const float d = HalfToFloat(Load16(b));
  const float m = HalfToFloat(Load16(b + 2));
  const uint32_t qh = Load32(b + 4);
  const uint8_t* qs = b + 8;
  for (int j = 0; j < 16; ++j) {
    const int q0 = (qs[j] & 0x0F) | ((qh >> j) & 1) << 4;
    const int q1 = (qs[j] >> 4) | ((qh >> (j + 16)) & 1) << 4;
    y[j] = static_cast<float>(q0) * d + m;
    y[j + 16] = static_cast<float>(q1) * d + m;
  }
}

// block_q8_0: fp16 d; int8 qs[32]; value q * d.
void DecodeQ8_0(const uint8_t* b, float* y) {
  const float d = HalfToFloat(Load16(b));
  for (int j = 0; j < 32; ++j) {
    y[j] = static_cast<float>(static_cast<int8_t>(b[2 + j])) * d;
  }
}

using BlockDecoder = void (*)(const uint8_t* block, float* out);

BlockDecoder FindDecoder(GgmlType type) {
  switch (type) {
    case GgmlType::kF32:
      return DecodeF32;
    case GgmlType::kF16:
      return DecodeF16;
    case GgmlType::kBF16:
      return DecodeBF16;
    case GgmlType::kQ4_0:
      return DecodeQ4_0;
    case GgmlType::kQ4_1:
      return DecodeQ4_1;
    case GgmlType::kQ5_0:
      return DecodeQ5_0;
    case GgmlType::kQ5_1:
      return DecodeQ5_1;
    case GgmlType::kQ8_0:
      return DecodeQ8_0;
    default:
      return nullptr;
  }
}

}  // namespace

const GgmlTypeTraits* FindGgmlType(uint32_t id) {
  for (const GgmlTypeTraits& traits : kTypes) {
    if (static_cast<uint32_t>(traits.type) == id) return &traits;
  }
  return nullptr;
}

std::string GgmlTypeName(GgmlType type) {
  const GgmlTypeTraits* traits = FindGgmlType(static_cast<uint32_t>(type));
  if (traits == nullptr) {
    return absl::StrCat("type ", static_cast<uint32_t>(type));
  }
  return traits->name;
}

bool CanDequantize(GgmlType type) { return FindDecoder(type) != nullptr; }

absl::Status DequantizeToF32(GgmlType type, absl::string_view data,
                             absl::Span<float> out) {
  const BlockDecoder decode = FindDecoder(type);
  if (decode == nullptr) {
    return absl::UnimplementedError(
        absl::StrCat("cannot dequantize ", GgmlTypeName(type),
                     "; supported: F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, "
                     "Q8_0"));
  }
  const GgmlTypeTraits& traits = *FindGgmlType(static_cast<uint32_t>(type));
  if (out.size() % traits.block_elements != 0 ||
      data.size() / traits.block_bytes != out.size() / traits.block_elements ||
      data.size() % traits.block_bytes != 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "cannot dequantize ", data.size(), " bytes of ", traits.name, " into ",
        out.size(), " floats: ", traits.name, " stores ", traits.block_elements,
        " elements in ", traits.block_bytes, " bytes"));
  }
  const auto* block = reinterpret_cast<const uint8_t*>(data.data());
  float* y = out.data();
  const size_t blocks = out.size() / traits.block_elements;
  for (size_t i = 0; i < blocks; ++i) {
    decode(block, y);
    block += traits.block_bytes;
    y += traits.block_elements;
  }
  return absl::OkStatus();
}

}  // namespace kvcache::model
