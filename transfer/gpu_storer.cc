#include "transfer/gpu_storer.h"

#include <cuda_runtime.h>

#include <algorithm>
#include <string>
#include <utility>

#include "absl/strings/str_cat.h"
#include "transfer/cuda_status.h"

namespace kvcache::transfer {

using codec::gpu::ChunkErrorName;
using codec::gpu::EncodeJob;

struct GpuStorer::Slot {
  uint8_t* out = nullptr;  // device, batch_chunks bitstreams
  void* workspace = nullptr;
  uint64_t workspace_bytes = 0;
  uint64_t* out_bytes = nullptr;   // device, per chunk
  int32_t* status = nullptr;       // device, per chunk
  uint64_t* host_bytes = nullptr;  // pinned copies of the two above
  int32_t* host_status = nullptr;
  cudaEvent_t encoded = nullptr;

  ~Slot() {
    cudaFree(out);
    cudaFree(workspace);
    cudaFree(out_bytes);
    cudaFree(status);
    cudaFreeHost(host_bytes);
    cudaFreeHost(host_status);
    if (encoded) cudaEventDestroy(encoded);
  }
};

struct GpuStorer::Batch {
  Ticket ticket = 0;
  Slot* slot = nullptr;
  size_t first = 0;  // index in the ticket of the batch's first chunk
  std::vector<ChunkFromDevice> chunks;
  PutOptions options;
  // Set once copied down.
  std::vector<std::string> streams;  // chunks[0, streams.size()) encoded
  uint64_t bytes = 0;
  absl::Status status;  // the batch's first error, if any
};

absl::StatusOr<std::unique_ptr<GpuStorer>> GpuStorer::Create(
    std::shared_ptr<ChunkStore> store, const codec::gpu::KvLayout& layout,
    GpuStorerOptions options) {
  if (store == nullptr || options.batch_chunks == 0 || options.slots == 0 ||
      options.chunk_tokens == 0) {
    return absl::InvalidArgumentError(
        "a GPU storer needs a store, chunks of 1+ tokens, batches of 1+ "
        "chunks and 1+ slots");
  }
  std::unique_ptr<GpuStorer> storer(
      new GpuStorer(std::move(store), layout, options));
  if (absl::Status s = storer->Allocate(); !s.ok()) return s;
  storer->copier_ = std::thread([s = storer.get()] { s->CopyDown(); });
  storer->putter_ = std::thread([s = storer.get()] { s->PutCopied(); });
  return storer;
}

GpuStorer::GpuStorer(std::shared_ptr<ChunkStore> store,
                     const codec::gpu::KvLayout& layout,
                     GpuStorerOptions options)
    : store_(std::move(store)), layout_(layout), options_(options) {}

absl::Status GpuStorer::Allocate() {
  // Bitstreams start 256-byte aligned, as the encoder's vector stores want.
  out_capacity_ =
      (codec::gpu::MaxEncodedBytes(layout_.ShapeOf(options_.chunk_tokens)) +
       255) /
      256 * 256;
  // The workspace a full batch needs; a layout needing more grows it.
  std::vector<EncodeJob> jobs(options_.batch_chunks);
  for (EncodeJob& job : jobs) job.src.tokens = options_.chunk_tokens;
  const uint64_t workspace = codec::gpu::EncodeWorkspaceBytes(
      codec::gpu::KvLayout::Contiguous(layout_.layers, layout_.kv_heads,
                                       layout_.head_dim, layout_.dtype),
      jobs);
  const uint32_t n = options_.batch_chunks;
  cudaError_t e = cudaGetDevice(&device_);
  if (e == cudaSuccess) {
    e = cudaStreamCreateWithFlags(&copy_stream_, cudaStreamNonBlocking);
  }
  for (uint32_t i = 0; e == cudaSuccess && i < options_.slots; ++i) {
    slots_.push_back(std::make_unique<Slot>());
    Slot& slot = *slots_.back();
    free_slots_.push_back(&slot);
    e = cudaMalloc(&slot.out, out_capacity_ * n);
    if (e == cudaSuccess) e = cudaMalloc(&slot.workspace, workspace);
    slot.workspace_bytes = workspace;
    if (e == cudaSuccess) e = cudaMalloc(&slot.out_bytes, sizeof(uint64_t) * n);
    if (e == cudaSuccess) e = cudaMalloc(&slot.status, sizeof(int32_t) * n);
    if (e == cudaSuccess) {
      e = cudaMallocHost(&slot.host_bytes, sizeof(uint64_t) * n);
    }
    if (e == cudaSuccess) {
      e = cudaMallocHost(&slot.host_status, sizeof(int32_t) * n);
    }
    if (e == cudaSuccess) {
      e = cudaEventCreateWithFlags(&slot.encoded, cudaEventDisableTiming);
    }
    device_bytes_ += out_capacity_ * n + workspace;
  }
  return CudaError(e, "setting up the GPU storer");
}

GpuStorer::~GpuStorer() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stopping_ = true;
  }
  changed_.notify_all();
  if (copier_.joinable()) copier_.join();
  if (putter_.joinable()) putter_.join();
  slots_.clear();
  if (copy_stream_) cudaStreamDestroy(copy_stream_);
}

