// libFuzzer entry point for a node's RPC handlers: each input is a sequence
// of calls a client could make (Put streams with any headers and data
// pieces, Get, Lookup, LookupEach, Locate, Release, Pin, Unpin, Delete,
// Stats, SendOverNccl and the Admin reads), sent through a real gRPC server
// in this process (an in-process channel: no sockets, so hundreds of inputs a
// second) to a small CPU-only node. Built and run by tests/fuzz/run_fuzz.sh
// kvcache_service.
//
// Input format, read front to back (a read past the end gives zeros, and the
// input ends at the first call that finds no bytes left, or after 32 calls):
//   call:  u8 opcode (modulo the number of calls), then its fields
//   key:   u8 k; k < 0xf0: a well-formed 32-byte key, one of 240;
//          otherwise u8 length and that many bytes (usually malformed)
//   keys:  u8 n (modulo 6, so 0..5; the node takes at most 4), n keys
//   Put:   u8 messages (modulo 6), each u8 kind (modulo 4):
//          0 a whole chunk: key, u16 size, u8 form: bits 0-1 pieces - 1;
//            bit 7 set: the bytes are `form` repeated (cheap large chunks,
//            to reach eviction), else they follow in the input; then u8
//            flags: 1 pin for u16 ms, 2 replace, 4 parent key (a key
//            follows). Header size and CRC32C match the bytes.
//          1 a header as given: key, key (parent), u32 size, u32 crc32c,
//            u32 pin_ttl_ms, u8 replace
//          2 a data piece: u16 length (modulo 8192), the bytes
//          3 a message with neither
//   Get/Lookup/LookupEach/Delete/Unpin: keys
//   Pin:   keys, u32 ttl_ms
//   Locate: keys, u32 lease_ms, u32 max_read_bytes, u8 accept_gpu
//   Release: u8 r; r < 0x80: the r-th lease this input took, else u64 id
//   SendOverNccl: u64 link id, keys, u32 max_bytes
//   Stats, NodeInfo, GetTierUsage, GetConfig: nothing
// What the input stored and leased is removed afterwards, so each input
// starts from an empty node. Beyond not crashing, the checks are the API's
// promises: Get returns the bytes Put stored, and a Put's counts match.
#include <grpcpp/grpcpp.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/container/flat_hash_set.h"
#include "codec/crc32c.h"
#include "kvcache/v1/kvcache.grpc.pb.h"
#include "kvstore/daemon_config.h"
#include "kvstore/kvcache_service.h"

namespace kvcache::kvstore {
namespace {

constexpr size_t kKeyBytes = 32;
constexpr uint64_t kMaxChunkBytes = 16 << 10;
// Each call costs a few hundred microseconds of gRPC; more calls an input
// would make inputs slow without reaching more code.
constexpr int kMaxCalls = 32;

// Reads the input front to back; past its end, every read is zero.
class InputReader {
 public:
  InputReader(const uint8_t* data, size_t size) : data_(data), size_(size) {}

  bool empty() const { return at_ >= size_; }

  template <typename T>
  T Take() {
    T value = 0;
    const size_t n = std::min(sizeof(T), size_ - std::min(at_, size_));
    std::memcpy(&value, data_ + std::min(at_, size_), n);
    at_ += sizeof(T);
    return value;
  }

  std::string TakeBytes(size_t length) {
    std::string bytes(length, '\0');
    const size_t start = std::min(at_, size_);
    std::memcpy(bytes.data(), data_ + start, std::min(length, size_ - start));
    at_ += length;
    return bytes;
  }

