// The worker's read path: find how much of a prompt's prefix a node holds,
// then stream those chunks, in order, into a ChunkSink that puts them where
// the worker wants them (decoded into GPU blocks, host buffers, ...).
//
// Transports, chosen per fetch:
//  - shared memory: on the node's host the worker maps the node's CPU tier
//    read-only (transfer/shared_region.h) and the sink reads each chunk in
//    place, reserved by a lease for the duration of the fetch. Chunks the
//    node cannot place in memory, or that do not fit in the lease limit,
//    come over gRPC in the same fetch.
//  - gRPC: the node's Get stream; chunk i reaches the sink while chunk
//    i + 1 is still in flight.
//  - CUDA IPC: where the node also has a GPU tier, a fetcher whose sink
//    takes device memory (ChunkSink::accepts_device_memory) opens it too,
//    and the chunks held there reach the sink in place in the node's
//    device memory, under the same lease.
//  - NCCL: GPU to GPU, from the node's GPU (on this host or another NCCL
//    reaches) straight into the sink's device staging, for a sink that
//    takes device memory. The link is opened once, when the fetcher is
//    made; each fetch asks the node for batches of chunks and receives them
//    while the sink decodes the batch before.
// kAuto uses shared memory where the node offers it on this host; NCCL
// where it does not but the node's GPU tier opens NCCL links and this
// process has a GPU; and gRPC otherwise, for chunks the node does not send
// over NCCL, or when the region goes away (a restarted node) mid-life.
//
// Thread-compatible: one fetch at a time per PrefixFetcher; use one per
// worker thread (they can share a KvCacheClient).
#ifndef KVCACHE_CLIENT_PREFIX_FETCHER_H_
#define KVCACHE_CLIENT_PREFIX_FETCHER_H_

#include <cstdint>
#include <memory>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "absl/types/span.h"
#include "client/chunk_key.h"
#include "client/chunk_sink.h"
#include "client/kvcache_client.h"
#include "transfer/gpu_region.h"
#include "transfer/nccl_link.h"
#include "transfer/shared_region.h"

struct CUevent_st;

namespace kvcache {

enum class Transport { kAuto, kSharedMemory, kGrpc, kNccl };

struct FetcherOptions {
  Transport transport = Transport::kAuto;
  // How long the node keeps a fetch's chunks in place for shared-memory
  // reads; a fetch that outlasts it fails (ABORTED) rather than trust bytes
  // the node may have reused.
  absl::Duration lease = absl::Seconds(30);
  // Page-lock the mapped region for the GPUs of this host, so copies out of
  // it run at full PCIe speed. Needs a GPU; ignored (with a note on stderr)
  // without one.
  bool register_for_gpu = false;
  // Open the node's GPU tier where it has one on this host (needs a GPU
  // that can reach the node's; skipped, with a note on stderr, if not).
  bool open_gpu_tier = true;
  // Most bytes the node reads up from its NVMe tier for one Locate. A
  // prefix on NVMe is then located in windows: the sink decodes one window
  // while the node reads the next, instead of starting only once the whole
  // prefix is in memory. 0: one Locate for all.
  uint64_t nvme_window_bytes = 64 << 20;
  // NCCL: most bytes of chunks one request asks the node for (the sink's
  // staging must hold them: GpuDecodeSinkOptions::slot_bytes), and how long
  // opening the link may take.
  uint64_t nccl_request_bytes = 32 << 20;
  absl::Duration nccl_join_timeout = absl::Seconds(30);
};

struct FetchReport {
  // Chunks read in place in the node's GPU tier, its CPU tier, or sent
  // over gRPC.
  size_t gpu_tier_chunks = 0;
  size_t shared_memory_chunks = 0;
  size_t grpc_chunks = 0;
  size_t nccl_chunks = 0;  // received over NCCL
  uint64_t bytes = 0;
  // Locate calls the shared-memory chunks took (more than one where the
  // node read them up from NVMe in windows).
  size_t locate_calls = 0;
};

class PrefixFetcher {
 public:
  // FAILED_PRECONDITION if kSharedMemory is forced and the node offers no
  // region on this host, or kNccl and no link could be opened.
  static absl::StatusOr<std::unique_ptr<PrefixFetcher>> Create(
      std::shared_ptr<KvCacheClient> client, FetcherOptions options = {});
  ~PrefixFetcher();

