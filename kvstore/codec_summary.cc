#include "kvstore/codec_summary.h"

#include <cstdint>

namespace kvcache::kvstore {
namespace {

// Where the fixed header keeps the level (codec/FORMAT.md, section 1).
constexpr size_t kLevelOffset = 6;

}  // namespace

std::optional<CodecSummary> SummarizeChunk(absl::string_view bytes) {
  absl::StatusOr<codec::ChunkShape> shape = codec::PeekShape(bytes);
  if (!shape.ok()) return std::nullopt;
  CodecSummary summary;
  summary.shape = *shape;
  summary.level =
      static_cast<codec::Level>(static_cast<uint8_t>(bytes[kLevelOffset]));
  return summary;
}

absl::string_view DTypeName(codec::DType dtype) {
  return dtype == codec::DType::kBFloat16 ? "bfloat16" : "float16";
}

}  // namespace kvcache::kvstore
