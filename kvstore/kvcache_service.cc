#include "kvstore/kvcache_service.h"

#include <unistd.h>

#include <algorithm>
#include <memory>
#include <optional>
#include <string>
#include <utility>

#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/strings/ascii.h"
#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "codec/codec.h"
#include "codec/crc32c.h"
#include "google/protobuf/io/coded_stream.h"
#include "google/protobuf/io/zero_copy_stream_impl_lite.h"
#include "google/protobuf/wire_format_lite.h"
#include "grpcpp/support/byte_buffer.h"
#include "grpcpp/support/slice.h"
#include "kvstore/codec_summary.h"
#include "kvstore/daemon_config.h"
#include "kvstore/gpu_arena.h"
#include "transfer/grpc_stream.h"
#include "transfer/nccl_link.h"

namespace kvcache::kvstore {
namespace {

constexpr size_t kKeyBytes = 32;
// Chunks a Locate reads up from NVMe at a time: one chunk of a small model
// is one read, which leaves the disk's queue mostly idle. The NVMe tier
// serves this many reads at once (UringOptions::rings).
constexpr int kNvmeChunksReadTogether = 4;

using ::google::protobuf::RepeatedPtrField;
using ::kvcache::transfer::ToGrpcStatus;

std::string HostName() {
  char name[256] = {};
  if (gethostname(name, sizeof(name) - 1) != 0) return "localhost";
  return name;
}

// A short, readable form of a key for error messages.
std::string KeyPrefix(absl::string_view key) {
  return absl::BytesToHexString(key.substr(0, 8));
}

grpc::Status InvalidArgument(absl::string_view message) {
  return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, std::string(message));
}

grpc::Status ValidateKey(absl::string_view key, absl::string_view where) {
  if (key.size() != kKeyBytes) {
    return InvalidArgument(absl::StrCat(where, " is ", key.size(),
                                        " bytes; a chunk key is ", kKeyBytes,
                                        " bytes (SHA-256)"));
  }
  return grpc::Status::OK;
}

grpc::Status ValidateKeys(const RepeatedPtrField<std::string>& keys,
                          const v1::LimitsConfig& limits) {
  if (keys.empty()) return InvalidArgument("request names no keys");
  if (static_cast<uint64_t>(keys.size()) > limits.max_keys_per_request()) {
    return InvalidArgument(absl::StrCat(
        "request names ", keys.size(), " keys; this node accepts at most ",
        limits.max_keys_per_request(), " (limits.max_keys_per_request)"));
  }
  for (int i = 0; i < keys.size(); ++i) {
    if (grpc::Status s = ValidateKey(keys[i], absl::StrCat("keys[", i, "]"));
        !s.ok()) {
      return s;
    }
  }
  return grpc::Status::OK;
}

// For calls that hand out each key's bytes or lease (Get, Locate,
// SendOverNccl): a key named twice would cost twice for nothing, and a
// request that names one chunk thousands of times would multiply a small
// request into gigabytes sent or leased.
grpc::Status ValidateDistinctKeys(const RepeatedPtrField<std::string>& keys,
                                  const v1::LimitsConfig& limits) {
  if (grpc::Status s = ValidateKeys(keys, limits); !s.ok()) return s;
  absl::flat_hash_map<absl::string_view, int> first;
  first.reserve(keys.size());
  for (int i = 0; i < keys.size(); ++i) {
    auto [it, added] = first.emplace(keys[i], i);
    if (!added) {
      return InvalidArgument(absl::StrCat("keys[", i, "] repeats keys[",
                                          it->second,
                                          "]; name each chunk once"));
    }
  }
  return grpc::Status::OK;
}

v1::Tier ToProtoTier(TierId tier) {
  switch (tier) {
    case TierId::kGpu:
      return v1::TIER_GPU;
    case TierId::kCpu:
      return v1::TIER_CPU;
    case TierId::kNvme:
      return v1::TIER_NVME;
  }
  return v1::TIER_UNSPECIFIED;
}

void FillInfo(absl::string_view key, const LocatedChunk& located,
              v1::ChunkInfo& info) {
  const ChunkRef& chunk = located.chunk;
  info.set_key(std::string(key));
  info.set_size_bytes(chunk.size_bytes);
  info.set_tier(ToProtoTier(located.tier));
  info.set_crc32c(chunk.crc32c);
  info.set_pinned(chunk.pinned);
  info.set_pin_expires_unix_ms(
      chunk.pinned ? absl::ToUnixMillis(chunk.pin_expiry) : 0);
  if (chunk.codec.has_value()) {
    const codec::ChunkShape& shape = chunk.codec->shape;
    v1::CodecSummary& summary = *info.mutable_codec();
    summary.set_layers(shape.layers);
    summary.set_tokens(shape.tokens);
    summary.set_kv_heads(shape.kv_heads);
    summary.set_head_dim(shape.head_dim);
    summary.set_dtype(std::string(codec::DTypeName(shape.dtype)));
    summary.set_level(std::string(codec::LevelName(chunk.codec->level)));
  }
}

// Bytes of the tiers same-host workers map (CPU, and GPU where there is one).
uint64_t SharedBytes(const TieredStore& store) {
  return store.cpu_arena().capacity_bytes() +
         (store.gpu_arena() ? store.gpu_arena()->capacity_bytes() : 0);
}

// A chunk's owner is the tenant that stores it; only a peer copying a chunk
// names its owner, and then as a tenant name (it ends up in metrics labels).
grpc::Status CheckOwner(const v1::PutHeader& header, const Caller& caller) {
  const std::string& owner = header.owner();
  if (owner.empty()) return grpc::Status::OK;
  if (!caller.Has(kPeerRole)) {
    return grpc::Status(grpc::StatusCode::PERMISSION_DENIED,
                        "only peers may set put header owner; a tenant's "
                        "chunks are its own");
  }
  const bool is_name =
      owner.size() <= 128 &&
      std::all_of(owner.begin(), owner.end(), [](char c) {
        return absl::ascii_isalnum(c) || c == '-' || c == '_' || c == '.';
      });
  return is_name ? grpc::Status::OK
                 : InvalidArgument(
                       "put header owner is not a tenant name (letters, "
                       "digits, '-', '_', '.'; at most 128)");
}

absl::Duration CappedTtl(uint64_t ttl_ms, const v1::LimitsConfig& limits) {
  return std::min(absl::Milliseconds(ttl_ms),
                  absl::Seconds(limits.max_pin_ttl_seconds()));
}

// Accumulates one chunk of a Put stream until its declared size arrived.
class IncomingChunk {
 public:
  explicit IncomingChunk(ByteBudget& budget) : budget_(budget) {}

