// Helpers shared by both ends of kvcache's gRPC streams: status conversion
// and cutting chunks into data pieces.
//
// Chunks can be far larger than gRPC's default 4 MiB message limit, so Put
// and Get carry them as a header followed by pieces of bounded size.
#ifndef KVCACHE_TRANSFER_GRPC_STREAM_H_
#define KVCACHE_TRANSFER_GRPC_STREAM_H_

#include <grpcpp/grpcpp.h>

#include <cstddef>

#include "absl/status/status.h"
#include "absl/strings/string_view.h"

namespace kvcache::transfer {

// Piece size a client uses for Put unless told otherwise: large enough that
// per-message overhead is noise, small enough to stay far below 4 MiB.
inline constexpr size_t kDefaultPieceBytes = 1 << 20;

// HTTP/2 flow control for connections that stream chunks; both ends apply
// it. By default gRPC sizes a stream's window from its bandwidth-delay
// estimate, which on a short path (loopback, one rack) stays at a fraction
// of a chunk, so the sender keeps stopping mid-chunk for window updates. A
// fixed window of a few pieces keeps a chunk flowing.
void SetChunkStreamWindow(grpc::ChannelArguments& args);
void SetChunkStreamWindow(grpc::ServerBuilder& builder);

// gRPC and absl share code numbering, so the conversion keeps codes exactly.
grpc::Status ToGrpcStatus(const absl::Status& status);
absl::Status FromGrpcStatus(const grpc::Status& status);

// Calls `emit(piece)` for consecutive pieces of at most `piece_bytes` that
// together are `data`; stops early and returns false as soon as `emit` does.
// Emits nothing for empty data.
template <typename Emit>
bool ForEachPiece(absl::string_view data, size_t piece_bytes, Emit&& emit) {
  for (size_t offset = 0; offset < data.size(); offset += piece_bytes) {
    if (!emit(data.substr(offset, piece_bytes))) return false;
  }
  return true;
}

}  // namespace kvcache::transfer

#endif  // KVCACHE_TRANSFER_GRPC_STREAM_H_
