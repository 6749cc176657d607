#include "codec/kvc_file.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <limits>
#include <new>

#include "absl/strings/str_cat.h"
#include "codec/byte_io.h"
#include "codec/crc32c.h"

namespace kvcache::codec {
namespace {

using internal::ByteReader;
using internal::ByteWriter;

// A codec stream's trailing CRC32C; PeekSummary has checked the stream is
// long enough to hold it.
constexpr size_t kStreamCrcBytes = 4;

absl::Status Damaged(absl::string_view what) {
  return absl::DataLossError(what);
}

std::string ShapeText(const ChunkShape& s) {
  return absl::StrCat(s.layers, "x", s.tokens, "x", s.kv_heads, "x", s.head_dim,
                      " ", DTypeName(s.dtype));
}

// Keeps the status code; puts `path` in front of the message.
absl::Status WithPath(const std::string& path, const absl::Status& status) {
  return absl::Status(status.code(),
                      absl::StrCat(path, ": ", status.message()));
}

// For a failed system call; reads errno.
absl::Status IoError(absl::StatusCode code, const std::string& what,
                     const std::string& path) {
  const int err = errno;
  return absl::Status(
      code, absl::StrCat("cannot ", what, " ", path, ": ", std::strerror(err)));
}

bool ReadU64(ByteReader& r, uint64_t* v) {
  uint32_t lo, hi;
  if (!r.U32(&lo) || !r.U32(&hi)) return false;
  *v = uint64_t{lo} | uint64_t{hi} << 32;
  return true;
}

// Whether a dump of this shape could be cut into codec chunks: the codec's
// limits apply to every dimension but tokens, which chunks divide. The
// total is capped so that byte offsets into the dump cannot overflow.
bool DumpShapeValid(const ChunkShape& s) {
  ChunkShape one_token = s;
  one_token.tokens = 1;
  if (s.tokens == 0 || !ShapeWithinLimits(one_token)) return false;
  return s.tokens <= kMaxKvcValues / one_token.NumValues();
}

// The dump is stored little-endian whatever the host's byte order.
void ToLittleEndian(absl::Span<uint16_t> values) {
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
  for (uint16_t& v : values) v = static_cast<uint16_t>(v << 8 | v >> 8);
#else
  (void)values;
#endif
}

absl::Status WriteAll(int fd, const char* data, size_t n, uint64_t offset) {
  while (n > 0) {
    const ssize_t done = pwrite(fd, data, n, static_cast<off_t>(offset));
    if (done < 0) {
      if (errno == EINTR) continue;
      return absl::UnknownError(std::strerror(errno));
    }
    data += done;
    n -= static_cast<size_t>(done);
    offset += static_cast<uint64_t>(done);
  }
  return absl::OkStatus();
}

}  // namespace

ChunkShape KvcIndex::ChunkShapeOf(size_t i) const {
  ChunkShape s = shape;
  s.tokens = chunks[i].tokens;
  return s;
}

absl::StatusOr<std::string> SerializeKvc(
    const ChunkShape& dump_shape, absl::Span<const std::string> streams) {
  if (streams.size() > std::numeric_limits<uint32_t>::max()) {
    return absl::InvalidArgumentError("too many chunks for a .kvc file");
  }
  std::string out;
  ByteWriter w(&out);
  w.Bytes(absl::string_view(kKvcMagic, sizeof(kKvcMagic)));
  w.U8(kKvcVersion);
  w.U8(static_cast<uint8_t>(dump_shape.dtype));
  w.U16(0);
  w.U32(dump_shape.layers);
  w.U32(dump_shape.kv_heads);
  w.U32(dump_shape.head_dim);
  w.U32(dump_shape.tokens);
  w.U32(static_cast<uint32_t>(streams.size()));
  uint64_t next_token = 0;
  for (size_t i = 0; i < streams.size(); ++i) {
    absl::StatusOr<StreamSummary> summary = PeekSummary(streams[i]);
    if (!summary.ok()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "chunk ", i, " is not a codec stream: ", summary.status().message()));
    }
    const uint32_t tokens = summary->shape.tokens;
    if (next_token + tokens > std::numeric_limits<uint32_t>::max()) {
      return absl::InvalidArgumentError("more tokens than a .kvc file holds");
    }
    w.U32(static_cast<uint32_t>(next_token));
    w.U32(tokens);
    w.U32(static_cast<uint32_t>(streams[i].size()));
    w.U32(static_cast<uint32_t>(uint64_t{streams[i].size()} >> 32));
    next_token += tokens;
  }
  w.U32(Crc32c(out));
  for (const std::string& s : streams) w.Bytes(s);
  // The reader's checks are the definition of a valid file; a writer that
  // ran them on its own output cannot produce a file the reader rejects.
  if (absl::StatusOr<KvcIndex> check = ParseKvc(out); !check.ok()) {
    return absl::InvalidArgumentError(
        absl::StrCat("cannot write a .kvc file: ", check.status().message()));
  }
  return out;
}

