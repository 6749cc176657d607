// A node's NCCL links to workers' GPUs (OpenNcclLink and SendOverNccl in
// kvcache.proto): the node joins each link on its GPU tier's device and
// sends chunks over it, each request's chunks packed into one message in a
// staging buffer on that GPU (copied there from the GPU tier, or up from
// the CPU tier). Every chunk sent is
// held until the worker has received it; a link whose worker has not taken
// a send within the send timeout is aborted, so a dead worker cannot pin
// memory or stall the GPU.
//
// Thread-safe.
#ifndef KVCACHE_KVSTORE_NCCL_LINKS_H_
#define KVCACHE_KVSTORE_NCCL_LINKS_H_

#include <cstdint>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "kvstore/chunk_ref.h"

namespace kvcache::kvstore {

struct NcclLinksOptions {
  int device = 0;  // the GPU tier's
  // Links open at once; opening one more closes the one idle longest.
  uint32_t max_links = 8;
  // Device memory each link packs a send's chunks in: the most one send
  // carries.
  uint64_t staging_bytes = 64 << 20;
  // How long a queued send may wait for its worker.
  absl::Duration send_timeout = absl::Seconds(30);
};

class NcclLinks {
 public:
  explicit NcclLinks(NcclLinksOptions options);
  ~NcclLinks();  // aborts every link

  NcclLinks(const NcclLinks&) = delete;
  NcclLinks& operator=(const NcclLinks&) = delete;

  // Starts joining the link `nccl_id` names, as the node's party, and
  // returns its number at once: the worker joins after it has the answer.
  // The join gives up after `join_timeout`.
  absl::StatusOr<uint64_t> Open(std::string nccl_id,
                                absl::Duration join_timeout);
  // Aborts the link; false if it was unknown.
  bool Close(uint64_t link);

  // Queues sending `chunks`, in order, over `link` (waiting for the join to
  // finish if need be), as one message: chunk i + 1 starts where chunk i
  // ends, rounded up to 256 bytes. Returns how many it queued: it stops
  // before a chunk that does not fit the staging.
  // NOT_FOUND for an unknown link; UNAVAILABLE for one that failed or was
  // aborted (its worker must open another); RESOURCE_EXHAUSTED when the
  // first chunk alone exceeds the staging buffer.
  absl::StatusOr<size_t> Send(uint64_t link, std::vector<ChunkRef> chunks);

  // Whether `link` is open (joining, joined or failed, not yet closed).
  bool IsOpen(uint64_t link) const;
  size_t open_links() const;
  // Sends queued and not yet received, over all links.
  size_t sends_in_flight() const;

 private:
  struct Link;

  std::shared_ptr<Link> Find(uint64_t link) const;
  // Drops the refs of finished sends, and aborts links whose oldest send
  // is past its deadline; runs until the destructor stops it.
  void Reap();
  // Whether `link` has sends that have not finished; drops finished ones.
  bool ReapLink(Link& link, absl::Time now);

  const NcclLinksOptions options_;
  mutable absl::Mutex mu_;
  absl::flat_hash_map<uint64_t, std::shared_ptr<Link>> links_
      ABSL_GUARDED_BY(mu_);
  uint64_t next_id_ ABSL_GUARDED_BY(mu_) = 1;
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  int joining_ ABSL_GUARDED_BY(mu_) = 0;  // joins under way
  std::thread reaper_;
};

}  // namespace kvcache::kvstore

#endif  // KVCACHE_KVSTORE_NCCL_LINKS_H_