  grpc::Status Start(const v1::PutHeader& header,
                     const v1::LimitsConfig& limits) {
    if (grpc::Status s = ValidateKey(header.key(), "put header key"); !s.ok()) {
      return s;
    }
    if (!header.parent_key().empty()) {
      if (grpc::Status s =
              ValidateKey(header.parent_key(), "put header parent_key");
          !s.ok()) {
        return s;
      }
    }
    if (header.size_bytes() == 0) {
      return InvalidArgument("put header declares an empty chunk");
    }
    if (header.size_bytes() > limits.max_chunk_bytes()) {
      return InvalidArgument(absl::StrCat(
          "chunk of ", header.size_bytes(), " bytes exceeds this node's ",
          "limit of ", limits.max_chunk_bytes(), " (limits.max_chunk_bytes)"));
    }
    // The declared size is held from the node's allowance before any byte
    // is buffered; a client that then sends nothing holds it only until the
    // stream's idle timeout.
    reservation_ = budget_.TryReserve(header.size_bytes());
    if (!reservation_) {
      return grpc::Status(
          grpc::StatusCode::RESOURCE_EXHAUSTED,
          absl::StrCat("a chunk of ", header.size_bytes(),
                       " bytes does not fit: Puts in flight already hold ",
                       budget_.used(), " of ", budget_.capacity(),
                       " bytes (limits.max_put_bytes_in_flight); retry later"));
    }
    header_ = header;
    bytes_.clear();
    // Pages are touched only as data arrives.
    bytes_.reserve(header.size_bytes());
    crc32c_ = 0;
    open_ = true;
    return grpc::Status::OK;
  }

  grpc::Status Append(absl::string_view data) {
    if (!open_) return InvalidArgument("put data arrived before a header");
    if (data.size() > header_.size_bytes() - bytes_.size()) {
      return InvalidArgument(absl::StrCat(
          "put data overruns the chunk: header declared ", header_.size_bytes(),
          " bytes, got at least ", bytes_.size() + data.size()));
    }
    bytes_.append(data.data(), data.size());
    // Checksummed piece by piece while the next piece is still in flight.
    crc32c_ = codec::Crc32cExtend(crc32c_, data.data(), data.size());
    return grpc::Status::OK;
  }

  bool open() const { return open_; }
  bool complete() const {
    return open_ && bytes_.size() == header_.size_bytes();
  }
  const v1::PutHeader& header() const { return header_; }
  uint64_t received() const { return bytes_.size(); }
  // CRC32C of the bytes received so far.
  uint32_t crc32c() const { return crc32c_; }

  // Hands over the finished chunk's bytes and closes it; its reservation
  // goes back once the caller has stored (copied) the bytes and dropped it.
  std::string Take(ByteBudget::Reservation& reservation) {
    open_ = false;
    reservation = std::move(reservation_);
    return std::move(bytes_);
  }

 private:
  ByteBudget& budget_;
  ByteBudget::Reservation reservation_;
  v1::PutHeader header_;
  std::string bytes_;
  uint32_t crc32c_ = 0;
  bool open_ = false;
};

}  // namespace

absl::StatusOr<std::unique_ptr<NodeState>> NodeState::Create(
    v1::DaemonConfig config) {
  TieredStoreOptions options;
  options.cpu_capacity_bytes = config.cpu_tier().capacity_bytes();
  options.cpu_max_admit_percent = config.cpu_tier().max_admit_percent();
  const v1::NvmeTierConfig& nvme = config.nvme_tier();
  if (!nvme.data_dir().empty()) {
    options.nvme = NvmeTierOptions{nvme.data_dir(), nvme.slab_bytes(),
                                   nvme.slab_count(), nvme.queue_depth()};
    options.write_through = nvme.write_through();
  }
  options.gpu_capacity_bytes = config.gpu_tier().capacity_bytes();
  options.gpu_device = static_cast<int>(config.gpu_tier().device());
  options.gpu_max_admit_percent = config.gpu_tier().max_admit_percent();
  for (const v1::TenantConfig& tenant : config.access().tenants()) {
    options.quotas[tenant.name()] =
        TierQuotas{tenant.gpu_quota_bytes(), tenant.cpu_quota_bytes(),
                   tenant.nvme_quota_bytes()};
  }
  absl::StatusOr<std::unique_ptr<TieredStore>> store =
      TieredStore::Open(options);
  if (!store.ok()) return store.status();
  return std::unique_ptr<NodeState>(
      new NodeState(std::move(config), std::move(*store)));
}

