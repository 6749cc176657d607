#include "tests/testing/fio_process.h"

#include <fstream>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "nlohmann/json.hpp"
#include "tests/testing/daemon_process.h"

namespace kvcache::testing {

absl::StatusOr<DiskReadResult> RunFioRead(const FioReadJob& job) {
  absl::StatusOr<DaemonProcess> fio = DaemonProcess::Spawn(
      job.fio, {"--name=read", "--filename=" + job.file,
                absl::StrCat("--size=", job.bytes),
                job.random ? "--rw=randread" : "--rw=read",
                absl::StrCat("--bs=", job.block_bytes), "--direct=1",
                "--ioengine=io_uring",
                absl::StrCat("--iodepth=", job.queue_depth), "--time_based",
                absl::StrCat("--runtime=",
                             absl::ToInt64Milliseconds(job.duration), "ms"),
                "--output-format=json", "--output=" + job.report_path});
  if (!fio.ok()) return fio.status();
  absl::StatusOr<int> exit_code =
      fio->WaitForExit(job.duration + absl::Minutes(1));
  if (!exit_code.ok()) return exit_code.status();
  if (*exit_code != 0) {
    return absl::InternalError(absl::StrCat("fio exited with ", *exit_code));
  }
  try {
    const nlohmann::json report =
        nlohmann::json::parse(std::ifstream(job.report_path));
    const nlohmann::json& read = report.at("jobs").at(0).at("read");
    DiskReadResult result;
    result.bytes = read.at("io_bytes").get<uint64_t>();
    result.seconds = read.at("runtime").get<double>() / 1e3;
    return result;
  } catch (const nlohmann::json::exception& e) {
    return absl::InternalError(absl::StrCat("cannot read fio's report ",
                                            job.report_path, ": ", e.what()));
  }
}

}  // namespace kvcache::testing
