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

// Writes one chunk: `header` (its size_bytes set to the bytes' size), then
// its bytes in pieces of `piece_bytes`. False once the stream is broken; the
// call's Finish says why.
bool WritePutChunk(grpc::ClientWriterInterface<v1::PutRequest>& writer,
                   const v1::PutHeader& header, absl::string_view bytes,
                   size_t piece_bytes);

}  // namespace kvcache::transfer

#endif  // KVCACHE_TRANSFER_PUT_STREAM_H_
