// CRC32C (Castagnoli polynomial 0x1EDC6F41, reflected 0x82F63B78), the
// checksum iSCSI, ext4 and most storage engines use. It guards codec
// bitstreams and is shared with the storage engine so both agree on the bytes.
//
// Thread-safe: the functions are pure.
#ifndef KVCACHE_CODEC_CRC32C_H_
#define KVCACHE_CODEC_CRC32C_H_

#include <cstddef>
#include <cstdint>

#include "absl/strings/string_view.h"

namespace kvcache::codec {

// Returns the CRC32C of `crc`'s message followed by data[0, n). Pass crc = 0
// for a fresh checksum; Crc32cExtend(Crc32c(a), b) == Crc32c(a + b).
// Uses the SSE4.2 crc32 instruction when the CPU has it, else slicing-by-8.
uint32_t Crc32cExtend(uint32_t crc, const void* data, size_t n);

// Returns the CRC32C of `data`.
inline uint32_t Crc32c(absl::string_view data) {
  return Crc32cExtend(0, data.data(), data.size());
}

// The portable path alone, exposed so tests can check it against the
// hardware path on the same input.
uint32_t Crc32cExtendPortable(uint32_t crc, const void* data, size_t n);

}  // namespace kvcache::codec

#endif  // KVCACHE_CODEC_CRC32C_H_