NodeState::NodeState(v1::DaemonConfig config,
                     std::unique_ptr<TieredStore> store)
    : config_(std::move(config)),
      node_id_(config_.node_id().empty() ? HostName() : config_.node_id()),
      started_(absl::Now()),
      store_(std::move(store)),
      // One cap over both shared tiers: a lease of GPU chunks holds device
      // memory the way one of CPU chunks holds host memory.
      leases_(SharedBytes(*store_) / 100 *
                  config_.shared_memory().max_leased_percent(),
              SharedBytes(*store_) / 100 *
                  config_.shared_memory().max_leased_percent_per_connection()),
      access_(config_.access()),
      put_budget_(config_.limits().max_put_bytes_in_flight()),
      watchdog_(absl::Seconds(config_.limits().stream_idle_timeout_seconds())) {
  const v1::GpuTierConfig& gpu = config_.gpu_tier();
  if (store_->gpu_arena() != nullptr && gpu.max_nccl_links() > 0) {
    NcclLinksOptions options;
    options.device = store_->gpu_arena()->device();
    options.max_links = gpu.max_nccl_links();
    options.staging_bytes = gpu.nccl_staging_bytes();
    options.send_timeout = absl::Seconds(gpu.nccl_send_timeout_seconds());
    nccl_links_ = std::make_unique<NcclLinks>(options);
  }
}

std::string NodeState::shared_memory_socket() const {
  absl::MutexLock lock(&socket_mu_);
  return shared_memory_socket_;
}

void NodeState::set_shared_memory_socket(std::string path) {
  absl::MutexLock lock(&socket_mu_);
  shared_memory_socket_ = std::move(path);
}

std::string NodeState::local_lookup_socket() const {
  absl::MutexLock lock(&socket_mu_);
  return local_lookup_socket_;
}

void NodeState::set_local_lookup_socket(std::string path) {
  absl::MutexLock lock(&socket_mu_);
  local_lookup_socket_ = std::move(path);
}

size_t NodeState::CountHeld(
    absl::Span<const absl::string_view> stored_keys,
    absl::FunctionRef<void(size_t, const LocatedChunk&)> on_held) {
  lookups.fetch_add(1, std::memory_order_relaxed);
  size_t found = 0;
  for (; found < stored_keys.size(); ++found) {
    absl::StatusOr<LocatedChunk> chunk = store().Peek(stored_keys[found]);
    if (!chunk.ok()) break;
    on_held(found, *chunk);
  }
  hits.fetch_add(found, std::memory_order_relaxed);
  misses.fetch_add(stored_keys.size() - found, std::memory_order_relaxed);
  return found;
}

void NodeState::SetNcclLinkOwner(uint64_t link_id, std::string caller) {
  absl::MutexLock lock(&nccl_owners_mu_);
  // Ids of links closed since (the link table reuses none) go with them.
  if (NcclLinks* links = nccl_links(); links != nullptr) {
    absl::erase_if(nccl_link_owners_, [&](const auto& entry) {
      return !links->IsOpen(entry.first);
    });
  }
  nccl_link_owners_[link_id] = std::move(caller);
}

bool NodeState::OwnsNcclLink(const std::string& caller,
                             uint64_t link_id) const {
  absl::MutexLock lock(&nccl_owners_mu_);
  auto it = nccl_link_owners_.find(link_id);
  return it != nccl_link_owners_.end() && it->second == caller;
}

bool NodeState::drained() const {
  const bool alone = config_.cluster().etcd_endpoints().empty();
  return draining() && (alone || handoff_done.load());
}

namespace {

// The answers of Lookup and LookupEach, for their callback handlers.
grpc::Status LookupPrefix(NodeState& node, grpc::CallbackServerContext* context,
                          const v1::LookupRequest* request,
                          v1::LookupResponse* response) {
  absl::StatusOr<Caller> caller =
      node.access().Admit(*context, kTenantRole | kPeerRole);
  if (!caller.ok()) return ToGrpcStatus(caller.status());
  if (grpc::Status s = ValidateKeys(request->keys(), node.config().limits());
      !s.ok()) {
    return s;
  }
  std::vector<std::string> stored;
  stored.reserve(request->keys_size());
  for (const std::string& key : request->keys()) {
    stored.push_back(caller->Stored(key));
  }
  const std::vector<absl::string_view> views(stored.begin(), stored.end());
  response->set_prefix_chunks(
      node.CountHeld(views, [&](size_t i, const LocatedChunk& chunk) {
        if (!request->count_only()) {
          FillInfo(request->keys(i), chunk, *response->add_chunks());
        }
      }));
  return grpc::Status::OK;
}

grpc::Status LookupEachKey(NodeState& node,
                           grpc::CallbackServerContext* context,
                           const v1::LookupEachRequest* request,
                           v1::LookupEachResponse* response) {
  absl::StatusOr<Caller> caller =
      node.access().Admit(*context, kTenantRole | kPeerRole);
  if (!caller.ok()) return ToGrpcStatus(caller.status());
  if (grpc::Status s = ValidateKeys(request->keys(), node.config().limits());
      !s.ok()) {
    return s;
  }
  for (const std::string& key : request->keys()) {
    v1::ChunkInfo* info = response->add_chunks();
    absl::StatusOr<LocatedChunk> chunk = node.store().Peek(caller->Stored(key));
    if (chunk.ok()) {
      FillInfo(key, *chunk, *info);
    } else {
      info->set_key(key);
    }
  }
  return grpc::Status::OK;
}

}  // namespace

grpc::ServerUnaryReactor* KvCacheService::Lookup(
    grpc::CallbackServerContext* context, const v1::LookupRequest* request,
    v1::LookupResponse* response) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  reactor->Finish(LookupPrefix(node_, context, request, response));
  return reactor;
}

grpc::ServerUnaryReactor* KvCacheService::LookupEach(
    grpc::CallbackServerContext* context, const v1::LookupEachRequest* request,
    v1::LookupEachResponse* response) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  reactor->Finish(LookupEachKey(node_, context, request, response));
  return reactor;
}