 private:
  const uint8_t* data_;
  size_t size_;
  size_t at_ = 0;
};

// The node and a client of it, made once per process.
struct Node {
  std::unique_ptr<NodeState> state;
  std::unique_ptr<KvCacheService> data_plane;
  std::unique_ptr<AdminService> admin_plane;
  std::unique_ptr<grpc::Server> server;
  std::unique_ptr<v1::KvCache::Stub> kvcache;
  std::unique_ptr<v1::Admin::Stub> admin;
};

Node& TheNode() {
  static Node* const node = [] {
    // A small node, so that inputs reach eviction and the limits: 256 KiB of
    // CPU tier, 16 KiB chunks, 4 keys a request, 4 KiB Get pieces.
    v1::DaemonConfig config;
    const absl::Status parsed = MergeConfigText(
        R"(listen_address: "127.0.0.1:0"
           node_id: "fuzz"
           cpu_tier { capacity_bytes: 262144 }
           limits {
             max_chunk_bytes: 16384
             max_keys_per_request: 4
             max_pin_ttl_seconds: 60
             get_piece_bytes: 4096
             max_put_bytes_in_flight: 65536
           })",
        "fuzz", config);
    if (!parsed.ok() || !ValidateConfig(config).ok()) std::abort();
    auto* n = new Node;
    absl::StatusOr<std::unique_ptr<NodeState>> state =
        NodeState::Create(config);
    if (!state.ok()) std::abort();
    n->state = std::move(*state);
    // Locate answers only once the daemon shares its memory; the socket
    // itself is not used by the handlers.
    n->state->set_shared_memory_socket("/nonexistent/kvcache-fuzz.sock");
    n->data_plane = std::make_unique<KvCacheService>(*n->state);
    n->admin_plane = std::make_unique<AdminService>(*n->state);
    grpc::ServerBuilder builder;
    builder.RegisterService(n->data_plane.get());
    builder.RegisterService(n->admin_plane.get());
    n->server = builder.BuildAndStart();
    if (!n->server) std::abort();
    std::shared_ptr<grpc::Channel> channel =
        n->server->InProcessChannel(grpc::ChannelArguments());
    n->kvcache = v1::KvCache::NewStub(channel);
    n->admin = v1::Admin::NewStub(channel);
    return n;
  }();
  return *node;
}

// A call's context: a deadline turns a handler that never returns into a
// slow input libFuzzer reports, not a hung run.
void SetDeadline(grpc::ClientContext& context) {
  context.set_deadline(std::chrono::system_clock::now() +
                       std::chrono::seconds(5));
}

// One input's calls, and what they left on the node.
class Session {
 public:
  explicit Session(InputReader& in) : in_(in), node_(TheNode()) {}

  ~Session() {
    for (const uint64_t lease : leases_) Release(lease);
    for (const std::string& key : stored_) {
      (void)node_.state->store().Delete(key);
    }
  }

  void Run() {
    for (int calls = 0; calls < kMaxCalls && !in_.empty(); ++calls) {
      switch (in_.Take<uint8_t>() % 14) {
        case 0:
          Put();
          break;
        case 1:
          Get();
          break;
        case 2: {
          v1::LookupRequest request;
          TakeKeys(*request.mutable_keys());
          v1::LookupResponse response;
          Unary(&v1::KvCache::Stub::Lookup, request, response);
          break;
        }
        case 3: {
          v1::LookupEachRequest request;
          TakeKeys(*request.mutable_keys());
          v1::LookupEachResponse response;
          Unary(&v1::KvCache::Stub::LookupEach, request, response);
          break;
        }
        case 4:
          Locate();
          break;
        case 5: {
          const uint8_t r = in_.Take<uint8_t>();
          const uint64_t id = r < 0x80 && r < leases_.size()
                                  ? leases_[r]
                                  : (r < 0x80 ? 0 : in_.Take<uint64_t>());
          Release(id);
          break;
        }
        case 6: {
          v1::PinRequest request;
          TakeKeys(*request.mutable_keys());
          request.set_ttl_ms(in_.Take<uint32_t>());
          v1::PinResponse response;
          Unary(&v1::KvCache::Stub::Pin, request, response);
          break;
        }
        case 7: {
          v1::UnpinRequest request;
          TakeKeys(*request.mutable_keys());
          v1::UnpinResponse response;
          Unary(&v1::KvCache::Stub::Unpin, request, response);
          break;
        }
        case 8: {
          v1::DeleteRequest request;
          TakeKeys(*request.mutable_keys());
          v1::DeleteResponse response;
          if (Unary(&v1::KvCache::Stub::Delete, request, response).ok()) {
            for (const std::string& key : request.keys()) contents_.erase(key);
          }
          break;
        }
        case 9: {
          v1::StatsResponse response;
          Unary(&v1::KvCache::Stub::Stats, v1::StatsRequest(), response);
          break;
        }
        case 10: {
          v1::SendOverNcclRequest request;
          request.set_link_id(in_.Take<uint64_t>());
          TakeKeys(*request.mutable_keys());
          request.set_max_bytes(in_.Take<uint32_t>());
          v1::SendOverNcclResponse response;
          Unary(&v1::KvCache::Stub::SendOverNccl, request, response);
          break;
        }
        case 11: {
          v1::NodeInfoResponse response;
          AdminUnary(&v1::Admin::Stub::NodeInfo, v1::NodeInfoRequest(),
                     response);
          break;
        }
        case 12: {
          v1::TierUsageResponse response;
          AdminUnary(&v1::Admin::Stub::GetTierUsage, v1::TierUsageRequest(),
                     response);
          break;
        }
        default: {
          v1::GetConfigResponse response;
          AdminUnary(&v1::Admin::Stub::GetConfig, v1::GetConfigRequest(),
                     response);
          break;
        }
      }
    }
  }

