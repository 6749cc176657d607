#include <cuda_runtime.h>

#include <algorithm>
#include <cstring>
#include <utility>

#include "absl/strings/str_cat.h"
#include "codec/codec.h"
#include "transfer/cuda_status.h"
#include "transfer/gpu_decode_sink.h"

namespace kvcache::transfer {

using codec::gpu::ChunkErrorName;
using codec::gpu::DecodeJob;

namespace {

// Where pieces of `sizes` go when packed back to back, each starting
// 256-byte aligned as the decoder's loads like; *end: where the last ends.
std::vector<uint64_t> PackedOffsets(absl::Span<const uint64_t> sizes,
                                    uint64_t* end) {
  std::vector<uint64_t> offsets;
  *end = 0;
  for (uint64_t size : sizes) {
    offsets.push_back((*end + 255) / 256 * 256);
    *end = offsets.back() + size;
  }
  return offsets;
}

// Device memory of at least `bytes` in *buffer (*capacity bytes), kept from
// call to call and replaced only when too small.
absl::Status GrowDeviceBuffer(uint64_t bytes, void** buffer, uint64_t* capacity,
                              const char* what) {
  if (bytes <= *capacity) return absl::OkStatus();
  cudaFree(*buffer);
  *buffer = nullptr;
  *capacity = 0;
  if (absl::Status s = CudaError(cudaMalloc(buffer, bytes), what); !s.ok()) {
    return s;
  }
  *capacity = bytes;
  return absl::OkStatus();
}

// Queues host-to-device copies of pieces on `stream`, in one call where the
// driver takes batches.
cudaError_t CopyPieces(std::vector<void*>& to, std::vector<const void*>& from,
                       std::vector<size_t>& sizes, cudaStream_t stream) {
  if (sizes.empty()) return cudaSuccess;
  cudaMemcpyAttributes attributes = {};
  attributes.srcAccessOrder = cudaMemcpySrcAccessOrderStream;
  attributes.flags = cudaMemcpyFlagPreferOverlapWithCompute;
  size_t attribute_index = 0;
  if (cudaMemcpyBatchAsync(to.data(), from.data(), sizes.data(), sizes.size(),
                           &attributes, &attribute_index, 1,
                           stream) == cudaSuccess) {
    return cudaSuccess;
  }
  cudaGetLastError();  // An older driver: one copy at a time.
  for (size_t i = 0; i < sizes.size(); ++i) {
    const cudaError_t e = cudaMemcpyAsync(to[i], from[i], sizes[i],
                                          cudaMemcpyHostToDevice, stream);
    if (e != cudaSuccess) return e;
  }
  return cudaSuccess;
}

}  // namespace

struct GpuDecodeSink::Slot {
  uint8_t* device = nullptr;
  uint8_t* pinned = nullptr;
  void* workspace = nullptr;
  uint64_t workspace_bytes = 0;
  uint64_t used = 0;
  std::vector<DecodeJob> jobs;
  size_t staged_jobs = 0;  // jobs whose chunk was copied into `device`
  size_t first_index = 0;
  cudaEvent_t copied = nullptr;
  cudaEvent_t decoded = nullptr;
  bool in_flight = false;  // `decoded` is yet to pass

