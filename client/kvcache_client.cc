#include "client/kvcache_client.h"

#include <iterator>
#include <utility>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "cluster/stored_key.h"
#include "codec/crc32c.h"
#include "transfer/grpc_stream.h"
#include "transfer/put_stream.h"
#include "transfer/tls_credentials.h"

namespace kvcache {
namespace {

using ::kvcache::transfer::FromGrpcStatus;

transfer::TlsFiles TlsFilesOf(const ClientOptions& options) {
  transfer::TlsFiles files;
  files.ca_file = options.ca_file;
  files.cert_file = options.cert_file;
  files.key_file = options.key_file;
  return files;
}

// gRPC reports a failed handshake as UNAVAILABLE with the TLS library's
// words in the message.
bool IsHandshakeFailure(const absl::Status& status) {
  if (status.code() != absl::StatusCode::kUnavailable) return false;
  for (absl::string_view sign :
       {"andshake", "SSL", "ssl", "certificate", "Certificate", "tls", "TLS"}) {
    if (absl::StrContains(status.message(), sign)) return true;
  }
  return false;
}

// A node that accepted the connection and closed it: it refused the
// client's certificate (or its lack of one), or it speaks TLS to a
// plaintext client.
bool ClosedByNode(const absl::Status& status) {
  return status.code() == absl::StatusCode::kUnavailable &&
         (absl::StrContains(status.message(), "Socket closed") ||
          absl::StrContains(status.message(), "onnection reset"));
}

// The token to send: `token`, or the contents of `token_file`.
absl::StatusOr<std::string> TokenOf(const ClientOptions& options) {
  if (!options.token.empty() && !options.token_file.empty()) {
    return absl::InvalidArgumentError(
        "give the token either as token or in token_file, not both");
  }
  std::string token = options.token;
  if (!options.token_file.empty()) {
    absl::StatusOr<std::string> read =
        transfer::ReadCredentialFile(options.token_file, "token_file");
    if (!read.ok()) return read.status();
    token = std::string(absl::StripTrailingAsciiWhitespace(*read));
  }
  // Metadata values are printable ASCII; anything else would fail every
  // call with a less helpful error.
  for (char c : token) {
    if (c < 0x21 || c > 0x7e) {
      return absl::InvalidArgumentError(absl::StrCat(
          "the token",
          options.token_file.empty()
              ? ""
              : absl::StrCat(" in token_file '", options.token_file, "'"),
          " holds a space, a line break or a non-ASCII character"));
    }
  }
  return token;
}

}  // namespace

KvCacheClient::KvCacheClient(const ClientOptions& options, std::string token,
                             std::shared_ptr<grpc::Channel> channel)
    : options_(options),
      authorization_(token.empty() ? "" : absl::StrCat("Bearer ", token)),
      channel_(std::move(channel)),
      data_(v1::KvCache::NewStub(channel_)),
      admin_(v1::Admin::NewStub(channel_)) {}

absl::Status KvCacheClient::Annotate(const grpc::Status& status,
                                     absl::string_view call) const {
  absl::Status s = FromGrpcStatus(status);
  if (s.ok()) return s;
  if (!options_.ca_file.empty() && IsHandshakeFailure(s)) {
    return absl::UnavailableError(absl::StrCat(
        "kvcache ", call, ": ",
        transfer::HandshakeFailureHint(TlsFilesOf(options_), options_.address),
        " (", s.message(), ")"));
  }
  return absl::Status(
      s.code(), absl::StrCat("kvcache ", call, " at ", options_.address, ": ",
                             s.message()));
}

absl::StatusOr<std::unique_ptr<KvCacheClient>> KvCacheClient::Connect(
    const ClientOptions& options) {
  absl::StatusOr<std::shared_ptr<grpc::ChannelCredentials>> credentials =
      transfer::ClientCredentials(TlsFilesOf(options));
  if (!credentials.ok()) return credentials.status();
  absl::StatusOr<std::string> token = TokenOf(options);
  if (!token.ok()) return token.status();
  grpc::ChannelArguments args;
  // Connections of its own: a shared one may still be the socket of a node
  // that died and was restarted on the same address.
  args.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);
  // Get streams carry pieces of up to limits.get_piece_bytes (max 3 MiB).
  args.SetMaxReceiveMessageSize(8 << 20);
  transfer::SetChunkStreamWindow(args);
  if (!options.server_name.empty()) {
    args.SetSslTargetNameOverride(options.server_name);
  }
  std::shared_ptr<grpc::Channel> channel =
      grpc::CreateCustomChannel(options.address, *credentials, args);
  const auto deadline = std::chrono::system_clock::now() +
                        absl::ToChronoMilliseconds(options.connect_timeout);
  grpc_connectivity_state state = channel->GetState(/*try_to_connect=*/true);
  while (state != GRPC_CHANNEL_READY &&
         !(options.fail_fast && state == GRPC_CHANNEL_TRANSIENT_FAILURE) &&
         channel->WaitForStateChange(state, deadline)) {
    state = channel->GetState(/*try_to_connect=*/true);
  }
  auto client = std::unique_ptr<KvCacheClient>(
      new KvCacheClient(options, *std::move(token), std::move(channel)));
  if (state == GRPC_CHANNEL_READY) return client;
  if (state == GRPC_CHANNEL_TRANSIENT_FAILURE) {
    // The channel's state does not say why it failed; one call does, and
    // tells a refused handshake (or a TLS node dialled in plaintext) from a
    // node that is not there.
    grpc::ClientContext context;
    context.set_deadline(std::chrono::system_clock::now() +
                         std::chrono::seconds(1));
    v1::StatsResponse response;
    const absl::Status probe = client->Annotate(
        client->data_->Stats(&context, v1::StatsRequest(), &response),
        "connect");
    if (IsHandshakeFailure(probe)) return probe;
    if (ClosedByNode(probe)) {
      return absl::UnavailableError(
          options.ca_file.empty()
              ? absl::StrCat("kvcached at ", options.address,
                             " closed the connection: if it serves TLS, give "
                             "the CA its certificate chains to (ca_file), "
                             "and a client certificate if it requires one")
              : transfer::HandshakeFailureHint(TlsFilesOf(options),
                                               options.address));
    }
  }
  return absl::UnavailableError(absl::StrCat(
      "cannot reach kvcached at ", options.address,
      state == GRPC_CHANNEL_TRANSIENT_FAILURE
          ? " (the connection failed)"
          : absl::StrCat(" within ",
                         absl::FormatDuration(options.connect_timeout)),
      "; is the daemon running?"));
}