absl::StatusOr<KvcIndex> ParseKvc(absl::string_view file) {
  const size_t magic_bytes = std::min(file.size(), sizeof(kKvcMagic));
  if (file.substr(0, magic_bytes) !=
      absl::string_view(kKvcMagic, magic_bytes)) {
    return Damaged("not a .kvc file (bad magic)");
  }
  if (file.size() > sizeof(kKvcMagic) &&
      static_cast<uint8_t>(file[sizeof(kKvcMagic)]) != kKvcVersion) {
    return absl::UnimplementedError(absl::StrCat(
        ".kvc version ", static_cast<uint8_t>(file[sizeof(kKvcMagic)]),
        " is not supported (this reader knows version ", kKvcVersion, ")"));
  }
  if (file.size() < kKvcHeaderBytes) {
    return Damaged(absl::StrCat("truncated: ", file.size(),
                                " bytes, shorter than the ", kKvcHeaderBytes,
                                "-byte header"));
  }
  ByteReader r(file.substr(sizeof(kKvcMagic) + 1));
  uint8_t dtype = 0;
  uint16_t reserved = 0;
  uint32_t chunk_count = 0;
  KvcIndex index;
  // Sizes were checked above, so the fixed header reads cannot fail.
  r.U8(&dtype);
  r.U16(&reserved);
  r.U32(&index.shape.layers);
  r.U32(&index.shape.kv_heads);
  r.U32(&index.shape.head_dim);
  r.U32(&index.shape.tokens);
  r.U32(&chunk_count);
  if (reserved != 0) return Damaged("bad header: reserved bytes are not zero");
  if (dtype > static_cast<uint8_t>(DType::kBFloat16)) {
    return Damaged(absl::StrCat("bad header: unknown dtype ", dtype));
  }
  index.shape.dtype = static_cast<DType>(dtype);
  if (!DumpShapeValid(index.shape)) {
    return Damaged(absl::StrCat("bad header: shape ", ShapeText(index.shape),
                                " is empty or beyond the codec's limits"));
  }
  if (chunk_count == 0) return Damaged("bad header: no chunks");
  const uint64_t index_end =
      kKvcHeaderBytes + uint64_t{chunk_count} * kKvcIndexEntryBytes;
  if (index_end + kKvcIndexCrcBytes > file.size()) {
    return Damaged(absl::StrCat("truncated: the index of ", chunk_count,
                                " chunks needs ", index_end + kKvcIndexCrcBytes,
                                " bytes, the file has ", file.size()));
  }
  const uint32_t stored_crc = internal::LoadU32(
      reinterpret_cast<const uint8_t*>(file.data()) + index_end);
  if (Crc32c(file.substr(0, index_end)) != stored_crc) {
    return Damaged(
        "index checksum mismatch: the header or the chunk index is damaged");
  }

  // chunk_count is now bounded by the file size, so reserving is safe.
  index.chunks.reserve(chunk_count);
  uint64_t next_token = 0;
  uint64_t offset = index_end + kKvcIndexCrcBytes;
  for (uint32_t i = 0; i < chunk_count; ++i) {
    KvcChunk c;
    r.U32(&c.first_token);
    r.U32(&c.tokens);
    ReadU64(r, &c.bytes);
    if (c.first_token != next_token) {
      return Damaged(absl::StrCat("chunks do not tile the tokens: chunk ", i,
                                  " starts at token ", c.first_token,
                                  ", expected ", next_token));
    }
    if (c.tokens == 0) {
      return Damaged(absl::StrCat("chunk ", i, " has no tokens"));
    }
    next_token += c.tokens;
    if (next_token > index.shape.tokens) {
      return Damaged(absl::StrCat("chunks do not tile the tokens: chunk ", i,
                                  " ends at token ", next_token,
                                  ", past the header's ", index.shape.tokens));
    }
    if (c.bytes > file.size() - offset) {
      return Damaged(absl::StrCat("truncated or a bad length: chunk ", i,
                                  "'s stream (", c.bytes, " bytes from byte ",
                                  offset, ") runs past the end of the file (",
                                  file.size(), " bytes)"));
    }
    c.offset = offset;
    offset += c.bytes;
    absl::StatusOr<StreamSummary> summary =
        PeekSummary(file.substr(c.offset, c.bytes));
    if (!summary.ok()) {
      return Damaged(absl::StrCat("chunk ", i, " (bytes ", c.offset, "..",
                                  offset, "): ", summary.status().message()));
    }
    ChunkShape want = index.shape;
    want.tokens = c.tokens;
    if (!(summary->shape == want)) {
      return Damaged(absl::StrCat(
          "chunk ", i, "'s stream holds ", ShapeText(summary->shape),
          ", the file's header and index say ", ShapeText(want)));
    }
    // The codec stream ends in the CRC32C of its other bytes (FORMAT.md,
    // section 7). Checking it here finds damage before a decoder has
    // written anything, and lets `info` vouch for the file.
    const absl::string_view stream = file.substr(c.offset, c.bytes);
    const size_t body = stream.size() - kStreamCrcBytes;
    if (Crc32c(stream.substr(0, body)) !=
        internal::LoadU32(reinterpret_cast<const uint8_t*>(stream.data()) +
                          body)) {
      return Damaged(absl::StrCat("chunk ", i, " (tokens ", c.first_token, "..",
                                  next_token,
                                  "): checksum mismatch, the stream is "
                                  "damaged"));
    }
    c.summary = *summary;
    index.chunks.push_back(c);
  }
  if (next_token != index.shape.tokens) {
    return Damaged(absl::StrCat("chunks do not tile the tokens: they cover ",
                                next_token, " of the header's ",
                                index.shape.tokens));
  }
  if (offset != file.size()) {
    return Damaged(absl::StrCat(file.size() - offset,
                                " unexpected bytes after the last chunk"));
  }
  return index;
}