grpc::Status KvCacheService::Put(grpc::ServerContext* context,
                                 grpc::ServerReader<v1::PutRequest>* reader,
                                 v1::PutResponse* response) {
  absl::StatusOr<Caller> caller =
      node_.access().Admit(*context, kTenantRole | kPeerRole);
  if (!caller.ok()) return ToGrpcStatus(caller.status());
  const v1::LimitsConfig& limits = node_.config().limits();
  StreamWatchdog::Watch watch(node_.watchdog(), *context);
  IncomingChunk chunk(node_.put_budget());
  v1::PutRequest request;
  while (reader->Read(&request)) {
    watch.Progress();
    if (request.has_header()) {
      if (chunk.open()) {
        return InvalidArgument(absl::StrCat(
            "a new put header arrived after ", chunk.received(), " of ",
            chunk.header().size_bytes(), " bytes of the previous chunk"));
      }
      if (node_.draining()) {
        return grpc::Status(grpc::StatusCode::FAILED_PRECONDITION,
                            "node is draining and accepts no new chunks");
      }
      if (grpc::Status s = CheckOwner(request.header(), *caller); !s.ok()) {
        return s;
      }
      const std::string& owner =
          caller->Has(kPeerRole) ? request.header().owner() : caller->name();
      if (request.header().size_bytes() >
          node_.store().LargestChunkFor(owner)) {
        return grpc::Status(
            grpc::StatusCode::RESOURCE_EXHAUSTED,
            absl::StrCat("a chunk of ", request.header().size_bytes(),
                         " bytes is over every tier quota of tenant ", owner,
                         " (gpu_quota_bytes, cpu_quota_bytes, "
                         "nvme_quota_bytes); nothing was buffered"));
      }
      if (grpc::Status s = chunk.Start(request.header(), limits); !s.ok()) {
        if (s.error_code() == grpc::StatusCode::RESOURCE_EXHAUSTED) {
          node_.refused_puts.fetch_add(1, std::memory_order_relaxed);
        }
        return s;
      }
    } else if (request.has_data()) {
      if (grpc::Status s = chunk.Append(request.data()); !s.ok()) return s;
    } else {
      return InvalidArgument("put message carries neither header nor data");
    }
    if (!chunk.complete()) continue;

    const v1::PutHeader header = chunk.header();
    const uint32_t crc = chunk.crc32c();
    ByteBudget::Reservation reservation;
    std::string bytes = chunk.Take(reservation);
    if (crc != header.crc32c()) {
      return grpc::Status(
          grpc::StatusCode::DATA_LOSS,
          absl::StrCat("chunk ", KeyPrefix(header.key()),
                       "... arrived damaged: CRC32C ", crc, " != declared ",
                       header.crc32c(), "; nothing stored for it"));
    }
    const uint64_t size = bytes.size();
    const std::string parent_key =
        header.parent_key().empty() ? "" : caller->Stored(header.parent_key());
    absl::StatusOr<PutOutcome> stored = node_.store().Put(
        caller->Stored(header.key()), std::move(bytes), crc,
        CappedTtl(header.pin_ttl_ms(), limits), parent_key,
        header.replace() ? PutMode::kReplace : PutMode::kKeepExisting,
        caller->Has(kPeerRole) ? header.owner() : caller->name());
    reservation.Reset();
    if (!stored.ok()) return ToGrpcStatus(stored.status());
    // Storing may take a while (a durable NVMe write); the client was not
    // idle meanwhile.
    watch.Progress();
    if (*stored == PutOutcome::kKeptExisting) {
      response->set_chunks_kept(response->chunks_kept() + 1);
      continue;
    }
    response->set_chunks_stored(response->chunks_stored() + 1);
    response->set_bytes_stored(response->bytes_stored() + size);
    node_.puts.fetch_add(1, std::memory_order_relaxed);
    node_.bytes_in.fetch_add(size, std::memory_order_relaxed);
  }
  if (watch.timed_out()) {
    return grpc::Status(
        grpc::StatusCode::CANCELLED,
        absl::StrCat("put stream sent nothing for ",
                     limits.stream_idle_timeout_seconds(),
                     " s (limits.stream_idle_timeout_seconds); cancelled"));
  }
  if (chunk.open()) {
    return InvalidArgument(absl::StrCat(
        "put stream ended after ", chunk.received(), " of ",
        chunk.header().size_bytes(), " bytes of chunk ",
        KeyPrefix(chunk.header().key()), "...; that chunk was not stored"));
  }
  return grpc::Status::OK;
}

namespace {

// A Get stream's writer. Each message is a GetResponse built on the wire:
// the header's bytes and the data field's tag and length, then the piece
// itself as a slice that holds a reference to the chunk until gRPC has sent
// it. gRPC calls it on its own threads, one reaction at a time.
//
// A chunk on NVMe is read on that thread, as the synchronous handler did on
// its own.
class GetReactor final : public grpc::ServerWriteReactor<grpc::ByteBuffer> {
 public:
  GetReactor(NodeState& node, grpc::CallbackServerContext& context,
             const grpc::ByteBuffer& request)
      : node_(node), watch_(node.watchdog(), context) {
    if (grpc::Status s = Begin(context, request); !s.ok()) {
      Finish(s);
      return;
    }
    WriteNext();
  }

  void OnWriteDone(bool ok) override {
    if (finished_) return;  // the last write: the stream is finished
    if (!ok) {
      // The client went away, or stopped reading past the idle timeout.
      Finish(grpc::Status(grpc::StatusCode::CANCELLED, "get stream cancelled"));
      return;
    }
    watch_.Progress();
    if (offset_ == chunk_.chunk.size_bytes) {
      node_.bytes_out.fetch_add(chunk_.chunk.size_bytes,
                                std::memory_order_relaxed);
      chunk_ = {};
      ++next_key_;
    }
    WriteNext();
  }

  void OnDone() override { delete this; }