std::unique_ptr<grpc::ClientContext> KvCacheClient::NewContext() const {
  auto context = std::make_unique<grpc::ClientContext>();
  context->set_deadline(std::chrono::system_clock::now() +
                        absl::ToChronoMilliseconds(options_.timeout));
  if (!authorization_.empty()) {
    context->AddMetadata("authorization", authorization_);
  }
  if (!options_.key_namespace.empty()) {
    context->AddMetadata("x-kvcache-namespace", options_.key_namespace);
  }
  return context;
}

template <typename Request>
void KvCacheClient::AddKeys(absl::Span<const ChunkKey> keys, Request& request) {
  for (const ChunkKey& key : keys) {
    request.add_keys(std::string(key.AsBytes()));
  }
}

absl::StatusOr<v1::LookupResponse> KvCacheClient::LookupCall(
    absl::Span<const ChunkKey> keys, bool count_only) {
  v1::LookupResponse response;
  if (keys.empty()) return response;
  v1::LookupRequest request;
  AddKeys(keys, request);
  request.set_count_only(count_only);
  grpc::Status status = data_->Lookup(NewContext().get(), request, &response);
  if (!status.ok()) return Annotate(status, "lookup");
  return response;
}

absl::StatusOr<LookupResult> KvCacheClient::Lookup(
    absl::Span<const ChunkKey> keys) {
  absl::StatusOr<v1::LookupResponse> response =
      LookupCall(keys, /*count_only=*/false);
  if (!response.ok()) return response.status();
  LookupResult result;
  result.prefix_chunks = response->prefix_chunks();
  result.chunks.assign(
      std::make_move_iterator(response->mutable_chunks()->begin()),
      std::make_move_iterator(response->mutable_chunks()->end()));
  return result;
}

