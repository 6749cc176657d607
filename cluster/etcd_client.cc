#include "cluster/etcd_client.h"

#include <algorithm>
#include <nlohmann/json.hpp>
#include <utility>

#include "absl/strings/escaping.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "cluster/http_client.h"

namespace kvcache::cluster {
namespace {

using Json = nlohmann::json;

std::string Base64(absl::string_view bytes) {
  return absl::Base64Escape(bytes);
}

// The gateway writes int64 fields as JSON strings and omits zero values.
int64_t Int64Field(const Json& object, const char* name) {
  const auto it = object.find(name);
  if (it == object.end()) return 0;
  if (it->is_number_integer()) return it->get<int64_t>();
  int64_t value = 0;
  if (it->is_string() && absl::SimpleAtoi(it->get<std::string>(), &value)) {
    return value;
  }
  return 0;
}

absl::StatusOr<Json> ParseJson(absl::string_view text, absl::string_view what) {
  Json json = Json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (json.is_discarded() || !json.is_object()) {
    return absl::InternalError(
        absl::StrCat("etcd answered ", what, " with malformed JSON"));
  }
  return json;
}

// The smallest key greater than every key starting with `prefix`.
std::string PrefixEnd(absl::string_view prefix) {
  std::string end(prefix);
  while (!end.empty() && static_cast<unsigned char>(end.back()) == 0xff) {
    end.pop_back();
  }
  if (!end.empty()) end.back() = static_cast<char>(end.back() + 1);
  return end;
}

}  // namespace

absl::StatusOr<int64_t> ParseLeaseGrantReply(absl::string_view body) {
  absl::StatusOr<Json> json = ParseJson(body, "a lease grant");
  if (!json.ok()) return json.status();
  const int64_t id = Int64Field(*json, "ID");
  if (id == 0) return absl::InternalError("etcd granted a lease without an id");
  return id;
}

absl::Status ParseKeepAliveReply(absl::string_view body, int64_t lease) {
  absl::StatusOr<Json> json = ParseJson(body, "a lease keepalive");
  if (!json.ok()) return json.status();
  // An expired lease comes back without a TTL rather than as an error.
  const Json& result = json->contains("result") ? (*json)["result"] : *json;
  if (Int64Field(result, "TTL") <= 0) {
    return absl::NotFoundError(
        absl::StrCat("etcd lease ", lease, " has expired"));
  }
  return absl::OkStatus();
}

absl::StatusOr<std::vector<KeyValue>> ParseRangeReply(absl::string_view body,
                                                      int* skipped) {
  absl::StatusOr<Json> json = ParseJson(body, "a range");
  if (!json.ok()) return json.status();
  std::vector<KeyValue> kvs;
  if (skipped != nullptr) *skipped = 0;
  if (!json->contains("kvs")) return kvs;  // omitted when empty
  const Json& entries = (*json)["kvs"];
  if (!entries.is_array()) {
    return absl::InternalError(
        "etcd answered a range with \"kvs\" that is not a list");
  }
  for (const Json& kv : entries) {
    KeyValue out;
    const bool readable =
        kv.is_object() && kv.contains("key") && kv["key"].is_string() &&
        (!kv.contains("value") || kv["value"].is_string()) &&
        absl::Base64Unescape(kv["key"].get<std::string>(), &out.key) &&
        absl::Base64Unescape(kv.value("value", std::string()), &out.value);
    if (!readable) {
      if (skipped != nullptr) ++*skipped;
      continue;
    }
    kvs.push_back(std::move(out));
  }
  return kvs;
}

absl::Status ParseErrorReply(int http_status, absl::string_view body) {
  Json json = Json::parse(body, nullptr, /*allow_exceptions=*/false);
  int64_t code = static_cast<int>(absl::StatusCode::kUnknown);
  std::string message = std::string(body.substr(0, 200));
  if (json.is_object()) {
    // etcd reports gRPC codes, which share absl's numbering.
    code = Int64Field(json, "code");
    if (json.contains("message") && json["message"].is_string()) {
      message = json["message"].get<std::string>();
    }
  }
  // A reply that says OK, or a code gRPC does not define, is still an error:
  // the call failed.
  if (code <= 0 ||
      code > static_cast<int>(absl::StatusCode::kUnauthenticated)) {
    code = static_cast<int>(absl::StatusCode::kUnknown);
  }
  return absl::Status(static_cast<absl::StatusCode>(code),
                      absl::StrCat("etcd (HTTP ", http_status, "): ", message));
}

EtcdClient::EtcdClient(EtcdOptions options) : options_(std::move(options)) {}

absl::StatusOr<std::string> EtcdClient::Call(absl::string_view path,
                                             const std::string& request) {
  if (options_.endpoints.empty()) {
    return absl::FailedPreconditionError("no etcd endpoints configured");
  }
  std::vector<std::string> failures;
  const size_t first = preferred_.load(std::memory_order_relaxed);
  for (size_t i = 0; i < options_.endpoints.size(); ++i) {
    const size_t index = (first + i) % options_.endpoints.size();
    absl::StatusOr<HttpResponse> response =
        HttpPost(options_.endpoints[index], path, request, options_.timeout);
    if (!response.ok()) {
      failures.push_back(std::string(response.status().message()));
      continue;
    }
    preferred_.store(index, std::memory_order_relaxed);
    if (response->status != 200) {
      return ParseErrorReply(response->status, response->body);
    }
    return std::move(response->body);
  }
  return absl::UnavailableError(absl::StrCat(
      "etcd is unreachable (", absl::StrJoin(failures, "; "), ")"));
}

absl::StatusOr<int64_t> EtcdClient::GrantLease(absl::Duration ttl) {
  const int64_t seconds = std::max<int64_t>(1, absl::ToInt64Seconds(ttl));
  absl::StatusOr<std::string> body =
      Call("/v3/lease/grant", Json{{"TTL", std::to_string(seconds)}}.dump());
  if (!body.ok()) return body.status();
  return ParseLeaseGrantReply(*body);
}

absl::Status EtcdClient::KeepAlive(int64_t lease) {
  absl::StatusOr<std::string> body =
      Call("/v3/lease/keepalive", Json{{"ID", std::to_string(lease)}}.dump());
  if (!body.ok()) return body.status();
  return ParseKeepAliveReply(*body, lease);
}

absl::Status EtcdClient::RevokeLease(int64_t lease) {
  return Call("/v3/lease/revoke", Json{{"ID", std::to_string(lease)}}.dump())
      .status();
}

absl::Status EtcdClient::Put(absl::string_view key, absl::string_view value,
                             int64_t lease) {
  Json request = {{"key", Base64(key)}, {"value", Base64(value)}};
  if (lease != 0) request["lease"] = std::to_string(lease);
  return Call("/v3/kv/put", request.dump()).status();
}

absl::StatusOr<std::vector<KeyValue>> EtcdClient::RangePrefix(
    absl::string_view prefix, int* skipped) {
  absl::StatusOr<std::string> body = Call(
      "/v3/kv/range",
      Json{{"key", Base64(prefix)}, {"range_end", Base64(PrefixEnd(prefix))}}
          .dump());
  if (!body.ok()) return body.status();
  return ParseRangeReply(*body, skipped);
}

}  // namespace kvcache::cluster
