#include "kvstore/eviction_order.h"

#include <algorithm>

namespace kvcache::kvstore {

EvictionOrder::EvictionOrder(const OwnerQuotas& quotas) {
  for (const auto& [name, quota] : quotas) {
    if (quota == 0) continue;
    Owner& owner = OwnerNamed(name);
    owner.quota = quota;
    owner.queue = &owner.own;
  }
}

EvictionOrder::Owner& EvictionOrder::OwnerNamed(const std::string& name) {
  auto [it, added] = owners_.try_emplace(name);
  if (added) {
    it->second.name = name;
    it->second.queue = &shared_;
  }
  return it->second;
}

const EvictionOrder::Owner* EvictionOrder::Find(absl::string_view name) const {
  auto it = owners_.find(name);
  return it == owners_.end() ? nullptr : &it->second;
}

EvictionOrder::Place EvictionOrder::Add(const std::string& key,
                                        const std::string& owner,
                                        uint64_t bytes) {
  Owner& o = OwnerNamed(owner);
  o.used += bytes;
  ++o.chunks;
  Place place;
  place.owner = &o;
  place.in_all = all_.insert(all_.end(), key);
  place.in_queue = o.queue->insert(o.queue->end(), key);
  return place;
}

void EvictionOrder::Touch(const Place& place) {
  all_.splice(all_.end(), all_, place.in_all);
  Queue& queue = *place.owner->queue;
  queue.splice(queue.end(), queue, place.in_queue);
}

void EvictionOrder::Remove(const Place& place, uint64_t bytes) {
  Owner& o = *place.owner;
  o.used -= bytes;
  --o.chunks;
  all_.erase(place.in_all);
  o.queue->erase(place.in_queue);
  // Owners without a quota are kept only while they hold chunks, so names
  // that come and go (peers' copies) do not pile up.
  if (o.chunks == 0 && o.quota == 0) owners_.erase(owners_.find(o.name));
}

uint64_t EvictionOrder::quota(absl::string_view owner) const {
  const Owner* o = Find(owner);
  return o == nullptr ? 0 : o->quota;
}

uint64_t EvictionOrder::used(absl::string_view owner) const {
  const Owner* o = Find(owner);
  return o == nullptr ? 0 : o->used;
}

uint64_t EvictionOrder::OverQuota(absl::string_view owner, uint64_t adding,
                                  uint64_t replacing) const {
  const uint64_t limit = quota(owner);
  if (limit == 0) return 0;
  const uint64_t held = used(owner) + adding - replacing;
  return held > limit ? held - limit : 0;
}

bool EvictionOrder::MayEvictFor(absl::string_view owner,
                                absl::string_view victim_owner) const {
  if (owner == victim_owner) return true;
  const Owner* victim = Find(victim_owner);
  return victim == nullptr || victim->quota == 0 ||
         victim->used > victim->quota;
}

template <typename More>
bool EvictionOrder::OfferQueue(Queue& queue, Visitor visit, More more) {
  for (const bool leaves_only : {true, false}) {
    for (auto it = queue.begin(); it != queue.end() && more();) {
      // Step past the chunk first: the visitor may remove it.
      const std::string& key = *it++;
      if (!visit(key, leaves_only)) return false;
    }
  }
  return true;
}

void EvictionOrder::OfferOwn(absl::string_view owner, Visitor visit) {
  auto it = owners_.find(owner);
  if (it == owners_.end() || it->second.quota == 0) return;
  OfferQueue(it->second.own, visit, [] { return true; });
}

void EvictionOrder::OfferForRoom(absl::string_view owner, Visitor visit) {
  // Only owners with a quota can be over it, and they stay in the map, so
  // the pointers outlive the visits.
  std::vector<Owner*> over_quota;
  for (auto& [name, o] : owners_) {
    if (o.quota > 0 && o.used > o.quota) over_quota.push_back(&o);
  }
  for (Owner* o : over_quota) {
    if (!OfferQueue(o->own, visit, [o] { return o->used > o->quota; })) {
      return;
    }
  }
  if (!OfferQueue(shared_, visit, [] { return true; })) return;
  auto it = owners_.find(owner);
  if (it != owners_.end() && it->second.quota > 0) {
    OfferQueue(it->second.own, visit, [] { return true; });
  }
}

std::vector<OwnerUsage> EvictionOrder::Usage() const {
  std::vector<OwnerUsage> usage;
  for (const auto& [name, o] : owners_) {
    if (name.empty()) continue;
    usage.push_back(OwnerUsage{name, o.used, o.chunks, o.quota});
  }
  std::sort(usage.begin(), usage.end(),
            [](const OwnerUsage& a, const OwnerUsage& b) {
              return a.owner < b.owner;
            });
  return usage;
}

}  // namespace kvcache::kvstore
