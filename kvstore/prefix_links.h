// Which held chunks other held chunks extend, for prefix-aware eviction: a
// chunk no held chunk extends is a leaf and goes first, so a cached prompt
// shrinks from its end instead of losing the chunks the rest depends on.
//
// Thread-compatible: the tier holding it guards it with its own lock.
#ifndef KVCACHE_KVSTORE_PREFIX_LINKS_H_
#define KVCACHE_KVSTORE_PREFIX_LINKS_H_

#include <cstdint>
#include <string>

#include "absl/container/flat_hash_map.h"
#include "absl/strings/string_view.h"

namespace kvcache::kvstore {

class PrefixLinks {
 public:
  // A chunk of `key` extending `parent` (empty: none) arrived or left. A
  // chunk naming itself is ignored: it would never be a leaf.
  void Add(absl::string_view key, absl::string_view parent) {
    if (!parent.empty() && parent != key) ++children_[parent];
  }
  void Remove(absl::string_view key, absl::string_view parent) {
    if (parent.empty() || parent == key) return;
    auto it = children_.find(parent);
    if (it != children_.end() && --it->second == 0) children_.erase(it);
  }

  // Whether some held chunk extends `key`.
  bool Extended(absl::string_view key) const { return children_.contains(key); }

 private:
  absl::flat_hash_map<std::string, uint32_t> children_;
};

}  // namespace kvcache::kvstore

#endif  // KVCACHE_KVSTORE_PREFIX_LINKS_H_
