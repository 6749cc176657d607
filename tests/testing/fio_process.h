// fio, the reference the disk benchmarks measure against: one job of
// O_DIRECT reads through io_uring on a file, and the bytes and seconds its
// JSON report gives.
#ifndef KVCACHE_TESTS_TESTING_FIO_PROCESS_H_
#define KVCACHE_TESTS_TESTING_FIO_PROCESS_H_

#include <cstdint>
#include <string>

#include "absl/status/statusor.h"
#include "absl/time/time.h"

namespace kvcache::testing {

struct FioReadJob {
  std::string fio = "/usr/bin/fio";  // deploy/setup.sh installs it there
  std::string file;
  uint64_t bytes = 0;  // the first `bytes` of the file are read
  uint64_t block_bytes = 1 << 20;
  int queue_depth = 32;
  bool random = false;  // randread; otherwise sequential, from the start
  // Reads go on, wrapping around, for this long.
  absl::Duration duration = absl::Seconds(2);
  std::string report_path;  // where fio writes its JSON report
};

struct DiskReadResult {
  uint64_t bytes = 0;
  double seconds = 0;
  double GbPerSecond() const { return seconds > 0 ? bytes / seconds / 1e9 : 0; }
};

absl::StatusOr<DiskReadResult> RunFioRead(const FioReadJob& job);

}  // namespace kvcache::testing

#endif  // KVCACHE_TESTS_TESTING_FIO_PROCESS_H_
