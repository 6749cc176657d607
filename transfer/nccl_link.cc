#include "transfer/nccl_link.h"

#include <cuda_runtime.h>
#include <dlfcn.h>
#include <nccl.h>

#include <cstdlib>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "transfer/cuda_status.h"

namespace kvcache::transfer {
namespace {

// The NCCL entry points a link uses, resolved from the library at run time.
struct NcclApi {
  decltype(&ncclGetVersion) get_version = nullptr;
  decltype(&ncclGetUniqueId) get_unique_id = nullptr;
  decltype(&ncclCommInitRankConfig) init_rank_config = nullptr;
  decltype(&ncclCommGetAsyncError) get_async_error = nullptr;
  decltype(&ncclCommAbort) abort = nullptr;
  decltype(&ncclSend) send = nullptr;
  decltype(&ncclRecv) recv = nullptr;
  decltype(&ncclGroupStart) group_start = nullptr;
  decltype(&ncclGroupEnd) group_end = nullptr;
  decltype(&ncclGetErrorString) error_string = nullptr;
  decltype(&ncclGetLastError) last_error = nullptr;
};

absl::StatusOr<NcclApi> LoadApi() {
  const char* env = std::getenv("KVCACHE_NCCL_LIBRARY");
  const bool named = env != nullptr && *env != '\0';
  const char* path = named ? env : "libnccl.so.2";
  void* library = dlopen(path, RTLD_NOW | RTLD_LOCAL);
  if (library == nullptr && !named) {
    // Where the CUDA toolkit keeps it.
    library =
        dlopen("/usr/local/cuda/lib64/libnccl.so.2", RTLD_NOW | RTLD_LOCAL);
  }
  if (library == nullptr) {
    return absl::UnavailableError(
        absl::StrCat("NCCL cannot be loaded (", dlerror(),
                     "); put libnccl.so.2 on the library path or name it in "
                     "KVCACHE_NCCL_LIBRARY"));
  }
  NcclApi api;
  bool complete = true;
  auto resolve = [&](auto& entry, const char* name) {
    entry = reinterpret_cast<std::remove_reference_t<decltype(entry)>>(
        dlsym(library, name));
    complete = complete && entry != nullptr;
  };
  resolve(api.get_version, "ncclGetVersion");
  resolve(api.get_unique_id, "ncclGetUniqueId");
  resolve(api.init_rank_config, "ncclCommInitRankConfig");
  resolve(api.get_async_error, "ncclCommGetAsyncError");
  resolve(api.abort, "ncclCommAbort");
  resolve(api.send, "ncclSend");
  resolve(api.recv, "ncclRecv");
  resolve(api.group_start, "ncclGroupStart");
  resolve(api.group_end, "ncclGroupEnd");
  resolve(api.error_string, "ncclGetErrorString");
  resolve(api.last_error, "ncclGetLastError");
  if (!complete) {
    dlclose(library);
    return absl::UnavailableError(absl::StrCat(
        path, " lacks NCCL entry points kvcache needs (NCCL 2.14 or later)"));
  }
  // Kept loaded for the life of the process: links may outlive any owner.
  return api;
}

// Loaded once per process.
const absl::StatusOr<NcclApi>& Api() {
  static const absl::StatusOr<NcclApi>* api =
      new absl::StatusOr<NcclApi>(LoadApi());
  return *api;
}

absl::Status NcclError(ncclResult_t result, ncclComm_t comm,
                       absl::string_view what) {
  if (result == ncclSuccess) return absl::OkStatus();
  const NcclApi& api = *Api();
  std::string message =
      absl::StrCat(what, ": NCCL: ", api.error_string(result));
  if (const char* last = api.last_error(comm); last != nullptr && *last) {
    absl::StrAppend(&message, " (", last, ")");
  }
  switch (result) {
    case ncclRemoteError:
    case ncclSystemError:
      return absl::UnavailableError(message);
    case ncclInvalidArgument:
    case ncclInvalidUsage:
      return absl::InvalidArgumentError(message);
    default:
      return absl::InternalError(message);
  }
}

// A non-blocking communicator answers ncclInProgress while work it was
// asked for (joining, queueing a transfer) is under way; waits for it to
// settle until `deadline`.
ncclResult_t Settle(ncclComm_t comm, ncclResult_t result, absl::Time deadline) {
  while (result == ncclInProgress && absl::Now() < deadline) {
    absl::SleepFor(absl::Microseconds(50));
    if (Api()->get_async_error(comm, &result) != ncclSuccess) {
      return ncclInternalError;
    }
  }
  return result;
}

// How long queueing one transfer may take (it does not wait for the peer).
constexpr absl::Duration kQueueTimeout = absl::Seconds(10);

}  // namespace

absl::Status NcclLink::Available() { return Api().status(); }

absl::StatusOr<std::string> NcclLink::Version() {
  if (!Api().ok()) return Api().status();
  int version = 0;
  if (Api()->get_version(&version) != ncclSuccess) {
    return absl::InternalError("ncclGetVersion failed");
  }
  // NCCL 2.9 and later: major * 10000 + minor * 100 + patch.
  return absl::StrCat(version / 10000, ".", version / 100 % 100, ".",
                      version % 100);
}

absl::StatusOr<std::string> NcclLink::NewId() {
  if (!Api().ok()) return Api().status();
  ncclUniqueId id;
  if (absl::Status s =
          NcclError(Api()->get_unique_id(&id), nullptr, "making a link id");
      !s.ok()) {
    return s;
  }
  return std::string(id.internal, sizeof(id.internal));
}

absl::StatusOr<std::unique_ptr<NcclLink>> NcclLink::Join(
    absl::string_view id, int rank, int device, absl::Duration timeout) {
  if (!Api().ok()) return Api().status();
  ncclUniqueId unique_id;
  if (id.size() != sizeof(unique_id.internal)) {
    return absl::InvalidArgumentError(absl::StrCat("an NCCL link id is ",
                                                   sizeof(unique_id.internal),
                                                   " bytes, not ", id.size()));
  }
  if (rank != kWorkerRank && rank != kNodeRank) {
    return absl::InvalidArgumentError(
        absl::StrCat("an NCCL link has ranks 0 and 1, not ", rank));
  }
  std::memcpy(unique_id.internal, id.data(), id.size());
  if (absl::Status s = CudaError(cudaSetDevice(device),
                                 absl::StrCat("using CUDA device ", device));
      !s.ok()) {
    return s;
  }
  const absl::Time deadline = absl::Now() + timeout;
  ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
  config.blocking = 0;
  ncclComm_t comm = nullptr;
  ncclResult_t result =
      Api()->init_rank_config(&comm, 2, unique_id, rank, &config);
  if (comm != nullptr) result = Settle(comm, result, deadline);
  if (result == ncclInProgress) {
    Api()->abort(comm);
    return absl::DeadlineExceededError(
        absl::StrCat("the NCCL link's peer did not join within ",
                     absl::FormatDuration(timeout)));
  }
  if (result != ncclSuccess) {
    absl::Status s = NcclError(result, comm, "joining an NCCL link");
    if (comm != nullptr) Api()->abort(comm);
    return s;
  }
  std::unique_ptr<NcclLink> link(new NcclLink(comm, rank, device));
  if (absl::Status s = link->Connect(deadline); !s.ok()) return s;
  return link;
}

absl::Status NcclLink::Connect(absl::Time deadline) {
  // NCCL connects two ranks on their first transfer, and that takes both
  // at once; done here, while both are joining, later sends are queued
  // without waiting for the peer to call in.
  absl::MutexLock lock(&mu_);
  void* scratch = nullptr;
  cudaStream_t stream = nullptr;
  cudaError_t e = cudaMalloc(&scratch, 2);
  if (e == cudaSuccess) {
    e = cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking);
  }
  absl::Status status = CudaError(e, "connecting an NCCL link");
  if (status.ok()) {
    const NcclApi& api = *Api();
    char* bytes = static_cast<char*>(scratch);
    const int peer = 1 - rank_;
    ncclResult_t result = api.group_start();
    if (result == ncclSuccess) {
      result = api.send(bytes, 1, ncclUint8, peer, comm_, stream);
    }
    if (result == ncclSuccess || result == ncclInProgress) {
      result = api.recv(bytes + 1, 1, ncclUint8, peer, comm_, stream);
    }
    if (result == ncclSuccess || result == ncclInProgress) {
      result = Settle(comm_, api.group_end(), deadline);
    }
    if (result == ncclInProgress) {
      status = absl::DeadlineExceededError(
          "the NCCL link's peer did not connect in time");
    } else {
      status = NcclError(result, comm_, "connecting an NCCL link");
    }
    while (status.ok() && cudaStreamQuery(stream) == cudaErrorNotReady) {
      if (absl::Now() > deadline) {
        status = absl::DeadlineExceededError(
            "the NCCL link's peer did not connect in time");
      }
      absl::SleepFor(absl::Microseconds(50));
    }
  }
  if (!status.ok()) {
    // Ends the transfers above, if they are still waiting.
    Api()->abort(comm_);
    comm_ = nullptr;
  }
  if (stream != nullptr) {
    cudaStreamSynchronize(stream);
    cudaStreamDestroy(stream);
  }
  cudaFree(scratch);
  return status;
}

