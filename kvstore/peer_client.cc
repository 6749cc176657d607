#include "kvstore/peer_client.h"

#include <grpcpp/grpcpp.h>

#include <algorithm>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "transfer/grpc_stream.h"
#include "transfer/put_stream.h"

namespace kvcache::kvstore {
namespace {

absl::Status PeerError(const grpc::Status& status, absl::string_view call,
                       absl::string_view address) {
  const absl::Status s = transfer::FromGrpcStatus(status);
  return absl::Status(
      s.code(), absl::StrCat("peer ", address, " ", call, ": ", s.message()));
}

}  // namespace

transfer::TlsFiles NodeTlsFiles(const v1::TlsConfig& tls) {
  transfer::TlsFiles files;
  files.ca_file = tls.ca_file();
  files.cert_file = tls.cert_file();
  files.key_file = tls.key_file();
  files.ca_option = "tls.ca_file";
  files.cert_option = "tls.cert_file";
  files.key_option = "tls.key_file";
  return files;
}

absl::StatusOr<PeerCredentials> PeerCredentialsOf(
    const v1::DaemonConfig& config) {
  PeerCredentials credentials;
  if (config.tls().cert_file().empty()) {
    credentials.channel = grpc::InsecureChannelCredentials();
  } else {
    absl::StatusOr<std::shared_ptr<grpc::ChannelCredentials>> channel =
        transfer::ReloadingChannelCredentials(
            NodeTlsFiles(config.tls()),
            absl::Seconds(config.tls().reload_interval_seconds()));
    if (!channel.ok()) return channel.status();
    credentials.channel = *std::move(channel);
  }
  if (!config.access().peer_token_file().empty()) {
    absl::StatusOr<std::string> token = transfer::ReadCredentialFile(
        config.access().peer_token_file(), "access.peer_token_file");
    if (!token.ok()) return token.status();
    // Files written by `echo` end in a newline that is not part of the token.
    credentials.token = std::string(absl::StripTrailingAsciiWhitespace(*token));
  }
  return credentials;
}

void PeerClient::Prepare(grpc::ClientContext& context,
                         absl::Duration timeout) const {
  context.set_deadline(std::chrono::system_clock::now() +
                       absl::ToChronoMilliseconds(timeout));
  if (!credentials_.token.empty()) {
    context.AddMetadata("authorization",
                        absl::StrCat("Bearer ", credentials_.token));
  }
}

v1::KvCache::Stub& PeerClient::StubFor(const std::string& address) {
  std::unique_ptr<v1::KvCache::Stub>& stub = stubs_[address];
  if (!stub) {
    grpc::ChannelArguments args;
    args.SetMaxReceiveMessageSize(8 << 20);
    transfer::SetChunkStreamWindow(args);
    stub = v1::KvCache::NewStub(
        grpc::CreateCustomChannel(address, credentials_.channel, args));
  }
  return *stub;
}

absl::StatusOr<std::vector<bool>> PeerClient::Holds(
    const std::string& address, const std::vector<std::string>& keys) {
  v1::LookupEachRequest request;
  for (const std::string& key : keys) request.add_keys(key);
  v1::LookupEachResponse response;
  grpc::ClientContext context;
  Prepare(context, lookup_timeout_);
  const grpc::Status status =
      StubFor(address).LookupEach(&context, request, &response);
  if (!status.ok()) return PeerError(status, "lookup", address);
  if (response.chunks_size() != static_cast<int>(keys.size())) {
    return absl::InternalError(absl::StrCat("peer ", address, " answered ",
                                            response.chunks_size(), " of ",
                                            keys.size(), " keys"));
  }
  std::vector<bool> held;
  held.reserve(keys.size());
  for (const v1::ChunkInfo& info : response.chunks()) {
    held.push_back(info.tier() != v1::TIER_UNSPECIFIED);
  }
  return held;
}

absl::StatusOr<size_t> PeerClient::Copy(const std::string& address,
                                        const std::vector<std::string>& keys,
                                        TieredStore& store) {
  grpc::ClientContext context;
  Prepare(context, copy_timeout_);
  v1::PutResponse response;
  std::unique_ptr<grpc::ClientWriter<v1::PutRequest>> writer =
      StubFor(address).Put(&context, &response);
  const absl::Time now = absl::Now();
  for (const std::string& key : keys) {
    absl::StatusOr<LocatedChunk> located = store.GetForCopy(key);
    if (!located.ok()) continue;  // evicted or deleted since the scan
    const ChunkRef& chunk = located->chunk;
    const int64_t pin_ms =
        chunk.pinned ? std::max<int64_t>(
                           1, absl::ToInt64Milliseconds(chunk.pin_expiry - now))
                     : 0;
    v1::PutHeader header;
    header.set_key(key);
    header.set_crc32c(chunk.crc32c);
    header.set_pin_ttl_ms(pin_ms);
    header.set_parent_key(chunk.parent_key);
    header.set_owner(chunk.owner);
    if (!transfer::WritePutChunk(*writer, header, chunk.bytes(),
                                 transfer::kDefaultPieceBytes)) {
      break;  // Finish says why
    }
  }
  writer->WritesDone();
  const grpc::Status status = writer->Finish();
  if (!status.ok()) return PeerError(status, "put", address);
  return response.chunks_stored();
}

}  // namespace kvcache::kvstore