  ~Slot() {
    cudaFree(device);
    cudaFreeHost(pinned);
    cudaFree(workspace);
    if (copied) cudaEventDestroy(copied);
    if (decoded) cudaEventDestroy(decoded);
  }
};

absl::StatusOr<std::unique_ptr<GpuDecodeSink>> GpuDecodeSink::Create(
    const codec::gpu::KvLayout& layout,
    std::vector<codec::gpu::KvChunkRef> destinations, codec::gpu::Stream stream,
    GpuDecodeSinkOptions options) {
  if (options.batch_chunks == 0 || options.device_batch_chunks == 0 ||
      options.slots < 2 || options.slot_bytes == 0) {
    return absl::InvalidArgumentError(
        "a GPU decode sink needs batches of 1+ chunks and 2+ slots");
  }
  std::unique_ptr<GpuDecodeSink> sink(
      new GpuDecodeSink(layout, std::move(destinations), stream, options));
  if (absl::Status s = sink->Allocate(); !s.ok()) return s;
  return sink;
}

GpuDecodeSink::GpuDecodeSink(const codec::gpu::KvLayout& layout,
                             std::vector<codec::gpu::KvChunkRef> destinations,
                             codec::gpu::Stream stream,
                             GpuDecodeSinkOptions options)
    : layout_(layout),
      destinations_(std::move(destinations)),
      stream_(stream),
      options_(options),
      profile_(options.profile),
      on_layer_(options.on_layer) {}

absl::Status GpuDecodeSink::Allocate() {
  if (absl::Status s = AllocateStatuses(); !s.ok()) return s;
  cudaError_t e =
      cudaStreamCreateWithFlags(&copy_stream_, cudaStreamNonBlocking);
  if (e == cudaSuccess) e = cudaEventCreate(&started_);
  if (e == cudaSuccess) e = cudaEventCreate(&first_decoded_);
  for (uint32_t i = 0; e == cudaSuccess && i < options_.slots; ++i) {
    slots_.push_back(std::make_unique<Slot>());
    Slot& slot = *slots_.back();
    e = cudaMalloc(&slot.device, options_.slot_bytes);
    if (e == cudaSuccess) e = cudaMallocHost(&slot.pinned, options_.slot_bytes);
    if (e == cudaSuccess) {
      e = cudaEventCreateWithFlags(&slot.copied, cudaEventDisableTiming);
    }
    if (e == cudaSuccess) {
      e = cudaEventCreateWithFlags(&slot.decoded, cudaEventDisableTiming);
    }
  }
  return CudaError(e, "setting up the GPU decode sink");
}

absl::Status GpuDecodeSink::AllocateStatuses() {
  const size_t needed = std::max<size_t>(1, destinations_.size());
  if (needed <= status_capacity_) return absl::OkStatus();
  cudaFree(status_);
  status_ = nullptr;
  status_capacity_ = 0;
  if (absl::Status s = CudaError(cudaMalloc(&status_, sizeof(int32_t) * needed),
                                 "setting up the GPU decode sink");
      !s.ok()) {
    return s;
  }
  status_capacity_ = needed;
  return absl::OkStatus();
}

absl::Status GpuDecodeSink::Reset(
    const codec::gpu::KvLayout& layout,
    std::vector<codec::gpu::KvChunkRef> destinations, codec::gpu::Stream stream,
    const codec::gpu::DeviceProfile* profile, LayerReadyCallback on_layer) {
  if (consumed_ > 0 && !finished_) {
    return absl::FailedPreconditionError(
        "a GPU decode sink is reset only after Finish");
  }
  // A batch whose launch failed may still hold jobs; Finish waited for
  // every one that launched.
  for (auto& slot : slots_) {
    slot->jobs.clear();
    slot->staged_jobs = 0;
    slot->used = 0;
  }
  layout_ = layout;
  destinations_ = std::move(destinations);
  stream_ = stream;
  profile_ = profile;
  on_layer_ = std::move(on_layer);
  layered_.clear();
  held_.clear();
  staging_block_ = 0;
  staging_used_ = 0;
  filling_ = 0;
  consumed_ = 0;
  finished_ = false;
  launched_any_ = false;
  first_batch_ms_ = 0;
  return AllocateStatuses();
}

GpuDecodeSink::~GpuDecodeSink() {
  // Nothing may still read the slots or write the statuses when they go.
  if (launched_any_) cudaStreamSynchronize(stream_);
  if (copy_stream_) {
    cudaStreamSynchronize(copy_stream_);
    cudaStreamDestroy(copy_stream_);
  }
  slots_.clear();
  for (auto& [block, bytes] : staging_) cudaFree(block);
  cudaFree(layered_workspace_);
  if (layer_copied_) cudaEventDestroy(layer_copied_);
  for (cudaEvent_t e : layer_ready_) cudaEventDestroy(e);
  cudaFree(status_);
  if (started_) cudaEventDestroy(started_);
  if (first_decoded_) cudaEventDestroy(first_decoded_);
}

absl::Status GpuDecodeSink::CheckNext(size_t index) const {
  if (index != consumed_ || index >= destinations_.size()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "chunk ", index, " out of order or without a destination (",
        destinations_.size(), " given)"));
  }
  return absl::OkStatus();
}

