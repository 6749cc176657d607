// The .kvc container: a whole KV-cache dump as a sequence of codec chunks,
// each a run of consecutive tokens, in one file (layout in codec/FORMAT.md,
// "The .kvc container"). It is what the `kvcodec` tool writes and reads, so
// that a dump of any length can be compressed with the chunk codec and
// restored token for token.
//
// Errors: every function returns a Status. A damaged or foreign file gives
// DataLoss (Unimplemented for a newer container version) with a message that
// says what is wrong; ReadKvcFile and DecodeKvcToFile put the file's path
// in front. Every count in a file is checked against the file's size before
// anything is allocated; each chunk's codec header is checked against the
// container's shape and its CRC32C against its bytes, so a parsed file is
// intact and can be decoded chunk by chunk into buffers of known size.
//
// Thread-safety: functions keep no state; a KvcFile may be read from any
// number of threads.
#ifndef KVCACHE_CODEC_KVC_FILE_H_
#define KVCACHE_CODEC_KVC_FILE_H_

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/types/span.h"
#include "codec/codec.h"

namespace kvcache::codec {

inline constexpr char kKvcMagic[4] = {'K', 'V', 'C', 'F'};
inline constexpr uint8_t kKvcVersion = 1;
// Fixed header, one index entry per chunk, and the CRC32C that closes the
// index; the chunk streams follow.
inline constexpr size_t kKvcHeaderBytes = 28;
inline constexpr size_t kKvcIndexEntryBytes = 16;
inline constexpr size_t kKvcIndexCrcBytes = 4;
// Most 16-bit values a file may hold, all chunks together.
inline constexpr uint64_t kMaxKvcValues = uint64_t{1} << 62;

// One chunk of a parsed file: tokens [first_token, first_token + tokens) of
// the dump, whose codec stream is bytes [offset, offset + bytes) of the file.
struct KvcChunk {
  uint32_t first_token = 0;
  uint32_t tokens = 0;
  uint64_t offset = 0;
  uint64_t bytes = 0;
  StreamSummary summary;  // From the stream's codec header.
};

// What a file holds: the dump's shape (`shape.tokens` counts all its tokens)
// and its chunks in token order, tiling [0, shape.tokens) exactly.
struct KvcIndex {
  ChunkShape shape;
  std::vector<KvcChunk> chunks;

  // The shape of chunk `i`'s stream: the dump's, with the chunk's tokens.
  ChunkShape ChunkShapeOf(size_t i) const;
};

// Builds a file for a dump of `dump_shape` from codec streams in token
// order; each stream's token count is read from its header. InvalidArgument
// if a stream is not a codec stream, its shape (tokens aside) or dtype
// differs from `dump_shape`, or the streams' tokens do not add up to
// dump_shape.tokens.
absl::StatusOr<std::string> SerializeKvc(const ChunkShape& dump_shape,
                                         absl::Span<const std::string> streams);

// Validates the whole contents of a file and returns its index (offsets
// refer into `file`): magic, version, header fields, the index against the
// file size and its checksum, the chunks tiling the tokens, the streams
// filling the file exactly, each stream's header (codec::PeekSummary)
// against the container's shape, and each stream's checksum.
absl::StatusOr<KvcIndex> ParseKvc(absl::string_view file);

// A file read into memory and parsed.
struct KvcFile {
  std::string path;  // Where it was read from; names it in messages.
  std::string bytes;
  KvcIndex index;

  absl::string_view Stream(size_t i) const {
    return absl::string_view(bytes).substr(index.chunks[i].offset,
                                           index.chunks[i].bytes);
  }
};

// Reads and parses `path`. NotFound if it cannot be opened, InvalidArgument
// if it is not a regular file; otherwise as ParseKvc, with the path at the
// start of the message.
absl::StatusOr<KvcFile> ReadKvcFile(const std::string& path);

// Cuts `values`, a dump in the layout [layer][K,V][token][kv_head][head_dim]
// with `dump_shape`, into chunks of `chunk_tokens` tokens (the last may be
// shorter), encodes each at `level`, and returns the file. InvalidArgument
// for a size mismatch, chunk_tokens outside [1, kMaxTokens] or a shape the
// codec does not take. Transform levels need `profile`; each chunk's first
// position is its first token's index in the dump.
absl::StatusOr<std::string> EncodeKvc(const ChunkShape& dump_shape,
                                      absl::Span<const uint16_t> values,
                                      Level level, uint32_t chunk_tokens,
                                      const ModelProfile* profile = nullptr);

// Decodes every chunk of `file` and writes the dump to `path` in the layout
// above, chunks re-joined along tokens, fp16/bf16 little-endian: a lossless
// file gives back the original dump byte for byte. Holds one decoded chunk
// in memory at a time. If a stream fails to decode, DataLoss naming
// file.path and the chunk; if writing fails, Unknown naming `path`. The
// partial output is then removed. Transform streams need `profile`
// (FailedPrecondition naming the one they need otherwise).
absl::Status DecodeKvcToFile(const KvcFile& file, const std::string& path,
                             const ModelProfile* profile = nullptr);

}  // namespace kvcache::codec

#endif  // KVCACHE_CODEC_KVC_FILE_H_
