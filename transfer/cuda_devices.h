// The CUDA devices of this host, as the daemon and the GPU tools see them.
//
// Safe to call on a machine without a GPU or driver: it then returns an
// empty list or an error saying why, never aborts.
#ifndef KVCACHE_TRANSFER_CUDA_DEVICES_H_
#define KVCACHE_TRANSFER_CUDA_DEVICES_H_

#include <cstdint>
#include <string>
#include <vector>

namespace kvcache::transfer {

struct CudaDevice {
  int index = 0;
  std::string name;
  uint64_t total_memory_bytes = 0;
  int compute_capability_major = 0;
  int compute_capability_minor = 0;
  int multiprocessors = 0;
};

// The visible devices; empty if there are none. On a driver or runtime
// failure, empty with `error` set to the runtime's explanation.
std::vector<CudaDevice> ListCudaDevices(std::string* error);

// Bandwidth, in GB/s, of copying `bytes` from pinned host memory to `device`
// (averaged over `repeats` copies); negative with `error` set on failure.
double MeasurePinnedHostToDeviceGBps(int device, uint64_t bytes, int repeats,
                                     std::string* error);

// Page-locks [host, host + bytes) for the devices of this host (CUDA's
// cudaHostRegister), so copies to a GPU run at full speed. False, with
// `error` set, when there is no GPU or registration fails; the memory then
// works as before, only slower to copy. `read_only`: the memory is mapped
// read-only (a node's shared region in a worker); the GPU only reads it.
bool RegisterHostMemory(void* host, uint64_t bytes, std::string* error,
                        bool read_only = false);
// Undoes RegisterHostMemory.
void UnregisterHostMemory(void* host);

}  // namespace kvcache::transfer

#endif  // KVCACHE_TRANSFER_CUDA_DEVICES_H_