absl::StatusOr<GpuDecodeSink::Slot*> GpuDecodeSink::SlotFor(
    size_t index, uint64_t staged_bytes) {
  if (absl::Status s = CheckNext(index); !s.ok()) return s;
  if (staged_bytes > options_.slot_bytes) {
    return absl::InvalidArgumentError(absl::StrCat(
        "chunk ", index, " is ", staged_bytes, " bytes; staging slots hold ",
        options_.slot_bytes, " (GpuDecodeSinkOptions::slot_bytes)"));
  }
  Slot* slot = slots_[filling_].get();
  if (slot->used + staged_bytes > options_.slot_bytes) {
    if (absl::Status s = Launch(); !s.ok()) return s;
    slot = slots_[filling_].get();
  }
  if (slot->jobs.empty()) {
    // The slot's last batch must be done with its buffers before reuse.
    if (slot->in_flight) {
      if (absl::Status s = CudaError(cudaEventSynchronize(slot->decoded),
                                     "waiting for a staging slot");
          !s.ok()) {
        return s;
      }
      slot->in_flight = false;
    }
    slot->first_index = index;
  }
  if (index == 0) cudaEventRecord(started_, copy_stream_);
  return slot;
}

void GpuDecodeSink::AddJob(Slot& slot, size_t index, const void* device_bytes,
                           uint64_t size) {
  DecodeJob job;
  job.stream = static_cast<const uint8_t*>(device_bytes);
  job.stream_bytes = size;
  job.dest = destinations_[index];
  slot.jobs.push_back(job);
  ++consumed_;
}

absl::Status GpuDecodeSink::LaunchIfFull(const Slot& slot) {
  const uint32_t batch = slot.staged_jobs > 0 ? options_.batch_chunks
                                              : options_.device_batch_chunks;
  return slot.jobs.size() >= batch ? Launch() : absl::OkStatus();
}

absl::Status GpuDecodeSink::Stage(
    size_t first, absl::Span<const uint64_t> sizes,
    absl::FunctionRef<absl::Status(Slot&, uint8_t*, uint64_t)> write) {
  if (first + sizes.size() > destinations_.size()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "chunks ", first, "..", first + sizes.size() - 1,
        " have no destination (", destinations_.size(), " given)"));
  }
  uint64_t end = 0;
  const std::vector<uint64_t> offsets = PackedOffsets(sizes, &end);
  const uint64_t reserved = (end + 255) / 256 * 256;
  absl::StatusOr<Slot*> slot = SlotFor(first, reserved);
  if (!slot.ok()) return slot.status();
  uint8_t* staged = (*slot)->device + (*slot)->used;
  if (absl::Status s = write(**slot, staged, end); !s.ok()) return s;
  for (size_t i = 0; i < sizes.size(); ++i) {
    AddJob(**slot, first + i, staged + offsets[i], sizes[i]);
  }
  (*slot)->used += reserved;
  (*slot)->staged_jobs += sizes.size();
  return LaunchIfFull(**slot);
}

