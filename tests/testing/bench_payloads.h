// Incompressible payloads for the storage and cluster benchmarks, like codec
// output, without allocating a buffer per chunk.
#ifndef KVCACHE_TESTS_TESTING_BENCH_PAYLOADS_H_
#define KVCACHE_TESTS_TESTING_BENCH_PAYLOADS_H_

#include <cstdint>
#include <cstring>
#include <random>
#include <string>

#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"

namespace kvcache::testing {

// Random bytes that payloads are cut from, at offsets that differ from chunk
// to chunk.
class Payloads {
 public:
  explicit Payloads(uint64_t bytes) : pool_(bytes, '\0') {
    std::mt19937_64 rng(20240607);
    for (uint64_t i = 0; i + 8 <= bytes; i += 8) {
      const uint64_t word = rng();
      std::memcpy(&pool_[i], &word, sizeof(word));
    }
  }

  // `size` bytes (at most the pool's) for chunk `index`.
  absl::string_view Chunk(uint64_t index, uint64_t size) const {
    const uint64_t offset = index * 1000003 % (pool_.size() - size + 1);
    return absl::string_view(pool_).substr(offset, size);
  }

 private:
  std::string pool_;
};

// "4 MiB", "256 KiB".
inline std::string SizeName(uint64_t bytes) {
  constexpr uint64_t kKiB = 1024, kMiB = 1024 * kKiB;
  return bytes >= kMiB ? absl::StrCat(bytes / kMiB, " MiB")
                       : absl::StrCat(bytes / kKiB, " KiB");
}

}  // namespace kvcache::testing

#endif  // KVCACHE_TESTS_TESTING_BENCH_PAYLOADS_H_
