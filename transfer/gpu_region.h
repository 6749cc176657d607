// A node's GPU tier opened in a worker on the same host through CUDA IPC
// (the node exports it with cudaIpcGetMemHandle; see
// NodeInfoResponse.gpu_ipc_handle), so the worker's kernels read chunks in
// place in the node's device memory.
//
// Thread-safe: read-only after Open.
#ifndef KVCACHE_TRANSFER_GPU_REGION_H_
#define KVCACHE_TRANSFER_GPU_REGION_H_

#include <cstdint>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace kvcache::transfer {

class GpuRegion {
 public:
  // Maps the `size`-byte region that `ipc_handle` (a cudaIpcMemHandle_t)
  // names into this process, for the current device; if that is another
  // GPU than the node's, peer access is enabled on first use.
  // UNAVAILABLE, with the runtime's reason, when it cannot be opened (no
  // GPU here, another host's handle, GPUs without peer access).
  static absl::StatusOr<std::unique_ptr<GpuRegion>> Open(
      absl::string_view ipc_handle, uint64_t size, std::string id);
  ~GpuRegion();

  GpuRegion(const GpuRegion&) = delete;
  GpuRegion& operator=(const GpuRegion&) = delete;

  // The device address of [offset, offset + bytes); OUT_OF_RANGE if that
  // is not inside the region.
  absl::StatusOr<const void*> View(uint64_t offset, uint64_t bytes) const;

  const std::string& id() const { return id_; }

 private:
  GpuRegion(const char* base, uint64_t size, std::string id)
      : base_(base), size_(size), id_(std::move(id)) {}

  const char* const base_;
  const uint64_t size_;
  const std::string id_;
};

}  // namespace kvcache::transfer

#endif  // KVCACHE_TRANSFER_GPU_REGION_H_
