// Tests of the GGUF reader: the reference model's metadata, and every one of
// its tensors dequantized bit for bit as gguf-py does; every value type and
// tensor type through synthetic files (also checked against gguf-py); and
// clear errors, never crashes, for damaged files.
#include "client/examples/model/gguf.h"

#include <dirent.h>
#include <openssl/evp.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iostream>
#include <limits>
#include <map>
#include <optional>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/escaping.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "client/examples/model/ggml_types.h"
#include "client/examples/model/gguf_writer.h"
#include "codec/half.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace kvcache::model {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;
using ::testing::StartsWith;

constexpr char kDumpScript[] =
    "client/examples/model/testdata_gen/dump_gguf_tensors.py";
constexpr char kCorpusDir[] = "tests/fuzz/corpus/gguf";
constexpr char kSetupHint[] =
    "; run deploy/setup.sh, which fetches the reference model and the Python "
    "environment and writes .setup.bazelrc so that bazel test passes them "
    "on";

// A path from the environment that must exist.
absl::StatusOr<std::string> PathFromEnv(const char* var) {
  const char* value = std::getenv(var);
  if (value == nullptr || *value == '\0') {
    return absl::FailedPreconditionError(
        absl::StrCat("$", var, " is not set", kSetupHint));
  }
  if (access(value, R_OK) != 0) {
    return absl::NotFoundError(
        absl::StrCat("$", var, " = ", value, " does not exist", kSetupHint));
  }
  return std::string(value);
}

std::string TempPath(absl::string_view name) {
  const char* dir = std::getenv("TEST_TMPDIR");
  return absl::StrCat(dir != nullptr ? dir : "/tmp", "/", name);
}

absl::StatusOr<std::string> ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot read ", path));
  return std::string(std::istreambuf_iterator<char>(in), {});
}

void WriteFile(const std::string& path, absl::string_view bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  ASSERT_TRUE(out.good()) << "cannot write " << path;
}

std::vector<float> ReadFloats(absl::string_view bytes) {
  std::vector<float> out(bytes.size() / sizeof(float));
  std::memcpy(out.data(), bytes.data(), out.size() * sizeof(float));
  return out;
}

std::string Sha256Hex(const std::vector<float>& values) {
  unsigned char digest[EVP_MAX_MD_SIZE];
  unsigned int length = 0;
  EVP_Digest(values.data(), values.size() * sizeof(float), digest, &length,
             EVP_sha256(), nullptr);
  return absl::BytesToHexString(
      absl::string_view(reinterpret_cast<const char*>(digest), length));
}

// gguf-py's view of a tensor, from dump_gguf_tensors.py's digests.tsv.
struct Reference {
  std::string type;
  uint64_t elements = 0;
  std::string sha256;  // "-" if gguf-py cannot dequantize it
};

// Runs dump_gguf_tensors.py on `gguf`, dumping `dump_tensors` in full, into
// a fresh directory `out_dir`; returns the digests by tensor name.
absl::StatusOr<std::map<std::string, Reference>> RunGgufPy(
    const std::string& gguf, const std::string& out_dir,
    const std::vector<std::string>& dump_tensors) {
  absl::StatusOr<std::string> python = PathFromEnv("KVCACHE_PYTHON");
  if (!python.ok()) return python.status();
  mkdir(out_dir.c_str(), 0755);
  std::string command = absl::StrCat("'", *python, "' ", kDumpScript, " '",
                                     gguf, "' '", out_dir, "'");
  for (const std::string& name : dump_tensors) {
    absl::StrAppend(&command, " '", name, "'");
  }
  if (std::system(command.c_str()) != 0) {
    return absl::InternalError(absl::StrCat("failed: ", command));
  }
  absl::StatusOr<std::string> tsv = ReadFile(out_dir + "/digests.tsv");
  if (!tsv.ok()) return tsv.status();
  std::map<std::string, Reference> references;
  for (absl::string_view line : absl::StrSplit(*tsv, '\n', absl::SkipEmpty())) {
    std::vector<std::string> fields = absl::StrSplit(line, '\t');
    if (fields.size() != 4) {
      return absl::InternalError(absl::StrCat("bad digests line: ", line));
    }
    references[fields[0]] = {fields[1], std::stoull(fields[2]), fields[3]};
  }
  return references;
}

// Equal bit patterns, so NaNs and signed zeros count too; names the first
// few differences.
::testing::AssertionResult SameBits(const std::vector<float>& got,
                                    const std::vector<float>& want) {
  if (got.size() != want.size()) {
    return ::testing::AssertionFailure()
           << got.size() << " values, want " << want.size();
  }
  size_t differing = 0;
  std::ostringstream report;
  for (size_t i = 0; i < got.size(); ++i) {
    if (codec::FloatBits(got[i]) == codec::FloatBits(want[i])) continue;
    if (++differing <= 5) {
      report << " [" << i << "] " << got[i] << " vs " << want[i] << ";";
    }
  }
  if (differing == 0) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << differing << " of " << got.size()
                                       << " values differ:" << report.str();
}

// Each check that a file is rejected also checks that the error names the
// file and an offset.
void ExpectRejected(const std::string& bytes, absl::StatusCode code,
                    const std::string& message) {
  absl::StatusOr<GgufFile> file = GgufFile::Parse(bytes, "bad.gguf");
  ASSERT_FALSE(file.ok()) << "parsed: " << absl::CHexEscape(bytes);
  EXPECT_EQ(file.status().code(), code) << file.status();
  EXPECT_THAT(std::string(file.status().message()),
              StartsWith("bad.gguf: offset "));
  EXPECT_THAT(std::string(file.status().message()), HasSubstr(message));
}

uint16_t Half(float f) { return codec::FloatToHalf(f); }

// ---------------------------------------------------------------------------
// The reference model.

struct Model {
  absl::Status status;
  std::string path;
  std::optional<GgufFile> file;
};

const Model& GetModel() {
  static const Model* model = [] {
    auto* m = new Model;
    absl::StatusOr<std::string> path = PathFromEnv("KVCACHE_MODEL");
    if (!path.ok()) {
      m->status = path.status();
      return m;
    }
    m->path = *path;
    absl::StatusOr<GgufFile> file = GgufFile::Open(m->path);
    if (!file.ok()) {
      m->status = file.status();
      return m;
    }
    m->file.emplace(*std::move(file));
    return m;
  }();
  return *model;
}