 private:
  grpc::Status Begin(const grpc::CallbackServerContext& context,
                     const grpc::ByteBuffer& raw) {
    grpc::ByteBuffer copy(raw);  // shares the request's slices
    if (!grpc::SerializationTraits<v1::GetRequest>::Deserialize(&copy,
                                                                &request_)
             .ok()) {
      return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                          "malformed GetRequest");
    }
    absl::StatusOr<Caller> caller =
        node_.access().Admit(context, kTenantRole | kPeerRole);
    if (!caller.ok()) return ToGrpcStatus(caller.status());
    caller_.emplace(*std::move(caller));
    return ValidateDistinctKeys(request_.keys(), node_.config().limits());
  }

  // Queues the next message: the next piece of the current chunk, or the
  // next chunk's header (with its first piece if the caller reads them
  // together); ends the stream after the last key or at a missing one.
  void WriteNext() {
    if (chunk_.chunk.data == nullptr) {
      if (next_key_ == request_.keys_size()) {
        Finish(grpc::Status::OK);
        return;
      }
      if (grpc::Status s = OpenChunk(); !s.ok()) {
        Finish(s);
        return;
      }
    }
    v1::GetResponse header;
    if (!header_sent_) {
      FillInfo(request_.keys(next_key_), chunk_, *header.mutable_header());
      header_sent_ = true;
      if (!request_.header_carries_data()) {
        message_ = Message(&header, {});
        StartWrite(&message_);
        return;
      }
    }
    const absl::string_view bytes = chunk_.chunk.bytes();
    const absl::string_view piece =
        bytes.substr(offset_, node_.config().limits().get_piece_bytes());
    offset_ += piece.size();
    message_ = Message(header.has_header() ? &header : nullptr, piece);
    finished_ =
        offset_ == bytes.size() && next_key_ + 1 == request_.keys_size();
    if (!finished_) {
      StartWrite(&message_);
      return;
    }
    // The last message goes out with the stream's status: Finish sends
    // both, and only then does the write complete.
    StartWriteLast(&message_, grpc::WriteOptions());
    node_.bytes_out.fetch_add(chunk_.chunk.size_bytes,
                              std::memory_order_relaxed);
    Finish(grpc::Status::OK);
  }

  grpc::Status OpenChunk() {
    const int i = next_key_;
    const std::string& key = request_.keys(i);
    absl::StatusOr<LocatedChunk> chunk =
        node_.store().Get(caller_->Stored(key));
    if (absl::IsNotFound(chunk.status())) {
      node_.misses.fetch_add(1, std::memory_order_relaxed);
      return grpc::Status(grpc::StatusCode::NOT_FOUND,
                          absl::StrCat("keys[", i, "] (", KeyPrefix(key),
                                       "...) is not cached on this node"));
    }
    if (!chunk.ok()) {
      return ToGrpcStatus(absl::Status(
          chunk.status().code(),
          absl::StrCat("keys[", i, "]: ", chunk.status().message())));
    }
    node_.hits.fetch_add(1, std::memory_order_relaxed);
    chunk_ = *std::move(chunk);
    offset_ = 0;
    header_sent_ = false;
    return grpc::Status::OK;
  }

  // A GetResponse with `header` (if not null) and `piece` (if not empty) as
  // its data, the piece not copied.
  grpc::ByteBuffer Message(const v1::GetResponse* header,
                           absl::string_view piece) {
    std::string prefix;
    if (header != nullptr) header->SerializeToString(&prefix);
    if (piece.empty()) {
      grpc::Slice slice(prefix);
      return grpc::ByteBuffer(&slice, 1);
    }
    {
      google::protobuf::io::StringOutputStream out(&prefix);
      google::protobuf::io::CodedOutputStream coded(&out);
      coded.WriteTag(google::protobuf::internal::WireFormatLite::MakeTag(
          v1::GetResponse::kDataFieldNumber,
          google::protobuf::internal::WireFormatLite::
              WIRETYPE_LENGTH_DELIMITED));
      coded.WriteVarint32(static_cast<uint32_t>(piece.size()));
    }
    grpc::Slice slices[2] = {
        grpc::Slice(prefix),
        grpc::Slice(const_cast<char*>(piece.data()), piece.size(),
                    &ReleaseChunk,
                    new std::shared_ptr<const char>(chunk_.chunk.data))};
    return grpc::ByteBuffer(slices, 2);
  }

  static void ReleaseChunk(void* reference) {
    delete static_cast<std::shared_ptr<const char>*>(reference);
  }

  NodeState& node_;
  StreamWatchdog::Watch watch_;
  v1::GetRequest request_;
  std::optional<Caller> caller_;
  int next_key_ = 0;
  LocatedChunk chunk_;  // the chunk being sent; data null between chunks
  uint64_t offset_ = 0;
  bool header_sent_ = false;
  bool finished_ = false;     // the last message is queued
  grpc::ByteBuffer message_;  // in flight until OnWriteDone
};

}  // namespace

grpc::ServerWriteReactor<grpc::ByteBuffer>* KvCacheService::Get(
    grpc::CallbackServerContext* context, const grpc::ByteBuffer* request) {
  return new GetReactor(node_, *context, *request);
}

