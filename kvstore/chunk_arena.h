// Memory a MemoryTier keeps chunk bytes in: one region reserved once at
// start-up (host memory for the CPU tier, a GPU's for the GPU tier) and
// carved into 4 KiB-block extents, so storing a chunk costs no allocation
// from the system, and so the region can be shared whole with workers on
// the same host.
//
// Thread-safe. Slices keep the arena alive: it is released when the owner
// and every outstanding slice are gone.
#ifndef KVCACHE_KVSTORE_CHUNK_ARENA_H_
#define KVCACHE_KVSTORE_CHUNK_ARENA_H_

#include <cstdint>
#include <memory>
#include <optional>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "kvstore/extent_allocator.h"

namespace kvcache::kvstore {

class ChunkArena : public std::enable_shared_from_this<ChunkArena> {
 public:
  virtual ~ChunkArena() = default;

  ChunkArena(const ChunkArena&) = delete;
  ChunkArena& operator=(const ChunkArena&) = delete;

  // `bytes` of arena memory, returned to the arena when the last copy of the
  // pointer is dropped. RESOURCE_EXHAUSTED if no free run is large enough
  // (the caller evicts and retries).
  absl::StatusOr<std::shared_ptr<char>> Allocate(uint64_t bytes);

  // Copies host `bytes` into `dest`, memory this arena allocated.
  virtual absl::Status Write(char* dest, absl::string_view bytes) = 0;

  // Whether the region is a GPU's: the CPU cannot read its slices.
  virtual bool on_device() const = 0;

  // Where `data` (memory this arena allocated) starts in the region, for
  // workers that map it; nullopt for memory that is not the arena's.
  std::optional<uint64_t> OffsetOf(const char* data) const;

  // A random id that tells this region from that of an earlier or other
  // node.
  const std::string& id() const { return id_; }

  uint64_t used_bytes() const { return allocator_.used_bytes(); }
  uint64_t capacity_bytes() const { return allocator_.capacity_bytes(); }

 protected:
  // Manages [base, base + capacity_bytes); capacity_bytes is a multiple of
  // kBlockBytes.
  ChunkArena(char* base, uint64_t capacity_bytes);

  char* base() const { return base_; }

 private:
  char* const base_;
  const std::string id_;
  ExtentAllocator allocator_;
};

}  // namespace kvcache::kvstore

#endif  // KVCACHE_KVSTORE_CHUNK_ARENA_H_