absl::StatusOr<KvcFile> ReadKvcFile(const std::string& path) {
  const int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return IoError(absl::StatusCode::kNotFound, "open", path);
  KvcFile file;
  file.path = path;
  struct stat info;
  if (fstat(fd, &info) != 0 || !S_ISREG(info.st_mode)) {
    close(fd);
    return absl::InvalidArgumentError(
        absl::StrCat(path, ": not a regular file"));
  }
  // The allocation is the size the file system reports, not a count read
  // from the file.
  file.bytes.resize(static_cast<size_t>(info.st_size));
  size_t have = 0;
  while (have < file.bytes.size()) {
    const ssize_t n = read(fd, &file.bytes[have], file.bytes.size() - have);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      const absl::Status st =
          n < 0 ? IoError(absl::StatusCode::kUnknown, "read", path)
                : absl::DataLossError(
                      absl::StrCat(path, ": shrank while being read"));
      close(fd);
      return st;
    }
    have += static_cast<size_t>(n);
  }
  close(fd);
  absl::StatusOr<KvcIndex> index = ParseKvc(file.bytes);
  if (!index.ok()) return WithPath(path, index.status());
  file.index = *std::move(index);
  return file;
}

absl::StatusOr<std::string> EncodeKvc(const ChunkShape& dump_shape,
                                      absl::Span<const uint16_t> values,
                                      Level level, uint32_t chunk_tokens,
                                      const ModelProfile* profile) {
  if (chunk_tokens == 0 || chunk_tokens > kMaxTokens) {
    return absl::InvalidArgumentError(absl::StrCat(
        "chunk tokens must be in 1..", kMaxTokens, ", not ", chunk_tokens));
  }
  if (!DumpShapeValid(dump_shape)) {
    return absl::InvalidArgumentError(
        absl::StrCat("cannot encode a dump of shape ", ShapeText(dump_shape)));
  }
  if (values.size() != dump_shape.NumValues()) {
    return absl::InvalidArgumentError(
        absl::StrCat("dump of shape ", ShapeText(dump_shape), " needs ",
                     dump_shape.NumValues(), " values, got ", values.size()));
  }
  const size_t row = size_t{dump_shape.kv_heads} * dump_shape.head_dim;
  const size_t planes = 2 * size_t{dump_shape.layers};
  std::vector<std::string> streams;
  std::vector<uint16_t> chunk;
  for (uint32_t t0 = 0; t0 < dump_shape.tokens;) {
    ChunkShape s = dump_shape;
    s.tokens = std::min(chunk_tokens, dump_shape.tokens - t0);
    // The chunk takes the same token range from every (layer, K/V) plane.
    chunk.clear();
    for (size_t p = 0; p < planes; ++p) {
      const uint16_t* first =
          values.data() + (p * dump_shape.tokens + t0) * row;
      chunk.insert(chunk.end(), first, first + size_t{s.tokens} * row);
    }
    EncodeOptions options;
    options.profile = profile;
    options.first_position = t0;
    absl::StatusOr<std::string> stream = EncodeChunk(s, chunk, level, options);
    if (!stream.ok()) return stream.status();
    streams.push_back(*std::move(stream));
    t0 += s.tokens;
  }
  return SerializeKvc(dump_shape, streams);
}

