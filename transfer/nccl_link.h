// A two-party NCCL communicator between a node's GPU and a worker's GPU, in
// different processes (and on different hosts where NCCL's network
// transports reach): the worker makes the link's id (NewId) and hands it to
// the node over the admin plane, both join, and the node sends chunks that
// the worker receives straight into device memory.
//
// NCCL is loaded when first needed (libnccl.so.2, or the file that
// $KVCACHE_NCCL_LIBRARY names), so programs that use this run, and say why
// links are unavailable, on hosts without it. The communicator is
// non-blocking: no call here waits on the peer longer than its deadline,
// and Abort ends a link whose peer went away, from any thread.
//
// Thread-safe.
#ifndef KVCACHE_TRANSFER_NCCL_LINK_H_
#define KVCACHE_TRANSFER_NCCL_LINK_H_

#include <cstdint>
#include <memory>
#include <string>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"

struct CUstream_st;
struct ncclComm;

namespace kvcache::transfer {

class NcclLink {
 public:
  // The ranks of the two parties.
  static constexpr int kWorkerRank = 0;
  static constexpr int kNodeRank = 1;

  // OK if NCCL can be loaded here; UNAVAILABLE, saying why, if not.
  static absl::Status Available();
  // NCCL's version as "2.28.9", once loaded.
  static absl::StatusOr<std::string> Version();

  // A fresh link id (ncclGetUniqueId, 128 bytes). Its maker's process
  // hosts the link's bootstrap, so it must stay up while the peer joins.
  static absl::StatusOr<std::string> NewId();

  // Joins link `id` as `rank` on CUDA device `device`; returns once the
  // peer has joined too. DEADLINE_EXCEEDED if it has not within `timeout`;
  // INVALID_ARGUMENT for an id that is not 128 bytes.
  static absl::StatusOr<std::unique_ptr<NcclLink>> Join(absl::string_view id,
                                                        int rank, int device,
                                                        absl::Duration timeout);
  ~NcclLink();  // aborts: queued transfers end unfinished

  NcclLink(const NcclLink&) = delete;
  NcclLink& operator=(const NcclLink&) = delete;

  // Queue sending `bytes` at device address `data` to the peer, or
  // receiving that many into `data`, on `stream`. Transfers pair up in
  // the order each side queues them, so both sides must queue the same
  // sizes in the same order. UNAVAILABLE once the link is aborted or
  // broken.
  absl::Status Send(const void* data, uint64_t bytes, CUstream_st* stream);
  absl::Status Recv(void* data, uint64_t bytes, CUstream_st* stream);

  // OK while the link works; the error NCCL found otherwise (a peer that
  // went away, a network failure).
  absl::Status Check();

  // Ends the link: transfers queued on it stop, and their streams move on.
  // Idempotent.
  void Abort();

  int device() const { return device_; }

 private:
  NcclLink(ncclComm* comm, int rank, int device)
      : comm_(comm), rank_(rank), device_(device) {}

  // Makes the link's first transfer, one byte each way, before `deadline`.
  absl::Status Connect(absl::Time deadline);
  // Queues one transfer: `send` picks the direction.
  absl::Status Transfer(bool send, void* data, uint64_t bytes,
                        CUstream_st* stream);

  absl::Mutex mu_;
  ncclComm* comm_ ABSL_GUARDED_BY(mu_);  // null once aborted
  const int rank_;
  const int device_;
};

}  // namespace kvcache::transfer

#endif  // KVCACHE_TRANSFER_NCCL_LINK_H_
