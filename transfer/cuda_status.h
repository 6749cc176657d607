// absl::Status from CUDA runtime errors, for code that calls the runtime.
#ifndef KVCACHE_TRANSFER_CUDA_STATUS_H_
#define KVCACHE_TRANSFER_CUDA_STATUS_H_

#include <cuda_runtime.h>

#include <string>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"

namespace kvcache {

// OK for cudaSuccess. Otherwise "<what>: <CUDA's description>", as
// RESOURCE_EXHAUSTED when device or pinned memory ran out, UNAVAILABLE when
// there is no usable GPU, INTERNAL for anything else.
inline absl::Status CudaError(cudaError_t error, absl::string_view what) {
  if (error == cudaSuccess) return absl::OkStatus();
  const std::string message =
      absl::StrCat(what, ": ", cudaGetErrorString(error));
  if (error == cudaErrorMemoryAllocation) {
    return absl::ResourceExhaustedError(message);
  }
  if (error == cudaErrorNoDevice || error == cudaErrorInsufficientDriver ||
      error == cudaErrorInvalidDevice) {
    return absl::UnavailableError(message);
  }
  return absl::InternalError(message);
}

}  // namespace kvcache

#endif  // KVCACHE_TRANSFER_CUDA_STATUS_H_
