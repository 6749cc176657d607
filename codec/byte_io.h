// Little-endian byte writer and bounds-checked reader used by the bitstream
// code. The reader never reads past its view: every accessor reports failure
// instead, so hostile streams cannot cause out-of-bounds reads.
#ifndef KVCACHE_CODEC_BYTE_IO_H_
#define KVCACHE_CODEC_BYTE_IO_H_

#include <cstddef>
#include <cstdint>
#include <string>

#include "absl/strings/string_view.h"
#include "codec/hd.h"
#include "codec/rans_math.h"

namespace kvcache::codec::internal {

// Appends to a caller-owned string. Not thread-safe.
class ByteWriter {
 public:
  explicit ByteWriter(std::string* out) : out_(out) {}

  void U8(uint8_t v) { out_->push_back(static_cast<char>(v)); }
  void U16(uint16_t v) {
    U8(v & 0xFF);
    U8(v >> 8);
  }
  void U32(uint32_t v) {
    U16(v & 0xFFFF);
    U16(v >> 16);
  }
  // LEB128: 7 bits per byte, low group first, high bit = more follows.
  void Varint(uint32_t v) {
    while (v >= 0x80) {
      U8(static_cast<uint8_t>(v | 0x80));
      v >>= 7;
    }
    U8(static_cast<uint8_t>(v));
  }
  void Bytes(absl::string_view b) { out_->append(b.data(), b.size()); }

 private:
  std::string* out_;
};

// Reads from a view it does not own. Every method returns false (and leaves
// the output unspecified) when the view is exhausted or malformed.
class ByteReader {
 public:
  explicit ByteReader(absl::string_view data) : data_(data) {}

  size_t remaining() const { return data_.size() - pos_; }
  size_t position() const { return pos_; }

  bool U8(uint8_t* v) {
    if (remaining() < 1) return false;
    *v = static_cast<uint8_t>(data_[pos_++]);
    return true;
  }
  bool U16(uint16_t* v) {
    uint8_t lo, hi;
    if (!U8(&lo) || !U8(&hi)) return false;
    *v = static_cast<uint16_t>(lo | hi << 8);
    return true;
  }
  bool U32(uint32_t* v) {
    uint16_t lo, hi;
    if (!U16(&lo) || !U16(&hi)) return false;
    *v = uint32_t{lo} | uint32_t{hi} << 16;
    return true;
  }
  // Rejects encodings longer than five bytes or overflowing 32 bits.
  bool Varint(uint32_t* v) {
    const int n = rans::ReadVarint(
        reinterpret_cast<const uint8_t*>(data_.data()) + pos_, remaining(), v);
    pos_ += n;
    return n != 0;
  }
  bool Bytes(size_t n, absl::string_view* v) {
    if (remaining() < n) return false;
    *v = data_.substr(pos_, n);
    pos_ += n;
    return true;
  }

 private:
  absl::string_view data_;
  size_t pos_ = 0;
};

// Unaligned little-endian loads/stores on raw buffers the caller has already
// bounds-checked.
KVCACHE_HD inline uint32_t LoadU32(const uint8_t* p) {
  return uint32_t{p[0]} | uint32_t{p[1]} << 8 | uint32_t{p[2]} << 16 |
         uint32_t{p[3]} << 24;
}
KVCACHE_HD inline uint16_t LoadU16(const uint8_t* p) {
  return static_cast<uint16_t>(p[0] | p[1] << 8);
}

}  // namespace kvcache::codec::internal

#endif  // KVCACHE_CODEC_BYTE_IO_H_
