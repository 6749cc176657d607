#include <cuda_runtime.h>

#include "transfer/cuda_devices.h"

namespace kvcache::transfer {
namespace {

bool Check(cudaError_t result, const char* what, std::string* error) {
  if (result == cudaSuccess) return true;
  if (error != nullptr) {
    *error = std::string(what) + ": " + cudaGetErrorString(result);
  }
  return false;
}

}  // namespace

std::vector<CudaDevice> ListCudaDevices(std::string* error) {
  std::vector<CudaDevice> devices;
  int count = 0;
  if (!Check(cudaGetDeviceCount(&count), "cudaGetDeviceCount", error)) {
    return devices;
  }
  for (int i = 0; i < count; ++i) {
    cudaDeviceProp prop;
    if (!Check(cudaGetDeviceProperties(&prop, i), "cudaGetDeviceProperties",
               error)) {
      return {};
    }
    devices.push_back(CudaDevice{i, prop.name, prop.totalGlobalMem, prop.major,
                                 prop.minor, prop.multiProcessorCount});
  }
  return devices;
}

double MeasurePinnedHostToDeviceGBps(int device, uint64_t bytes, int repeats,
                                     std::string* error) {
  void* host = nullptr;
  void* dev = nullptr;
  cudaEvent_t start = nullptr, stop = nullptr;
  double gbps = -1;
  if (Check(cudaSetDevice(device), "cudaSetDevice", error) &&
      Check(cudaMallocHost(&host, bytes), "cudaMallocHost", error) &&
      Check(cudaMalloc(&dev, bytes), "cudaMalloc", error) &&
      Check(cudaEventCreate(&start), "cudaEventCreate", error) &&
      Check(cudaEventCreate(&stop), "cudaEventCreate", error) &&
      // One untimed copy warms up the path (page tables, DMA engines).
      Check(cudaMemcpy(dev, host, bytes, cudaMemcpyHostToDevice), "cudaMemcpy",
            error)) {
    cudaEventRecord(start);
    for (int i = 0; i < repeats; ++i) {
      cudaMemcpyAsync(dev, host, bytes, cudaMemcpyHostToDevice);
    }
    cudaEventRecord(stop);
    float ms = 0;
    if (Check(cudaEventSynchronize(stop), "cudaEventSynchronize", error) &&
        Check(cudaEventElapsedTime(&ms, start, stop), "cudaEventElapsedTime",
              error) &&
        ms > 0) {
      gbps = static_cast<double>(bytes) * repeats / (ms * 1e6);
    }
  }
  if (start) cudaEventDestroy(start);
  if (stop) cudaEventDestroy(stop);
  if (dev) cudaFree(dev);
  if (host) cudaFreeHost(host);
  return gbps;
}

bool RegisterHostMemory(void* host, uint64_t bytes, std::string* error,
                        bool read_only) {
  int count = 0;
  if (!Check(cudaGetDeviceCount(&count), "cudaGetDeviceCount", error)) {
    return false;
  }
  const unsigned flags =
      cudaHostRegisterPortable | (read_only ? cudaHostRegisterReadOnly : 0);
  return Check(cudaHostRegister(host, bytes, flags), "cudaHostRegister", error);
}

void UnregisterHostMemory(void* host) { cudaHostUnregister(host); }

}  // namespace kvcache::transfer