std::shared_ptr<KvCacheClient::LocalLookup> KvCacheClient::FindLocalLookup() {
  absl::MutexLock lock(&local_mu_);
  if (local_searched_ || !options_.local_lookups) return local_;
  absl::StatusOr<v1::NodeInfoResponse> info = NodeInfo();
  // A node not reached now is asked again at the next call.
  local_searched_ = info.ok() || !(absl::IsUnavailable(info.status()) ||
                                   absl::IsDeadlineExceeded(info.status()));
  if (!info.ok()) return nullptr;
  if (info->local_lookup_socket().empty()) return nullptr;
  // A node elsewhere, or one this user may not ask, has no socket here
  // that greets with its id.
  absl::StatusOr<std::unique_ptr<transfer::LocalLookupClient>> client =
      transfer::LocalLookupClient::Connect(info->local_lookup_socket(),
                                           info->node_id());
  if (!client.ok()) return nullptr;
  local_ = std::make_shared<LocalLookup>(
      LocalLookup{*std::move(client), info->key_namespace()});
  return local_;
}

void KvCacheClient::DropLocalLookup(
    const std::shared_ptr<LocalLookup>& broken) {
  absl::MutexLock lock(&local_mu_);
  // The next call looks again: the node may have restarted.
  if (local_ == broken) {
    local_ = nullptr;
    local_searched_ = false;
  }
}

absl::StatusOr<size_t> KvCacheClient::CountCached(
    absl::Span<const ChunkKey> keys) {
  if (keys.empty()) return 0;
  if (std::shared_ptr<LocalLookup> local = FindLocalLookup();
      local != nullptr && keys.size() <= transfer::kMaxLocalLookupKeys) {
    std::vector<std::string> stored;
    stored.reserve(keys.size());
    for (const ChunkKey& key : keys) {
      stored.push_back(cluster::StoredKey(local->key_namespace, key.AsBytes()));
    }
    absl::StatusOr<size_t> held = local->client->CountHeld(stored);
    if (held.ok()) {
      local_lookups_.fetch_add(1, std::memory_order_relaxed);
      return *held;
    }
    DropLocalLookup(local);
  }
  absl::StatusOr<v1::LookupResponse> response =
      LookupCall(keys, /*count_only=*/true);
  if (!response.ok()) return response.status();
  return response->prefix_chunks();
}

absl::StatusOr<std::vector<v1::ChunkInfo>> KvCacheClient::LookupEach(
    absl::Span<const ChunkKey> keys) {
  std::vector<v1::ChunkInfo> infos;
  if (keys.empty()) return infos;
  v1::LookupEachRequest request;
  AddKeys(keys, request);
  v1::LookupEachResponse response;
  grpc::Status status =
      data_->LookupEach(NewContext().get(), request, &response);
  if (!status.ok()) return Annotate(status, "lookup");
  if (response.chunks_size() != static_cast<int>(keys.size())) {
    return absl::InternalError(
        absl::StrCat("kvcache lookup at ", options_.address, ": node answered ",
                     response.chunks_size(), " of ", keys.size(), " keys"));
  }
  infos.assign(response.chunks().begin(), response.chunks().end());
  return infos;
}

absl::Status KvCacheClient::Put(absl::Span<const ChunkToPut> chunks,
                                const PutOptions& options) {
  if (chunks.empty()) return absl::OkStatus();
  auto context = NewContext();
  v1::PutResponse response;
  std::unique_ptr<grpc::ClientWriter<v1::PutRequest>> writer =
      data_->Put(context.get(), &response);
  for (const ChunkToPut& chunk : chunks) {
    // A failed write means the node ended the call; Finish says why.
    v1::PutHeader header;
    header.set_key(std::string(chunk.key.AsBytes()));
    header.set_crc32c(codec::Crc32c(chunk.bytes));
    header.set_pin_ttl_ms(absl::ToInt64Milliseconds(options.pin_ttl));
    header.set_replace(options.replace);
    if (chunk.parent.has_value()) {
      header.set_parent_key(std::string(chunk.parent->AsBytes()));
    }
    if (!transfer::WritePutChunk(*writer, header, chunk.bytes,
                                 options_.piece_bytes)) {
      break;
    }
  }
  writer->WritesDone();
  return Annotate(writer->Finish(), "put");
}

absl::StatusOr<std::vector<FetchedChunk>> KvCacheClient::Get(
    absl::Span<const ChunkKey> keys) {
  std::vector<FetchedChunk> chunks;
  chunks.reserve(keys.size());
  absl::Status s = GetStream(keys, [&](size_t, FetchedChunk chunk) {
    chunks.push_back(std::move(chunk));
    return absl::OkStatus();
  });
  if (!s.ok()) return s;
  return chunks;
}

