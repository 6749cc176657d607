// Writes small valid codec streams (every level, both dtypes, a few shapes)
// into a directory, as the seed corpus for the decoder fuzzer and the
// corpus replay test. Usage: make_fuzz_corpus OUTDIR
#include <cstdio>
#include <fstream>
#include <string>

#include "absl/strings/str_cat.h"
#include "codec/codec.h"
#include "codec/fuzz_profile.h"
#include "codec/test_data.h"

int main(int argc, char** argv) {
  using namespace kvcache::codec;
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s OUTDIR\n", argv[0]);
    return 2;
  }
  const ChunkShape shapes[] = {
      {1, 1, 1, 8, DType::kFloat16},
      {2, 20, 2, 8, DType::kFloat16},
      {1, 33, 1, 64, DType::kBFloat16},
  };
  for (const ChunkShape& s : shapes) {
    for (Level level : {Level::kLossless, Level::kNearLossless, Level::kHigh,
                        Level::kDefault, Level::kCompact, Level::kTiny}) {
      absl::StatusOr<std::string> enc =
          EncodeChunk(s, SyntheticChunk(s, s.tokens), level);
      if (!enc.ok()) {
        std::fprintf(stderr, "%s\n", enc.status().ToString().c_str());
        return 1;
      }
      const std::string path = absl::StrCat(
          argv[1], "/valid_", s.layers, "x", s.tokens, "x", s.kv_heads, "x",
          s.head_dim, "_", s.dtype == DType::kFloat16 ? "f16" : "bf16", "_",
          LevelName(level));
      std::ofstream(path, std::ios::binary) << *enc;
    }
  }
  // Transform streams with the fuzz profile, at a first position inside
  // the exactly stored ones and past them.
  for (uint32_t tokens : {1u, 20u}) {
    ChunkShape s = kFuzzProfileShape;
    s.tokens = tokens;
    for (Level level : {Level::kProfileFine, Level::kProfileSmall}) {
      for (uint32_t position : {0u, 77u}) {
        EncodeOptions options;
        options.profile = &FuzzProfile();
        options.first_position = position;
        absl::StatusOr<std::string> enc =
            EncodeChunk(s, SyntheticChunk(s, tokens), level, options);
        if (!enc.ok()) {
          std::fprintf(stderr, "%s\n", enc.status().ToString().c_str());
          return 1;
        }
        std::ofstream(absl::StrCat(argv[1], "/valid_transform_", s.layers, "x",
                                   tokens, "x", s.kv_heads, "x", s.head_dim,
                                   "_", LevelName(level), "_at", position),
                      std::ios::binary)
            << *enc;
      }
    }
  }
  return 0;
}
