#include "kvstore/codec_summary.h"

namespace kvcache::kvstore {

std::optional<CodecSummary> SummarizeChunk(absl::string_view bytes) {
  absl::StatusOr<CodecSummary> summary = codec::PeekSummary(bytes);
  if (!summary.ok()) return std::nullopt;
  return *summary;
}

}  // namespace kvcache::kvstore
