// What a storage tier hands out: references to chunks, chunks it evicted,
// and its usage.
//
// Thread-compatible value type.
#ifndef KVCACHE_KVSTORE_CHUNK_REF_H_
#define KVCACHE_KVSTORE_CHUNK_REF_H_

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "kvstore/codec_summary.h"

namespace kvcache::kvstore {

// A stored chunk as readers see it. `data` keeps the bytes alive (a slice of
// a tier's arena, or a read buffer) as long as the reference is held, even if
// the chunk is evicted or deleted meanwhile; it is null where only the
// chunk's description was asked for (Peek on a tier that keeps bytes on
// disk).
struct ChunkRef {
  std::shared_ptr<const char> data;
  uint64_t size_bytes = 0;
  uint32_t crc32c = 0;
  bool pinned = false;
  absl::Time pin_expiry = absl::InfinitePast();
  // The chunk this one extends in its prompt, if its writer said so; every
  // tier keeps it for prefix-aware eviction, the NVMe tier in its index.
  std::string parent_key;
  // What the chunk's codec header says, if its bytes are a codec stream.
  std::optional<CodecSummary> codec;
  // `data` is GPU memory (the GPU tier's): the CPU cannot read bytes().
  bool on_device = false;
  // The tenant whose chunk this is (empty: none, on an open node or for a
  // chunk stored before tenants had quotas). It travels with the chunk
  // through every tier and to peers, and counts against its quotas.
  std::string owner;

  absl::string_view bytes() const {
    return absl::string_view(data.get(), data ? size_bytes : 0);
  }
};

// One owner's share of a tier.
struct OwnerUsage {
  std::string owner;
  uint64_t used_bytes = 0;  // chunk data, as quotas count it
  uint64_t chunks = 0;
  uint64_t quota_bytes = 0;  // 0: no quota in this tier
};

struct TierUsage {
  uint64_t used_bytes = 0;
  uint64_t capacity_bytes = 0;
  uint64_t chunks = 0;
  uint64_t pinned_chunks = 0;
  uint64_t evictions = 0;
  uint64_t corrupt_chunks = 0;
  // Every named owner holding chunks here or with a quota here, by name.
  std::vector<OwnerUsage> owners;
};

// A chunk pushed out of the tier to make room, for the caller to demote.
struct EvictedChunk {
  std::string key;
  ChunkRef chunk;
};

}  // namespace kvcache::kvstore

#endif  // KVCACHE_KVSTORE_CHUNK_REF_H_