absl::Status DecodeKvcToFile(const KvcFile& file, const std::string& path,
                             const ModelProfile* profile) {
  const int fd =
      open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) return IoError(absl::StatusCode::kUnknown, "create", path);
  const KvcIndex& index = file.index;
  const uint64_t row = uint64_t{index.shape.kv_heads} * index.shape.head_dim;
  const uint64_t planes = 2 * uint64_t{index.shape.layers};
  // A damaged stream is the input's fault, a failed write the output's.
  absl::Status status;
  std::string blame = file.path;
  std::vector<uint16_t> values;
  for (size_t i = 0; i < index.chunks.size() && status.ok(); ++i) {
    const KvcChunk& c = index.chunks[i];
    const ChunkShape shape = index.ChunkShapeOf(i);
    try {
      values.resize(shape.NumValues());
    } catch (const std::bad_alloc&) {
      status = absl::ResourceExhaustedError(
          absl::StrCat("chunk ", i, " needs ", shape.RawBytes(),
                       " bytes of memory to decode"));
      break;
    }
    if (absl::Status st =
            DecodeChunk(file.Stream(i), absl::MakeSpan(values), profile);
        !st.ok()) {
      status = absl::Status(
          st.code(),
          absl::StrCat("chunk ", i, " (tokens ", c.first_token, "..",
                       c.first_token + c.tokens, "): ", st.message()));
      break;
    }
    ToLittleEndian(absl::MakeSpan(values));
    // Plane p of the chunk lands at tokens [first_token, +tokens) of plane p
    // of the dump.
    const uint64_t plane_values = uint64_t{c.tokens} * row;
    for (uint64_t p = 0; p < planes && status.ok(); ++p) {
      const uint64_t at = 2 * (p * index.shape.tokens + c.first_token) * row;
      status = WriteAll(
          fd, reinterpret_cast<const char*>(values.data() + p * plane_values),
          2 * plane_values, at);
      if (!status.ok()) {
        status = absl::UnknownError(
            absl::StrCat("cannot write: ", status.message()));
        blame = path;
      }
    }
  }
  if (close(fd) != 0 && status.ok()) {
    status = absl::UnknownError(
        absl::StrCat("cannot write: ", std::strerror(errno)));
    blame = path;
  }
  if (!status.ok()) {
    unlink(path.c_str());
    return blame.empty() ? status : WithPath(blame, status);
  }
  return absl::OkStatus();
}

}  // namespace kvcache::codec
