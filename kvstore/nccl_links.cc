#include "kvstore/nccl_links.h"

#include <cuda_runtime.h>

#include <deque>
#include <utility>

#include "absl/strings/str_cat.h"
#include "transfer/cuda_status.h"
#include "transfer/nccl_link.h"

namespace kvcache::kvstore {

using transfer::NcclLink;

namespace {

// Chunks in a message start 256-byte aligned, as the worker's sink lays
// them out (ChunkSink::ConsumeWrittenOnDevice).
uint64_t Aligned(uint64_t bytes) { return (bytes + 255) / 256 * 256; }

}  // namespace

struct NcclLinks::Link {
  // One send: its chunks stay held until `done` has passed on the stream.
  struct InFlight {
    cudaEvent_t done = nullptr;
    std::vector<ChunkRef> chunks;
    absl::Time deadline;
  };

  explicit Link(int device) : device(device) {}
  ~Link() {
    cudaSetDevice(device);
    // Aborting first lets sends the worker never took end, so nothing
    // reads the chunks or the staging below once the stream is done.
    if (nccl) nccl->Abort();
    if (stream) cudaStreamSynchronize(stream);
    for (InFlight& sent : in_flight) cudaEventDestroy(sent.done);
    cudaFree(staging);
    if (stream) cudaStreamDestroy(stream);
  }

