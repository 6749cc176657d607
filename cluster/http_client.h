// A minimal HTTP/1.1 client for the JSON requests etcd's v3 gateway takes.
//
// One POST per connection (Connection: close) over plain TCP, with one
// deadline covering connect, send and receive, so a dead or hung endpoint
// costs at most `timeout`. Reads fixed-length and chunked bodies. Enough for
// etcd's unary calls; not a general HTTP client (no TLS, no redirects).
// Thread-safe: it keeps no state between calls.
#ifndef KVCACHE_CLUSTER_HTTP_CLIENT_H_
#define KVCACHE_CLUSTER_HTTP_CLIENT_H_

#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"

namespace kvcache::cluster {

struct HttpResponse {
  int status = 0;    // e.g. 200
  std::string body;  // decoded (chunked transfer encoding removed)
};

// POSTs `body` (JSON) to http://`host_port``path`. UNAVAILABLE naming the
// endpoint if it cannot be reached or the connection breaks;
// DEADLINE_EXCEEDED if it does not answer within `timeout`. Any HTTP status
// is returned as a response, not an error.
absl::StatusOr<HttpResponse> HttpPost(absl::string_view host_port,
                                      absl::string_view path,
                                      absl::string_view body,
                                      absl::Duration timeout);

}  // namespace kvcache::cluster

#endif  // KVCACHE_CLUSTER_HTTP_CLIENT_H_
