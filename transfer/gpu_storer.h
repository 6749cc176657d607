// Stores a worker's KV straight from its GPU blocks without holding the
// worker up: Store() queues the chunks' encode on the worker's CUDA stream,
// behind the kernels that wrote them, and returns. One background thread
// waits for each batch's encode and copies its bitstreams (about 7x smaller
// than the fp16 at the default level) down to host memory, freeing its
// slot; another puts them into a ChunkStore, each chunk naming the one
// before it as its parent.
//
// Encoding takes device memory on the worker's GPU: each of the `slots`
// batches being encoded holds `batch_chunks` chunks' worst-case bitstreams
// and the encoder's workspace (see device_bytes()). Store() waits only when
// every slot is busy, which happens when the GPU encodes faster than the
// copies down, or when `max_queued_bytes` of bitstreams already wait for
// their puts.
//
// Thread-safe. Needs a GPU.
#ifndef KVCACHE_TRANSFER_GPU_STORER_H_
#define KVCACHE_TRANSFER_GPU_STORER_H_

#include <condition_variable>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <optional>
#include <thread>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "client/chunk_key.h"
#include "client/chunk_store.h"
#include "codec/cuda/gpu_codec.h"

namespace kvcache::transfer {

struct GpuStorerOptions {
  codec::Level level = codec::Level::kDefault;
  // Largest chunk Store takes, in tokens; sizes the slots.
  uint32_t chunk_tokens = 256;
  // Chunks encoded per launch and put per call.
  uint32_t batch_chunks = 8;
  // Batches being encoded or copied down at once.
  uint32_t slots = 2;
  // Bitstream bytes copied down and waiting for their puts before the copies
  // pause (and so, once the slots fill, Store).
  uint64_t max_queued_bytes = uint64_t{1} << 30;
};

// One chunk to store: its key, the chunk it extends in its prompt (none for
// a prompt's first chunk), and where its values are in the layout.
struct ChunkFromDevice {
  ChunkKey key;
  std::optional<ChunkKey> parent;
  codec::gpu::KvChunkRef source;
};

struct StoreReport {
  size_t chunks = 0;
  uint64_t raw_bytes = 0;     // fp16/bf16 values read from the blocks
  uint64_t stored_bytes = 0;  // bitstream bytes put
};

class GpuStorer {
 public:
  using Ticket = uint64_t;

  // Chunks are read from `layout` (device pointers, as for
  // codec::gpu::EncodeBatch) and put into `store`. Allocates the slots up
  // front on the current device.
  static absl::StatusOr<std::unique_ptr<GpuStorer>> Create(
      std::shared_ptr<ChunkStore> store, const codec::gpu::KvLayout& layout,
      GpuStorerOptions options = {});
  // Finishes every queued store first.
  ~GpuStorer();

  GpuStorer(const GpuStorer&) = delete;
  GpuStorer& operator=(const GpuStorer&) = delete;

  // Queues the chunks' encode on `stream` and returns a ticket for Wait.
  // Work queued on `stream` after this call may overwrite the sources; work
  // on other streams must wait for `stream` first. INVALID_ARGUMENT for a
  // chunk longer than options.chunk_tokens or outside the layout.
  absl::StatusOr<Ticket> Store(std::vector<ChunkFromDevice> chunks,
                               codec::gpu::Stream stream,
                               const PutOptions& options = {});

  // Waits until the ticket's chunks are stored. A chunk the GPU could not
  // encode fails the ticket (INVALID_ARGUMENT naming it) and none of the
  // ticket's later chunks is put, so a stored prompt has no holes; a Put
  // error is returned as the store gave it. A ticket can be waited once.
  absl::StatusOr<StoreReport> Wait(Ticket ticket);

  // Device memory the slots hold.
  uint64_t device_bytes() const { return device_bytes_; }

 private:
  struct Slot;
  struct Batch;
  struct TicketState {
    size_t batches_left = 0;
    absl::Status status;
    StoreReport report;
    bool abandoned = false;  // Store failed: nobody waits for it
  };

  GpuStorer(std::shared_ptr<ChunkStore> store,
            const codec::gpu::KvLayout& layout, GpuStorerOptions options);
  absl::Status Allocate();
  // Background threads: one copies each encoded batch down and frees its
  // slot, the other puts what was copied and settles the tickets.
  void CopyDown();
  void PutCopied();
  // Copies the batch's bitstreams into batch.streams, up to the first chunk
  // the encoder rejected (whose error is returned).
  absl::Status CopyBatch(Batch& batch);

  const std::shared_ptr<ChunkStore> store_;
  const codec::gpu::KvLayout layout_;
  const GpuStorerOptions options_;
  int device_ = 0;
  uint64_t out_capacity_ = 0;  // bytes per chunk's bitstream
  uint64_t device_bytes_ = 0;
  codec::gpu::Stream copy_stream_ = nullptr;

  std::mutex mu_;
  std::condition_variable changed_;
  std::vector<std::unique_ptr<Slot>> slots_;
  std::vector<Slot*> free_slots_;
  std::deque<std::unique_ptr<Batch>> encoding_;  // in slots, on the GPU
  bool copying_ = false;  // a batch is between the two queues
  std::deque<std::unique_ptr<Batch>> copied_;  // in host memory
  uint64_t copied_bytes_ = 0;
  absl::flat_hash_map<Ticket, TicketState> tickets_;
  Ticket next_ticket_ = 1;
  bool stopping_ = false;
  std::thread copier_;
  std::thread putter_;
};

}  // namespace kvcache::transfer

#endif  // KVCACHE_TRANSFER_GPU_STORER_H_
