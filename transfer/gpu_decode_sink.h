// A ChunkSink that restores fetched codec chunks straight into a worker's
// GPU KV blocks: each chunk's compressed bytes are copied up (from the
// node's shared region in place, or through pinned staging for chunks that
// came over gRPC) into one of a few device staging slots, and a slot's
// batch of chunks decodes on the worker's stream while the next slot fills.
// So chunk i + 1 is in flight, and on the PCIe bus, while chunk i decodes.
// Chunks already in device memory (a node's GPU tier opened through CUDA
// IPC) join a batch without a copy and decode where they lie; chunks that
// arrive over NCCL are received straight into a slot.
//
// Layer by layer (GpuDecodeSinkOptions::on_layer), the copies go layer by
// layer across all the fetch's chunks instead, and each layer decodes once
// its bytes are in, so an engine computes layer l while later ones arrive.
//
// Thread-compatible. Needs a GPU.
#ifndef KVCACHE_TRANSFER_GPU_DECODE_SINK_H_
#define KVCACHE_TRANSFER_GPU_DECODE_SINK_H_

#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "client/chunk_sink.h"
#include "codec/cuda/gpu_codec.h"

struct CUevent_st;

namespace kvcache::transfer {

// Called for each layer of a fetch, in order, as soon as its decode is
// queued; `ready` is a CUDA event recorded after it on the fetch's stream,
// which a worker's stream waits on (cudaStreamWaitEvent) before it reads
// the layer, or the host with cudaEventSynchronize. Runs on the thread that
// calls Finish; the event stays valid until the next fetch on the sink.
using LayerReadyCallback =
    std::function<void(uint32_t layer, CUevent_st* ready)>;

struct GpuDecodeSinkOptions {
  // Chunks decoded per launch; more fill the GPU better, fewer start
  // decoding sooner.
  uint32_t batch_chunks = 8;
  // The same for a batch of chunks already in device memory: with no copy
  // to overlap, larger batches cost only time to the first batch.
  uint32_t device_batch_chunks = 32;
  // Compressed bytes one staging slot holds; a chunk larger than this is
  // INVALID_ARGUMENT.
  uint64_t slot_bytes = 64 << 20;
  // Slots in flight: one filling, the others copying or decoding.
  uint32_t slots = 3;
  // The model profile that chunks at the transform levels name; it must
  // outlive the fetches. Without it (or with another) such a chunk fails
  // the fetch with FAILED_PRECONDITION.
  const codec::gpu::DeviceProfile* profile = nullptr;
  // Restores layer by layer when set. The chunks are taken as they come,
  // and at Finish their bytes go to the GPU layer by layer: layer 0 of
  // every chunk (with the chunk's headers and tables) decodes while layer 1
  // copies, and so on. The whole fetch's compressed bytes are staged on
  // the GPU at once (device memory of their size, kept for the next
  // fetch), and each chunk's checksum is checked when its last layer is
  // in: a corrupt chunk fails Finish after its earlier layers were
  // written, where the default order leaves a rejected chunk's blocks
  // untouched. Chunks that come over gRPC wait in host memory for Finish.
  LayerReadyCallback on_layer;
};

class GpuDecodeSink : public ChunkSink {
 public:
  // destinations[i] is where chunk i goes in `layout` (device pointers, as
  // for codec::gpu::DecodeBatch), decoded on `stream`. Allocates the slots
  // (device and pinned memory) up front.
  static absl::StatusOr<std::unique_ptr<GpuDecodeSink>> Create(
      const codec::gpu::KvLayout& layout,
      std::vector<codec::gpu::KvChunkRef> destinations,
      codec::gpu::Stream stream, GpuDecodeSinkOptions options = {});
  ~GpuDecodeSink() override;

  // Aims the sink at another fetch once Finish has returned, keeping its
  // staging slots and workspace (device and pinned memory, which take far
  // longer to allocate than a fetch of a few chunks), with `profile` in
  // place of the options' one. FAILED_PRECONDITION while a fetch is under
  // way.
  // `on_layer` replaces the options' too.
  absl::Status Reset(const codec::gpu::KvLayout& layout,
                     std::vector<codec::gpu::KvChunkRef> destinations,
                     codec::gpu::Stream stream,
                     const codec::gpu::DeviceProfile* profile = nullptr,
                     LayerReadyCallback on_layer = nullptr);

  absl::Status Consume(size_t index, absl::string_view bytes,
                       bool stable) override;
  bool accepts_device_memory() const override { return true; }
  absl::Status ConsumeOnDevice(size_t index, const void* device_bytes,
                               uint64_t size) override;
  absl::Status ConsumeWrittenOnDevice(
      size_t first, absl::Span<const uint64_t> sizes,
      absl::FunctionRef<absl::Status(void*, uint64_t, CUstream_st*)> write)
      override;
  // Launches the decode of the chunks staged so far.
  absl::Status Flush() override {
    return layered() ? absl::OkStatus() : Launch();
  }
  // Decodes what is left, waits for the stream, and reports the first chunk
  // the GPU rejected (DATA_LOSS naming it and why; FAILED_PRECONDITION for
  // a chunk whose model profile the sink lacks). A rejected chunk leaves its
  // blocks untouched.
  absl::Status Finish() override;

