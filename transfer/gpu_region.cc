#include "transfer/gpu_region.h"

#include <cuda_runtime.h>

#include <cstring>
#include <utility>

#include "absl/strings/str_cat.h"

namespace kvcache::transfer {

absl::StatusOr<std::unique_ptr<GpuRegion>> GpuRegion::Open(
    absl::string_view ipc_handle, uint64_t size, std::string id) {
  cudaIpcMemHandle_t handle;
  if (ipc_handle.size() != sizeof(handle)) {
    return absl::InvalidArgumentError(
        absl::StrCat("a CUDA IPC handle is ", sizeof(handle), " bytes, not ",
                     ipc_handle.size()));
  }
  std::memcpy(&handle, ipc_handle.data(), sizeof(handle));
  void* base = nullptr;
  const cudaError_t e =
      cudaIpcOpenMemHandle(&base, handle, cudaIpcMemLazyEnablePeerAccess);
  if (e != cudaSuccess) {
    cudaGetLastError();  // not sticky: leave the worker's context clean
    return absl::UnavailableError(absl::StrCat(
        "cannot open the node's GPU tier: ", cudaGetErrorString(e)));
  }
  return std::unique_ptr<GpuRegion>(
      new GpuRegion(static_cast<const char*>(base), size, std::move(id)));
}

GpuRegion::~GpuRegion() { cudaIpcCloseMemHandle(const_cast<char*>(base_)); }

absl::StatusOr<const void*> GpuRegion::View(uint64_t offset,
                                            uint64_t bytes) const {
  if (offset > size_ || bytes > size_ - offset) {
    return absl::OutOfRangeError(absl::StrCat("[", offset, ", +", bytes,
                                              ") is outside the ", size_,
                                              "-byte GPU region"));
  }
  return static_cast<const void*>(base_ + offset);
}

}  // namespace kvcache::transfer