 private:
  template <typename Request, typename Response>
  grpc::Status Unary(grpc::Status (v1::KvCache::Stub::*call)(
                         grpc::ClientContext*, const Request&, Response*),
                     const Request& request, Response& response) {
    grpc::ClientContext context;
    SetDeadline(context);
    return (node_.kvcache.get()->*call)(&context, request, &response);
  }

  template <typename Request, typename Response>
  grpc::Status AdminUnary(grpc::Status (v1::Admin::Stub::*call)(
                              grpc::ClientContext*, const Request&, Response*),
                          const Request& request, Response& response) {
    grpc::ClientContext context;
    SetDeadline(context);
    return (node_.admin.get()->*call)(&context, request, &response);
  }

  std::string TakeKey() {
    const uint8_t k = in_.Take<uint8_t>();
    if (k < 0xf0) {
      std::string key(kKeyBytes, 'k');
      key[0] = static_cast<char>(k);
      return key;
    }
    std::string key = in_.TakeBytes(in_.Take<uint8_t>());
    if (key.size() == kKeyBytes) stored_.insert(key);
    return key;
  }

  void TakeKeys(google::protobuf::RepeatedPtrField<std::string>& keys) {
    for (int n = in_.Take<uint8_t>() % 6; n > 0; --n) *keys.Add() = TakeKey();
  }

