#include "transfer/put_stream.h"

#include "transfer/grpc_stream.h"

namespace kvcache::transfer {

bool WritePutChunk(grpc::ClientWriterInterface<v1::PutRequest>& writer,
                   const v1::PutHeader& header, absl::string_view bytes,
                   size_t piece_bytes) {
  v1::PutRequest message;
  *message.mutable_header() = header;
  message.mutable_header()->set_size_bytes(bytes.size());
  if (!writer.Write(message)) return false;
  return ForEachPiece(bytes, piece_bytes, [&](absl::string_view piece) {
    message.set_data(piece.data(), piece.size());
    return writer.Write(message);
  });
}

}  // namespace kvcache::transfer
