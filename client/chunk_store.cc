#include "client/chunk_store.h"

#include <utility>

namespace kvcache {

std::vector<ChunkToPut> PromptChunks(absl::Span<const ChunkKey> keys,
                                     size_t first,
                                     absl::Span<const std::string> bytes) {
  std::vector<ChunkToPut> chunks;
  chunks.reserve(bytes.size());
  for (size_t i = first; i < first + bytes.size(); ++i) {
    ChunkToPut chunk{keys[i], bytes[i - first]};
    if (i > 0) chunk.parent = keys[i - 1];
    chunks.push_back(std::move(chunk));
  }
  return chunks;
}

}  // namespace kvcache
