// The order in which one storage tier gives up its chunks, kept per owner
// (tenant), with each owner's bytes in the tier against its quota there.
//
// Every chunk is in the tier-wide recency list (all(): least recently used
// first) and in one eviction queue: its owner's own if the owner has a quota
// in the tier, else the queue shared by every owner without one (chunks with
// no owner among them). A tenant at its quota makes room among its own
// chunks by walking its own queue, never by scanning the whole tier.
//
// Room for a chunk of owner O is taken, in this order, from
//   1. owners holding more than their quota (after a restart with a lower
//      quota, say), each only down to its quota;
//   2. the chunks of owners without a quota in the tier;
//   3. O's own chunks;
// and never from another owner with a quota that holds no more than it. So
// a tenant's chunks within its quota are evicted only to make room for that
// tenant's own chunks; when quotas sum to at most the tier's capacity, a
// tenant within its quota also always finds room (unless pins, readers or
// fragmentation hold the space).
//
// Each queue is offered twice: first for chunks no other held chunk extends
// (prefix-aware eviction: the caller knows the links and skips the others),
// least recently used first, then for any chunk.
//
// Thread-compatible: the tier guards it with its own lock.
#ifndef KVCACHE_KVSTORE_EVICTION_ORDER_H_
#define KVCACHE_KVSTORE_EVICTION_ORDER_H_

#include <cstdint>
#include <list>
#include <string>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/container/node_hash_map.h"
#include "absl/functional/function_ref.h"
#include "absl/strings/string_view.h"
#include "kvstore/chunk_ref.h"

namespace kvcache::kvstore {

// Bytes of chunk data each owner may hold in one tier. An owner not listed,
// or listed with 0, has no quota there.
using OwnerQuotas = absl::flat_hash_map<std::string, uint64_t>;

class EvictionOrder {
 private:
  struct Owner;

 public:
  using Queue = std::list<std::string>;

  // Where a chunk sits; valid until the chunk is removed.
  struct Place {
    Owner* owner = nullptr;
    Queue::iterator in_all;
    Queue::iterator in_queue;
  };

  // Offered a held chunk's key, in the pass for chunks no other held chunk
  // extends (`leaves_only`) or in the pass for any. It may Remove that chunk,
  // and no other; `key` is invalid afterwards. Returns whether to go on.
  using Visitor =
      absl::FunctionRef<bool(const std::string& key, bool leaves_only)>;

  explicit EvictionOrder(const OwnerQuotas& quotas = {});

  EvictionOrder(const EvictionOrder&) = delete;
  EvictionOrder& operator=(const EvictionOrder&) = delete;

  // A chunk of `bytes` owned by `owner` (empty: none) arrived, the most
  // recently used.
  Place Add(const std::string& key, const std::string& owner, uint64_t bytes);
  // The chunk was used: it is now the most recently used.
  void Touch(const Place& place);
  // The chunk of `bytes` at `place` left the tier.
  void Remove(const Place& place, uint64_t bytes);

  // Every chunk, least recently used first.
  const Queue& all() const { return all_; }

  // The owner's quota in this tier (0: none) and the bytes it holds.
  uint64_t quota(absl::string_view owner) const;
  uint64_t used(absl::string_view owner) const;
  // Bytes `owner` would hold beyond its quota with `adding` more bytes in
  // place of `replacing` of its own; 0 if that fits or it has no quota.
  uint64_t OverQuota(absl::string_view owner, uint64_t adding,
                     uint64_t replacing) const;

  // Whether making room for a chunk of `owner` may take one of
  // `victim_owner`'s (see the order above).
  bool MayEvictFor(absl::string_view owner,
                   absl::string_view victim_owner) const;

  // Offers `owner`'s chunks, if it has a quota here, least recently used
  // first: to make room within its quota, or to count its pinned bytes.
  void OfferOwn(absl::string_view owner, Visitor visit);
  // Offers the chunks room may be taken from for a chunk of `owner`, in
  // the order above.
  void OfferForRoom(absl::string_view owner, Visitor visit);

  // Usage of every named owner that holds chunks here or has a quota here,
  // by name.
  std::vector<OwnerUsage> Usage() const;

 private:
  struct Owner {
    std::string name;
    uint64_t quota = 0;
    uint64_t used = 0;
    uint64_t chunks = 0;
    Queue own;     // its chunks, if it has a quota
    Queue* queue;  // `own`, or the shared queue
  };

  Owner& OwnerNamed(const std::string& name);
  const Owner* Find(absl::string_view name) const;
  // Offers `queue`'s chunks while `more()` holds; false if the visitor
  // stopped.
  template <typename More>
  bool OfferQueue(Queue& queue, Visitor visit, More more);

  // Pointer-stable: places point at their owner.
  absl::node_hash_map<std::string, Owner> owners_;
  Queue all_;
  // The chunks of owners without a quota.
  Queue shared_;
};

}  // namespace kvcache::kvstore

#endif  // KVCACHE_KVSTORE_EVICTION_ORDER_H_