// Fails (never skips) when the model is missing: these tests are the proof
// that the reader reads it right.
class ReferenceModelTest : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_TRUE(GetModel().status.ok()) << GetModel().status;
  }
  const GgufFile& model() const { return *GetModel().file; }
};

TEST_F(ReferenceModelTest, HeaderAndCounts) {
  EXPECT_EQ(model().version(), 3u);
  EXPECT_EQ(model().alignment(), 32u);
  EXPECT_EQ(model().data_offset(), 1785664u);
  EXPECT_EQ(model().Keys().size(), 33u);
  EXPECT_EQ(model().Keys().front(), "general.architecture");
  EXPECT_EQ(model().Keys().back(), "general.quantization_version");
  EXPECT_EQ(model().tensors().size(), 272u);
}

TEST_F(ReferenceModelTest, LlamaHyperparameters) {
  const GgufFile& m = model();
  EXPECT_EQ(*m.GetString("general.architecture"), "llama");
  EXPECT_EQ(*m.GetString("general.size_label"), "135M");
  EXPECT_THAT(*m.GetStringArray("general.languages"), ElementsAre("en"));
  EXPECT_EQ(*m.GetType("llama.block_count"), GgufValueType::kUint32);
  EXPECT_EQ(*m.GetInt("llama.block_count"), 30);
  EXPECT_EQ(*m.GetInt("llama.context_length"), 8192);
  EXPECT_EQ(*m.GetInt("llama.embedding_length"), 576);
  EXPECT_EQ(*m.GetInt("llama.feed_forward_length"), 1536);
  EXPECT_EQ(*m.GetInt("llama.attention.head_count"), 9);
  EXPECT_EQ(*m.GetInt("llama.attention.head_count_kv"), 3);
  EXPECT_EQ(*m.GetInt("llama.vocab_size"), 49152);
  EXPECT_EQ(*m.GetInt("llama.rope.dimension_count"), 64);
  EXPECT_EQ(*m.GetInt("general.file_type"), 3);  // MOSTLY_Q4_1
  EXPECT_EQ(*m.GetType("llama.rope.freq_base"), GgufValueType::kFloat32);
  EXPECT_EQ(*m.GetFloat("llama.rope.freq_base"), 100000.0);
  EXPECT_EQ(
      static_cast<float>(*m.GetFloat("llama.attention.layer_norm_rms_epsilon")),
      1e-5f);
  EXPECT_EQ(*m.GetInt("tokenizer.ggml.bos_token_id"), 1);
  EXPECT_EQ(*m.GetInt("tokenizer.ggml.eos_token_id"), 2);
  EXPECT_EQ(*m.GetBool("tokenizer.ggml.add_bos_token"), false);
  EXPECT_EQ(*m.GetBool("tokenizer.ggml.add_space_prefix"), false);
  EXPECT_EQ(*m.GetString("tokenizer.ggml.model"), "gpt2");
  EXPECT_EQ(*m.GetString("tokenizer.ggml.pre"), "smollm");
  EXPECT_THAT(*m.GetString("tokenizer.chat_template"),
              HasSubstr("<|im_start|>"));
}

