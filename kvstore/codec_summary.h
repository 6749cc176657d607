// What a chunk's codec header says about it (shape, dtype, level), for
// chunks stored as kvcache codec streams. Tiers read it once when a chunk is
// stored (the header is a few bytes at the front) and keep it with the
// chunk, and the NVMe tier keeps it in its index, so Lookup reports it
// without touching chunk bytes. Chunks are opaque to the store: bytes that
// are not a codec stream simply have no summary.
#ifndef KVCACHE_KVSTORE_CODEC_SUMMARY_H_
#define KVCACHE_KVSTORE_CODEC_SUMMARY_H_

#include <optional>

#include "absl/strings/string_view.h"
#include "codec/codec.h"

namespace kvcache::kvstore {

using CodecSummary = codec::StreamSummary;

// The summary of `bytes` if they are a codec stream with a valid header
// (checked as codec::PeekSummary does, checksum not verified); nullopt
// otherwise.
std::optional<CodecSummary> SummarizeChunk(absl::string_view bytes);

}  // namespace kvcache::kvstore

#endif  // KVCACHE_KVSTORE_CODEC_SUMMARY_H_