grpc::Status KvCacheService::Locate(grpc::ServerContext* context,
                                    const v1::LocateRequest* request,
                                    v1::LocateResponse* response) {
  absl::StatusOr<Caller> caller = node_.access().Admit(*context, kTenantRole);
  if (!caller.ok()) return ToGrpcStatus(caller.status());
  if (grpc::Status s =
          ValidateDistinctKeys(request->keys(), node_.config().limits());
      !s.ok()) {
    return s;
  }
  if (node_.shared_memory_socket().empty()) {
    return grpc::Status(grpc::StatusCode::UNAVAILABLE,
                        "this node shares no memory (shared_memory.enabled)");
  }
  const HostArena& arena = node_.store().cpu_arena();
  const GpuArena* gpu = node_.store().gpu_arena();
  const bool accept_gpu = request->accept_gpu() && gpu != nullptr &&
                          request->gpu_region_id() == gpu->id();
  std::vector<ChunkRef> chunks;
  // Chunks past the room leases have left would be read up from NVMe, or
  // copied out of the GPU tier, only to go unleased: stop before them. The
  // first is always tried, so a full cap is RESOURCE_EXHAUSTED below.
  const std::string owner = context->peer();
  const uint64_t room = node_.leases().room_bytes(owner);
  const uint64_t max_read = request->max_read_bytes();
  uint64_t offered = 0, read = 0;
  bool out_of_room = false, read_limited = false;
  std::vector<std::string> stored_keys, on_nvme;
  for (const std::string& key : request->keys()) {
    std::string stored = caller->Stored(key);
    absl::StatusOr<LocatedChunk> peeked = node_.store().Peek(stored);
    if (!peeked.ok()) break;
    offered += peeked->chunk.size_bytes;
    out_of_room = offered > room && !stored_keys.empty();
    if (out_of_room) break;
    if (peeked->tier == TierId::kNvme) {
      read_limited = max_read != 0 && read != 0 &&
                     read + peeked->chunk.size_bytes > max_read;
      if (read_limited) break;
      read += peeked->chunk.size_bytes;
      on_nvme.push_back(stored);
    }
    stored_keys.push_back(std::move(stored));
  }
  node_.store().ReadUpFromNvme(on_nvme, kNvmeChunksReadTogether);
  for (size_t i = 0; i < stored_keys.size(); ++i) {
    absl::StatusOr<LocatedChunk> chunk =
        node_.store().GetInMemory(stored_keys[i], accept_gpu);
    if (!chunk.ok()) break;
    v1::ChunkExtent* extent = response->add_chunks();
    FillInfo(request->keys(i), *chunk, *extent->mutable_info());
    const ChunkArena& held_in = chunk->tier == TierId::kGpu
                                    ? static_cast<const ChunkArena&>(*gpu)
                                    : arena;
    extent->set_offset(*held_in.OffsetOf(chunk->chunk.data.get()));
    chunks.push_back(std::move(chunk->chunk));
  }
  const size_t found = chunks.size();
  // A chunk that could not be placed ends the answer short of the window.
  read_limited = read_limited && found == stored_keys.size();
  node_.hits.fetch_add(found, std::memory_order_relaxed);
  // Keys left for lack of lease room or read budget are not known to be
  // absent.
  if (!out_of_room && !read_limited) {
    node_.misses.fetch_add(request->keys_size() - found,
                           std::memory_order_relaxed);
  }
  response->set_region_id(arena.id());
  if (found == 0) return grpc::Status::OK;
  const absl::Duration ttl = std::min(
      absl::Milliseconds(request->lease_ms()),
      absl::Seconds(node_.config().shared_memory().max_lease_seconds()));
  const ChunkLeases::Lease lease =
      node_.leases().Grant(owner, std::move(chunks), ttl);
  if (lease.chunks == 0) {
    return grpc::Status(
        grpc::StatusCode::RESOURCE_EXHAUSTED,
        absl::StrCat("leases already hold ", node_.leases().held_bytes(),
                     " bytes of the shared tiers, ",
                     node_.leases().held_bytes(owner),
                     " of them this connection's "
                     "(shared_memory.max_leased_percent, "
                     "max_leased_percent_per_connection); release some or "
                     "fetch with Get"));
  }
  response->mutable_chunks()->DeleteSubrange(
      lease.chunks, response->chunks_size() - lease.chunks);
  response->set_lease_id(lease.id);
  response->set_lease_expires_unix_ms(absl::ToUnixMillis(lease.expiry));
  response->set_read_limited(read_limited &&
                             lease.chunks == static_cast<size_t>(found));
  return grpc::Status::OK;
}

grpc::Status KvCacheService::Release(grpc::ServerContext* context,
                                     const v1::ReleaseRequest* request,
                                     v1::ReleaseResponse* response) {
  absl::StatusOr<Caller> caller = node_.access().Admit(*context, kTenantRole);
  if (!caller.ok()) return ToGrpcStatus(caller.status());
  response->set_released(
      node_.leases().Release(context->peer(), request->lease_id()));
  return grpc::Status::OK;
}

grpc::Status KvCacheService::SendOverNccl(
    grpc::ServerContext* context, const v1::SendOverNcclRequest* request,
    v1::SendOverNcclResponse* response) {
  absl::StatusOr<Caller> caller = node_.access().Admit(*context, kTenantRole);
  if (!caller.ok()) return ToGrpcStatus(caller.status());
  if (grpc::Status s =
          ValidateDistinctKeys(request->keys(), node_.config().limits());
      !s.ok()) {
    return s;
  }
  NcclLinks* links = node_.nccl_links();
  if (links == nullptr) {
    return grpc::Status(grpc::StatusCode::FAILED_PRECONDITION,
                        "this node opens no NCCL links");
  }
  if (!node_.OwnsNcclLink(caller->name(), request->link_id())) {
    return grpc::Status(grpc::StatusCode::NOT_FOUND,
                        absl::StrCat("no NCCL link ", request->link_id(),
                                     " is open for this caller"));
  }
  std::vector<ChunkRef> chunks;
  uint64_t bytes = 0;
  for (const std::string& key : request->keys()) {
    absl::StatusOr<LocatedChunk> chunk =
        node_.store().GetInMemory(caller->Stored(key), /*accept_device=*/true);
    if (!chunk.ok()) break;
    bytes += chunk->chunk.size_bytes;
    if (bytes > request->max_bytes()) {
      if (chunks.empty()) {
        return grpc::Status(
            grpc::StatusCode::RESOURCE_EXHAUSTED,
            absl::StrCat("the first chunk is ", chunk->chunk.size_bytes,
                         " bytes; the receiver takes ", request->max_bytes()));
      }
      break;
    }
    FillInfo(key, *chunk, *response->add_chunks());
    chunks.push_back(std::move(chunk->chunk));
  }
  const size_t found = chunks.size();
  absl::StatusOr<size_t> queued =
      found == 0 ? 0 : links->Send(request->link_id(), std::move(chunks));
  if (!queued.ok()) return ToGrpcStatus(queued.status());
  response->mutable_chunks()->DeleteSubrange(*queued,
                                             response->chunks_size() - *queued);
  uint64_t sent_bytes = 0;
  for (const v1::ChunkInfo& info : response->chunks()) {
    sent_bytes += info.size_bytes();
  }
  node_.hits.fetch_add(*queued, std::memory_order_relaxed);
  if (found < static_cast<size_t>(request->keys_size()) &&
      bytes <= request->max_bytes()) {
    node_.misses.fetch_add(request->keys_size() - found,
                           std::memory_order_relaxed);
  }
  node_.bytes_out.fetch_add(sent_bytes, std::memory_order_relaxed);
  return grpc::Status::OK;
}

