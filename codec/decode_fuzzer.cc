// libFuzzer entry point for the decoder. Build and run with
// tests/fuzz/run_fuzz.sh codec. Each input is decoded as given and again
// with its trailing CRC32C recomputed, so mutations also reach the table,
// directory and rANS parsers behind the checksum.
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "codec/codec.h"
#include "codec/crc32c.h"
#include "codec/fuzz_profile.h"

namespace {

// Keeps one input's output allocation small; larger shapes are still
// parsed by PeekShape.
constexpr size_t kMaxFuzzValues = size_t{1} << 22;

// Transform streams decode with the fuzz profile (the seeds' profile).
void DecodeBounded(absl::string_view stream) {
  absl::StatusOr<kvcache::codec::ChunkShape> shape =
      kvcache::codec::PeekShape(stream);
  if (!shape.ok() || shape->NumValues() > kMaxFuzzValues) return;
  std::vector<uint16_t> out(shape->NumValues());
  (void)kvcache::codec::DecodeChunk(stream, absl::MakeSpan(out),
                                    &kvcache::codec::FuzzProfile());
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string input(reinterpret_cast<const char*>(data), size);
  DecodeBounded(input);
  if (size >= 4) {
    std::string fixed = input;
    const uint32_t crc =
        kvcache::codec::Crc32c(absl::string_view(fixed).substr(0, size - 4));
    for (int i = 0; i < 4; ++i) {
      fixed[size - 4 + i] = static_cast<char>(crc >> (8 * i));
    }
    DecodeBounded(fixed);
  }
  return 0;
}