  // After Finish: milliseconds, on the GPU, from the first chunk's copy to
  // the end of the first batch's decode: when a worker could start using
  // the prefix's first chunks. Layer by layer: to the end of layer 0's.
  float first_batch_ms() const { return first_batch_ms_; }

 private:
  struct Slot;

  GpuDecodeSink(const codec::gpu::KvLayout& layout,
                std::vector<codec::gpu::KvChunkRef> destinations,
                codec::gpu::Stream stream, GpuDecodeSinkOptions options);
  absl::Status Allocate();
  // INVALID_ARGUMENT unless chunk `index` is the next one and has a
  // destination.
  absl::Status CheckNext(size_t index) const;
  // The slot that takes chunk `index` with `staged_bytes` of staging,
  // launching the filling one first if it is full.
  absl::StatusOr<Slot*> SlotFor(size_t index, uint64_t staged_bytes);
  // Gives chunks first, first + 1, ... (of `sizes`) one piece of a slot's
  // device staging, back to back at 256-byte aligned offsets, which `write`
  // fills (queued on the copy stream, given the piece and its length), and
  // queues them for decoding.
  absl::Status Stage(
      size_t first, absl::Span<const uint64_t> sizes,
      absl::FunctionRef<absl::Status(Slot&, uint8_t*, uint64_t)> write);
  // Queues chunk `index`, at `device_bytes`, for decoding with its slot.
  void AddJob(Slot& slot, size_t index, const void* device_bytes,
              uint64_t size);
  // Launches the slot's batch once it has enough chunks.
  absl::Status LaunchIfFull(const Slot& slot);
  // Starts decoding the filling slot's batch and moves to the next slot.
  absl::Status Launch();

  // Allocates room for a status per destination.
  absl::Status AllocateStatuses();
  // Reads the statuses of the chunks consumed and reports the first
  // rejected one.
  absl::Status ChunkStatuses();

  // Layer by layer: a chunk's bytes, in host memory (copied up layer by
  // layer into `staged`, headers and layer 0 as soon as it comes) or
  // already on the device (decoded where they lie; `staged` null).
  struct LayeredChunk {
    const uint8_t* bytes = nullptr;
    uint64_t size = 0;
    uint8_t* staged = nullptr;
    // Host chunks: where each layer ends (codec::LayerEnds), the last
    // layer with the checksum.
    std::vector<uint64_t> ends;
  };
  bool layered() const { return on_layer_ != nullptr; }
  absl::Status TakeLayered(size_t index, absl::string_view bytes);
  absl::Status TakeLayeredOnDevice(size_t index, const uint8_t* bytes,
                                   uint64_t size);
  // Takes chunks a transport writes on the device, into staging.
  absl::Status TakeWrittenLayered(
      size_t first, absl::Span<const uint64_t> sizes,
      absl::FunctionRef<absl::Status(void*, uint64_t, CUstream_st*)> write);
  // Device staging for `bytes` of this fetch.
  absl::StatusOr<uint8_t*> TakeStaging(uint64_t bytes);
  // Copies, decodes and signals every layer; then as Finish.
  absl::Status FinishLayered();
  absl::Status RunLayers();

  codec::gpu::KvLayout layout_;
  std::vector<codec::gpu::KvChunkRef> destinations_;
  codec::gpu::Stream stream_;
  const GpuDecodeSinkOptions options_;
  const codec::gpu::DeviceProfile* profile_;
  codec::gpu::Stream copy_stream_ = nullptr;
  std::vector<std::unique_ptr<Slot>> slots_;
  size_t filling_ = 0;         // index of the slot taking chunks
  int32_t* status_ = nullptr;  // device, one per destination
  size_t status_capacity_ = 0;
  size_t consumed_ = 0;
  bool finished_ = false;
  bool launched_any_ = false;
  CUevent_st* started_ = nullptr;
  CUevent_st* first_decoded_ = nullptr;
  float first_batch_ms_ = 0;

  LayerReadyCallback on_layer_;
  std::vector<LayeredChunk> layered_;
  std::deque<std::string> held_;  // gRPC chunks, until Finish
  // Device staging of layer-by-layer fetches, in blocks kept from fetch to
  // fetch (a chunk goes up before the fetch's total is known); a fetch
  // fills them from the first, `staging_used_` bytes into the current one.
  std::vector<std::pair<uint8_t*, uint64_t>> staging_;
  size_t staging_block_ = 0;
  uint64_t staging_used_ = 0;
  void* layered_workspace_ = nullptr;
  uint64_t layered_workspace_bytes_ = 0;
  CUevent_st* layer_copied_ = nullptr;
  std::vector<CUevent_st*> layer_ready_;
};

}  // namespace kvcache::transfer

#endif  // KVCACHE_TRANSFER_GPU_DECODE_SINK_H_
