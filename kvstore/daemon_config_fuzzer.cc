// libFuzzer entry point for kvcached's configuration parser. Built and run by
// tests/fuzz/run_fuzz.sh daemon_config. Each input is a configuration file;
// whatever it holds, parsing and validation must return a status, and a
// configuration that parses must print (ConfigToText, as --print-config
// does) to text that parses back to the same configuration.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string>

#include "kvstore/daemon_config.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using kvcache::kvstore::ConfigToText;
  using kvcache::kvstore::MergeConfigText;
  const absl::string_view text(reinterpret_cast<const char*>(data), size);
  kvcache::v1::DaemonConfig config;
  if (!MergeConfigText(text, "fuzz.textproto", config).ok()) return 0;
  (void)kvcache::kvstore::ValidateConfig(config);
  const std::string printed = ConfigToText(config);
  kvcache::v1::DaemonConfig reparsed;
  if (!MergeConfigText(printed, "printed", reparsed).ok() ||
      ConfigToText(reparsed) != printed) {
    std::abort();
  }
  return 0;
}