NcclLink::~NcclLink() { Abort(); }

absl::Status NcclLink::Send(const void* data, uint64_t bytes,
                            CUstream_st* stream) {
  return Transfer(/*send=*/true, const_cast<void*>(data), bytes, stream);
}

absl::Status NcclLink::Recv(void* data, uint64_t bytes, CUstream_st* stream) {
  return Transfer(/*send=*/false, data, bytes, stream);
}

absl::Status NcclLink::Transfer(bool send, void* data, uint64_t bytes,
                                CUstream_st* stream) {
  absl::MutexLock lock(&mu_);
  if (comm_ == nullptr)
    return absl::UnavailableError("the NCCL link is closed");
  if (absl::Status s =
          CudaError(cudaSetDevice(device_), "using the link's GPU");
      !s.ok()) {
    return s;
  }
  const NcclApi& api = *Api();
  const int peer = 1 - rank_;
  const ncclResult_t queued =
      send ? api.send(data, bytes, ncclUint8, peer, comm_, stream)
           : api.recv(data, bytes, ncclUint8, peer, comm_, stream);
  const ncclResult_t result =
      Settle(comm_, queued, absl::Now() + kQueueTimeout);
  if (result == ncclInProgress) {
    return absl::DeadlineExceededError(
        "the NCCL link did not take a transfer in time");
  }
  return NcclError(result, comm_,
                   send ? "sending over NCCL" : "receiving over NCCL");
}

absl::Status NcclLink::Check() {
  absl::MutexLock lock(&mu_);
  if (comm_ == nullptr)
    return absl::UnavailableError("the NCCL link is closed");
  ncclResult_t state = ncclSuccess;
  ncclResult_t result = Api()->get_async_error(comm_, &state);
  // A settled communicator with nothing wrong reports ncclSuccess.
  if (result == ncclSuccess &&
      (state == ncclSuccess || state == ncclInProgress)) {
    return absl::OkStatus();
  }
  return NcclError(result != ncclSuccess ? result : state, comm_,
                   "the NCCL link");
}

void NcclLink::Abort() {
  absl::MutexLock lock(&mu_);
  if (comm_ == nullptr) return;
  Api()->abort(comm_);
  comm_ = nullptr;
}

}  // namespace kvcache::transfer
