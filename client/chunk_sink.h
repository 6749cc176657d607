// Where a worker's fetched chunks go (client/prefix_fetcher.h): decoded
// into GPU blocks, host buffers, or anything else that takes chunk bytes in
// prompt order. Kept apart from the fetcher so GPU code can implement it
// without the gRPC headers.
#ifndef KVCACHE_CLIENT_CHUNK_SINK_H_
#define KVCACHE_CLIENT_CHUNK_SINK_H_

#include <cstddef>
#include <cstdint>

#include "absl/status/status.h"
#include "absl/strings/string_view.h"

namespace kvcache {

// Where fetched chunks go. Chunks arrive in prompt order, each once.
class ChunkSink {
 public:
  virtual ~ChunkSink() = default;

  // Takes chunk `index` of the fetch. If `stable`, `bytes` stays valid until
  // Finish returns (the sink may read it asynchronously, e.g. a GPU copy);
  // otherwise only during this call. An error ends the fetch.
  virtual absl::Status Consume(size_t index, absl::string_view bytes,
                               bool stable) = 0;

  // Whether the sink also takes chunks that are in GPU memory (a node's GPU
  // tier opened through CUDA IPC), through ConsumeOnDevice.
  virtual bool accepts_device_memory() const { return false; }

  // Takes chunk `index` as `size` bytes of device memory at `device_bytes`,
  // valid until Finish returns. Called only if accepts_device_memory().
  virtual absl::Status ConsumeOnDevice(size_t index, const void* device_bytes,
                                       uint64_t size) {
    return absl::UnimplementedError("this sink takes host memory only");
  }

  // Called once after the last chunk (also after a failed fetch): returns
  // when nothing reads the bytes given to Consume any more, with the first
  // error the sink met (a corrupt chunk, a failed copy).
  virtual absl::Status Finish() = 0;
};

}  // namespace kvcache

#endif  // KVCACHE_CLIENT_CHUNK_SINK_H_
