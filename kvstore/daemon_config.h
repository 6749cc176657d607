// Loading and checking kvcached's configuration.
//
// The schema, with every field's default, is proto/kvcache/v1/config.proto.
// A configuration is a text-format DaemonConfig file, then command-line
// overrides in the same syntax applied on top, then validation. Errors name
// the file, line and field so an operator can fix them.
#ifndef KVCACHE_KVSTORE_DAEMON_CONFIG_H_
#define KVCACHE_KVSTORE_DAEMON_CONFIG_H_

#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "kvcache/v1/config.pb.h"

namespace kvcache::kvstore {

// Parses `text` (text-format DaemonConfig) on top of `config`. `origin` names
// the text in error messages (a file path, or "--set"). INVALID_ARGUMENT with
// the origin, line and column on a syntax error or an unknown field.
absl::Status MergeConfigText(absl::string_view text, absl::string_view origin,
                             v1::DaemonConfig& config);

// Checks values the schema cannot (ranges, address shape). INVALID_ARGUMENT
// naming the field otherwise.
absl::Status ValidateConfig(const v1::DaemonConfig& config);

// Reads `path` (empty: no file, all defaults), applies each of `overrides`
// in order, and validates the result.
absl::StatusOr<v1::DaemonConfig> LoadConfig(
    const std::string& path, const std::vector<std::string>& overrides);

// Whether "host:port" names a loopback host (127.0.0.0/8, ::1, localhost):
// reachable from this host only.
bool IsLoopbackAddress(absl::string_view address);

// The configuration as text-format, every field spelled out with its
// effective value (defaults included).
std::string ConfigToText(const v1::DaemonConfig& config);

}  // namespace kvcache::kvstore

#endif  // KVCACHE_KVSTORE_DAEMON_CONFIG_H_
