// The key a node stores a chunk under. On a node with tenants every
// tenant's keys live in a namespace of their own: the stored key is a hash
// of the namespace and the key a worker sent, so two tenants' equal keys
// are different chunks, and nothing a worker sends can name another
// tenant's chunk. Nodes place and copy chunks by stored key, so cluster
// clients place by it too (a node tells each caller its namespace in
// NodeInfo.key_namespace).
#ifndef KVCACHE_CLUSTER_STORED_KEY_H_
#define KVCACHE_CLUSTER_STORED_KEY_H_

#include <string>

#include "absl/strings/string_view.h"

namespace kvcache::cluster {

// SHA-256("kvcache stored key v1" || decimal length of the namespace || ":"
// || namespace || key); `key` itself when the namespace is empty (a node
// without tenants, or a peer naming stored keys).
std::string StoredKey(absl::string_view name_space, absl::string_view key);

}  // namespace kvcache::cluster

#endif  // KVCACHE_CLUSTER_STORED_KEY_H_
