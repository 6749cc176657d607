// The disk's own sequential read rate, for benchmarks on hosts without fio:
// the same job as fio's sequential read (O_DIRECT, io_uring, 1 MiB
// requests, 32 in flight), issued by this process.
#ifndef KVCACHE_TESTS_TESTING_RAW_DISK_READ_H_
#define KVCACHE_TESTS_TESTING_RAW_DISK_READ_H_

#include <cstdint>
#include <string>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "tests/testing/fio_process.h"

namespace kvcache::testing {

// Reads the first `bytes` of `file` (rounded down to 4 KiB) from the start,
// wrapping around, for `duration`.
absl::StatusOr<DiskReadResult> RawSequentialRead(
    const std::string& file, uint64_t bytes,
    absl::Duration duration = absl::Seconds(2));

}  // namespace kvcache::testing

#endif  // KVCACHE_TESTS_TESTING_RAW_DISK_READ_H_
