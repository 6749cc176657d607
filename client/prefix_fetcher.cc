#include "client/prefix_fetcher.h"

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <future>
#include <string>
#include <utility>

#include "absl/cleanup/cleanup.h"
#include "absl/strings/str_cat.h"
#include "transfer/cuda_devices.h"
#include "transfer/cuda_status.h"

namespace kvcache {

absl::StatusOr<std::unique_ptr<PrefixFetcher>> PrefixFetcher::Create(
    std::shared_ptr<KvCacheClient> client, FetcherOptions options) {
  std::unique_ptr<PrefixFetcher> fetcher(
      new PrefixFetcher(std::move(client), options));
  const Transport transport = options.transport;
  if (transport == Transport::kAuto || transport == Transport::kSharedMemory) {
    absl::Status s = fetcher->ConnectRegion();
    if (!s.ok() && transport == Transport::kSharedMemory) {
      return absl::FailedPreconditionError(absl::StrCat(
          "shared-memory transport asked for, but: ", s.message()));
    }
  }
  if (transport == Transport::kNccl ||
      (transport == Transport::kAuto && !fetcher->shared_memory())) {
    absl::Status s = fetcher->OpenNcclLink();
    if (!s.ok() && transport == Transport::kNccl) {
      return absl::FailedPreconditionError(
          absl::StrCat("NCCL transport asked for, but: ", s.message()));
    }
    // Nodes without NCCL links, and workers without a GPU, are the usual
    // case for gRPC; only a link that failed to open is news.
    if (!s.ok() && !absl::IsFailedPrecondition(s)) {
      std::fprintf(stderr, "kvcache: no NCCL link to the node: %s\n",
                   s.ToString().c_str());
    }
  }
  return fetcher;
}

PrefixFetcher::~PrefixFetcher() {
  DropNcclLink();
  DropRegion();
}

absl::Status PrefixFetcher::ConnectRegion() {
  absl::StatusOr<v1::NodeInfoResponse> info = client_->NodeInfo();
  if (!info.ok()) return info.status();
  if (info->shared_memory_socket().empty()) {
    return absl::UnavailableError(absl::StrCat(
        "node ", info->node_id(), " shares no memory (shared_memory.enabled)"));
  }
  absl::StatusOr<std::unique_ptr<transfer::SharedRegion>> region =
      transfer::SharedRegion::Connect(info->shared_memory_socket());
  if (!region.ok()) return region.status();
  // A socket of the same name on another host, or of a restarted node,
  // hands out some other region.
  if ((*region)->id() != info->shared_region_id()) {
    return absl::UnavailableError(absl::StrCat(info->shared_memory_socket(),
                                               " belongs to another node than ",
                                               client_->options().address));
  }
  region_ = *std::move(region);
  OpenGpuRegion(*info);
  if (options_.register_for_gpu) {
    std::string error;
    registered_ = transfer::RegisterHostMemory(
        const_cast<char*>(region_->base()), region_->size(), &error,
        /*read_only=*/true);
    if (!registered_) {
      std::fprintf(stderr, "kvcache: shared region not page-locked: %s\n",
                   error.c_str());
    }
  }
  return absl::OkStatus();
}

void PrefixFetcher::OpenGpuRegion(const v1::NodeInfoResponse& info) {
  // Only once the shared region proved the node is on this host.
  if (!options_.open_gpu_tier || info.gpu_ipc_handle().empty()) return;
  absl::StatusOr<std::unique_ptr<transfer::GpuRegion>> gpu =
      transfer::GpuRegion::Open(info.gpu_ipc_handle(), info.gpu_region_bytes(),
                                info.gpu_region_id());
  if (gpu.ok()) {
    gpu_region_ = *std::move(gpu);
  } else {
    std::fprintf(stderr, "kvcache: node's GPU tier (on %s) not opened: %s\n",
                 info.gpu_pci_bus_id().c_str(),
                 gpu.status().ToString().c_str());
  }
}

void PrefixFetcher::DropRegion() {
  if (registered_)
    transfer::UnregisterHostMemory(const_cast<char*>(region_->base()));
  registered_ = false;
  region_.reset();
  gpu_region_.reset();
}

absl::Status PrefixFetcher::OpenNcclLink() {
  absl::StatusOr<v1::NodeInfoResponse> info = client_->NodeInfo();
  if (!info.ok()) return info.status();
  if (!info->nccl_links()) {
    return absl::FailedPreconditionError(absl::StrCat(
        "node ", info->node_id(), " opens no NCCL links (no GPU tier)"));
  }
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) {
    return absl::FailedPreconditionError("this process has no GPU");
  }
  absl::StatusOr<std::string> id = transfer::NcclLink::NewId();
  if (!id.ok()) return id.status();
  absl::StatusOr<v1::OpenNcclLinkResponse> opened =
      client_->OpenNcclLink(*id, options_.nccl_join_timeout);
  if (!opened.ok()) return opened.status();
  absl::StatusOr<std::unique_ptr<transfer::NcclLink>> link =
      transfer::NcclLink::Join(*id, transfer::NcclLink::kWorkerRank, device,
                               options_.nccl_join_timeout);
  if (!link.ok()) {
    (void)client_->CloseNcclLink(opened->link_id());
    return link.status();
  }
  if (absl::Status s = CudaError(
          cudaEventCreateWithFlags(&nccl_received_, cudaEventDisableTiming),
          "setting up the NCCL link");
      !s.ok()) {
    (void)client_->CloseNcclLink(opened->link_id());
    return s;
  }
  nccl_ = *std::move(link);
  nccl_link_id_ = opened->link_id();
  return absl::OkStatus();
}