absl::Status GpuDecodeSink::Consume(size_t index, absl::string_view bytes,
                                    bool stable) {
  if (layered()) {
    if (!stable) bytes = held_.emplace_back(bytes);
    return TakeLayered(index, bytes);
  }
  const uint64_t size = bytes.size();
  return Stage(index, absl::MakeConstSpan(&size, 1),
               [&](Slot& slot, uint8_t* staged, uint64_t) {
                 const void* source = bytes.data();
                 if (!stable) {
                   // gRPC's buffer is gone after this call, and pageable
                   // besides.
                   std::memcpy(slot.pinned + slot.used, bytes.data(), size);
                   source = slot.pinned + slot.used;
                 }
                 return CudaError(
                     cudaMemcpyAsync(staged, source, size,
                                     cudaMemcpyHostToDevice, copy_stream_),
                     "copying a chunk to the GPU");
               });
}

absl::Status GpuDecodeSink::ConsumeWrittenOnDevice(
    size_t first, absl::Span<const uint64_t> sizes,
    absl::FunctionRef<absl::Status(void*, uint64_t, CUstream_st*)> write) {
  // Written on the copy stream, so a batch's decode waits for it as it
  // waits for copies.
  if (layered()) return TakeWrittenLayered(first, sizes, write);
  return Stage(first, sizes, [&](Slot&, uint8_t* staged, uint64_t bytes) {
    return write(staged, bytes, copy_stream_);
  });
}

absl::Status GpuDecodeSink::ConsumeOnDevice(size_t index,
                                            const void* device_bytes,
                                            uint64_t size) {
  // Decoded where it lies: the chunk takes a place in the batch, but no
  // staging space.
  if (layered()) {
    return TakeLayeredOnDevice(index, static_cast<const uint8_t*>(device_bytes),
                               size);
  }
  absl::StatusOr<Slot*> slot = SlotFor(index, 0);
  if (!slot.ok()) return slot.status();
  AddJob(**slot, index, device_bytes, size);
  return LaunchIfFull(**slot);
}

absl::Status GpuDecodeSink::Launch() {
  Slot& slot = *slots_[filling_];
  if (slot.jobs.empty()) return absl::OkStatus();
  const uint64_t needed =
      codec::gpu::DecodeWorkspaceBytes(layout_, slot.jobs, profile_);
  if (absl::Status s =
          GrowDeviceBuffer(needed, &slot.workspace, &slot.workspace_bytes,
                           "allocating decode workspace");
      !s.ok()) {
    return s;
  }
  cudaEventRecord(slot.copied, copy_stream_);
  cudaStreamWaitEvent(stream_, slot.copied, 0);
  if (absl::Status s = codec::gpu::DecodeBatch(
          layout_, slot.jobs, slot.workspace, slot.workspace_bytes,
          status_ + slot.first_index, stream_, profile_);
      !s.ok()) {
    return s;
  }
  cudaEventRecord(slot.decoded, stream_);
  if (!launched_any_) cudaEventRecord(first_decoded_, stream_);
  launched_any_ = true;
  slot.in_flight = true;
  slot.jobs.clear();
  slot.staged_jobs = 0;
  slot.used = 0;
  filling_ = (filling_ + 1) % slots_.size();
  return absl::OkStatus();
}

absl::Status GpuDecodeSink::Finish() {
  if (layered()) return FinishLayered();
  const absl::Status launched = Launch();
  const cudaError_t synced = cudaStreamSynchronize(stream_);
  for (auto& slot : slots_) slot->in_flight = false;
  finished_ = true;
  if (!launched.ok()) return launched;
  if (synced != cudaSuccess) return CudaError(synced, "decoding on the GPU");
  if (launched_any_) {
    cudaEventElapsedTime(&first_batch_ms_, started_, first_decoded_);
  }
  return ChunkStatuses();
}

