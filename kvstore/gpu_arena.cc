#include "kvstore/gpu_arena.h"

#include <cuda_runtime.h>

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "transfer/cuda_status.h"

namespace kvcache::kvstore {
namespace {

// Copies on this thread's stream of `device` and waits: pageable copies may
// return before their DMA ends, and readers in other processes must see
// the bytes once a Put is acknowledged.
absl::Status CopyAndWait(int device, void* dest, const void* source,
                         uint64_t size, cudaMemcpyKind kind,
                         absl::string_view what) {
  cudaError_t e = cudaSetDevice(device);
  if (e == cudaSuccess) {
    e = cudaMemcpyAsync(dest, source, size, kind, cudaStreamPerThread);
  }
  if (e == cudaSuccess) e = cudaStreamSynchronize(cudaStreamPerThread);
  return CudaError(e, what);
}

}  // namespace

absl::StatusOr<std::shared_ptr<GpuArena>> GpuArena::Create(
    int device, uint64_t capacity_bytes) {
  const uint64_t size = RoundUpToBlock(std::max<uint64_t>(capacity_bytes, 1));
  if (absl::Status s = CudaError(cudaSetDevice(device),
                                 absl::StrCat("using CUDA device ", device));
      !s.ok()) {
    return s;
  }
  void* base = nullptr;
  if (absl::Status s = CudaError(cudaMalloc(&base, size),
                                 absl::StrCat("reserving the GPU tier's ", size,
                                              " bytes on device ", device));
      !s.ok()) {
    return s;
  }
  std::shared_ptr<GpuArena> arena(
      new GpuArena(device, static_cast<char*>(base), size));
  cudaIpcMemHandle_t handle;
  char bus_id[32] = {};
  cudaError_t e = cudaIpcGetMemHandle(&handle, base);
  if (e == cudaSuccess) {
    e = cudaDeviceGetPCIBusId(bus_id, sizeof(bus_id), device);
  }
  if (absl::Status s = CudaError(e, "exporting the GPU tier"); !s.ok()) {
    return s;
  }
  arena->ipc_handle_.assign(reinterpret_cast<const char*>(&handle),
                            sizeof(handle));
  arena->pci_bus_id_ = bus_id;
  return arena;
}

GpuArena::~GpuArena() {
  cudaSetDevice(device_);
  cudaFree(base());
}

absl::Status GpuArena::Write(char* dest, absl::string_view bytes) {
  return CopyAndWait(device_, dest, bytes.data(), bytes.size(),
                     cudaMemcpyHostToDevice, "copying a chunk to the GPU tier");
}

absl::StatusOr<std::shared_ptr<const char>> GpuArena::ReadToHost(
    const char* source, uint64_t size) const {
  std::shared_ptr<char> host(new char[std::max<uint64_t>(size, 1)],
                             std::default_delete<char[]>());
  if (absl::Status s =
          CopyAndWait(device_, host.get(), source, size, cudaMemcpyDeviceToHost,
                      "copying a chunk out of the GPU tier");
      !s.ok()) {
    return s;
  }
  return std::shared_ptr<const char>(std::move(host));
}

}  // namespace kvcache::kvstore