absl::Status KvCacheClient::GetStream(
    absl::Span<const ChunkKey> keys,
    const std::function<absl::Status(size_t, FetchedChunk)>& on_chunk) {
  if (keys.empty()) return absl::OkStatus();
  v1::GetRequest request;
  AddKeys(keys, request);
  request.set_header_carries_data(true);
  auto context = NewContext();
  std::unique_ptr<grpc::ClientReader<v1::GetResponse>> reader =
      data_->Get(context.get(), request);
  size_t started = 0, delivered = 0;  // chunks begun and handed over
  FetchedChunk chunk;
  uint64_t expected_size = 0;
  uint32_t expected_crc = 0, received_crc = 0;
  absl::Status failed;
  v1::GetResponse message;
  while (failed.ok() && reader->Read(&message)) {
    if (message.has_header()) {
      const size_t i = started;
      if (i != delivered || i >= keys.size() ||
          message.header().key() != keys[i].AsBytes() ||
          message.header().size_bytes() == 0) {
        failed = absl::InternalError(
            absl::StrCat("kvcache get at ", options_.address,
                         ": node answered out of order at chunk ", i));
        break;
      }
      ++started;
      chunk = FetchedChunk{keys[i], {}, message.header().tier()};
      expected_size = message.header().size_bytes();
      expected_crc = message.header().crc32c();
      received_crc = 0;
      if (!message.has_data()) continue;
    }
    std::string& data = *message.mutable_data();
    if (started == delivered ||
        data.size() > expected_size - chunk.bytes.size()) {
      failed = absl::InternalError(
          absl::StrCat("kvcache get at ", options_.address,
                       ": data outside a chunk's declared size"));
      break;
    }
    // The CRC32C grows as pieces arrive, so checking overlaps the transfer.
    received_crc = codec::Crc32cExtend(received_crc, data.data(), data.size());
    if (chunk.bytes.empty() && data.size() == expected_size) {
      chunk.bytes.swap(data);  // a chunk in one piece is not copied again
    } else {
      chunk.bytes.reserve(expected_size);
      chunk.bytes.append(data);
    }
    if (chunk.bytes.size() < expected_size) continue;
    if (received_crc != expected_crc) {
      failed = absl::DataLossError(
          absl::StrCat("kvcache get at ", options_.address, ": chunk ",
                       delivered, " (", keys[delivered].ToHex().substr(0, 16),
                       "...) failed its CRC32C check"));
      break;
    }
    failed = on_chunk(delivered++, std::move(chunk));
  }
  if (!failed.ok()) {
    context->TryCancel();
    reader->Finish();
    return failed;
  }
  if (absl::Status s = Annotate(reader->Finish(), "get"); !s.ok()) {
    return s;
  }
  if (delivered != keys.size()) {
    return absl::InternalError(absl::StrCat("kvcache get at ", options_.address,
                                            ": stream ended after ", delivered,
                                            " of ", keys.size(), " chunks"));
  }
  return absl::OkStatus();
}

absl::StatusOr<v1::LocateResponse> KvCacheClient::Locate(
    absl::Span<const ChunkKey> keys, absl::Duration lease,
    absl::string_view gpu_region_id, uint64_t max_read_bytes) {
  v1::LocateRequest request;
  AddKeys(keys, request);
  request.set_lease_ms(absl::ToInt64Milliseconds(lease));
  request.set_max_read_bytes(max_read_bytes);
  if (!gpu_region_id.empty()) {
    request.set_accept_gpu(true);
    request.set_gpu_region_id(std::string(gpu_region_id));
  }
  v1::LocateResponse response;
  grpc::Status status = data_->Locate(NewContext().get(), request, &response);
  if (!status.ok()) return Annotate(status, "locate");
  return response;
}

absl::StatusOr<bool> KvCacheClient::Release(uint64_t lease_id) {
  v1::ReleaseRequest request;
  request.set_lease_id(lease_id);
  v1::ReleaseResponse response;
  grpc::Status status = data_->Release(NewContext().get(), request, &response);
  if (!status.ok()) return Annotate(status, "release");
  return response.released();
}

