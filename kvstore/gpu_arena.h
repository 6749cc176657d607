// The GPU tier's memory: a ChunkArena over one cudaMalloc region on one
// device, exported as a CUDA IPC handle so workers on the same host can
// decode chunks straight out of it.
//
// Thread-safe: each calling thread copies on its own per-thread stream.
#ifndef KVCACHE_KVSTORE_GPU_ARENA_H_
#define KVCACHE_KVSTORE_GPU_ARENA_H_

#include <cstdint>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "kvstore/chunk_arena.h"

namespace kvcache::kvstore {

class GpuArena : public ChunkArena {
 public:
  // Reserves `capacity_bytes` (rounded up to 4 KiB) on CUDA device
  // `device`. UNAVAILABLE, with the runtime's reason, when there is no such
  // device or driver; RESOURCE_EXHAUSTED when the device lacks the memory.
  static absl::StatusOr<std::shared_ptr<GpuArena>> Create(
      int device, uint64_t capacity_bytes);
  ~GpuArena() override;

  // Copies host `bytes` to the device; returns once they are there.
  absl::Status Write(char* dest, absl::string_view bytes) override;
  bool on_device() const override { return true; }

  // Copies `size` bytes at `source` (memory of this arena) into a new host
  // buffer.
  absl::StatusOr<std::shared_ptr<const char>> ReadToHost(const char* source,
                                                         uint64_t size) const;

  // The region's cudaIpcMemHandle_t, as bytes.
  const std::string& ipc_handle() const { return ipc_handle_; }
  // The device's PCI bus id ("0000:1b:00.0"), the same in every process
  // whatever CUDA_VISIBLE_DEVICES says.
  const std::string& pci_bus_id() const { return pci_bus_id_; }
  int device() const { return device_; }

 private:
  GpuArena(int device, char* base, uint64_t capacity_bytes)
      : ChunkArena(base, capacity_bytes), device_(device) {}

  const int device_;
  std::string ipc_handle_;
  std::string pci_bus_id_;
};

}  // namespace kvcache::kvstore

#endif  // KVCACHE_KVSTORE_GPU_ARENA_H_