  void Put() {
    grpc::ClientContext context;
    SetDeadline(context);
    v1::PutResponse response;
    std::unique_ptr<grpc::ClientWriter<v1::PutRequest>> writer =
        node_.kvcache->Put(&context, &response);
    // Chunks this stream completed, in order, if the node stores them all.
    std::vector<std::pair<std::string, std::string>> sent;
    bool open = true;
    for (int n = in_.Take<uint8_t>() % 6; n > 0 && open; --n) {
      v1::PutRequest message;
      switch (in_.Take<uint8_t>() % 4) {
        case 0: {
          v1::PutHeader& header = *message.mutable_header();
          header.set_key(TakeKey());
          const size_t size = in_.Take<uint16_t>() % (kMaxChunkBytes + 1024);
          const uint8_t form = in_.Take<uint8_t>();
          const int pieces = 1 + (form & 3);
          std::string bytes = (form & 0x80)
                                  ? std::string(size, static_cast<char>(form))
                                  : in_.TakeBytes(size);
          const uint8_t flags = in_.Take<uint8_t>();
          if (flags & 1) header.set_pin_ttl_ms(in_.Take<uint16_t>());
          header.set_replace(flags & 2);
          if (flags & 4) header.set_parent_key(TakeKey());
          header.set_size_bytes(bytes.size());
          header.set_crc32c(codec::Crc32c(bytes));
          stored_.insert(header.key());
          open = writer->Write(message);
          const size_t piece = bytes.size() / pieces + 1;
          for (size_t at = 0; at < bytes.size() && open; at += piece) {
            v1::PutRequest data;
            data.set_data(bytes.substr(at, piece));
            open = writer->Write(data);
          }
          sent.emplace_back(header.key(), std::move(bytes));
          continue;
        }
        case 1: {
          v1::PutHeader& header = *message.mutable_header();
          header.set_key(TakeKey());
          header.set_parent_key(TakeKey());
          header.set_size_bytes(in_.Take<uint32_t>());
          header.set_crc32c(in_.Take<uint32_t>());
          header.set_pin_ttl_ms(in_.Take<uint32_t>());
          header.set_replace(in_.Take<uint8_t>() & 1);
          stored_.insert(header.key());
          // A hand-made header may complete with hand-made data; whatever
          // the node then holds under the key is no longer known here.
          contents_.erase(header.key());
          Forget(sent);
          break;
        }
        case 2:
          message.set_data(in_.TakeBytes(in_.Take<uint16_t>() % 8192));
          Forget(sent);
          break;
        default:
          Forget(sent);
          break;
      }
      open = writer->Write(message);
    }
    writer->WritesDone();
    if (!writer->Finish().ok()) {
      // The chunks before the failure may be stored, or not.
      Forget(sent);
      return;
    }
    if (!sent.empty() &&
        response.chunks_stored() + response.chunks_kept() != sent.size()) {
      std::abort();
    }
    // A chunk the node kept (it held the key already) keeps its first
    // bytes; only when none was kept are all of these known to be held.
    if (response.chunks_kept() != 0) {
      Forget(sent);
      return;
    }
    for (auto& [key, bytes] : sent) contents_[key] = std::move(bytes);
  }

  // Chunks whose Put may or may not have stored them: what the node holds
  // under their keys is no longer known.
  void Forget(std::vector<std::pair<std::string, std::string>>& sent) {
    for (const auto& [key, bytes] : sent) contents_.erase(key);
    sent.clear();
  }

  void Get() {
    v1::GetRequest request;
    TakeKeys(*request.mutable_keys());
    grpc::ClientContext context;
    SetDeadline(context);
    std::unique_ptr<grpc::ClientReader<v1::GetResponse>> reader =
        node_.kvcache->Get(&context, request);
    absl::flat_hash_map<std::string, std::string> got;
    std::string* current = nullptr;
    v1::GetResponse message;
    while (reader->Read(&message)) {
      if (message.has_header()) {
        current = &got[message.header().key()];
      } else if (current != nullptr) {
        current->append(message.data());
      } else {
        std::abort();  // data before any header
      }
    }
    if (!reader->Finish().ok()) return;
    // Evicted chunks are NOT_FOUND; a chunk that comes back is whole.
    for (const auto& [key, bytes] : got) {
      const auto known = contents_.find(key);
      if (known != contents_.end() && known->second != bytes) std::abort();
    }
  }

  void Locate() {
    v1::LocateRequest request;
    TakeKeys(*request.mutable_keys());
    request.set_lease_ms(in_.Take<uint32_t>());
    request.set_max_read_bytes(in_.Take<uint32_t>());
    request.set_accept_gpu(in_.Take<uint8_t>() & 1);
    v1::LocateResponse response;
    if (Unary(&v1::KvCache::Stub::Locate, request, response).ok() &&
        response.lease_id() != 0) {
      leases_.push_back(response.lease_id());
    }
  }

  void Release(uint64_t id) {
    v1::ReleaseRequest request;
    request.set_lease_id(id);
    v1::ReleaseResponse response;
    Unary(&v1::KvCache::Stub::Release, request, response);
  }

  InputReader& in_;
  Node& node_;
  absl::flat_hash_set<std::string> stored_;
  std::vector<uint64_t> leases_;
  // What Get must return for keys whose content this input knows.
  absl::flat_hash_map<std::string, std::string> contents_;
};

}  // namespace
}  // namespace kvcache::kvstore

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  kvcache::kvstore::InputReader in(data, size);
  kvcache::kvstore::Session(in).Run();
  return 0;
}
