// Writes the GGUF fuzzer's seed corpus: small valid files that between them
// use every value type, every type ReadF32 decodes, a K-quant it does not,
// a non-default alignment, version 2, and a llama-shaped tensor table.
//
// Usage: bazel run //client/examples/model:make_gguf_fuzz_corpus -- DIR
#include <cstdint>
#include <fstream>
#include <iostream>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "client/examples/model/gguf_writer.h"

namespace kvcache::model {
namespace {

// Deterministic filler, so regenerating the corpus changes nothing.
std::string Bytes(size_t n, uint32_t seed) {
  std::string s(n, '\0');
  for (char& c : s) {
    seed = seed * 1664525u + 1013904223u;
    c = static_cast<char>(seed >> 24);
  }
  return s;
}

GgufWriter MetadataOnly() {
  GgufWriter w;
  w.AddValue("u8", GgufValueType::kUint8, EncodeLe<uint8_t>(200));
  w.AddValue("i8", GgufValueType::kInt8, EncodeLe<int8_t>(-100));
  w.AddValue("u16", GgufValueType::kUint16, EncodeLe<uint16_t>(60000));
  w.AddValue("i16", GgufValueType::kInt16, EncodeLe<int16_t>(-30000));
  w.AddUint32("u32", 4000000000u);
  w.AddValue("i32", GgufValueType::kInt32, EncodeLe<int32_t>(-2000000000));
  w.AddFloat32("f32", 1.5f);
  w.AddBool("bool", true);
  w.AddString("str", "text");
  w.AddValue("u64", GgufValueType::kUint64, EncodeLe<uint64_t>(~uint64_t{0}));
  w.AddValue("i64", GgufValueType::kInt64, EncodeLe<int64_t>(-1));
  w.AddValue("f64", GgufValueType::kFloat64, EncodeLe(0.1));
  w.AddValue("a_i32", GgufValueType::kArray,
             EncodeArray(GgufValueType::kInt32, 2,
                         EncodeLe<int32_t>(1) + EncodeLe<int32_t>(-1)));
  w.AddValue("a_f32", GgufValueType::kArray,
             EncodeArray(GgufValueType::kFloat32, 1, EncodeLe(2.0f)));
  w.AddValue("a_u64", GgufValueType::kArray,
             EncodeArray(GgufValueType::kUint64, 1, EncodeLe(~uint64_t{0})));
  w.AddValue("a_bool", GgufValueType::kArray,
             EncodeArray(GgufValueType::kBool, 2, std::string("\x01\x00", 2)));
  w.AddValue("a_str", GgufValueType::kArray, EncodeStringArray({"a", "bc"}));
  return w;
}

GgufWriter EveryDecodedType() {
  GgufWriter w;
  w.AddString("general.architecture", "test");
  w.AddTensor("f32", {8}, GgmlType::kF32, Bytes(32, 1));
  w.AddTensor("f16", {8}, GgmlType::kF16, Bytes(16, 2));
  w.AddTensor("bf16", {8}, GgmlType::kBF16, Bytes(16, 3));
  w.AddTensor("q4_0", {32}, GgmlType::kQ4_0, Bytes(18, 4));
  w.AddTensor("q4_1", {32}, GgmlType::kQ4_1, Bytes(20, 5));
  w.AddTensor("q5_0", {32}, GgmlType::kQ5_0, Bytes(22, 6));
  w.AddTensor("q5_1", {32}, GgmlType::kQ5_1, Bytes(24, 7));
  w.AddTensor("q8_0", {32}, GgmlType::kQ8_0, Bytes(34, 8));
  return w;
}

GgufWriter Aligned64() {
  GgufWriter w;
  w.set_alignment(64);
  w.AddUint32("general.alignment", 64);
  w.AddTensor("a", {32, 2}, GgmlType::kQ4_1, Bytes(40, 9));
  w.AddTensor("b", {32, 1, 2}, GgmlType::kQ5_0, Bytes(44, 10));
  w.AddTensor("scalar", {}, GgmlType::kF32, Bytes(4, 11));
  return w;
}

GgufWriter LlamaLike() {
  GgufWriter w;
  w.AddString("general.architecture", "llama");
  w.AddUint32("llama.block_count", 1);
  w.AddUint32("llama.embedding_length", 32);
  w.AddFloat32("llama.rope.freq_base", 10000.0f);
  w.AddBool("tokenizer.ggml.add_bos_token", false);
  w.AddValue("tokenizer.ggml.tokens", GgufValueType::kArray,
             EncodeStringArray({"<s>", "</s>", "a", "b"}));
  w.AddValue("tokenizer.ggml.merges", GgufValueType::kArray,
             EncodeStringArray({"a b"}));
  w.AddValue("tokenizer.ggml.token_type", GgufValueType::kArray,
             EncodeArray(GgufValueType::kInt32, 4, Bytes(16, 12)));
  w.AddTensor("token_embd.weight", {32, 4}, GgmlType::kQ8_0, Bytes(136, 13));
  w.AddTensor("blk.0.attn_norm.weight", {32}, GgmlType::kF32, Bytes(128, 14));
  w.AddTensor("blk.0.attn_q.weight", {32, 8}, GgmlType::kQ4_1, Bytes(160, 15));
  return w;
}

GgufWriter KQuant() {
  GgufWriter w;
  w.AddTensor("q4_k", {256}, GgmlType::kQ4_K, Bytes(144, 16));
  w.AddTensor("q8_0", {32}, GgmlType::kQ8_0, Bytes(34, 17));
  return w;
}

GgufWriter Version2() {
  GgufWriter w = EveryDecodedType();
  w.set_version(2);
  return w;
}

int Main(int argc, char** argv) {
  if (argc != 2) {
    std::cerr << "usage: make_gguf_fuzz_corpus DIR\n";
    return 2;
  }
  const std::pair<const char*, GgufWriter> seeds[] = {
      {"metadata_only.gguf", MetadataOnly()},
      {"every_decoded_type.gguf", EveryDecodedType()},
      {"aligned_64.gguf", Aligned64()},
      {"llama_like.gguf", LlamaLike()},
      {"k_quant.gguf", KQuant()},
      {"version_2.gguf", Version2()},
  };
  for (const auto& [name, writer] : seeds) {
    const std::string path = absl::StrCat(argv[1], "/", name);
    const std::string bytes = writer.Build();
    std::ofstream out(path, std::ios::binary | std::ios::trunc);
    out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
    if (!out.good()) {
      std::cerr << "cannot write " << path << "\n";
      return 1;
    }
    std::cout << path << ": " << bytes.size() << " bytes\n";
  }
  return 0;
}

}  // namespace
}  // namespace kvcache::model

int main(int argc, char** argv) { return kvcache::model::Main(argc, argv); }