absl::Status GpuDecodeSink::ChunkStatuses() {
  std::vector<int32_t> status(consumed_);
  if (consumed_ > 0) {
    const cudaError_t e = cudaMemcpy(status.data(), status_, 4 * consumed_,
                                     cudaMemcpyDeviceToHost);
    if (e != cudaSuccess) return CudaError(e, "reading chunk statuses");
  }
  for (size_t i = 0; i < status.size(); ++i) {
    if (status[i] == codec::gpu::kNeedsProfile) {
      return absl::FailedPreconditionError(absl::StrCat(
          "chunk ", i, " is coded with a model profile ",
          profile_ == nullptr
              ? "and the fetch was given none"
              : absl::StrCat("other than the fetch's (",
                             codec::ProfileIdHex(profile_->id()), ")"),
          "; fetch the profile the chunk names and pass it"));
    }
    if (status[i] != codec::gpu::kOk) {
      return absl::DataLossError(absl::StrCat(
          "chunk ", i,
          " rejected by the GPU decoder: ", ChunkErrorName(status[i])));
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<uint8_t*> GpuDecodeSink::TakeStaging(uint64_t bytes) {
  bytes = (bytes + 255) / 256 * 256;  // Streams start 256-byte aligned.
  for (; staging_block_ < staging_.size(); ++staging_block_) {
    auto [block, capacity] = staging_[staging_block_];
    if (staging_used_ + bytes <= capacity) {
      staging_used_ += bytes;
      return block + staging_used_ - bytes;
    }
    staging_used_ = 0;
  }
  constexpr uint64_t kStagingBlock = 256 << 20;
  const uint64_t capacity = std::max(kStagingBlock, bytes);
  void* block = nullptr;
  if (absl::Status s = CudaError(cudaMalloc(&block, capacity),
                                 "allocating layer-by-layer staging");
      !s.ok()) {
    return s;
  }
  staging_.emplace_back(static_cast<uint8_t*>(block), capacity);
  staging_used_ = bytes;
  return static_cast<uint8_t*>(block);
}

absl::Status GpuDecodeSink::TakeLayered(size_t index, absl::string_view bytes) {
  if (absl::Status s = CheckNext(index); !s.ok()) return s;
  LayeredChunk chunk;
  chunk.bytes = reinterpret_cast<const uint8_t*>(bytes.data());
  chunk.size = bytes.size();
  // A chunk whose layers can't be found goes up whole with layer 0, for
  // the decoder to reject.
  absl::StatusOr<std::vector<uint64_t>> ends = codec::LayerEnds(bytes);
  chunk.ends = ends.ok() && ends->size() == layout_.layers
                   ? *std::move(ends)
                   : std::vector<uint64_t>(layout_.layers, bytes.size());
  chunk.ends.back() = bytes.size();  // The checksum comes with the last.
  absl::StatusOr<uint8_t*> staged = TakeStaging(bytes.size());
  if (!staged.ok()) return staged.status();
  chunk.staged = *staged;
  // Its headers, tables and layer 0 go up now, while later chunks are
  // still on their way.
  if (index == 0) cudaEventRecord(started_, copy_stream_);
  if (absl::Status s =
          CudaError(cudaMemcpyAsync(*staged, chunk.bytes, chunk.ends[0],
                                    cudaMemcpyHostToDevice, copy_stream_),
                    "copying a chunk's first layer to the GPU");
      !s.ok()) {
    return s;
  }
  layered_.push_back(std::move(chunk));
  ++consumed_;
  return absl::OkStatus();
}

absl::Status GpuDecodeSink::TakeLayeredOnDevice(size_t index,
                                                const uint8_t* bytes,
                                                uint64_t size) {
  if (absl::Status s = CheckNext(index); !s.ok()) return s;
  if (index == 0) cudaEventRecord(started_, copy_stream_);
  layered_.push_back({bytes, size, nullptr, {}});
  ++consumed_;
  return absl::OkStatus();
}

absl::Status GpuDecodeSink::TakeWrittenLayered(
    size_t first, absl::Span<const uint64_t> sizes,
    absl::FunctionRef<absl::Status(void*, uint64_t, CUstream_st*)> write) {
  uint64_t end = 0;
  const std::vector<uint64_t> offsets = PackedOffsets(sizes, &end);
  absl::StatusOr<uint8_t*> group = TakeStaging(end);
  if (!group.ok()) return group.status();
  if (absl::Status s = write(*group, end, copy_stream_); !s.ok()) return s;
  for (size_t i = 0; i < sizes.size(); ++i) {
    if (absl::Status s =
            TakeLayeredOnDevice(first + i, *group + offsets[i], sizes[i]);
        !s.ok()) {
      return s;
    }
  }
  return absl::OkStatus();
}

absl::Status GpuDecodeSink::RunLayers() {
  const size_t n = layered_.size();
  const uint32_t layers = layout_.layers;
  if (n == 0) return absl::OkStatus();
  std::vector<DecodeJob> jobs(n);
  for (size_t i = 0; i < n; ++i) {
    const LayeredChunk& c = layered_[i];
    jobs[i].stream = c.staged != nullptr ? c.staged : c.bytes;
    jobs[i].stream_bytes = c.size;
    jobs[i].dest = destinations_[i];
  }
  const codec::gpu::LayerRange one_layer{0, 1, false, false};
  const uint64_t workspace =
      codec::gpu::DecodeWorkspaceBytes(layout_, jobs, profile_, one_layer);
  if (absl::Status s = GrowDeviceBuffer(workspace, &layered_workspace_,
                                        &layered_workspace_bytes_,
                                        "allocating decode workspace");
      !s.ok()) {
    return s;
  }
  cudaError_t e = cudaSuccess;
  if (layer_copied_ == nullptr) {
    e = cudaEventCreateWithFlags(&layer_copied_, cudaEventDisableTiming);
  }
  while (e == cudaSuccess && layer_ready_.size() < layers) {
    e = cudaEventCreate(&layer_ready_.emplace_back());
    if (e != cudaSuccess) layer_ready_.pop_back();
  }
  if (e != cudaSuccess) return CudaError(e, "setting up layer events");

  std::vector<void*> to;
  std::vector<const void*> from;
  std::vector<size_t> sizes;
  for (uint32_t l = 0; l < layers; ++l) {
    // Layer 0 went up with each chunk.
    to.clear();
    from.clear();
    sizes.clear();
    for (const LayeredChunk& c : layered_) {
      if (l == 0 || c.ends.empty() || c.ends[l] == c.ends[l - 1]) continue;
      const uint64_t begin = c.ends[l - 1];
      to.push_back(c.staged + begin);
      from.push_back(c.bytes + begin);
      sizes.push_back(c.ends[l] - begin);
    }
    if (absl::Status s = CudaError(CopyPieces(to, from, sizes, copy_stream_),
                                   "copying a layer to the GPU");
        !s.ok()) {
      return s;
    }
    cudaEventRecord(layer_copied_, copy_stream_);
    cudaStreamWaitEvent(stream_, layer_copied_, 0);
    const codec::gpu::LayerRange range{l, 1, l > 0, l + 1 == layers};
    if (absl::Status s = codec::gpu::DecodeBatch(
            layout_, jobs, layered_workspace_, layered_workspace_bytes_,
            status_, stream_, profile_, range);
        !s.ok()) {
      return s;
    }
    launched_any_ = true;
    cudaEventRecord(layer_ready_[l], stream_);
    on_layer_(l, layer_ready_[l]);
  }
  return absl::OkStatus();
}

absl::Status GpuDecodeSink::FinishLayered() {
  const absl::Status ran = RunLayers();
  // Copies precede the decodes that wait for them, unless a failure came
  // between.
  const cudaError_t copied = cudaStreamSynchronize(copy_stream_);
  const cudaError_t synced = cudaStreamSynchronize(stream_);
  finished_ = true;
  held_.clear();
  if (!ran.ok()) return ran;
  if (copied != cudaSuccess) return CudaError(copied, "copying to the GPU");
  if (synced != cudaSuccess) return CudaError(synced, "decoding on the GPU");
  if (launched_any_) {
    cudaEventElapsedTime(&first_batch_ms_, started_, layer_ready_[0]);
  }
  return ChunkStatuses();
}

}  // namespace kvcache::transfer