TEST_F(ReferenceModelTest, TokenizerArrays) {
  absl::StatusOr<std::vector<std::string>> tokens =
      model().GetStringArray("tokenizer.ggml.tokens");
  ASSERT_TRUE(tokens.ok()) << tokens.status();
  ASSERT_EQ(tokens->size(), 49152u);
  EXPECT_EQ((*tokens)[0], "<|endoftext|>");
  EXPECT_EQ((*tokens)[1], "<|im_start|>");
  EXPECT_EQ((*tokens)[2], "<|im_end|>");

  absl::StatusOr<std::vector<std::string>> merges =
      model().GetStringArray("tokenizer.ggml.merges");
  ASSERT_TRUE(merges.ok()) << merges.status();
  ASSERT_EQ(merges->size(), 48900u);
  EXPECT_EQ((*merges)[0], "\xC4\xA0 t");  // "Ġ t": GPT-2's byte-level space

  EXPECT_EQ(*model().GetArrayElementType("tokenizer.ggml.token_type"),
            GgufValueType::kInt32);
  absl::StatusOr<std::vector<int64_t>> token_type =
      model().GetIntArray("tokenizer.ggml.token_type");
  ASSERT_TRUE(token_type.ok()) << token_type.status();
  ASSERT_EQ(token_type->size(), 49152u);
  EXPECT_EQ((*token_type)[0], 3);  // CONTROL

  // The typed getters refuse the wrong shape of value.
  EXPECT_EQ(model().GetIntArray("tokenizer.ggml.tokens").status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(model().GetString("tokenizer.ggml.tokens").status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST_F(ReferenceModelTest, TensorTable) {
  std::map<GgmlType, int> by_type;
  for (const GgufTensorInfo& t : model().tensors()) {
    ++by_type[t.type];
    EXPECT_EQ(t.offset % model().alignment(), 0u) << t.name;
  }
  EXPECT_EQ(by_type[GgmlType::kQ4_1], 210);
  EXPECT_EQ(by_type[GgmlType::kF32], 61);
  EXPECT_EQ(by_type[GgmlType::kQ8_0], 1);

  const GgufTensorInfo* embed = model().FindTensor("token_embd.weight");
  ASSERT_NE(embed, nullptr);
  EXPECT_THAT(embed->dims, ElementsAre(576, 49152));
  EXPECT_EQ(embed->type, GgmlType::kQ8_0);
  EXPECT_EQ(embed->elements(), 576u * 49152u);
  EXPECT_EQ(embed->bytes, 576u / 32 * 34 * 49152);

  const GgufTensorInfo* down = model().FindTensor("blk.29.ffn_down.weight");
  ASSERT_NE(down, nullptr);
  EXPECT_THAT(down->dims, ElementsAre(1536, 576));  // [in, out]
  EXPECT_EQ(down->type, GgmlType::kQ4_1);
  EXPECT_EQ(model().FindTensor("output.weight"), nullptr);  // tied
}

TEST_F(ReferenceModelTest, EveryTensorMatchesGgufPyBitForBit) {
  // One tensor of each type in the file is compared value by value, for a
  // readable report; all of them are compared by digest.
  const std::vector<std::string> dumped = {
      "token_embd.weight", "blk.0.attn_k.weight", "blk.0.attn_norm.weight"};
  absl::StatusOr<std::map<std::string, Reference>> references =
      RunGgufPy(GetModel().path, TempPath("model_reference"), dumped);
  ASSERT_TRUE(references.ok()) << references.status();
  ASSERT_EQ(references->size(), model().tensors().size());

  for (const std::string& name : dumped) {
    absl::StatusOr<std::string> bytes =
        ReadFile(TempPath(absl::StrCat("model_reference/", name, ".f32")));
    ASSERT_TRUE(bytes.ok()) << bytes.status();
    absl::StatusOr<std::vector<float>> values = model().ReadF32(name);
    ASSERT_TRUE(values.ok()) << values.status();
    EXPECT_TRUE(SameBits(*values, ReadFloats(*bytes))) << name;
  }

  absl::Duration reading;
  uint64_t floats = 0;
  for (const GgufTensorInfo& t : model().tensors()) {
    const absl::Time start = absl::Now();
    absl::StatusOr<std::vector<float>> values = model().ReadF32(t.name);
    reading += absl::Now() - start;
    ASSERT_TRUE(values.ok()) << values.status();
    ASSERT_EQ(values->size(), t.elements()) << t.name;
    floats += values->size();
    const Reference& want = (*references)[t.name];
    EXPECT_EQ(want.type, GgmlTypeName(t.type)) << t.name;
    EXPECT_EQ(want.elements, t.elements()) << t.name;
    EXPECT_EQ(Sha256Hex(*values), want.sha256) << t.name;
  }
  std::cout << "read and dequantized " << model().tensors().size()
            << " tensors (" << floats << " floats) in "
            << absl::ToDoubleMilliseconds(reading) << " ms\n";
}

TEST_F(ReferenceModelTest, OpenAndParseAgree) {
  absl::StatusOr<std::string> bytes = ReadFile(GetModel().path);
  ASSERT_TRUE(bytes.ok()) << bytes.status();
  absl::StatusOr<GgufFile> parsed = GgufFile::Parse(*std::move(bytes));
  ASSERT_TRUE(parsed.ok()) << parsed.status();
  EXPECT_EQ(parsed->Keys(), model().Keys());
  EXPECT_EQ(parsed->data_offset(), model().data_offset());
  ASSERT_EQ(parsed->tensors().size(), model().tensors().size());
  for (size_t i = 0; i < parsed->tensors().size(); ++i) {
    EXPECT_EQ(parsed->tensors()[i].name, model().tensors()[i].name);
    EXPECT_EQ(parsed->tensors()[i].offset, model().tensors()[i].offset);
  }
  const std::string last = model().tensors().back().name;
  EXPECT_EQ(*parsed->ReadRaw(last), *model().ReadRaw(last));
}

// ---------------------------------------------------------------------------
// Opening.

TEST(GgufOpenTest, MissingFileIsNotFound) {
  absl::StatusOr<GgufFile> file = GgufFile::Open(TempPath("no_such.gguf"));
  EXPECT_EQ(file.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(std::string(file.status().message()), HasSubstr("no_such.gguf"));
}

TEST(GgufOpenTest, DirectoryIsInvalidArgument) {
  const std::string dir = TempPath("a_directory.gguf");
  mkdir(dir.c_str(), 0755);
  absl::StatusOr<GgufFile> file = GgufFile::Open(dir);
  EXPECT_EQ(file.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(file.status().message()),
              HasSubstr("not a regular file"));
}

TEST(GgufOpenTest, FileTruncatedAfterOpenIsDataLoss) {
  GgufWriter w;
  w.AddTensor("t", {64}, GgmlType::kF32, std::string(256, '\0'));
  const std::string path = TempPath("shrinks.gguf");
  WriteFile(path, w.Build());
  absl::StatusOr<GgufFile> file = GgufFile::Open(path);
  ASSERT_TRUE(file.ok()) << file.status();
  ASSERT_EQ(truncate(path.c_str(), 100), 0);
  absl::StatusOr<std::vector<float>> values = file->ReadF32("t");
  EXPECT_EQ(values.status().code(), absl::StatusCode::kDataLoss);
  EXPECT_THAT(std::string(values.status().message()), HasSubstr(path));
  EXPECT_THAT(std::string(values.status().message()), HasSubstr("truncated"));
}

// ---------------------------------------------------------------------------
// Metadata through synthetic files.

TEST(GgufMetadataTest, EveryValueTypeRoundTrips) {
  GgufWriter w;
  w.AddValue("u8", GgufValueType::kUint8, EncodeLe<uint8_t>(200));
  w.AddValue("i8", GgufValueType::kInt8, EncodeLe<int8_t>(-100));
  w.AddValue("u16", GgufValueType::kUint16, EncodeLe<uint16_t>(60000));
  w.AddValue("i16", GgufValueType::kInt16, EncodeLe<int16_t>(-30000));
  w.AddValue("u32", GgufValueType::kUint32, EncodeLe<uint32_t>(4000000000u));
  w.AddValue("i32", GgufValueType::kInt32, EncodeLe<int32_t>(-2000000000));
  w.AddValue("f32", GgufValueType::kFloat32, EncodeLe(1.5f));
  w.AddValue("bool", GgufValueType::kBool, EncodeLe<uint8_t>(1));
  w.AddValue("str", GgufValueType::kString, EncodeString("h\xC3\xA9llo"));
  w.AddValue("u64", GgufValueType::kUint64, EncodeLe<uint64_t>(1ull << 40));
  w.AddValue("i64", GgufValueType::kInt64, EncodeLe<int64_t>(-(1ll << 40)));
  w.AddValue("f64", GgufValueType::kFloat64, EncodeLe(0.1));
  w.AddValue("empty_str", GgufValueType::kString, EncodeString(""));
  w.AddValue("a_u8", GgufValueType::kArray,
             EncodeArray(GgufValueType::kUint8, 3, "\x01\x02\xFF"));
  w.AddValue("a_i16", GgufValueType::kArray,
             EncodeArray(GgufValueType::kInt16, 2,
                         EncodeLe<int16_t>(-5) + EncodeLe<int16_t>(7)));
  w.AddValue("a_u32", GgufValueType::kArray,
             EncodeArray(GgufValueType::kUint32, 1, EncodeLe(4000000000u)));
  w.AddValue(
      "a_i64", GgufValueType::kArray,
      EncodeArray(GgufValueType::kInt64, 2,
                  EncodeLe<int64_t>(std::numeric_limits<int64_t>::min()) +
                      EncodeLe<int64_t>(9)));
  w.AddValue("a_f32", GgufValueType::kArray,
             EncodeArray(GgufValueType::kFloat32, 2,
                         EncodeLe(0.5f) + EncodeLe(-2.0f)));
  w.AddValue("a_f64", GgufValueType::kArray,
             EncodeArray(GgufValueType::kFloat64, 1, EncodeLe(1e300)));
  w.AddValue("a_bool", GgufValueType::kArray,
             EncodeArray(GgufValueType::kBool, 2, std::string("\x01\x00", 2)));
  w.AddValue("a_str", GgufValueType::kArray,
             EncodeStringArray({"a", "", "ccc"}));
  w.AddValue("a_empty", GgufValueType::kArray,
             EncodeArray(GgufValueType::kInt32, 0, ""));
  absl::StatusOr<GgufFile> f = GgufFile::Parse(w.Build(), "values.gguf");
  ASSERT_TRUE(f.ok()) << f.status();

  EXPECT_THAT(
      f->Keys(),
      ElementsAre("u8", "i8", "u16", "i16", "u32", "i32", "f32", "bool", "str",
                  "u64", "i64", "f64", "empty_str", "a_u8", "a_i16", "a_u32",
                  "a_i64", "a_f32", "a_f64", "a_bool", "a_str", "a_empty"));
  EXPECT_TRUE(f->tensors().empty());
  EXPECT_EQ(*f->GetInt("u8"), 200);
  EXPECT_EQ(*f->GetInt("i8"), -100);
  EXPECT_EQ(*f->GetInt("u16"), 60000);
  EXPECT_EQ(*f->GetInt("i16"), -30000);
  EXPECT_EQ(*f->GetInt("u32"), 4000000000);
  EXPECT_EQ(*f->GetInt("i32"), -2000000000);
  EXPECT_EQ(*f->GetInt("u64"), int64_t{1} << 40);
  EXPECT_EQ(*f->GetInt("i64"), -(int64_t{1} << 40));
  EXPECT_EQ(*f->GetFloat("f32"), 1.5);
  EXPECT_EQ(*f->GetFloat("f64"), 0.1);
  EXPECT_EQ(*f->GetFloat("i8"), -100.0);  // integers are numbers too
  EXPECT_EQ(*f->GetBool("bool"), true);
  EXPECT_EQ(*f->GetString("str"), "h\xC3\xA9llo");
  EXPECT_EQ(*f->GetString("empty_str"), "");
  EXPECT_THAT(*f->GetIntArray("a_u8"), ElementsAre(1, 2, 255));
  EXPECT_THAT(*f->GetIntArray("a_i16"), ElementsAre(-5, 7));
  EXPECT_THAT(*f->GetIntArray("a_u32"), ElementsAre(4000000000));
  EXPECT_THAT(*f->GetIntArray("a_i64"),
              ElementsAre(std::numeric_limits<int64_t>::min(), 9));
  EXPECT_THAT(*f->GetFloatArray("a_f32"), ElementsAre(0.5, -2.0));
  EXPECT_THAT(*f->GetFloatArray("a_f64"), ElementsAre(1e300));
  EXPECT_THAT(*f->GetFloatArray("a_i16"), ElementsAre(-5.0, 7.0));
  EXPECT_THAT(*f->GetStringArray("a_str"), ElementsAre("a", "", "ccc"));
  EXPECT_TRUE(f->GetIntArray("a_empty")->empty());
  EXPECT_EQ(*f->GetType("a_bool"), GgufValueType::kArray);
  EXPECT_EQ(*f->GetArrayElementType("a_bool"), GgufValueType::kBool);
  EXPECT_EQ(*f->GetType("f64"), GgufValueType::kFloat64);
  EXPECT_TRUE(f->Has("u8"));
  EXPECT_FALSE(f->Has("u9"));
}

TEST(GgufMetadataTest, GettersRejectMissingKeysAndWrongTypes) {
  GgufWriter w;
  w.AddString("name", "x");
  w.AddUint32("count", 3);
  w.AddValue("big", GgufValueType::kUint64,
             EncodeLe(std::numeric_limits<uint64_t>::max()));
  w.AddValue("big_array", GgufValueType::kArray,
             EncodeArray(GgufValueType::kUint64, 1,
                         EncodeLe(std::numeric_limits<uint64_t>::max())));
  w.AddValue("flag", GgufValueType::kUint8, EncodeLe<uint8_t>(1));
  absl::StatusOr<GgufFile> f = GgufFile::Parse(w.Build(), "types.gguf");
  ASSERT_TRUE(f.ok()) << f.status();

  absl::Status missing = f->GetInt("nope").status();
  EXPECT_EQ(missing.code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(missing.message(), "types.gguf: no metadata key 'nope'");
  EXPECT_EQ(f->GetStringArray("nope").status().code(),
            absl::StatusCode::kNotFound);

  absl::Status wrong = f->GetInt("name").status();
  EXPECT_EQ(wrong.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(wrong.message(),
            "types.gguf: metadata key 'name' is string, not an integer");
  EXPECT_EQ(f->GetString("count").status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(f->GetFloat("name").status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(f->GetBool("flag").status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(f->GetStringArray("count").status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(f->GetArrayElementType("count").status().code(),
            absl::StatusCode::kInvalidArgument);

  absl::Status too_big = f->GetInt("big").status();
  EXPECT_EQ(too_big.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(too_big.message()),
              HasSubstr("18446744073709551615, which does not fit in int64"));
  EXPECT_EQ(*f->GetFloat("big"), 18446744073709551615.0);
  EXPECT_EQ(f->GetIntArray("big_array").status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(GgufMetadataTest, AlignmentKeyMovesTheData) {
  GgufWriter w;
  w.set_alignment(64);
  w.AddUint32("general.alignment", 64);
  w.AddTensor("a", {3}, GgmlType::kF32,
              EncodeLe(1.0f) + EncodeLe(2.0f) + EncodeLe(3.0f));
  w.AddTensor("b", {1}, GgmlType::kF32, EncodeLe(4.0f));
  absl::StatusOr<GgufFile> f = GgufFile::Parse(w.Build());
  ASSERT_TRUE(f.ok()) << f.status();
  EXPECT_EQ(f->alignment(), 64u);
  EXPECT_EQ(f->data_offset() % 64, 0u);
  EXPECT_EQ(f->FindTensor("b")->offset, 64u);
  EXPECT_THAT(*f->ReadF32("a"), ElementsAre(1.0f, 2.0f, 3.0f));
  EXPECT_THAT(*f->ReadF32("b"), ElementsAre(4.0f));
}

// ---------------------------------------------------------------------------
// Tensors through synthetic files.

// One block of each quantized type, built by hand, and the values ggml's
// formulas give for it.
TEST(GgufTensorTest, DequantizesHandMadeBlocks) {
  // Nibble j (element j) is j, nibble 16 + j is 15 - j.
  std::string nibbles;
  for (int j = 0; j < 16; ++j)
    nibbles.push_back(static_cast<char>(j | (15 - j) << 4));
  std::string q8;
  for (int j = 0; j < 32; ++j) q8.push_back(static_cast<char>(8 * j - 128));

  GgufWriter w;
  w.AddTensor("f32", {3}, GgmlType::kF32,
              EncodeLe(1.5f) + EncodeLe(-0.0f) + EncodeLe(3.4e38f));
  w.AddTensor("f16", {4}, GgmlType::kF16,
              EncodeLe(Half(1.0f)) + EncodeLe(Half(-2.0f)) +
                  EncodeLe<uint16_t>(0x0001) + EncodeLe<uint16_t>(0x7C00));
  w.AddTensor("bf16", {2}, GgmlType::kBF16,
              EncodeLe<uint16_t>(0x3F80) + EncodeLe<uint16_t>(0xC040));
  w.AddTensor("q4_0", {32}, GgmlType::kQ4_0, EncodeLe(Half(0.5f)) + nibbles);
  w.AddTensor("q4_1", {32}, GgmlType::kQ4_1,
              EncodeLe(Half(0.25f)) + EncodeLe(Half(-1.0f)) + nibbles);
  w.AddTensor("q5_0", {32}, GgmlType::kQ5_0,
              EncodeLe(Half(1.0f)) + EncodeLe<uint32_t>(0x0000FFFF) + nibbles);
  w.AddTensor("q5_1", {32}, GgmlType::kQ5_1,
              EncodeLe(Half(0.5f)) + EncodeLe(Half(2.0f)) +
                  EncodeLe<uint32_t>(0xFFFF0000) + nibbles);
  w.AddTensor("q8_0", {32}, GgmlType::kQ8_0, EncodeLe(Half(0.125f)) + q8);
  absl::StatusOr<GgufFile> f = GgufFile::Parse(w.Build(), "blocks.gguf");
  ASSERT_TRUE(f.ok()) << f.status();

  EXPECT_TRUE(SameBits(*f->ReadF32("f32"), {1.5f, -0.0f, 3.4e38f}));
  EXPECT_TRUE(SameBits(*f->ReadF32("f16"),
                       {1.0f, -2.0f, std::ldexp(1.0f, -24), INFINITY}));
  EXPECT_TRUE(SameBits(*f->ReadF32("bf16"), {1.0f, -3.0f}));
  std::vector<float> q4_0(32), q4_1(32), q5_0(32), q5_1(32), q8_0(32);
  for (int j = 0; j < 16; ++j) {
    q4_0[j] = (j - 8) * 0.5f;
    q4_0[16 + j] = (15 - j - 8) * 0.5f;
    q4_1[j] = j * 0.25f - 1.0f;
    q4_1[16 + j] = (15 - j) * 0.25f - 1.0f;
    q5_0[j] = j + 16 - 16;       // fifth bit set in the low half
    q5_0[16 + j] = 15 - j - 16;  // and clear in the high half
    q5_1[j] = j * 0.5f + 2.0f;
    q5_1[16 + j] = (15 - j + 16) * 0.5f + 2.0f;
  }
  for (int j = 0; j < 32; ++j) q8_0[j] = j - 16.0f;
  EXPECT_TRUE(SameBits(*f->ReadF32("q4_0"), q4_0));
  EXPECT_TRUE(SameBits(*f->ReadF32("q4_1"), q4_1));
  EXPECT_TRUE(SameBits(*f->ReadF32("q5_0"), q5_0));
  EXPECT_TRUE(SameBits(*f->ReadF32("q5_1"), q5_1));
  EXPECT_TRUE(SameBits(*f->ReadF32("q8_0"), q8_0));
}

// Random blocks of every type ReadF32 decodes, in shapes of one to four
// dims, written to a file and read by both gguf-py and GgufFile::Open.
TEST(GgufTensorTest, SyntheticTensorsMatchGgufPyBitForBit) {
  std::mt19937 rng(20240607);
  auto random_bytes = [&rng](size_t n) {
    std::string s(n, '\0');
    for (char& c : s) c = static_cast<char>(rng() & 0xFF);
    return s;
  };
  // Finite scales: NaN payloads are not what this compares.
  auto random_scale = [&rng]() {
    return EncodeLe(Half(std::uniform_real_distribution<float>(-4, 4)(rng)));
  };
  // Finite halves, floats and bfloats, with the exponent's top bit clear
  // whenever the random one would be Inf or NaN.
  auto random_finite = [&rng](GgmlType type, size_t n) {
    std::string s;
    for (size_t i = 0; i < n; ++i) {
      if (type == GgmlType::kF32) {
        uint32_t bits = static_cast<uint32_t>(rng());
        if ((bits & 0x7F800000u) == 0x7F800000u) bits &= ~0x40000000u;
        s += EncodeLe(bits);
      } else {
        uint16_t bits = static_cast<uint16_t>(rng());
        const uint16_t exponent = type == GgmlType::kF16 ? 0x7C00 : 0x7F80;
        if ((bits & exponent) == exponent) bits &= ~0x4000;
        s += EncodeLe(bits);
      }
    }
    return s;
  };

  GgufWriter w;
  w.AddString("general.architecture", "test");
  const std::vector<std::vector<uint64_t>> shapes = {
      {64}, {64, 3}, {32, 2, 3}, {32, 1, 2, 2}};
  const GgmlType quantized[] = {GgmlType::kQ4_0, GgmlType::kQ4_1,
                                GgmlType::kQ5_0, GgmlType::kQ5_1,
                                GgmlType::kQ8_0};
  int index = 0;
  for (const std::vector<uint64_t>& dims : shapes) {
    uint64_t elements = 1;
    for (uint64_t d : dims) elements *= d;
    for (GgmlType type : quantized) {
      const GgmlTypeTraits& traits = *FindGgmlType(static_cast<uint32_t>(type));
      const bool has_min = type == GgmlType::kQ4_1 || type == GgmlType::kQ5_1;
      std::string data;
      for (uint64_t b = 0; b < elements / 32; ++b) {
        std::string block = random_scale();
        if (has_min) block += random_scale();
        block += random_bytes(traits.block_bytes - block.size());
        data += block;
      }
      w.AddTensor(absl::StrCat(GgmlTypeName(type), "_", index++), dims, type,
                  data);
    }
    for (GgmlType type : {GgmlType::kF32, GgmlType::kF16, GgmlType::kBF16}) {
      w.AddTensor(absl::StrCat(GgmlTypeName(type), "_", index++), dims, type,
                  random_finite(type, elements));
    }
  }
  // Specials, exactly: zeros, subnormals, infinities, the largest values.
  w.AddTensor("f16_specials", {6}, GgmlType::kF16,
              EncodeLe<uint16_t>(0x8000) + EncodeLe<uint16_t>(0x0001) +
                  EncodeLe<uint16_t>(0x83FF) + EncodeLe<uint16_t>(0x7C00) +
                  EncodeLe<uint16_t>(0xFC00) + EncodeLe<uint16_t>(0x7BFF));
  w.AddTensor("bf16_specials", {4}, GgmlType::kBF16,
              EncodeLe<uint16_t>(0x0001) + EncodeLe<uint16_t>(0xFF80) +
                  EncodeLe<uint16_t>(0x7F7F) + EncodeLe<uint16_t>(0x8000));
  w.AddTensor("empty", {32, 0}, GgmlType::kQ8_0, "");
  const std::string path = TempPath("synthetic.gguf");
  WriteFile(path, w.Build());

  absl::StatusOr<std::map<std::string, Reference>> references =
      RunGgufPy(path, TempPath("synthetic_reference"), {});
  ASSERT_TRUE(references.ok()) << references.status();
  absl::StatusOr<GgufFile> f = GgufFile::Open(path);
  ASSERT_TRUE(f.ok()) << f.status();
  ASSERT_EQ(references->size(), f->tensors().size());
  for (const GgufTensorInfo& t : f->tensors()) {
    absl::StatusOr<std::vector<float>> values = f->ReadF32(t.name);
    ASSERT_TRUE(values.ok()) << values.status();
    const Reference& want = (*references)[t.name];
    EXPECT_EQ(want.type, GgmlTypeName(t.type)) << t.name;
    EXPECT_EQ(values->size(), want.elements) << t.name;
    EXPECT_EQ(Sha256Hex(*values), want.sha256) << t.name;
  }
}

TEST(GgufTensorTest, OtherTypesParseButAreUnimplemented) {
  GgufWriter w;
  w.AddTensor("q4_k", {256}, GgmlType::kQ4_K, std::string(144, '\x11'));
  absl::StatusOr<GgufFile> f = GgufFile::Parse(w.Build(), "kquant.gguf");
  ASSERT_TRUE(f.ok()) << f.status();
  EXPECT_EQ(f->FindTensor("q4_k")->bytes, 144u);
  absl::Status status = f->ReadF32("q4_k").status();
  EXPECT_EQ(status.code(), absl::StatusCode::kUnimplemented);
  EXPECT_THAT(std::string(status.message()), HasSubstr("kquant.gguf"));
  EXPECT_THAT(std::string(status.message()), HasSubstr("Q4_K"));
  EXPECT_EQ(*f->ReadRaw("q4_k"), std::string(144, '\x11'));
  EXPECT_EQ(f->ReadF32("absent").status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(f->ReadRaw("absent").status().code(), absl::StatusCode::kNotFound);
}

TEST(GgufTensorTest, ScalarAndEmptyTensors) {
  GgufWriter w;
  w.AddTensor("scalar", {}, GgmlType::kF32, EncodeLe(7.0f));
  w.AddTensor("empty", {32, 0, 5}, GgmlType::kQ4_0, "");
  absl::StatusOr<GgufFile> f = GgufFile::Parse(w.Build());
  ASSERT_TRUE(f.ok()) << f.status();
  EXPECT_EQ(f->FindTensor("scalar")->elements(), 1u);
  EXPECT_THAT(*f->ReadF32("scalar"), ElementsAre(7.0f));
  EXPECT_EQ(f->FindTensor("empty")->bytes, 0u);
  EXPECT_TRUE(f->ReadF32("empty")->empty());
}

// ---------------------------------------------------------------------------
// Damaged files.

// A small file with a bit of everything, for the damage tests to break.
GgufWriter SmallWriter() {
  GgufWriter w;
  w.AddString("general.architecture", "llama");
  w.AddUint32("llama.block_count", 2);
  w.AddValue("tokenizer.ggml.tokens", GgufValueType::kArray,
             EncodeStringArray({"<s>", "hi"}));
  w.AddValue("scores", GgufValueType::kArray,
             EncodeArray(GgufValueType::kFloat32, 2,
                         EncodeLe(0.5f) + EncodeLe(-1.0f)));
  w.AddTensor("norm", {4}, GgmlType::kF32, std::string(16, '\x3F'));
  w.AddTensor("embed", {32, 2}, GgmlType::kQ8_0, std::string(68, '\x01'));
  return w;
}

TEST(GgufDamageTest, SmallFileIsValid) {
  absl::StatusOr<GgufFile> f = GgufFile::Parse(SmallWriter().Build());
  ASSERT_TRUE(f.ok()) << f.status();
  EXPECT_EQ(f->ReadF32("embed")->size(), 64u);
}

TEST(GgufDamageTest, EveryTruncationIsRejected) {
  const std::string bytes = SmallWriter().Build();
  for (size_t n = 0; n < bytes.size(); ++n) {
    SCOPED_TRACE(absl::StrCat("first ", n, " of ", bytes.size(), " bytes"));
    absl::StatusOr<GgufFile> f =
        GgufFile::Parse(bytes.substr(0, n), "cut.gguf");
    ASSERT_FALSE(f.ok());
    EXPECT_TRUE(f.status().code() == absl::StatusCode::kDataLoss ||
                f.status().code() == absl::StatusCode::kInvalidArgument)
        << f.status();
    EXPECT_THAT(std::string(f.status().message()),
                StartsWith("cut.gguf: offset "));
  }
}

TEST(GgufDamageTest, BadMagic) {
  std::string bytes = SmallWriter().Build();
  bytes[3] = 'X';
  ExpectRejected(bytes, absl::StatusCode::kInvalidArgument,
                 "magic is \"GGUX\", not \"GGUF\"; not a GGUF file");
  ExpectRejected("GG", absl::StatusCode::kInvalidArgument,
                 "too short for a GGUF header");
}

TEST(GgufDamageTest, UnsupportedVersion) {
  for (uint32_t version : {0u, 1u, 4u, 0xFFFFFFFFu}) {
    GgufWriter w = SmallWriter();
    w.set_version(version);
    ExpectRejected(w.Build(), absl::StatusCode::kInvalidArgument,
                   absl::StrCat("unsupported GGUF version ", version));
  }
  GgufWriter big_endian = SmallWriter();
  big_endian.set_version(0x03000000);
  ExpectRejected(big_endian.Build(), absl::StatusCode::kInvalidArgument,
                 "big-endian");
  GgufWriter v2 = SmallWriter();
  v2.set_version(2);
  EXPECT_EQ(GgufFile::Parse(v2.Build())->version(), 2u);
}

TEST(GgufDamageTest, HugeCounts) {
  GgufWriter kvs = SmallWriter();
  kvs.set_kv_count(std::numeric_limits<uint64_t>::max());
  ExpectRejected(kvs.Build(), absl::StatusCode::kDataLoss,
                 "metadata count 18446744073709551615");
  GgufWriter tensors = SmallWriter();
  tensors.set_tensor_count(uint64_t{1} << 40);
  ExpectRejected(tensors.Build(), absl::StatusCode::kDataLoss,
                 "tensor count 1099511627776");
  // A count that fits the file but promises more entries than there are.
  GgufWriter more;
  more.AddString("a", "some text");
  more.AddString("b", "some more text");
  more.set_kv_count(3);
  ExpectRejected(more.Build(), absl::StatusCode::kDataLoss,
                 "the length of the key of metadata entry 2 needs 8 bytes");
}

TEST(GgufDamageTest, StringLengthPastTheEnd) {
  GgufWriter value;
  value.AddValue("k", GgufValueType::kString, EncodeLe<uint64_t>(1000) + "abc");
  ExpectRejected(value.Build(), absl::StatusCode::kDataLoss,
                 "the value of key 'k' is 1000 bytes long but the file ends 3 "
                 "bytes after its length");
  GgufWriter key;
  key.AddValue(std::string(3, 'k'), GgufValueType::kUint8, "\x01");
  std::string bytes = key.Build();
  // The key's length, after the 24-byte header: 3 becomes 2^64 - 1.
  for (int i = 24; i < 32; ++i) bytes[i] = '\xFF';
  ExpectRejected(bytes, absl::StatusCode::kDataLoss,
                 "the key of metadata entry 0 is 18446744073709551615 bytes");
}

TEST(GgufDamageTest, HugeArrayCounts) {
  GgufWriter numbers;
  numbers.AddValue(
      "a", GgufValueType::kArray,
      EncodeArray(GgufValueType::kUint32, uint64_t{1} << 61, EncodeLe(1u)));
  ExpectRejected(numbers.Build(), absl::StatusCode::kDataLoss,
                 "key 'a' is an array of 2305843009213693952 uint32");
  GgufWriter strings;
  strings.AddValue(
      "s", GgufValueType::kArray,
      EncodeArray(GgufValueType::kString, std::numeric_limits<uint64_t>::max(),
                  EncodeString("x")));
  ExpectRejected(strings.Build(), absl::StatusCode::kDataLoss,
                 "is an array of 18446744073709551615 string");
}

TEST(GgufDamageTest, UnknownOrNestedValueTypes) {
  GgufWriter unknown;
  unknown.AddValue("k", static_cast<GgufValueType>(13), "\x01");
  ExpectRejected(unknown.Build(), absl::StatusCode::kInvalidArgument,
                 "key 'k' has unknown value type 13");
  GgufWriter element;
  element.AddValue("k", GgufValueType::kArray,
                   EncodeArray(static_cast<GgufValueType>(99), 1, "\x01"));
  ExpectRejected(element.Build(), absl::StatusCode::kInvalidArgument,
                 "key 'k' is an array of unknown type 99");
  GgufWriter nested;
  nested.AddValue("k", GgufValueType::kArray,
                  EncodeArray(GgufValueType::kArray, 1,
                              EncodeArray(GgufValueType::kUint8, 1, "\x01")));
  ExpectRejected(nested.Build(), absl::StatusCode::kInvalidArgument,
                 "array of arrays");
}

TEST(GgufDamageTest, DuplicateKey) {
  GgufWriter w = SmallWriter();
  w.AddUint32("llama.block_count", 3);
  ExpectRejected(w.Build(), absl::StatusCode::kInvalidArgument,
                 "duplicate key 'llama.block_count'");
}

TEST(GgufDamageTest, BadAlignment) {
  for (uint32_t alignment : {0u, 48u}) {
    GgufWriter w;
    w.AddUint32("general.alignment", alignment);
    ExpectRejected(w.Build(), absl::StatusCode::kInvalidArgument,
                   absl::StrCat("general.alignment is ", alignment,
                                ", not a power of two"));
  }
  GgufWriter w;
  w.AddString("general.alignment", "32");
  ExpectRejected(w.Build(), absl::StatusCode::kInvalidArgument,
                 "general.alignment is a string, not a uint32");
}

TEST(GgufDamageTest, TooManyDims) {
  GgufWriter w;
  w.AddTensor("t", {1, 1, 1, 1, 1}, GgmlType::kF32, EncodeLe(1.0f));
  ExpectRejected(w.Build(), absl::StatusCode::kInvalidArgument,
                 "tensor 't' has 5 dimensions; ggml allows at most 4");
}

TEST(GgufDamageTest, ShapeOverflows) {
  GgufWriter product;
  product.AddTensor("t", {uint64_t{1} << 32, uint64_t{1} << 32}, GgmlType::kF32,
                    "");
  ExpectRejected(product.Build(), absl::StatusCode::kInvalidArgument,
                 "tensor 't' has shape [4294967296, 4294967296]...: its "
                 "element count overflows int64");
  GgufWriter dim;
  dim.AddTensor("t", {std::numeric_limits<uint64_t>::max()}, GgmlType::kF32,
                "");
  ExpectRejected(dim.Build(), absl::StatusCode::kInvalidArgument,
                 "overflows int64");
  GgufWriter bytes;
  bytes.AddTensor("t", {uint64_t{1} << 62}, GgmlType::kF32, "");
  ExpectRejected(bytes.Build(), absl::StatusCode::kInvalidArgument,
                 "its size in bytes overflows int64");
}

TEST(GgufDamageTest, HugeTensorIsCheckedAgainstTheFile) {
  GgufWriter w;
  w.AddTensor("t", {uint64_t{1} << 40}, GgmlType::kQ8_0, std::string(34, 0));
  ExpectRejected(w.Build(), absl::StatusCode::kDataLoss,
                 "tensor 't' (Q8_0 [1099511627776], 1168231104512 bytes at "
                 "data offset 0) runs past the end of the data section (34 "
                 "bytes");
}

TEST(GgufDamageTest, BadTensorOffsets) {
  GgufWriter misaligned = SmallWriter();
  misaligned.AddTensor({"t", {1}, 0, EncodeLe(1.0f), 4});
  ExpectRejected(misaligned.Build(), absl::StatusCode::kInvalidArgument,
                 "tensor 't' has data offset 4, not a multiple of the "
                 "alignment 32");
  for (uint64_t offset : {uint64_t{1} << 40, ~uint64_t{31}}) {
    GgufWriter past_end = SmallWriter();
    past_end.AddTensor({"t", {1}, 0, EncodeLe(1.0f), offset});
    ExpectRejected(past_end.Build(), absl::StatusCode::kDataLoss,
                   absl::StrCat("tensor 't' (F32 [1], 4 bytes at data offset ",
                                offset, ") runs past the end"));
  }
  GgufWriter overlap = SmallWriter();
  overlap.AddTensor({"t", {8}, 0, std::string(32, 0), 32});  // on "embed"
  ExpectRejected(overlap.Build(), absl::StatusCode::kInvalidArgument,
                 "overlaps tensor 'embed' (68 bytes at data offset 32)");
}

TEST(GgufDamageTest, BadTensorTypes) {
  for (uint32_t type : {4u, 5u, 31u, 1000u}) {
    GgufWriter w;
    w.AddTensor({"t", {32}, type, std::string(128, 0), std::nullopt});
    ExpectRejected(w.Build(), absl::StatusCode::kInvalidArgument,
                   absl::StrCat("tensor 't' has unknown ggml type ", type));
  }
  GgufWriter partial_block;
  partial_block.AddTensor("t", {33, 2}, GgmlType::kQ4_0, std::string(72, 0));
  ExpectRejected(partial_block.Build(), absl::StatusCode::kInvalidArgument,
                 "tensor 't' is Q4_0 with shape [33, 2], but Q4_0 packs rows "
                 "in blocks of 32 and ne[0] = 33 is not a multiple of that");
}

TEST(GgufDamageTest, DuplicateTensorName) {
  GgufWriter w = SmallWriter();
  w.AddTensor("norm", {4}, GgmlType::kF32, std::string(16, 0));
  ExpectRejected(w.Build(), absl::StatusCode::kInvalidArgument,
                 "duplicate tensor 'norm'");
}

TEST(GgufDamageTest, HostileNamesAreEscapedAndShortened) {
  GgufWriter w;
  w.AddTensor("\x01\xFF" + std::string(500, 'n'), {5}, GgmlType::kQ8_0, "");
  absl::StatusOr<GgufFile> f = GgufFile::Parse(w.Build(), "bad.gguf");
  ASSERT_FALSE(f.ok());
  EXPECT_THAT(std::string(f.status().message()), HasSubstr("'\\x01\\xffnnn"));
  EXPECT_LT(f.status().message().size(), 400u);
}

// Every single-byte change to the small file is parsed without a crash;
// what parses reads back the shapes it claims.
TEST(GgufDamageTest, EveryByteFlipIsHandled) {
  const std::string bytes = SmallWriter().Build();
  int parsed = 0;
  for (size_t i = 0; i < bytes.size(); ++i) {
    for (unsigned char mask : {0x01, 0x80, 0xFF}) {
      std::string damaged = bytes;
      damaged[i] = static_cast<char>(damaged[i] ^ mask);
      absl::StatusOr<GgufFile> f = GgufFile::Parse(damaged, "flip.gguf");
      if (!f.ok()) {
        EXPECT_THAT(std::string(f.status().message()),
                    StartsWith("flip.gguf: offset "));
        continue;
      }
      ++parsed;
      for (const GgufTensorInfo& t : f->tensors()) {
        absl::StatusOr<std::vector<float>> values = f->ReadF32(t.name);
        if (values.ok()) {
          EXPECT_EQ(values->size(), t.elements());
        } else {
          EXPECT_EQ(values.status().code(), absl::StatusCode::kUnimplemented);
        }
      }
    }
  }
  // Flips in string contents and tensor data leave a valid file.
  EXPECT_GT(parsed, 0);
}

// The fuzzer's seeds are valid files, so it starts from deep inside the
// parser.
TEST(GgufCorpusTest, SeedsParse) {
  DIR* dir = opendir(kCorpusDir);
  ASSERT_NE(dir, nullptr) << "cannot list " << kCorpusDir;
  int seeds = 0;
  while (dirent* entry = readdir(dir)) {
    const std::string name = entry->d_name;
    if (name == "." || name == "..") continue;
    ++seeds;
    absl::StatusOr<std::string> bytes =
        ReadFile(absl::StrCat(kCorpusDir, "/", name));
    ASSERT_TRUE(bytes.ok()) << bytes.status();
    EXPECT_LE(bytes->size(), 8192u) << name << ": keep seeds small";
    absl::StatusOr<GgufFile> f = GgufFile::Parse(*bytes, name);
    ASSERT_TRUE(f.ok()) << f.status();
    for (const GgufTensorInfo& t : f->tensors()) {
      if (!CanDequantize(t.type)) continue;
      EXPECT_TRUE(f->ReadF32(t.name).ok()) << name << " " << t.name;
    }
  }
  closedir(dir);
  EXPECT_GE(seeds, 4);
}

}  // namespace
}  // namespace kvcache::model