  const int device;
  absl::Mutex mu;
  bool joined ABSL_GUARDED_BY(mu) = false;
  bool closed ABSL_GUARDED_BY(mu) = false;
  absl::Status failure ABSL_GUARDED_BY(mu);  // why the link is unusable
  std::unique_ptr<NcclLink> nccl ABSL_GUARDED_BY(mu);
  cudaStream_t stream ABSL_GUARDED_BY(mu) = nullptr;
  char* staging ABSL_GUARDED_BY(mu) = nullptr;
  std::deque<InFlight> in_flight ABSL_GUARDED_BY(mu);
  absl::Time last_used ABSL_GUARDED_BY(mu) = absl::Now();
};

NcclLinks::NcclLinks(NcclLinksOptions options)
    : options_(options), reaper_([this] { Reap(); }) {}

NcclLinks::~NcclLinks() {
  {
    absl::MutexLock lock(&mu_);
    stopping_ = true;
    // Joins under way hold their links; wait for them to end.
    auto joins_done = [this]() ABSL_SHARED_LOCKS_REQUIRED(mu_) {
      return joining_ == 0;
    };
    mu_.Await(absl::Condition(&joins_done));
  }
  reaper_.join();
  absl::MutexLock lock(&mu_);
  links_.clear();
}

std::shared_ptr<NcclLinks::Link> NcclLinks::Find(uint64_t link) const {
  absl::MutexLock lock(&mu_);
  auto it = links_.find(link);
  return it == links_.end() ? nullptr : it->second;
}

absl::StatusOr<uint64_t> NcclLinks::Open(std::string nccl_id,
                                         absl::Duration join_timeout) {
  if (options_.max_links == 0) {
    return absl::FailedPreconditionError(
        "this node opens no NCCL links (gpu_tier.max_nccl_links is 0)");
  }
  if (nccl_id.size() != 128) {
    return absl::InvalidArgumentError(
        absl::StrCat("an NCCL link id is 128 bytes, not ", nccl_id.size()));
  }
  if (absl::Status s = NcclLink::Available(); !s.ok()) return s;
  auto link = std::make_shared<Link>(options_.device);
  uint64_t id = 0;
  {
    absl::MutexLock lock(&mu_);
    if (stopping_) return absl::UnavailableError("the node is stopping");
    if (links_.size() >= options_.max_links) {
      // Make room by closing the link idle longest, if any is idle.
      auto idlest = links_.end();
      absl::Time idle_since = absl::InfiniteFuture();
      for (auto it = links_.begin(); it != links_.end(); ++it) {
        absl::MutexLock link_lock(&it->second->mu);
        if (it->second->joined && it->second->in_flight.empty() &&
            it->second->last_used < idle_since) {
          idlest = it;
          idle_since = it->second->last_used;
        }
      }
      if (idlest == links_.end()) {
        return absl::ResourceExhaustedError(absl::StrCat(
            "all ", options_.max_links,
            " NCCL links of this node are busy (gpu_tier.max_nccl_links)"));
      }
      {
        absl::MutexLock link_lock(&idlest->second->mu);
        idlest->second->closed = true;
        if (idlest->second->nccl) idlest->second->nccl->Abort();
      }
      links_.erase(idlest);
    }
    id = next_id_++;
    links_[id] = link;
    ++joining_;
  }
  // The worker joins once it has the answer, so the node joins in the
  // background.
  std::thread([this, link, nccl_id = std::move(nccl_id), join_timeout] {
    absl::StatusOr<std::unique_ptr<NcclLink>> joined = NcclLink::Join(
        nccl_id, NcclLink::kNodeRank, options_.device, join_timeout);
    {
      absl::MutexLock lock(&link->mu);
      link->joined = true;
      if (!joined.ok()) {
        link->failure = joined.status();
      } else if (link->closed) {
        (*joined)->Abort();
      } else {
        link->nccl = *std::move(joined);
      }
    }
    absl::MutexLock lock(&mu_);
    --joining_;
  }).detach();
  return id;
}

bool NcclLinks::IsOpen(uint64_t link) const {
  absl::MutexLock lock(&mu_);
  return links_.contains(link);
}

bool NcclLinks::Close(uint64_t link) {
  std::shared_ptr<Link> closing;
  {
    absl::MutexLock lock(&mu_);
    auto it = links_.find(link);
    if (it == links_.end()) return false;
    closing = std::move(it->second);
    links_.erase(it);
  }
  absl::MutexLock lock(&closing->mu);
  closing->closed = true;
  if (closing->nccl) closing->nccl->Abort();
  return true;
}

absl::StatusOr<size_t> NcclLinks::Send(uint64_t id,
                                       std::vector<ChunkRef> chunks) {
  std::shared_ptr<Link> link = Find(id);
  if (link == nullptr) {
    return absl::NotFoundError(
        absl::StrCat("no NCCL link ", id, " (closed, or the node restarted)"));
  }
  absl::MutexLock lock(&link->mu);
  auto joined = [&link]() ABSL_SHARED_LOCKS_REQUIRED(link->mu) {
    return link->joined;
  };
  if (!link->mu.AwaitWithTimeout(absl::Condition(&joined),
                                 options_.send_timeout)) {
    return absl::DeadlineExceededError(
        absl::StrCat("NCCL link ", id, " is still being joined"));
  }
  if (!link->failure.ok()) {
    return absl::UnavailableError(
        absl::StrCat("NCCL link ", id, " failed: ", link->failure.message()));
  }
  if (link->closed || link->nccl == nullptr) {
    return absl::UnavailableError(absl::StrCat("NCCL link ", id, " is closed"));
  }
  if (absl::Status s =
          CudaError(cudaSetDevice(options_.device), "using the GPU tier's GPU");
      !s.ok()) {
    return s;
  }
  if (link->stream == nullptr) {
    cudaError_t e =
        cudaStreamCreateWithFlags(&link->stream, cudaStreamNonBlocking);
    if (e == cudaSuccess) {
      e = cudaMalloc(&link->staging, options_.staging_bytes);
    }
    if (absl::Status s = CudaError(e, "setting up an NCCL link's staging");
        !s.ok()) {
      return s;
    }
  }
  // The chunks go as one message, packed into the staging buffer: NCCL
  // moves one large transfer far faster than many small ones. Sends queued
  // earlier read the staging first: the copies wait for them on the link's
  // stream.
  uint64_t staged = 0;
  size_t queued = 0;
  absl::Status status;
  for (const ChunkRef& chunk : chunks) {
    const uint64_t at = Aligned(staged);
    if (at + chunk.size_bytes > options_.staging_bytes) {
      if (queued == 0) {
        status = absl::ResourceExhaustedError(absl::StrCat(
            "a ", chunk.size_bytes, "-byte chunk is larger than the ",
            options_.staging_bytes,
            "-byte NCCL staging (gpu_tier.nccl_staging_bytes)"));
      }
      break;
    }
    status = CudaError(
        cudaMemcpyAsync(
            link->staging + at, chunk.data.get(), chunk.size_bytes,
            chunk.on_device ? cudaMemcpyDeviceToDevice : cudaMemcpyHostToDevice,
            link->stream),
        "staging a chunk for NCCL");
    if (!status.ok()) break;
    staged = at + chunk.size_bytes;
    ++queued;
  }
  if (status.ok() && queued > 0) {
    status = link->nccl->Send(link->staging, staged, link->stream);
    if (!status.ok()) {
      // The worker expects a message this link can no longer send.
      link->failure = status;
      link->nccl->Abort();
    }
  }
  if (queued > 0) {
    Link::InFlight sent;
    cudaError_t e =
        cudaEventCreateWithFlags(&sent.done, cudaEventDisableTiming);
    if (e == cudaSuccess) e = cudaEventRecord(sent.done, link->stream);
    if (e != cudaSuccess) {
      // Without an event the chunks cannot be let go safely: wait here.
      cudaStreamSynchronize(link->stream);
      if (sent.done) cudaEventDestroy(sent.done);
      if (status.ok()) status = CudaError(e, "tracking an NCCL send");
    } else {
      chunks.resize(queued);
      sent.chunks = std::move(chunks);
      sent.deadline = absl::Now() + options_.send_timeout;
      link->in_flight.push_back(std::move(sent));
    }
  }
  link->last_used = absl::Now();
  if (!status.ok()) return status;
  return queued;
}

size_t NcclLinks::open_links() const {
  absl::MutexLock lock(&mu_);
  return links_.size();
}

size_t NcclLinks::sends_in_flight() const {
  std::vector<std::shared_ptr<Link>> links;
  {
    absl::MutexLock lock(&mu_);
    for (const auto& [id, link] : links_) links.push_back(link);
  }
  size_t sends = 0;
  for (const auto& link : links) {
    absl::MutexLock lock(&link->mu);
    sends += link->in_flight.size();
  }
  return sends;
}

bool NcclLinks::ReapLink(Link& link, absl::Time now) {
  absl::MutexLock lock(&link.mu);
  while (!link.in_flight.empty()) {
    Link::InFlight& oldest = link.in_flight.front();
    const cudaError_t state = cudaEventQuery(oldest.done);
    if (state == cudaErrorNotReady) {
      if (now > oldest.deadline && link.nccl != nullptr) {
        // The worker is gone or stuck: end its sends so the stream, and
        // the chunks they hold, are freed.
        link.failure = absl::DeadlineExceededError(
            absl::StrCat("the worker took no send within ",
                         absl::FormatDuration(options_.send_timeout)));
        link.nccl->Abort();
        link.nccl.reset();
      }
      return true;
    }
    cudaEventDestroy(oldest.done);
    link.in_flight.pop_front();
  }
  return false;
}

void NcclLinks::Reap() {
  absl::MutexLock lock(&mu_);
  bool busy = false;
  auto stopping = [this]()
                      ABSL_SHARED_LOCKS_REQUIRED(mu_) { return stopping_; };
  // Polls often while sends are in flight, rarely otherwise.
  while (!mu_.AwaitWithTimeout(
      absl::Condition(&stopping),
      busy ? absl::Milliseconds(1) : absl::Milliseconds(50))) {
    std::vector<std::shared_ptr<Link>> links;
    for (const auto& [id, link] : links_) links.push_back(link);
    mu_.Unlock();
    const absl::Time now = absl::Now();
    busy = false;
    for (const auto& link : links) busy = ReapLink(*link, now) || busy;
    links.clear();
    mu_.Lock();
  }
}

}  // namespace kvcache::kvstore