grpc::Status KvCacheService::Delete(grpc::ServerContext* context,
                                    const v1::DeleteRequest* request,
                                    v1::DeleteResponse* response) {
  absl::StatusOr<Caller> caller =
      node_.access().Admit(*context, kTenantRole | kPeerRole);
  if (!caller.ok()) return ToGrpcStatus(caller.status());
  if (grpc::Status s = ValidateKeys(request->keys(), node_.config().limits());
      !s.ok()) {
    return s;
  }
  uint32_t deleted = 0;
  for (const std::string& key : request->keys()) {
    absl::StatusOr<bool> gone = node_.store().Delete(caller->Stored(key));
    if (!gone.ok()) return ToGrpcStatus(gone.status());
    deleted += *gone ? 1 : 0;
  }
  response->set_deleted(deleted);
  return grpc::Status::OK;
}

grpc::Status KvCacheService::Pin(grpc::ServerContext* context,
                                 const v1::PinRequest* request,
                                 v1::PinResponse* response) {
  absl::StatusOr<Caller> caller =
      node_.access().Admit(*context, kTenantRole | kPeerRole);
  if (!caller.ok()) return ToGrpcStatus(caller.status());
  const v1::LimitsConfig& limits = node_.config().limits();
  if (grpc::Status s = ValidateKeys(request->keys(), limits); !s.ok()) return s;
  if (request->ttl_ms() == 0) {
    return InvalidArgument("pin needs a ttl_ms > 0");
  }
  const absl::Duration ttl = CappedTtl(request->ttl_ms(), limits);
  absl::Time earliest = absl::InfiniteFuture();
  for (int i = 0; i < request->keys_size(); ++i) {
    absl::StatusOr<absl::Time> expiry =
        node_.store().Pin(caller->Stored(request->keys(i)), ttl);
    if (!expiry.ok() && !absl::IsNotFound(expiry.status())) {
      return ToGrpcStatus(expiry.status());
    }
    if (!expiry.ok()) {
      return grpc::Status(
          grpc::StatusCode::NOT_FOUND,
          absl::StrCat("keys[", i, "] (", KeyPrefix(request->keys(i)),
                       "...) is not cached; keys before it were pinned"));
    }
    earliest = std::min(earliest, *expiry);
  }
  response->set_expires_unix_ms(absl::ToUnixMillis(earliest));
  return grpc::Status::OK;
}

grpc::Status KvCacheService::Unpin(grpc::ServerContext* context,
                                   const v1::UnpinRequest* request,
                                   v1::UnpinResponse*) {
  absl::StatusOr<Caller> caller =
      node_.access().Admit(*context, kTenantRole | kPeerRole);
  if (!caller.ok()) return ToGrpcStatus(caller.status());
  if (grpc::Status s = ValidateKeys(request->keys(), node_.config().limits());
      !s.ok()) {
    return s;
  }
  for (int i = 0; i < request->keys_size(); ++i) {
    const absl::Status s =
        node_.store().Unpin(caller->Stored(request->keys(i)));
    if (!s.ok() && !absl::IsNotFound(s)) return ToGrpcStatus(s);
    if (!s.ok()) {
      return grpc::Status(
          grpc::StatusCode::NOT_FOUND,
          absl::StrCat("keys[", i, "] (", KeyPrefix(request->keys(i)),
                       "...) is not cached; keys before it were unpinned"));
    }
  }
  return grpc::Status::OK;
}

grpc::Status KvCacheService::Stats(grpc::ServerContext* context,
                                   const v1::StatsRequest*,
                                   v1::StatsResponse* response) {
  // Node-wide counters say what every tenant does.
  absl::StatusOr<Caller> caller = node_.access().Admit(*context, kAdminRole);
  if (!caller.ok()) return ToGrpcStatus(caller.status());
  uint64_t evictions = 0;
  for (const TierReport& tier : node_.store().Report()) {
    evictions += tier.usage.evictions;
  }
  response->set_lookups(node_.lookups.load(std::memory_order_relaxed));
  response->set_hits(node_.hits.load(std::memory_order_relaxed));
  response->set_misses(node_.misses.load(std::memory_order_relaxed));
  response->set_puts(node_.puts.load(std::memory_order_relaxed));
  response->set_bytes_in(node_.bytes_in.load(std::memory_order_relaxed));
  response->set_bytes_out(node_.bytes_out.load(std::memory_order_relaxed));
  response->set_evictions(evictions);
  response->set_chunks(node_.store().chunks());
  return grpc::Status::OK;
}

