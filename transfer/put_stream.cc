#include "transfer/put_stream.h"

#include <string>

#include "transfer/grpc_stream.h"

namespace kvcache::transfer {

bool WritePutChunk(grpc::ClientWriterInterface<v1::PutRequest>& writer,
                   absl::string_view key, absl::string_view bytes,
                   uint32_t crc32c, uint64_t pin_ttl_ms, size_t piece_bytes) {
  v1::PutRequest message;
  v1::PutHeader* header = message.mutable_header();
  header->set_key(std::string(key));
  header->set_size_bytes(bytes.size());
  header->set_crc32c(crc32c);
  header->set_pin_ttl_ms(pin_ttl_ms);
  if (!writer.Write(message)) return false;
  return ForEachPiece(bytes, piece_bytes, [&](absl::string_view piece) {
    message.set_data(piece.data(), piece.size());
    return writer.Write(message);
  });
}

}  // namespace kvcache::transfer
