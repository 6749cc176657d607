// Writing chunks into a KvCache Put stream, shared by the client library and
// by nodes copying chunks to their peers.
#ifndef KVCACHE_TRANSFER_PUT_STREAM_H_
#define KVCACHE_TRANSFER_PUT_STREAM_H_

#include <grpcpp/support/sync_stream.h>

#include <cstddef>
#include <cstdint>

#include "absl/strings/string_view.h"
#include "kvcache/v1/kvcache.pb.h"

namespace kvcache::transfer {

// Writes one chunk: its header (key, size, `crc32c`, `pin_ttl_ms`, 0 for no
// pin), then its bytes in pieces of `piece_bytes`. False once the stream is
// broken; the call's Finish says why.
bool WritePutChunk(grpc::ClientWriterInterface<v1::PutRequest>& writer,
                   absl::string_view key, absl::string_view bytes,
                   uint32_t crc32c, uint64_t pin_ttl_ms, size_t piece_bytes);

}  // namespace kvcache::transfer

#endif  // KVCACHE_TRANSFER_PUT_STREAM_H_