  // How many leading keys the node holds.
  absl::StatusOr<size_t> Lookup(absl::Span<const ChunkKey> keys);

  // Streams the chunks of `keys` (a prefix the node holds) into `sink`, then
  // calls sink.Finish(). NOT_FOUND if a key is missing; the node's error
  // (UNAVAILABLE, ...) if it fails mid-fetch; the sink's errors as they
  // are. On any error the fetch as a whole failed, whatever the sink got.
  absl::StatusOr<FetchReport> Fetch(absl::Span<const ChunkKey> keys,
                                    ChunkSink& sink);

  // Whether fetches can read the node's memory, or its GPU tier, in place
  // right now.
  bool shared_memory() const { return region_ != nullptr; }
  bool gpu_tier() const { return gpu_region_ != nullptr; }
  // Whether fetches receive chunks over an NCCL link.
  bool nccl() const { return nccl_ != nullptr; }

 private:
  PrefixFetcher(std::shared_ptr<KvCacheClient> client, FetcherOptions options)
      : client_(std::move(client)), options_(options) {}

  // Maps the node's region if it offers one on this host, and opens its
  // GPU tier if it has one.
  absl::Status ConnectRegion();
  void OpenGpuRegion(const v1::NodeInfoResponse& info);
  void DropRegion();
  // The node's reservations of the chunks a fetch reads in place.
  struct Leases {
    std::vector<uint64_t> ids;
    absl::Time expiry = absl::InfiniteFuture();  // the earliest
  };
  // Feeds the sink the leading chunks the node can lend from shared memory,
  // a window at a time where they are read up from NVMe; returns how many.
  absl::StatusOr<size_t> FetchShared(absl::Span<const ChunkKey> keys,
                                     ChunkSink& sink, Leases& leases,
                                     FetchReport& report);
  // Feeds the sink the chunks of one Locate answer, keys[first, ...).
  absl::Status ConsumeLocated(const v1::LocateResponse& located,
                              absl::Span<const ChunkKey> keys, size_t first,
                              bool use_gpu, ChunkSink& sink,
                              FetchReport& report);
  // Opens an NCCL link from the node's GPU to this process's.
  absl::Status OpenNcclLink();
  void DropNcclLink();
  // Receives the chunks of keys[first, ...) the node sends over the NCCL
  // link into the sink; returns how many (it stops at a key the node does
  // not hold).
  absl::StatusOr<size_t> FetchOverNccl(absl::Span<const ChunkKey> keys,
                                       size_t first, ChunkSink& sink,
                                       FetchReport& report);
  // Waits until the NCCL receives queued so far are done; aborts the link
  // if the node goes away first.
  absl::Status AwaitNcclReceives();
  absl::Status FetchOverGrpc(absl::Span<const ChunkKey> keys, size_t first,
                             ChunkSink& sink, FetchReport& report);

  const std::shared_ptr<KvCacheClient> client_;
  const FetcherOptions options_;
  std::unique_ptr<transfer::SharedRegion> region_;
  std::unique_ptr<transfer::GpuRegion> gpu_region_;
  bool registered_ = false;
  std::unique_ptr<transfer::NcclLink> nccl_;
  uint64_t nccl_link_id_ = 0;
  CUevent_st* nccl_received_ = nullptr;  // after the last receive queued
};

}  // namespace kvcache

#endif  // KVCACHE_CLIENT_PREFIX_FETCHER_H_