absl::StatusOr<v1::OpenNcclLinkResponse> KvCacheClient::OpenNcclLink(
    absl::string_view nccl_id, absl::Duration join_timeout) {
  v1::OpenNcclLinkRequest request;
  request.set_nccl_id(std::string(nccl_id));
  request.set_join_timeout_ms(absl::ToInt64Milliseconds(join_timeout));
  v1::OpenNcclLinkResponse response;
  grpc::Status status =
      admin_->OpenNcclLink(NewContext().get(), request, &response);
  if (!status.ok()) return Annotate(status, "open NCCL link");
  return response;
}

absl::StatusOr<bool> KvCacheClient::CloseNcclLink(uint64_t link_id) {
  v1::CloseNcclLinkRequest request;
  request.set_link_id(link_id);
  v1::CloseNcclLinkResponse response;
  grpc::Status status =
      admin_->CloseNcclLink(NewContext().get(), request, &response);
  if (!status.ok()) {
    return Annotate(status, "close NCCL link");
  }
  return response.closed();
}

absl::StatusOr<v1::SendOverNcclResponse> KvCacheClient::SendOverNccl(
    uint64_t link_id, absl::Span<const ChunkKey> keys, uint64_t max_bytes) {
  v1::SendOverNcclRequest request;
  request.set_link_id(link_id);
  AddKeys(keys, request);
  request.set_max_bytes(max_bytes);
  v1::SendOverNcclResponse response;
  grpc::Status status =
      data_->SendOverNccl(NewContext().get(), request, &response);
  if (!status.ok()) return Annotate(status, "send over NCCL");
  return response;
}

absl::StatusOr<uint32_t> KvCacheClient::Delete(
    absl::Span<const ChunkKey> keys) {
  v1::DeleteRequest request;
  AddKeys(keys, request);
  v1::DeleteResponse response;
  grpc::Status status = data_->Delete(NewContext().get(), request, &response);
  if (!status.ok()) return Annotate(status, "delete");
  return response.deleted();
}

absl::StatusOr<absl::Time> KvCacheClient::Pin(absl::Span<const ChunkKey> keys,
                                              absl::Duration ttl) {
  v1::PinRequest request;
  AddKeys(keys, request);
  request.set_ttl_ms(absl::ToInt64Milliseconds(ttl));
  v1::PinResponse response;
  grpc::Status status = data_->Pin(NewContext().get(), request, &response);
  if (!status.ok()) return Annotate(status, "pin");
  return absl::FromUnixMillis(response.expires_unix_ms());
}

absl::Status KvCacheClient::Unpin(absl::Span<const ChunkKey> keys) {
  v1::UnpinRequest request;
  AddKeys(keys, request);
  v1::UnpinResponse response;
  return Annotate(data_->Unpin(NewContext().get(), request, &response),
                  "unpin");
}

absl::StatusOr<v1::StatsResponse> KvCacheClient::Stats() {
  v1::StatsResponse response;
  grpc::Status status =
      data_->Stats(NewContext().get(), v1::StatsRequest(), &response);
  if (!status.ok()) return Annotate(status, "stats");
  return response;
}

absl::StatusOr<v1::NodeInfoResponse> KvCacheClient::NodeInfo() {
  v1::NodeInfoResponse response;
  grpc::Status status =
      admin_->NodeInfo(NewContext().get(), v1::NodeInfoRequest(), &response);
  if (!status.ok()) return Annotate(status, "node info");
  return response;
}

absl::StatusOr<v1::TierUsageResponse> KvCacheClient::TierUsage() {
  v1::TierUsageResponse response;
  grpc::Status status = admin_->GetTierUsage(NewContext().get(),
                                             v1::TierUsageRequest(), &response);
  if (!status.ok()) return Annotate(status, "tier usage");
  return response;
}

absl::StatusOr<std::string> KvCacheClient::Config() {
  v1::GetConfigResponse response;
  grpc::Status status =
      admin_->GetConfig(NewContext().get(), v1::GetConfigRequest(), &response);
  if (!status.ok()) return Annotate(status, "config");
  return response.config_textproto();
}

absl::StatusOr<uint64_t> KvCacheClient::Drain() {
  v1::DrainResponse response;
  grpc::Status status =
      admin_->Drain(NewContext().get(), v1::DrainRequest(), &response);
  if (!status.ok()) return Annotate(status, "drain");
  return response.chunks_remaining();
}

}  // namespace kvcache