grpc::Status AdminService::NodeInfo(grpc::ServerContext* context,
                                    const v1::NodeInfoRequest*,
                                    v1::NodeInfoResponse* response) {
  absl::StatusOr<Caller> caller =
      node_.access().Admit(*context, kTenantRole | kAdminRole | kPeerRole);
  if (!caller.ok()) return ToGrpcStatus(caller.status());
  response->set_key_namespace(caller->key_namespace());
  response->set_node_id(node_.node_id());
  response->set_version(KVCACHE_VERSION);
  response->set_listen_address(node_.config().listen_address());
  response->set_started_unix_ms(absl::ToUnixMillis(node_.started()));
  response->set_draining(node_.draining());
  response->set_handoff_chunks(node_.handoff_chunks.load());
  response->set_drained(node_.drained());
  response->set_shared_memory_socket(node_.shared_memory_socket());
  response->set_local_lookup_socket(node_.local_lookup_socket());
  response->set_shared_region_id(node_.store().cpu_arena().id());
  if (const GpuArena* gpu = node_.store().gpu_arena();
      gpu != nullptr && !response->shared_memory_socket().empty()) {
    response->set_gpu_ipc_handle(gpu->ipc_handle());
    response->set_gpu_region_id(gpu->id());
    response->set_gpu_region_bytes(gpu->capacity_bytes());
    response->set_gpu_pci_bus_id(gpu->pci_bus_id());
  }
  response->set_nccl_links(node_.nccl_links() != nullptr &&
                           transfer::NcclLink::Available().ok());
  return grpc::Status::OK;
}

grpc::Status AdminService::OpenNcclLink(grpc::ServerContext* context,
                                        const v1::OpenNcclLinkRequest* request,
                                        v1::OpenNcclLinkResponse* response) {
  absl::StatusOr<Caller> caller = node_.access().Admit(*context, kTenantRole);
  if (!caller.ok()) return ToGrpcStatus(caller.status());
  NcclLinks* links = node_.nccl_links();
  if (links == nullptr) {
    return grpc::Status(
        grpc::StatusCode::FAILED_PRECONDITION,
        "this node opens no NCCL links: it has no GPU tier "
        "(gpu_tier.capacity_bytes) or gpu_tier.max_nccl_links is 0");
  }
  const absl::Duration timeout =
      request->join_timeout_ms() == 0
          ? absl::Seconds(30)
          : std::min(absl::Milliseconds(request->join_timeout_ms()),
                     absl::Minutes(5));
  absl::StatusOr<uint64_t> id = links->Open(request->nccl_id(), timeout);
  if (!id.ok()) return ToGrpcStatus(id.status());
  node_.SetNcclLinkOwner(*id, caller->name());
  response->set_link_id(*id);
  response->set_gpu_pci_bus_id(node_.store().gpu_arena()->pci_bus_id());
  return grpc::Status::OK;
}

grpc::Status AdminService::CloseNcclLink(
    grpc::ServerContext* context, const v1::CloseNcclLinkRequest* request,
    v1::CloseNcclLinkResponse* response) {
  absl::StatusOr<Caller> caller = node_.access().Admit(*context, kTenantRole);
  if (!caller.ok()) return ToGrpcStatus(caller.status());
  NcclLinks* links = node_.nccl_links();
  response->set_closed(links != nullptr &&
                       node_.OwnsNcclLink(caller->name(), request->link_id()) &&
                       links->Close(request->link_id()));
  return grpc::Status::OK;
}

grpc::Status AdminService::GetTierUsage(grpc::ServerContext* context,
                                        const v1::TierUsageRequest*,
                                        v1::TierUsageResponse* response) {
  absl::StatusOr<Caller> caller = node_.access().Admit(*context, kAdminRole);
  if (!caller.ok()) return ToGrpcStatus(caller.status());
  for (const TierReport& report : node_.store().Report()) {
    const TierCounters& counters = *report.counters;
    v1::TierUsage* tier = response->add_tiers();
    tier->set_tier(ToProtoTier(report.tier));
    tier->set_used_bytes(report.usage.used_bytes);
    tier->set_capacity_bytes(report.usage.capacity_bytes);
    tier->set_chunks(report.usage.chunks);
    tier->set_pinned_chunks(report.usage.pinned_chunks);
    tier->set_hits(counters.hits.load(std::memory_order_relaxed));
    tier->set_misses(counters.misses.load(std::memory_order_relaxed));
    tier->set_evictions(report.usage.evictions);
    tier->set_promotions(counters.promotions.load(std::memory_order_relaxed));
    tier->set_demotions(counters.demotions.load(std::memory_order_relaxed));
    tier->set_corrupt_chunks(report.usage.corrupt_chunks);
    tier->set_read_p50_us(counters.read_latency.QuantileMicros(0.5));
    tier->set_read_p99_us(counters.read_latency.QuantileMicros(0.99));
    tier->set_write_p50_us(counters.write_latency.QuantileMicros(0.5));
    tier->set_write_p99_us(counters.write_latency.QuantileMicros(0.99));
    for (const OwnerUsage& owner : report.usage.owners) {
      v1::TenantTierUsage* tenant = tier->add_tenants();
      tenant->set_tenant(owner.owner);
      tenant->set_used_bytes(owner.used_bytes);
      tenant->set_quota_bytes(owner.quota_bytes);
      tenant->set_chunks(owner.chunks);
    }
  }
  return grpc::Status::OK;
}

grpc::Status AdminService::GetConfig(grpc::ServerContext* context,
                                     const v1::GetConfigRequest*,
                                     v1::GetConfigResponse* response) {
  absl::StatusOr<Caller> caller = node_.access().Admit(*context, kAdminRole);
  if (!caller.ok()) return ToGrpcStatus(caller.status());
  response->set_config_textproto(ConfigToText(node_.config()));
  return grpc::Status::OK;
}

grpc::Status AdminService::Drain(grpc::ServerContext* context,
                                 const v1::DrainRequest*,
                                 v1::DrainResponse* response) {
  absl::StatusOr<Caller> caller = node_.access().Admit(*context, kAdminRole);
  if (!caller.ok()) return ToGrpcStatus(caller.status());
  node_.StartDraining();
  response->set_chunks_remaining(node_.store().chunks());
  return grpc::Status::OK;
}

}  // namespace kvcache::kvstore