absl::StatusOr<GpuStorer::Ticket> GpuStorer::Store(
    std::vector<ChunkFromDevice> chunks, codec::gpu::Stream stream,
    const PutOptions& options) {
  for (size_t i = 0; i < chunks.size(); ++i) {
    const uint32_t tokens = chunks[i].source.tokens;
    if (tokens == 0 || tokens > options_.chunk_tokens) {
      return absl::InvalidArgumentError(absl::StrCat(
          "chunk ", i, " has ", tokens, " tokens; this storer takes 1 to ",
          options_.chunk_tokens, " (GpuStorerOptions::chunk_tokens)"));
    }
  }
  const size_t batch = options_.batch_chunks;
  const size_t batches = (chunks.size() + batch - 1) / batch;
  Ticket ticket;
  {
    std::lock_guard<std::mutex> lock(mu_);
    ticket = next_ticket_++;
    tickets_[ticket].batches_left = batches;
  }
  for (size_t first = 0; first < chunks.size(); first += batch) {
    auto b = std::make_unique<Batch>();
    b->ticket = ticket;
    b->first = first;
    b->options = options;
    const size_t end = std::min(chunks.size(), first + batch);
    b->chunks.assign(std::make_move_iterator(chunks.begin() + first),
                     std::make_move_iterator(chunks.begin() + end));
    {
      std::unique_lock<std::mutex> lock(mu_);
      changed_.wait(lock, [&] { return !free_slots_.empty(); });
      b->slot = free_slots_.back();
      free_slots_.pop_back();
    }
    Slot& slot = *b->slot;
    std::vector<EncodeJob> jobs(b->chunks.size());
    for (size_t i = 0; i < jobs.size(); ++i) {
      jobs[i].src = b->chunks[i].source;
      jobs[i].out = slot.out + i * out_capacity_;
      jobs[i].out_capacity = out_capacity_;
    }
    absl::Status s;
    const uint64_t workspace = codec::gpu::EncodeWorkspaceBytes(layout_, jobs);
    if (workspace > slot.workspace_bytes) {
      // The slot is idle: its last batch was copied down before it came back.
      cudaFree(slot.workspace);
      slot.workspace = nullptr;
      slot.workspace_bytes = 0;
      s = CudaError(cudaMalloc(&slot.workspace, workspace),
                    "growing the GPU storer's workspace");
      if (s.ok()) slot.workspace_bytes = workspace;
    }
    if (s.ok()) {
      s = codec::gpu::EncodeBatch(layout_, jobs, options_.level, slot.workspace,
                                  slot.workspace_bytes, slot.out_bytes,
                                  slot.status, stream);
    }
    if (s.ok()) {
      s = CudaError(cudaEventRecord(slot.encoded, stream), "queueing a store");
    }
    std::lock_guard<std::mutex> lock(mu_);
    if (!s.ok()) {
      // Batches already queued still drain; the ticket goes with the last.
      free_slots_.push_back(b->slot);
      TicketState& state = tickets_[ticket];
      state.batches_left -= batches - first / batch;
      state.abandoned = true;
      if (state.batches_left == 0) tickets_.erase(ticket);
      changed_.notify_all();
      return s;
    }
    encoding_.push_back(std::move(b));
    changed_.notify_all();
  }
  return ticket;
}

absl::StatusOr<StoreReport> GpuStorer::Wait(Ticket ticket) {
  std::unique_lock<std::mutex> lock(mu_);
  auto it = tickets_.find(ticket);
  if (it == tickets_.end()) {
    return absl::InvalidArgumentError(
        absl::StrCat("no store with ticket ", ticket, " is waiting"));
  }
  changed_.wait(lock, [&] { return it->second.batches_left == 0; });
  TicketState state = std::move(it->second);
  tickets_.erase(it);
  if (!state.status.ok()) return state.status;
  return state.report;
}

