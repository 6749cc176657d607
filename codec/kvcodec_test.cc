// Runs the kvcodec binary on the real stories260K dumps, as a user would.
#include <sys/wait.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "codec/codec.h"
#include "codec/half.h"
#include "codec/kv_dump.h"
#include "codec/profile.h"
#include "gtest/gtest.h"

namespace kvcache::codec {
namespace {

// The bounds codec/README.md lists for K and V relative L2 error.
const std::map<Level, double> kErrorBound = {
    {Level::kNearLossless, 0.006}, {Level::kHigh, 0.08},
    {Level::kDefault, 0.35},       {Level::kCompact, 0.45},
    {Level::kTiny, 0.65},
};

std::string Binary() {
  const char* srcdir = std::getenv("TEST_SRCDIR");
  const char* workspace = std::getenv("TEST_WORKSPACE");
  if (srcdir && workspace) {
    return absl::StrCat(srcdir, "/", workspace, "/codec/kvcodec");
  }
  return "codec/kvcodec";
}

std::string TempPath(const std::string& name) {
  const char* dir = std::getenv("TEST_TMPDIR");
  return std::string(dir ? dir : "/tmp") + "/" + name;
}

struct Result {
  int exit_code = -1;
  std::string output;  // stdout and stderr together.
};

// Runs kvcodec with `args` (already shell-quoted where needed).
Result Kvcodec(const std::string& args) {
  const std::string command = absl::StrCat(Binary(), " ", args, " 2>&1");
  FILE* pipe = popen(command.c_str(), "r");
  Result r;
  if (pipe == nullptr) return r;
  char buffer[4096];
  for (size_t n; (n = fread(buffer, 1, sizeof(buffer), pipe)) > 0;) {
    r.output.append(buffer, n);
  }
  const int status = pclose(pipe);
  r.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  return r;
}

std::string ReadAll(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

void WriteAll(const std::string& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out << bytes;
}

struct Dump {
  std::string manifest;
  std::string kv_path;  // The dump's own .kv file.
  KvDump dump;
};

std::vector<Dump> RealDumps() {
  std::vector<Dump> out;
  absl::StatusOr<std::string> dir = FindKvDataDir();
  EXPECT_TRUE(dir.ok()) << dir.status();
  if (!dir.ok()) return out;
  absl::StatusOr<std::vector<std::string>> manifests = ListManifests(*dir);
  EXPECT_TRUE(manifests.ok() && !manifests->empty()) << *dir;
  if (!manifests.ok()) return out;
  for (const std::string& m : *manifests) {
    absl::StatusOr<KvDump> dump = LoadKvDump(m);
    EXPECT_TRUE(dump.ok()) << dump.status();
    if (!dump.ok()) continue;
    out.push_back({m, absl::StrCat(*dir, "/", dump->name, ".kv"), *dump});
  }
  return out;
}

// Encodes, expecting success; returns the .kvc path.
std::string Encode(const Dump& d, const std::string& flags,
                   const std::string& name) {
  const std::string kvc = TempPath(name + ".kvc");
  const Result r = Kvcodec(
      absl::StrCat("encode ", flags, " '", d.manifest, "' '", kvc, "'"));
  EXPECT_EQ(r.exit_code, 0) << r.output;
  return kvc;
}

std::string Decode(const std::string& kvc, const std::string& name) {
  const std::string kv = TempPath(name + ".kv");
  const Result r = Kvcodec(absl::StrCat("decode '", kvc, "' '", kv, "'"));
  EXPECT_EQ(r.exit_code, 0) << r.output;
  return kv;
}

// K (kv = 0) or V (kv = 1) relative L2 error of a decoded .kv file.
double RelativeL2(const KvDump& dump, const std::string& decoded, int kv) {
  const size_t plane =
      size_t{dump.shape.tokens} * dump.shape.kv_heads * dump.shape.head_dim;
  double err = 0, ref = 0;
  for (size_t p = kv; p < 2 * size_t{dump.shape.layers}; p += 2) {
    for (size_t i = p * plane; i < (p + 1) * plane; ++i) {
      const uint16_t bits =
          static_cast<uint16_t>(static_cast<uint8_t>(decoded[2 * i]) |
                                static_cast<uint8_t>(decoded[2 * i + 1]) << 8);
      const double a = HalfToFloat(dump.kv[i]);
      const double b = HalfToFloat(bits);
      err += (a - b) * (a - b);
      ref += a * a;
    }
  }
  return std::sqrt(err / ref);
}

// The chunk rows of `info` output: {first_token, tokens, level} each.
struct InfoRow {
  uint32_t first_token = 0, tokens = 0;
  std::string level;
};
std::vector<InfoRow> InfoRows(const std::string& output, uint32_t* total) {
  std::vector<InfoRow> rows;
  for (absl::string_view line : absl::StrSplit(output, '\n')) {
    const std::vector<absl::string_view> cols =
        absl::StrSplit(line, ' ', absl::SkipEmpty());
    uint32_t index = 0;
    if (cols.size() >= 4 && absl::SimpleAtoi(cols[0], &index)) {
      EXPECT_EQ(index, rows.size()) << line;
      InfoRow row;
      EXPECT_TRUE(absl::SimpleAtoi(cols[1], &row.first_token)) << line;
      EXPECT_TRUE(absl::SimpleAtoi(cols[2], &row.tokens)) << line;
      row.level = std::string(cols[3]);
      rows.push_back(row);
    } else if (cols.size() >= 2 && cols[0] == "total") {
      EXPECT_TRUE(absl::SimpleAtoi(cols[1], total)) << line;
    }
  }
  return rows;
}

TEST(KvcodecTest, LosslessRoundTripIsByteIdentical) {
  const std::vector<Dump> dumps = RealDumps();
  ASSERT_EQ(dumps.size(), 3u);
  for (const Dump& d : dumps) {
    SCOPED_TRACE(d.manifest);
    const std::string want = ReadAll(d.kv_path);
    ASSERT_EQ(want.size(), d.dump.shape.RawBytes());
    const std::string kvc = Encode(d, "--level=lossless", "lossless");
    const std::string got = ReadAll(Decode(kvc, "lossless"));
    EXPECT_TRUE(got == want) << "decoded .kv differs from " << d.kv_path;
    EXPECT_LT(ReadAll(kvc).size(), want.size());
  }
}

TEST(KvcodecTest, LossyLevelsDecodeWithinTheirBounds) {
  for (const Dump& d : RealDumps()) {
    size_t previous_bytes = d.dump.shape.RawBytes();
    for (const auto& [level, bound] : kErrorBound) {
      const std::string name(LevelName(level));
      SCOPED_TRACE(absl::StrCat(d.manifest, " ", name));
      const std::string kvc = Encode(d, "--level=" + name, name);
      const std::string decoded = ReadAll(Decode(kvc, name));
      ASSERT_EQ(decoded.size(), d.dump.shape.RawBytes());
      const double k = RelativeL2(d.dump, decoded, 0);
      const double v = RelativeL2(d.dump, decoded, 1);
      EXPECT_LE(k, bound);
      EXPECT_LE(v, bound);
      EXPECT_GT(k + v, 0.0) << "a lossy level came back exact";
      // Each level down the list trades error for size.
      const size_t bytes = ReadAll(kvc).size();
      EXPECT_LT(bytes, previous_bytes);
      previous_bytes = bytes;
    }
  }
}

// calibrate makes a profile from one dump; the transform levels encode
// another with it and decode only with it.
TEST(KvcodecTest, TransformLevelsCalibrateEncodeAndDecodeWithAProfile) {
  const std::vector<Dump> dumps = RealDumps();
  ASSERT_EQ(dumps.size(), 3u);
  const std::string profile = TempPath("stories.kvp");
  Result r = Kvcodec(absl::StrCat("calibrate --rope_theta=10000 '",
                                  dumps[1].manifest, "' '", dumps[2].manifest,
                                  "' '", profile, "'"));
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_TRUE(absl::StrContains(r.output, "from 1024 tokens")) << r.output;
  const absl::StatusOr<ModelProfile> parsed = ParseProfile(ReadAll(profile));
  ASSERT_TRUE(parsed.ok()) << parsed.status();

  const Dump& d = dumps[0];
  const std::string kvc =
      Encode(d, absl::StrCat("--level=profile-balanced --profile='", profile,
                             "'"),
             "transform");
  r = Kvcodec(absl::StrCat("info '", kvc, "'"));
  EXPECT_TRUE(absl::StrContains(
      r.output, "needs model profile " + ProfileIdHex(parsed->id)))
      << r.output;
  const std::string kv = TempPath("transform.kv");
  r = Kvcodec(absl::StrCat("decode '", kvc, "' '", kv, "'"));
  EXPECT_EQ(r.exit_code, 1) << r.output;
  EXPECT_TRUE(absl::StrContains(r.output, ProfileIdHex(parsed->id)))
      << r.output;
  r = Kvcodec(
      absl::StrCat("decode --profile='", profile, "' '", kvc, "' '", kv, "'"));
  ASSERT_EQ(r.exit_code, 0) << r.output;
  const std::string decoded = ReadAll(kv);
  EXPECT_LT(RelativeL2(d.dump, decoded, 0), 0.3);
  EXPECT_LT(RelativeL2(d.dump, decoded, 1), 0.3);
  // Usage errors: a transform level without a profile, calibrate without
  // its RoPE base, a damaged profile.
  r = Kvcodec(absl::StrCat("encode --level=profile-fine '", d.manifest, "' '",
                           TempPath("x.kvc"), "'"));
  EXPECT_EQ(r.exit_code, 2) << r.output;
  r = Kvcodec(absl::StrCat("calibrate '", d.manifest, "' '",
                           TempPath("x.kvp"), "'"));
  EXPECT_EQ(r.exit_code, 2) << r.output;
  WriteAll(TempPath("bad.kvp"), ReadAll(profile).substr(0, 100));
  r = Kvcodec(absl::StrCat("decode --profile='", TempPath("bad.kvp"), "' '",
                           kvc, "' '", kv, "'"));
  EXPECT_EQ(r.exit_code, 1) << r.output;
}

TEST(KvcodecTest, DefaultLevelIsTheCodecsDefault) {
  const std::vector<Dump> dumps = RealDumps();
  ASSERT_FALSE(dumps.empty());
  const std::string kvc = Encode(dumps[0], "", "plain");
  const Result info = Kvcodec(absl::StrCat("info '", kvc, "'"));
  ASSERT_EQ(info.exit_code, 0) << info.output;
  uint32_t total = 0;
  for (const InfoRow& row : InfoRows(info.output, &total)) {
    EXPECT_EQ(row.level, LevelName(kDefaultLevel));
  }
}

TEST(KvcodecTest, UnevenLastChunkRoundTrips) {
  for (const Dump& d : RealDumps()) {
    SCOPED_TRACE(d.manifest);
    const std::string kvc =
        Encode(d, "--level=lossless --chunk_tokens=100", "uneven");
    EXPECT_TRUE(ReadAll(Decode(kvc, "uneven")) == ReadAll(d.kv_path));
    const Result info = Kvcodec(absl::StrCat("info '", kvc, "'"));
    ASSERT_EQ(info.exit_code, 0) << info.output;
    uint32_t total = 0;
    const std::vector<InfoRow> rows = InfoRows(info.output, &total);
    ASSERT_EQ(rows.size(), 6u) << info.output;  // 5 x 100 + 12 tokens.
    EXPECT_EQ(rows[5].first_token, 500u);
    EXPECT_EQ(rows[5].tokens, 12u);
    EXPECT_EQ(total, 512u);
  }
}

TEST(KvcodecTest, OneChunkWhenChunkTokensExceedTheDump) {
  const std::vector<Dump> dumps = RealDumps();
  ASSERT_FALSE(dumps.empty());
  const std::string kvc =
      Encode(dumps[0], "--chunk_tokens=1000 --level=high", "one");
  const Result info = Kvcodec(absl::StrCat("info '", kvc, "'"));
  ASSERT_EQ(info.exit_code, 0) << info.output;
  uint32_t total = 0;
  const std::vector<InfoRow> rows = InfoRows(info.output, &total);
  ASSERT_EQ(rows.size(), 1u) << info.output;
  EXPECT_EQ(rows[0].tokens, 512u);
  EXPECT_EQ(rows[0].level, "high");
}

TEST(KvcodecTest, InfoListsEveryChunkAndToken) {
  for (const Dump& d : RealDumps()) {
    SCOPED_TRACE(d.manifest);
    const std::string kvc = Encode(d, "--level=compact", "info");
    const Result info = Kvcodec(absl::StrCat("info '", kvc, "'"));
    ASSERT_EQ(info.exit_code, 0) << info.output;
    uint32_t total = 0;
    const std::vector<InfoRow> rows = InfoRows(info.output, &total);
    ASSERT_EQ(rows.size(), 2u) << info.output;
    EXPECT_EQ(rows[0].first_token, 0u);
    EXPECT_EQ(rows[1].first_token, 256u);
    EXPECT_EQ(rows[0].tokens + rows[1].tokens, 512u);
    EXPECT_EQ(rows[1].level, "compact");
    EXPECT_EQ(total, 512u);
    EXPECT_TRUE(absl::StrContains(info.output, "5x256x4x8")) << info.output;
    EXPECT_TRUE(absl::StrContains(info.output, "float16")) << info.output;
  }
}

// A damaged input fails with exit 1, names the file and leaves no output.
void ExpectRejected(const std::string& kvc, absl::string_view why) {
  const std::string out = TempPath("rejected.kv");
  std::filesystem::remove(out);
  for (const std::string& args :
       {absl::StrCat("decode '", kvc, "' '", out, "'"),
        absl::StrCat("info '", kvc, "'")}) {
    const Result r = Kvcodec(args);
    EXPECT_EQ(r.exit_code, 1) << args << "\n" << r.output;
    EXPECT_TRUE(absl::StrContains(r.output, kvc + ": ")) << r.output;
    EXPECT_TRUE(absl::StrContains(r.output, why)) << r.output;
  }
  EXPECT_FALSE(std::filesystem::exists(out));
}

TEST(KvcodecTest, TruncatedFileFailsWithExit1) {
  const std::vector<Dump> dumps = RealDumps();
  ASSERT_FALSE(dumps.empty());
  const std::string whole = ReadAll(Encode(dumps[0], "", "whole"));
  for (size_t n : {size_t{0}, size_t{10}, size_t{40}, whole.size() / 2,
                   whole.size() - 1}) {
    SCOPED_TRACE(n);
    const std::string kvc = TempPath("truncated.kvc");
    WriteAll(kvc, whole.substr(0, n));
    ExpectRejected(kvc, "truncated");
  }
}

TEST(KvcodecTest, BitFlipFailsWithExit1) {
  const std::vector<Dump> dumps = RealDumps();
  ASSERT_FALSE(dumps.empty());
  const std::string whole = ReadAll(Encode(dumps[0], "", "whole"));
  // The magic, the header's shape, the index, a stream's header and
  // payload, and the last stream's checksum.
  const std::pair<size_t, absl::string_view> flips[] = {
      {0, "bad magic"},
      {9, "index checksum mismatch"},
      {40, "index checksum mismatch"},
      {70, "chunk 0"},
      {whole.size() / 2, "checksum mismatch"},
      {whole.size() - 1, "chunk 1 (tokens 256..512): checksum mismatch"},
  };
  for (const auto& [at, why] : flips) {
    SCOPED_TRACE(at);
    std::string damaged = whole;
    damaged[at] ^= 0x04;
    const std::string kvc = TempPath("flipped.kvc");
    WriteAll(kvc, damaged);
    ExpectRejected(kvc, why);
  }
}

TEST(KvcodecTest, BadUsageExits2) {
  const Result none = Kvcodec("");
  EXPECT_EQ(none.exit_code, 2);
  EXPECT_TRUE(absl::StartsWith(none.output, "usage: kvcodec")) << none.output;
  const Result help = Kvcodec("--help");
  EXPECT_EQ(help.exit_code, 2);
  EXPECT_TRUE(absl::StartsWith(help.output, "usage: kvcodec")) << help.output;

  const std::vector<Dump> dumps = RealDumps();
  ASSERT_FALSE(dumps.empty());
  const std::string m = absl::StrCat("'", dumps[0].manifest, "'");
  const std::string out = TempPath("usage.kvc");
  const std::pair<std::string, absl::string_view> cases[] = {
      {"compress a b", "unknown command 'compress'"},
      {absl::StrCat("encode --level=fastest ", m, " ", out),
       "unknown level \"fastest\""},
      {absl::StrCat("encode --chunk_tokens=0 ", m, " ", out),
       "--chunk_tokens=0"},
      {absl::StrCat("encode --chunk_tokens=12x ", m, " ", out),
       "--chunk_tokens=12x"},
      {absl::StrCat("encode --chunk_tokens=16777217 ", m, " ", out),
       "--chunk_tokens=16777217"},
      {absl::StrCat("encode --verbose ", m, " ", out), "unknown flag"},
      {absl::StrCat("encode ", m), "encode takes"},
      {absl::StrCat("encode ", m, " ", out, " extra"), "encode takes"},
      {"decode in.kvc", "decode takes"},
      {"decode --level=tiny in.kvc out.kv", "are for encode"},
      {"info", "info takes"},
  };
  for (const auto& [args, why] : cases) {
    const Result r = Kvcodec(args);
    EXPECT_EQ(r.exit_code, 2) << args << "\n" << r.output;
    EXPECT_TRUE(absl::StrContains(r.output, why)) << args << "\n" << r.output;
  }
  EXPECT_FALSE(std::filesystem::exists(out));
}

TEST(KvcodecTest, MissingInputExits1) {
  const Result r =
      Kvcodec(absl::StrCat("info '", TempPath("no-such.kvc"), "'"));
  EXPECT_EQ(r.exit_code, 1) << r.output;
  EXPECT_TRUE(absl::StrContains(r.output, "no-such.kvc")) << r.output;
  const Result e = Kvcodec(absl::StrCat("encode '", TempPath("no.json"), "' '",
                                        TempPath("x.kvc"), "'"));
  EXPECT_EQ(e.exit_code, 1) << e.output;
}

}  // namespace
}  // namespace kvcache::codec