void PrefixFetcher::DropNcclLink() {
  if (nccl_ == nullptr) return;
  // Aborting ends receives the node will never send, so streams move on.
  nccl_->Abort();
  nccl_.reset();
  cudaEventDestroy(nccl_received_);
  nccl_received_ = nullptr;
  // Best effort: the node aborts its side too, or has gone.
  (void)client_->CloseNcclLink(nccl_link_id_);
  nccl_link_id_ = 0;
}

absl::StatusOr<size_t> PrefixFetcher::Lookup(absl::Span<const ChunkKey> keys) {
  absl::StatusOr<LookupResult> found = client_->Lookup(keys);
  if (!found.ok()) return found.status();
  return found->prefix_chunks;
}

absl::StatusOr<FetchReport> PrefixFetcher::Fetch(
    absl::Span<const ChunkKey> keys, ChunkSink& sink) {
  FetchReport report;
  Leases leases;
  size_t first_over_grpc = 0;
  absl::Status status;
  if (region_ != nullptr) {
    absl::StatusOr<size_t> shared = FetchShared(keys, sink, leases, report);
    if (shared.ok()) {
      first_over_grpc = *shared;
    } else {
      status = shared.status();
    }
  }
  bool received_over_nccl = false;
  if (status.ok() && first_over_grpc < keys.size() && nccl_ != nullptr &&
      sink.accepts_device_memory()) {
    absl::StatusOr<size_t> received =
        FetchOverNccl(keys, first_over_grpc, sink, report);
    if (received.ok()) {
      received_over_nccl = *received > first_over_grpc;
      first_over_grpc = *received;
    } else {
      status = received.status();
    }
  }
  if (status.ok() && received_over_nccl) status = AwaitNcclReceives();
  if (status.ok() && first_over_grpc < keys.size()) {
    if (options_.transport == Transport::kNccl) {
      status = sink.accepts_device_memory()
                   ? absl::NotFoundError(absl::StrCat(
                         "the node sent ", first_over_grpc, " of ", keys.size(),
                         " chunks over NCCL: it lacks chunk ", first_over_grpc))
                   : absl::FailedPreconditionError(
                         "NCCL transport asked for, but the sink takes host "
                         "memory only");
    } else if (options_.transport == Transport::kSharedMemory) {
      status = absl::FailedPreconditionError(absl::StrCat(
          "shared-memory transport asked for, but the node lent only ",
          first_over_grpc, " of ", keys.size(),
          " chunks from memory (absent, on NVMe with no room in memory, or "
          "over its lease limit)"));
    } else {
      status = FetchOverGrpc(keys, first_over_grpc, sink, report);
    }
  }
  const absl::Status finished = sink.Finish();
  // Host and node share a clock. Past the expiry the node may have reused
  // the memory while the sink still read it.
  if (!leases.ids.empty() && status.ok() && finished.ok() &&
      absl::Now() >= leases.expiry) {
    status = absl::AbortedError(
        "the node's lease on the shared chunks expired before they were "
        "copied; fetch again (with a longer FetcherOptions::lease)");
  }
  // Best effort: a node that is gone took its leases with it.
  for (uint64_t id : leases.ids) (void)client_->Release(id);
  if (!status.ok()) return status;
  if (!finished.ok()) return finished;
  return report;
}

