// Entropy coding of one (layer, K/V, channel group): the unit that owns its
// own frequency tables. FORMAT.md, "Channel-group streams", defines the order
// of symbols this produces; encoder and decoder share it through this file.
//
// Within each token group the first token is the anchor. Each group is coded
// either as is ("raw") or as wrapped differences from the anchor ("delta"),
// whichever the cost estimate says is smaller; because the integers are
// already quantized the differences are exact, so every token decodes
// independently of every other except its group's anchor.
//
// Not thread-safe: each thread needs its own coder (they hold scratch space).
#ifndef KVCACHE_CODEC_GROUP_CODER_H_
#define KVCACHE_CODEC_GROUP_CODER_H_

#include <array>
#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/string_view.h"
#include "absl/types/span.h"
#include "codec/byte_io.h"
#include "codec/format.h"
#include "codec/rans.h"

namespace kvcache::codec::internal {

// Where one channel group's integers live and how wide they are.
struct GroupView {
  const Header* header;
  uint32_t bits;  // Integer width, 1..16.
  uint32_t cg;    // Channel group index.
  uint64_t
      first_choice;  // Index of this group's first bit in the choice section.
};

// Symbols of the group's raw and delta streams (per byte plane): raw holds
// every anchor row plus raw groups; delta the non-anchor rows of delta
// groups.
std::array<size_t, 2> StreamSizes(const GroupView& v,
                                  absl::string_view choices);

class GroupEncoder {
 public:
  // Codes columns of channel group v.cg of q (tokens x channels, row-major):
  // sets its choice bits in `choices`, appends its tables and its blocks and
  // each block's end offset (relative to the payload start).
  void Encode(const GroupView& v, const uint16_t* q,
              std::vector<uint8_t>* choices, std::string* tables,
              std::string* payload, std::vector<uint32_t>* block_ends);

 private:
  std::vector<uint16_t> delta_;
  std::vector<uint8_t> syms_[2][2];  // [raw/delta][byte plane]
};

// Walks the block directory in stream order.
class BlockCursor {
 public:
  BlockCursor(absl::string_view directory, absl::string_view payload)
      : directory_(directory), payload_(payload) {}
  // Returns the next block, or DataLoss if the directory is exhausted or
  // its offsets go backwards or past the payload.
  absl::Status Next(absl::string_view* block);
  bool AtEnd() const { return index_ * 4 == directory_.size(); }
  uint32_t last_end() const { return last_end_; }

 private:
  absl::string_view directory_;
  absl::string_view payload_;
  size_t index_ = 0;
  uint32_t last_end_ = 0;
};

class GroupDecoder {
 public:
  // Channel groups decoded together, so that their blocks' rANS decoding
  // interleaves.
  static constexpr size_t kMaxGroups = 2;

  // Decodes channel groups views[j].cg, consecutive in the stream, into
  // q[j] (tokens x channel_group, row-major), reading their tables from
  // `tables` and their blocks from `blocks`.
  absl::Status Decode(absl::Span<const GroupView> views,
                      absl::string_view choices, ByteReader* tables,
                      BlockCursor* blocks, absl::Span<uint16_t* const> q);

 private:
  // Reads group j's tables and blocks: queues its rANS blocks in jobs_ and
  // points next_[j] at where each stream's symbols will be.
  absl::Status Read(size_t j, const GroupView& v, absl::string_view choices,
                    ByteReader* tables, BlockCursor* blocks);
  // Rebuilds group j's integers from its decoded streams.
  void Assemble(size_t j, const GroupView& v, absl::string_view choices,
                uint16_t* q);

  // Per group, [raw/delta][byte plane].
  rans::Decoder decoders_[kMaxGroups * 4];
  std::vector<uint8_t> syms_[kMaxGroups][2][2];
  const uint8_t* next_[kMaxGroups][2][2] = {};
  std::vector<rans::BlockJob> jobs_;
};

}  // namespace kvcache::codec::internal

#endif  // KVCACHE_CODEC_GROUP_CODER_H_
