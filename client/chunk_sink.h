// Where a worker's fetched chunks go (client/prefix_fetcher.h): decoded
// into GPU blocks, host buffers, or anything else that takes chunk bytes in
// prompt order. Kept apart from the fetcher so GPU code can implement it
// without the gRPC headers.
#ifndef KVCACHE_CLIENT_CHUNK_SINK_H_
#define KVCACHE_CLIENT_CHUNK_SINK_H_

#include <cstddef>
#include <cstdint>

#include "absl/functional/function_ref.h"
#include "absl/status/status.h"
#include "absl/strings/string_view.h"
#include "absl/types/span.h"

struct CUstream_st;

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

  // Takes chunks first, first + 1, ... (their sizes in `sizes`), which a
  // transport writes into device memory itself, in one piece (an NCCL
  // receive): chunk i + 1 starts where chunk i ends, rounded up to a
  // multiple of 256 bytes. The sink calls write(destination, bytes, stream)
  // once, with room for the piece in device memory, and `write` queues
  // writing the piece's `bytes` on that CUDA stream before it returns; the
  // sink reads them after it. Called only if accepts_device_memory().
  virtual absl::Status ConsumeWrittenOnDevice(
      size_t first, absl::Span<const uint64_t> sizes,
      absl::FunctionRef<absl::Status(void* destination, uint64_t bytes,
                                     CUstream_st* stream)>
          write) {
    return absl::UnimplementedError("this sink takes host memory only");
  }

  // Starts work on the chunks taken so far instead of waiting for more to
  // fill a batch. The fetcher calls it before it waits on the node (reading
  // the next chunks up from NVMe), so those it has are not held back.
  virtual absl::Status Flush() { return absl::OkStatus(); }

  // Called once after the last chunk (also after a failed fetch): returns
  // when nothing reads the bytes given to Consume any more, with the first
  // error the sink met (a corrupt chunk, a failed copy).
  virtual absl::Status Finish() = 0;
};

}  // namespace kvcache

#endif  // KVCACHE_CLIENT_CHUNK_SINK_H_