absl::StatusOr<size_t> PrefixFetcher::FetchShared(
    absl::Span<const ChunkKey> keys, ChunkSink& sink, Leases& leases,
    FetchReport& report) {
  const bool use_gpu = gpu_region_ != nullptr && sink.accepts_device_memory();
  auto locate = [this, keys, use_gpu](size_t first) {
    return client_->Locate(keys.subspan(first), options_.lease,
                           use_gpu ? gpu_region_->id() : "",
                           options_.nvme_window_bytes);
  };
  // The window after the one being consumed, located meanwhile, so the
  // node's NVMe reads overlap the sink's copies and decoding. Whatever
  // lease it got is released with the fetch's, even if the fetch ends
  // before it is consumed.
  std::future<absl::StatusOr<v1::LocateResponse>> ahead;
  absl::Cleanup join_ahead = [&ahead, &leases] {
    if (!ahead.valid()) return;
    absl::StatusOr<v1::LocateResponse> unused = ahead.get();
    if (unused.ok() && unused->lease_id() != 0) {
      leases.ids.push_back(unused->lease_id());
    }
  };
  size_t lent = 0;
  absl::StatusOr<v1::LocateResponse> located = locate(0);
  while (true) {
    ++report.locate_calls;
    if (located.ok() && located->region_id() != region_->id()) {
      // The node restarted with a new region: the rest comes over gRPC.
      // The region is mapped anew for later fetches, unless the sink may
      // still be reading this one.
      if (located->lease_id() != 0) {
        (void)client_->Release(located->lease_id());
      }
      if (lent == 0) {
        DropRegion();
        (void)ConnectRegion();
      }
      return lent;
    }
    if (!located.ok()) {
      // Out of lease room, or sharing switched off: gRPC serves the rest.
      if (options_.transport == Transport::kAuto &&
          (absl::IsResourceExhausted(located.status()) ||
           absl::IsUnavailable(located.status()))) {
        return lent;
      }
      return located.status();
    }
    if (located->chunks().empty()) return lent;
    leases.ids.push_back(located->lease_id());
    leases.expiry = std::min(
        leases.expiry, absl::FromUnixMillis(located->lease_expires_unix_ms()));
    const size_t next = lent + located->chunks_size();
    const bool more = located->read_limited() && next < keys.size();
    if (more) ahead = std::async(std::launch::async, locate, next);
    if (absl::Status s =
            ConsumeLocated(*located, keys, lent, use_gpu, sink, report);
        !s.ok()) {
      return s;
    }
    lent = next;
    if (!more) return lent;
    // The next window may still wait on NVMe reads: decode this one
    // meanwhile.
    if (absl::Status s = sink.Flush(); !s.ok()) return s;
    located = ahead.get();
  }
}

absl::Status PrefixFetcher::ConsumeLocated(const v1::LocateResponse& located,
                                           absl::Span<const ChunkKey> keys,
                                           size_t first, bool use_gpu,
                                           ChunkSink& sink,
                                           FetchReport& report) {
  for (int j = 0; j < located.chunks_size(); ++j) {
    const size_t i = first + j;
    const v1::ChunkExtent& extent = located.chunks(j);
    if (i >= keys.size() || extent.info().key() != keys[i].AsBytes()) {
      return absl::InternalError(
          absl::StrCat("node located chunks out of order at ", i));
    }
    const uint64_t size = extent.info().size_bytes();
    absl::Status consumed;
    if (extent.info().tier() == v1::TIER_GPU) {
      if (!use_gpu) {
        return absl::InternalError(absl::StrCat(
            "node located chunk ", i, " in a GPU tier it was not asked for"));
      }
      absl::StatusOr<const void*> on_device =
          gpu_region_->View(extent.offset(), size);
      if (!on_device.ok()) return on_device.status();
      consumed = sink.ConsumeOnDevice(i, *on_device, size);
      ++report.gpu_tier_chunks;
    } else {
      absl::StatusOr<absl::string_view> bytes =
          region_->View(extent.offset(), size);
      if (!bytes.ok()) return bytes.status();
      consumed = sink.Consume(i, *bytes, /*stable=*/true);
      ++report.shared_memory_chunks;
    }
    if (!consumed.ok()) return consumed;
    report.bytes += size;
  }
  return absl::OkStatus();
}

