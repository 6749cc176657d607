// libFuzzer entry point for the NVMe tier's index records, which kvcached
// reads back from RocksDB at start-up (a damaged disk or an older version may
// have written anything). Built and run by tests/fuzz/run_fuzz.sh
// chunk_index. Whatever the bytes, decoding returns a status; a record that
// decodes describes something the tier can hold (an extent that covers its
// size, a codec summary a stream can have) and survives encoding and
// decoding again unchanged.
#include <cstddef>
#include <cstdint>
#include <cstdlib>

#include "codec/codec.h"
#include "kvstore/chunk_index.h"

namespace {

using kvcache::kvstore::IndexRecord;

bool SameRecord(const IndexRecord& a, const IndexRecord& b) {
  if (a.codec.has_value() != b.codec.has_value()) return false;
  if (a.codec.has_value()) {
    const kvcache::codec::ChunkShape &x = a.codec->shape, &y = b.codec->shape;
    if (x.layers != y.layers || x.tokens != y.tokens ||
        x.kv_heads != y.kv_heads || x.head_dim != y.head_dim ||
        x.dtype != y.dtype || a.codec->level != b.codec->level) {
      return false;
    }
  }
  return a.extent == b.extent && a.size_bytes == b.size_bytes &&
         a.crc32c == b.crc32c &&
         a.last_access_unix_ms == b.last_access_unix_ms &&
         a.pin_expiry_unix_ms == b.pin_expiry_unix_ms &&
         a.parent_key == b.parent_key && a.owner == b.owner;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using kvcache::kvstore::DecodeIndexRecord;
  const absl::string_view bytes(reinterpret_cast<const char*>(data), size);
  absl::StatusOr<IndexRecord> record = DecodeIndexRecord(bytes);
  if (!record.ok()) return 0;
  if (record->extent.length < record->size_bytes ||
      record->extent.length % kvcache::kvstore::kBlockBytes != 0) {
    std::abort();
  }
  if (record->codec.has_value() &&
      (!kvcache::codec::ShapeWithinLimits(record->codec->shape) ||
       kvcache::codec::LevelName(record->codec->level) == "unknown")) {
    std::abort();
  }
  absl::StatusOr<IndexRecord> again =
      DecodeIndexRecord(kvcache::kvstore::EncodeIndexRecord(*record));
  if (!again.ok() || !SameRecord(*record, *again)) std::abort();
  return 0;
}
