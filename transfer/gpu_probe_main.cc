// gpu_probe: lists this host's CUDA devices and the pinned host-to-device
// copy bandwidth of each, the baseline that loading raw fp16 KV costs.
// Exits 1 if no device is usable.
#include <cstdio>
#include <string>

#include "transfer/cuda_devices.h"

int main() {
  std::string error;
  const auto devices = kvcache::transfer::ListCudaDevices(&error);
  if (devices.empty()) {
    std::fprintf(stderr, "gpu_probe: no CUDA device%s%s\n",
                 error.empty() ? "" : ": ", error.c_str());
    return 1;
  }
  for (const auto& d : devices) {
    const double gbps = kvcache::transfer::MeasurePinnedHostToDeviceGBps(
        d.index, uint64_t{256} << 20, 20, &error);
    std::printf(
        "gpu %d: %s, sm_%d%d, %d SMs, %.1f GiB, pinned H2D %.1f GB/s%s%s\n",
        d.index, d.name.c_str(), d.compute_capability_major,
        d.compute_capability_minor, d.multiprocessors,
        d.total_memory_bytes / 1073741824.0, gbps, gbps < 0 ? " " : "",
        gbps < 0 ? error.c_str() : "");
  }
  return 0;
}