absl::StatusOr<size_t> PrefixFetcher::FetchOverNccl(
    absl::Span<const ChunkKey> keys, size_t first, ChunkSink& sink,
    FetchReport& report) {
  size_t next = first;
  while (next < keys.size()) {
    absl::StatusOr<v1::SendOverNcclResponse> sent = client_->SendOverNccl(
        nccl_link_id_, keys.subspan(next), options_.nccl_request_bytes);
    if (!sent.ok()) {
      // Nothing of this request is on the link. A link the node lost (it
      // restarted, or aborted a stuck send) is not used again; under kAuto
      // gRPC takes the rest.
      if (absl::IsNotFound(sent.status()) ||
          absl::IsUnavailable(sent.status())) {
        DropNcclLink();
        if (options_.transport == Transport::kAuto) return next;
      }
      return sent.status();
    }
    if (sent->chunks().empty()) break;  // the node lacks keys[next]
    std::vector<uint64_t> sizes;
    absl::Status s;
    for (const v1::ChunkInfo& info : sent->chunks()) {
      if (info.key() != keys[next + sizes.size()].AsBytes()) {
        s = absl::InternalError(absl::StrCat(
            "node sent chunks out of order at ", next + sizes.size()));
        break;
      }
      sizes.push_back(info.size_bytes());
    }
    // The node sends the chunks as one message, packed as the sink lays
    // them out.
    if (s.ok()) {
      s = sink.ConsumeWrittenOnDevice(
          next, sizes,
          [&](void* destination, uint64_t bytes, CUstream_st* stream) {
            absl::Status received = nccl_->Recv(destination, bytes, stream);
            if (received.ok()) {
              received = CudaError(cudaEventRecord(nccl_received_, stream),
                                   "tracking NCCL receives");
            }
            return received;
          });
    }
    if (!s.ok()) {
      // The node's sends and this side's receives no longer pair up.
      DropNcclLink();
      return s;
    }
    for (uint64_t size : sizes) report.bytes += size;
    report.nccl_chunks += sizes.size();
    next += sizes.size();
  }
  return next;
}

absl::Status PrefixFetcher::AwaitNcclReceives() {
  // A node that dies after answering leaves receives that never end, and a
  // sink that waits on them forever: watch them here, where the node's
  // health can be asked, and abort the link if it is gone.
  const absl::Time deadline = absl::Now() + options_.lease;
  absl::Time next_probe = absl::Now() + absl::Milliseconds(250);
  absl::Status status;
  while (true) {
    const cudaError_t state = cudaEventQuery(nccl_received_);
    if (state == cudaSuccess) return absl::OkStatus();
    if (state != cudaErrorNotReady) {
      status = CudaError(state, "receiving over NCCL");
      break;
    }
    const absl::Time now = absl::Now();
    if (now > deadline) {
      status = absl::DeadlineExceededError(absl::StrCat(
          "NCCL receives not done after ", absl::FormatDuration(options_.lease),
          " (FetcherOptions::lease)"));
      break;
    }
    if (now >= next_probe) {
      next_probe = now + absl::Milliseconds(250);
      status = nccl_->Check();
      if (status.ok()) status = client_->NodeInfo().status();
      if (!status.ok()) {
        status = absl::UnavailableError(absl::StrCat(
            "the node stopped sending over NCCL: ", status.message()));
        break;
      }
    }
    absl::SleepFor(absl::Microseconds(100));
  }
  DropNcclLink();
  return status;
}

absl::Status PrefixFetcher::FetchOverGrpc(absl::Span<const ChunkKey> keys,
                                          size_t first, ChunkSink& sink,
                                          FetchReport& report) {
  return client_->GetStream(
      keys.subspan(first), [&](size_t i, FetchedChunk chunk) {
        ++report.grpc_chunks;
        report.bytes += chunk.bytes.size();
        return sink.Consume(first + i, chunk.bytes, /*stable=*/false);
      });
}

}  // namespace kvcache
