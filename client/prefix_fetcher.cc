#include "client/prefix_fetcher.h"

#include <cstdio>
#include <string>
#include <utility>

#include "absl/strings/str_cat.h"
#include "transfer/cuda_devices.h"

namespace kvcache {

absl::StatusOr<std::unique_ptr<PrefixFetcher>> PrefixFetcher::Create(
    std::shared_ptr<KvCacheClient> client, FetcherOptions options) {
  std::unique_ptr<PrefixFetcher> fetcher(
      new PrefixFetcher(std::move(client), options));
  if (options.transport != Transport::kGrpc) {
    absl::Status s = fetcher->ConnectRegion();
    if (!s.ok() && options.transport == Transport::kSharedMemory) {
      return absl::FailedPreconditionError(absl::StrCat(
          "shared-memory transport asked for, but: ", s.message()));
    }
  }
  return fetcher;
}

PrefixFetcher::~PrefixFetcher() { DropRegion(); }

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

absl::StatusOr<size_t> PrefixFetcher::Lookup(absl::Span<const ChunkKey> keys) {
  absl::StatusOr<LookupResult> found = client_->Lookup(keys);
  if (!found.ok()) return found.status();
  return found->prefix_chunks;
}

absl::StatusOr<FetchReport> PrefixFetcher::Fetch(
    absl::Span<const ChunkKey> keys, ChunkSink& sink) {
  FetchReport report;
  uint64_t lease_id = 0;
  absl::Time lease_expiry;
  size_t first_over_grpc = 0;
  absl::Status status;
  if (region_ != nullptr) {
    absl::StatusOr<size_t> shared =
        FetchShared(keys, sink, &lease_id, &lease_expiry, report);
    if (shared.ok()) {
      first_over_grpc = *shared;
    } else {
      status = shared.status();
    }
  }
  if (status.ok() && first_over_grpc < keys.size()) {
    if (options_.transport == Transport::kSharedMemory) {
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
  if (lease_id != 0) {
    // Host and node share a clock. Past the expiry the node may have reused
    // the memory while the sink still read it.
    if (status.ok() && finished.ok() && absl::Now() >= lease_expiry) {
      status = absl::AbortedError(
          "the node's lease on the shared chunks expired before they were "
          "copied; fetch again (with a longer FetcherOptions::lease)");
    }
    // Best effort: a node that is gone took its leases with it.
    (void)client_->Release(lease_id);
  }
  if (!status.ok()) return status;
  if (!finished.ok()) return finished;
  return report;
}

absl::StatusOr<size_t> PrefixFetcher::FetchShared(
    absl::Span<const ChunkKey> keys, ChunkSink& sink, uint64_t* lease_id,
    absl::Time* expiry, FetchReport& report) {
  const bool use_gpu = gpu_region_ != nullptr && sink.accepts_device_memory();
  absl::StatusOr<v1::LocateResponse> located =
      client_->Locate(keys, options_.lease, use_gpu ? gpu_region_->id() : "");
  if (located.ok() && located->region_id() != region_->id()) {
    // The node restarted with a new region: map that one for later fetches
    // and take this one over gRPC.
    if (located->lease_id() != 0) (void)client_->Release(located->lease_id());
    DropRegion();
    (void)ConnectRegion();
    return 0;
  }
  if (!located.ok()) {
    // Out of lease room, or sharing switched off: gRPC serves it all.
    if (options_.transport == Transport::kAuto &&
        (absl::IsResourceExhausted(located.status()) ||
         absl::IsUnavailable(located.status()))) {
      return 0;
    }
    return located.status();
  }
  *lease_id = located->lease_id();
  *expiry = absl::FromUnixMillis(located->lease_expires_unix_ms());
  const size_t lent = located->chunks_size();
  for (size_t i = 0; i < lent; ++i) {
    const v1::ChunkExtent& extent = located->chunks(i);
    if (extent.info().key() != keys[i].AsBytes()) {
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
  return lent;
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