void GpuStorer::CopyDown() {
  cudaSetDevice(device_);
  for (;;) {
    std::unique_ptr<Batch> batch;
    bool skip;
    {
      std::unique_lock<std::mutex> lock(mu_);
      changed_.wait(lock, [&] {
        return (stopping_ || !encoding_.empty()) &&
               copied_bytes_ < options_.max_queued_bytes;
      });
      if (encoding_.empty()) return;
      batch = std::move(encoding_.front());
      encoding_.pop_front();
      copying_ = true;
      skip = !tickets_[batch->ticket].status.ok();
    }
    if (skip) {
      // An earlier chunk of the ticket failed: nothing of it after that
      // chunk is stored. The slot is free once its encode is done.
      batch->status = CudaError(cudaEventSynchronize(batch->slot->encoded),
                                "waiting for an encode");
    } else {
      batch->status = CopyBatch(*batch);
    }
    std::lock_guard<std::mutex> lock(mu_);
    free_slots_.push_back(batch->slot);
    batch->slot = nullptr;
    copied_bytes_ += batch->bytes;
    copied_.push_back(std::move(batch));
    copying_ = false;
    changed_.notify_all();
  }
}

void GpuStorer::PutCopied() {
  for (;;) {
    std::unique_ptr<Batch> batch;
    bool skip;
    {
      std::unique_lock<std::mutex> lock(mu_);
      changed_.wait(lock, [&] {
        return !copied_.empty() ||
               (stopping_ && encoding_.empty() && !copying_);
      });
      if (copied_.empty()) return;
      batch = std::move(copied_.front());
      copied_.pop_front();
      skip = !tickets_[batch->ticket].status.ok();
    }
    StoreReport report;
    absl::Status s = batch->status;
    const size_t good = batch->streams.size();
    if (!skip && good > 0) {
      std::vector<ChunkToPut> puts(good);
      for (size_t i = 0; i < good; ++i) {
        puts[i] = {batch->chunks[i].key, batch->streams[i],
                   batch->chunks[i].parent};
        report.raw_bytes +=
            layout_.ShapeOf(batch->chunks[i].source.tokens).RawBytes();
      }
      if (absl::Status put = store_->Put(puts, batch->options); put.ok()) {
        report.chunks = good;
        report.stored_bytes = batch->bytes;
      } else {
        s = put;
        report = {};
      }
    }
    std::lock_guard<std::mutex> lock(mu_);
    copied_bytes_ -= batch->bytes;
    TicketState& state = tickets_[batch->ticket];
    if (state.status.ok()) state.status = s;
    state.report.chunks += report.chunks;
    state.report.raw_bytes += report.raw_bytes;
    state.report.stored_bytes += report.stored_bytes;
    if (--state.batches_left == 0 && state.abandoned) {
      tickets_.erase(batch->ticket);
    }
    changed_.notify_all();
  }
}

absl::Status GpuStorer::CopyBatch(Batch& batch) {
  Slot& slot = *batch.slot;
  const size_t n = batch.chunks.size();
  cudaStream_t copy = copy_stream_;
  cudaError_t e = cudaStreamWaitEvent(copy, slot.encoded, 0);
  if (e == cudaSuccess) {
    e = cudaMemcpyAsync(slot.host_bytes, slot.out_bytes, sizeof(uint64_t) * n,
                        cudaMemcpyDeviceToHost, copy);
  }
  if (e == cudaSuccess) {
    e = cudaMemcpyAsync(slot.host_status, slot.status, sizeof(int32_t) * n,
                        cudaMemcpyDeviceToHost, copy);
  }
  if (e == cudaSuccess) e = cudaStreamSynchronize(copy);
  if (absl::Status s = CudaError(e, "encoding chunks to store"); !s.ok()) {
    return s;
  }
  // A rejected chunk ends what its ticket stores.
  size_t good = 0;
  while (good < n && slot.host_status[good] == codec::gpu::kOk) ++good;
  batch.streams.resize(good);
  for (size_t i = 0; i < good && e == cudaSuccess; ++i) {
    batch.streams[i].resize(slot.host_bytes[i]);
    batch.bytes += slot.host_bytes[i];
    e = cudaMemcpyAsync(batch.streams[i].data(), slot.out + i * out_capacity_,
                        slot.host_bytes[i], cudaMemcpyDeviceToHost, copy);
  }
  if (e == cudaSuccess) e = cudaStreamSynchronize(copy);
  if (absl::Status s = CudaError(e, "copying encoded chunks"); !s.ok()) {
    batch.streams.clear();
    batch.bytes = 0;
    return s;
  }
  if (good == n) return absl::OkStatus();
  return absl::InvalidArgumentError(
      absl::StrCat("chunk ", batch.first + good,
                   " of the store could not be encoded from its blocks (",
                   ChunkErrorName(slot.host_status[good]),
                   "); it and the chunks after it were not stored"));
}

}  // namespace kvcache::transfer
