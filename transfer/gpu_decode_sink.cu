#include <cuda_runtime.h>

#include <algorithm>
#include <cstring>
#include <utility>

#include "absl/strings/str_cat.h"
#include "transfer/cuda_status.h"
#include "transfer/gpu_decode_sink.h"

namespace kvcache::transfer {

using codec::gpu::ChunkErrorName;
using codec::gpu::DecodeJob;

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
      profile_(options.profile) {}

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
    const codec::gpu::DeviceProfile* profile) {
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
  cudaFree(status_);
  if (started_) cudaEventDestroy(started_);
  if (first_decoded_) cudaEventDestroy(first_decoded_);
}

absl::StatusOr<GpuDecodeSink::Slot*> GpuDecodeSink::SlotFor(
    size_t index, uint64_t staged_bytes) {
  if (index != consumed_ || index >= destinations_.size()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "chunk ", index, " out of order or without a destination (",
        destinations_.size(), " given)"));
  }
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
  // Streams start 256-byte aligned, as the decoder's loads like.
  std::vector<uint64_t> offsets;
  uint64_t end = 0;
  for (uint64_t size : sizes) {
    offsets.push_back((end + 255) / 256 * 256);
    end = offsets.back() + size;
  }
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
  return Stage(first, sizes, [&](Slot&, uint8_t* staged, uint64_t bytes) {
    return write(staged, bytes, copy_stream_);
  });
}

absl::Status GpuDecodeSink::ConsumeOnDevice(size_t index,
                                            const void* device_bytes,
                                            uint64_t size) {
  // Decoded where it lies: the chunk takes a place in the batch, but no
  // staging space.
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
  if (needed > slot.workspace_bytes) {
    cudaFree(slot.workspace);
    slot.workspace = nullptr;
    slot.workspace_bytes = 0;
    if (absl::Status s = CudaError(cudaMalloc(&slot.workspace, needed),
                                   "allocating decode workspace");
        !s.ok()) {
      return s;
    }
    slot.workspace_bytes = needed;
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
  const absl::Status launched = Launch();
  const cudaError_t synced = cudaStreamSynchronize(stream_);
  for (auto& slot : slots_) slot->in_flight = false;
  finished_ = true;
  if (!launched.ok()) return launched;
  if (synced != cudaSuccess) return CudaError(synced, "decoding on the GPU");
  if (launched_any_) {
    cudaEventElapsedTime(&first_batch_ms_, started_, first_decoded_);
  }
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

}  // namespace kvcache::transfer
