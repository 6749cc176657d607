// GGUF parsing and tensor reading (see gguf.h).
#include "client/examples/model/gguf.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "codec/half.h"

namespace kvcache::model {

class GgufByteSource {
 public:
  explicit GgufByteSource(std::string bytes)
      : bytes_(std::move(bytes)), size_(bytes_.size()) {}
  // Takes ownership of `fd`.
  GgufByteSource(int fd, uint64_t size) : fd_(fd), size_(size) {}
  ~GgufByteSource() {
    if (fd_ >= 0) close(fd_);
  }
  GgufByteSource(const GgufByteSource&) = delete;
  GgufByteSource& operator=(const GgufByteSource&) = delete;

  uint64_t size() const { return size_; }

  // Copies bytes [offset, offset + n) into dst. Callers check the range
  // against size(); DATA_LOSS here means the file shrank after it was
  // opened.
  absl::Status Read(uint64_t offset, size_t n, char* dst) const {
    if (offset > size_ || n > size_ - offset) {
      return absl::OutOfRangeError(
          absl::StrCat("read of ", n, " bytes past the end (", size_, ")"));
    }
    if (fd_ < 0) {
      std::memcpy(dst, bytes_.data() + offset, n);
      return absl::OkStatus();
    }
    while (n > 0) {
      const ssize_t got = pread(fd_, dst, n, static_cast<off_t>(offset));
      if (got < 0 && errno == EINTR) continue;
      if (got < 0) return absl::ErrnoToStatus(errno, "read failed");
      if (got == 0) {
        return absl::DataLossError(
            "the file ends early: it was truncated after it was opened");
      }
      dst += got;
      offset += static_cast<uint64_t>(got);
      n -= static_cast<size_t>(got);
    }
    return absl::OkStatus();
  }

 private:
  std::string bytes_;
  int fd_ = -1;
  uint64_t size_ = 0;
};

namespace {

constexpr char kMagic[] = "GGUF";
constexpr uint32_t kMinVersion = 2;  // version 1 had 32-bit counts
constexpr uint32_t kMaxVersion = 3;
constexpr char kAlignmentKey[] = "general.alignment";
constexpr uint32_t kMaxDims = 4;  // GGML_MAX_DIMS
constexpr uint64_t kMaxInt64 = std::numeric_limits<int64_t>::max();
// The smallest encodings of a key/value pair (empty key, type tag, one-byte
// value) and of a tensor info (empty name, n_dims = 0, type, offset), and
// of an array's string element (its length). Counts are capped by the bytes
// left divided by these before anything is reserved for them.
constexpr uint64_t kMinKeyValueBytes = 8 + 4 + 1;
constexpr uint64_t kMinTensorInfoBytes = 8 + 4 + 4 + 8;
constexpr uint64_t kMinStringBytes = 8;
// Metadata is read through a buffer of this size, so a file on disk costs a
// few large reads instead of one per field.
constexpr size_t kReadBufferBytes = 1 << 20;

uint64_t LoadLe(const char* p, size_t n) {
  uint64_t v = 0;
  for (size_t i = 0; i < n; ++i) {
    v |= uint64_t{static_cast<uint8_t>(p[i])} << (8 * i);
  }
  return v;
}

// Bytes per element of a number or bool; 0 for strings and arrays.
size_t ScalarBytes(GgufValueType type) {
  switch (type) {
    case GgufValueType::kUint8:
    case GgufValueType::kInt8:
    case GgufValueType::kBool:
      return 1;
    case GgufValueType::kUint16:
    case GgufValueType::kInt16:
      return 2;
    case GgufValueType::kUint32:
    case GgufValueType::kInt32:
    case GgufValueType::kFloat32:
      return 4;
    case GgufValueType::kUint64:
    case GgufValueType::kInt64:
    case GgufValueType::kFloat64:
      return 8;
    case GgufValueType::kString:
    case GgufValueType::kArray:
      return 0;
  }
  return 0;
}

bool IsKnownValueType(uint32_t tag) {
  return tag <= static_cast<uint32_t>(GgufValueType::kFloat64);
}

bool IsInteger(GgufValueType type) {
  return ScalarBytes(type) > 0 && type != GgufValueType::kBool &&
         type != GgufValueType::kFloat32 && type != GgufValueType::kFloat64;
}

bool IsFloat(GgufValueType type) {
  return type == GgufValueType::kFloat32 || type == GgufValueType::kFloat64;
}

// The integer of `type` at p, or nullopt for a uint64 above INT64_MAX.
std::optional<int64_t> IntegerAt(GgufValueType type, const char* p) {
  const uint64_t bits = LoadLe(p, ScalarBytes(type));
  switch (type) {
    case GgufValueType::kInt8:
      return static_cast<int8_t>(bits);
    case GgufValueType::kInt16:
      return static_cast<int16_t>(bits);
    case GgufValueType::kInt32:
      return static_cast<int32_t>(bits);
    case GgufValueType::kInt64:
      return static_cast<int64_t>(bits);
    case GgufValueType::kUint64:
      if (bits > kMaxInt64) return std::nullopt;
      return static_cast<int64_t>(bits);
    default:  // uint8, uint16, uint32
      return static_cast<int64_t>(bits);
  }
}

// The number of `type` (an integer or float type) at p, as a double.
double NumberAt(GgufValueType type, const char* p) {
  const uint64_t bits = LoadLe(p, ScalarBytes(type));
  switch (type) {
    case GgufValueType::kFloat32:
      return codec::BitsFloat(static_cast<uint32_t>(bits));
    case GgufValueType::kFloat64: {
      double d;
      std::memcpy(&d, &bits, sizeof(d));
      return d;
    }
    case GgufValueType::kUint64:
      return static_cast<double>(bits);
    default:
      return static_cast<double>(*IntegerAt(type, p));
  }
}

// A name from the file, fit for an error message: escaped, and cut short
// if a hostile file made it long.
std::string Quote(absl::string_view s) {
  constexpr size_t kMaxShown = 80;
  std::string shown = absl::CHexEscape(s.substr(0, kMaxShown));
  return absl::StrCat("'", shown, s.size() > kMaxShown ? "'..." : "'");
}

std::string DimsString(const std::vector<uint64_t>& dims) {
  return absl::StrCat("[", absl::StrJoin(dims, ", "), "]");
}

}  // namespace

std::string GgufValueTypeName(GgufValueType type) {
  static constexpr const char* kNames[] = {
      "uint8", "int8",   "uint16", "int16",  "uint32", "int32",  "float32",
      "bool",  "string", "array",  "uint64", "int64",  "float64"};
  const auto tag = static_cast<uint32_t>(type);
  if (!IsKnownValueType(tag)) return absl::StrCat("type ", tag);
  return kNames[tag];
}

uint64_t GgufTensorInfo::elements() const {
  uint64_t n = 1;
  for (uint64_t d : dims) n *= d;
  return n;
}

// Parses one file's header, metadata and tensor table, front to back, into
// a GgufFile. Every read is checked against the bytes left in the file.
class GgufParser {
 public:
  GgufParser(std::shared_ptr<const GgufByteSource> source, std::string name) {
    file_.source_ = std::move(source);
    file_.name_ = std::move(name);
  }

  absl::StatusOr<GgufFile> Parse() && {
    uint64_t tensor_count = 0;
    uint64_t kv_count = 0;
    if (absl::Status s = ParseHeader(&tensor_count, &kv_count); !s.ok()) {
      return s;
    }
    for (uint64_t i = 0; i < kv_count; ++i) {
      if (absl::Status s = ParseKeyValue(i); !s.ok()) return s;
    }
    file_.tensors_.reserve(tensor_count);
    for (uint64_t i = 0; i < tensor_count; ++i) {
      if (absl::Status s = ParseTensorInfo(i); !s.ok()) return s;
    }
    // offset_ is at most the file size, far below 2^64 - alignment.
    const uint64_t alignment = file_.alignment_;
    file_.data_offset_ = (offset_ + alignment - 1) / alignment * alignment;
    if (absl::Status s = CheckTensorPlacement(); !s.ok()) return s;
    return std::move(file_);
  }

 private:
  uint64_t size() const { return file_.source_->size(); }
  uint64_t remaining() const { return size() - offset_; }

  absl::Status Error(absl::StatusCode code, uint64_t at,
                     absl::string_view what) const {
    return absl::Status(code,
                        absl::StrCat(file_.name_, ": offset ", at, ": ", what));
  }

  // Reads n bytes at the current offset into dst; `what` names them for the
  // error if the file ends first.
  absl::Status Read(char* dst, uint64_t n, absl::string_view what) {
    if (n > remaining()) {
      return Error(absl::StatusCode::kDataLoss, offset_,
                   absl::StrCat(what, " needs ", n, " bytes but the file (",
                                size(), " bytes) ends ", remaining(),
                                " bytes later; truncated?"));
    }
    while (n > 0) {
      const uint64_t buffer_end = buffer_start_ + buffer_.size();
      if (offset_ < buffer_start_ || offset_ >= buffer_end) {
        const size_t len = static_cast<size_t>(
            std::min<uint64_t>(kReadBufferBytes, remaining()));
        buffer_.resize(len);
        if (absl::Status s = file_.source_->Read(offset_, len, buffer_.data());
            !s.ok()) {
          return Error(s.code(), offset_, s.message());
        }
        buffer_start_ = offset_;
        continue;
      }
      const size_t chunk =
          static_cast<size_t>(std::min<uint64_t>(n, buffer_end - offset_));
      std::memcpy(dst, buffer_.data() + (offset_ - buffer_start_), chunk);
      dst += chunk;
      offset_ += chunk;
      n -= chunk;
    }
    return absl::OkStatus();
  }

  absl::Status ReadU32(uint32_t* out, absl::string_view what) {
    char bytes[4];
    if (absl::Status s = Read(bytes, 4, what); !s.ok()) return s;
    *out = static_cast<uint32_t>(LoadLe(bytes, 4));
    return absl::OkStatus();
  }

  absl::Status ReadU64(uint64_t* out, absl::string_view what) {
    char bytes[8];
    if (absl::Status s = Read(bytes, 8, what); !s.ok()) return s;
    *out = LoadLe(bytes, 8);
    return absl::OkStatus();
  }

  absl::Status ReadString(std::string* out, absl::string_view what) {
    const uint64_t at = offset_;
    uint64_t length = 0;
    if (absl::Status s = ReadU64(&length, absl::StrCat("the length of ", what));
        !s.ok()) {
      return s;
    }
    if (length > remaining()) {
      return Error(
          absl::StatusCode::kDataLoss, at,
          absl::StrCat(what, " is ", length, " bytes long but the file ends ",
                       remaining(), " bytes after its length; truncated?"));
    }
    out->resize(length);
    return Read(out->data(), length, what);
  }

  absl::Status ParseHeader(uint64_t* tensor_count, uint64_t* kv_count) {
    char magic[4];
    if (size() < 4) {
      return Error(absl::StatusCode::kInvalidArgument, 0,
                   absl::StrCat("the file is ", size(),
                                " bytes long, too short for a GGUF header; "
                                "not a GGUF file"));
    }
    if (absl::Status s = Read(magic, 4, "magic"); !s.ok()) return s;
    if (std::memcmp(magic, kMagic, 4) != 0) {
      return Error(absl::StatusCode::kInvalidArgument, 0,
                   absl::StrCat("magic is \"", absl::CHexEscape({magic, 4}),
                                "\", not \"GGUF\"; not a GGUF file"));
    }
    uint32_t version = 0;
    if (absl::Status s = ReadU32(&version, "version"); !s.ok()) return s;
    if (version < kMinVersion || version > kMaxVersion) {
      const uint32_t swapped = __builtin_bswap32(version);
      std::string hint;
      if (swapped >= kMinVersion && swapped <= kMaxVersion) {
        hint = absl::StrCat(" (it reads as version ", swapped,
                            " big-endian; only little-endian files are "
                            "supported)");
      } else if (version == 1) {
        hint = " (version 1 had 32-bit counts; convert the model again)";
      }
      return Error(absl::StatusCode::kInvalidArgument, 4,
                   absl::StrCat("unsupported GGUF version ", version, hint,
                                "; versions ", kMinVersion, " to ", kMaxVersion,
                                " are supported"));
    }
    file_.version_ = version;
    if (absl::Status s = ReadU64(tensor_count, "tensor count"); !s.ok()) {
      return s;
    }
    if (absl::Status s = ReadU64(kv_count, "metadata count"); !s.ok()) {
      return s;
    }
    if (*kv_count > remaining() / kMinKeyValueBytes) {
      return Error(
          absl::StatusCode::kDataLoss, 16,
          absl::StrCat("metadata count ", *kv_count, " needs at least ",
                       kMinKeyValueBytes, " bytes each but the file has ",
                       remaining(), " bytes left"));
    }
    const uint64_t left = remaining() - *kv_count * kMinKeyValueBytes;
    if (*tensor_count > left / kMinTensorInfoBytes) {
      return Error(
          absl::StatusCode::kDataLoss, 8,
          absl::StrCat("tensor count ", *tensor_count, " needs at least ",
                       kMinTensorInfoBytes, " bytes each but the file has ",
                       left, " bytes left after the metadata"));
    }
    return absl::OkStatus();
  }

  absl::Status ParseKeyValue(uint64_t index) {
    const uint64_t at = offset_;
    std::string key;
    if (absl::Status s =
            ReadString(&key, absl::StrCat("the key of metadata entry ", index));
        !s.ok()) {
      return s;
    }
    const std::string what = absl::StrCat("key ", Quote(key));
    const uint64_t type_at = offset_;
    uint32_t tag = 0;
    if (absl::Status s = ReadU32(&tag, absl::StrCat("the type of ", what));
        !s.ok()) {
      return s;
    }
    if (!IsKnownValueType(tag)) {
      return Error(absl::StatusCode::kInvalidArgument, type_at,
                   absl::StrCat(what, " has unknown value type ", tag));
    }
    GgufFile::Value value;
    if (absl::Status s =
            ParseValue(static_cast<GgufValueType>(tag), what, &value);
        !s.ok()) {
      return s;
    }
    if (key == kAlignmentKey) {
      if (absl::Status s = SetAlignment(value, at); !s.ok()) return s;
    }
    if (!file_.values_.emplace(key, std::move(value)).second) {
      return Error(absl::StatusCode::kInvalidArgument, at,
                   absl::StrCat("duplicate ", what));
    }
    file_.keys_.push_back(std::move(key));
    return absl::OkStatus();
  }

  absl::Status ParseValue(GgufValueType type, const std::string& what,
                          GgufFile::Value* value) {
    value->type = type;
    if (type == GgufValueType::kString) {
      return ReadString(&value->bytes, absl::StrCat("the value of ", what));
    }
    if (type != GgufValueType::kArray) {
      value->bytes.resize(ScalarBytes(type));
      return Read(value->bytes.data(), value->bytes.size(),
                  absl::StrCat("the value of ", what));
    }
    const uint64_t element_at = offset_;
    uint32_t tag = 0;
    if (absl::Status s =
            ReadU32(&tag, absl::StrCat("the element type of ", what));
        !s.ok()) {
      return s;
    }
    if (!IsKnownValueType(tag)) {
      return Error(absl::StatusCode::kInvalidArgument, element_at,
                   absl::StrCat(what, " is an array of unknown type ", tag));
    }
    const auto element_type = static_cast<GgufValueType>(tag);
    if (element_type == GgufValueType::kArray) {
      return Error(absl::StatusCode::kInvalidArgument, element_at,
                   absl::StrCat(what,
                                " is an array of arrays, which is not "
                                "supported"));
    }
    value->element_type = element_type;
    const uint64_t count_at = offset_;
    if (absl::Status s =
            ReadU64(&value->count, absl::StrCat("the length of ", what));
        !s.ok()) {
      return s;
    }
    const uint64_t min_element_bytes = element_type == GgufValueType::kString
                                           ? kMinStringBytes
                                           : ScalarBytes(element_type);
    if (value->count > remaining() / min_element_bytes) {
      return Error(absl::StatusCode::kDataLoss, count_at,
                   absl::StrCat(what, " is an array of ", value->count, " ",
                                GgufValueTypeName(element_type),
                                " but the file has only ", remaining(),
                                " bytes left; truncated?"));
    }
    if (element_type != GgufValueType::kString) {
      value->bytes.resize(value->count * min_element_bytes);
      return Read(value->bytes.data(), value->bytes.size(),
                  absl::StrCat("the elements of ", what));
    }
    value->strings.resize(value->count);
    for (uint64_t i = 0; i < value->count; ++i) {
      if (absl::Status s =
              ReadString(&value->strings[i], absl::StrCat(what, "[", i, "]"));
          !s.ok()) {
        return s;
      }
    }
    return absl::OkStatus();
  }

  // Tensor offsets are checked against the alignment as they are read, so
  // general.alignment must be valid as soon as it is seen.
  absl::Status SetAlignment(const GgufFile::Value& value, uint64_t at) {
    if (value.type != GgufValueType::kUint32) {
      return Error(
          absl::StatusCode::kInvalidArgument, at,
          absl::StrCat(kAlignmentKey, " is a ", GgufValueTypeName(value.type),
                       ", not a uint32"));
    }
    const uint64_t alignment = LoadLe(value.bytes.data(), 4);
    if (alignment == 0 || (alignment & (alignment - 1)) != 0) {
      return Error(absl::StatusCode::kInvalidArgument, at,
                   absl::StrCat(kAlignmentKey, " is ", alignment,
                                ", not a power of two"));
    }
    file_.alignment_ = alignment;
    return absl::OkStatus();
  }

  absl::Status ParseTensorInfo(uint64_t index) {
    const uint64_t at = offset_;
    GgufTensorInfo info;
    if (absl::Status s =
            ReadString(&info.name, absl::StrCat("the name of tensor ", index));
        !s.ok()) {
      return s;
    }
    const std::string what = absl::StrCat("tensor ", Quote(info.name));
    uint32_t n_dims = 0;
    if (absl::Status s =
            ReadU32(&n_dims, absl::StrCat("the dimension count of ", what));
        !s.ok()) {
      return s;
    }
    if (n_dims > kMaxDims) {
      return Error(absl::StatusCode::kInvalidArgument, offset_ - 4,
                   absl::StrCat(what, " has ", n_dims,
                                " dimensions; ggml allows at most ", kMaxDims));
    }
    info.dims.resize(n_dims);
    uint64_t elements = 1;
    for (uint32_t d = 0; d < n_dims; ++d) {
      if (absl::Status s =
              ReadU64(&info.dims[d], absl::StrCat("ne[", d, "] of ", what));
          !s.ok()) {
        return s;
      }
      // ggml keeps shapes and element counts in int64.
      const uint64_t ne = info.dims[d];
      if (ne > kMaxInt64 || (ne != 0 && elements > kMaxInt64 / ne)) {
        info.dims.resize(d + 1);
        return Error(absl::StatusCode::kInvalidArgument, offset_ - 8,
                     absl::StrCat(what, " has shape ", DimsString(info.dims),
                                  "...: its element count overflows int64"));
      }
      elements *= ne;
    }
    const uint64_t type_at = offset_;
    uint32_t type_id = 0;
    if (absl::Status s = ReadU32(&type_id, absl::StrCat("the type of ", what));
        !s.ok()) {
      return s;
    }
    const GgmlTypeTraits* traits = FindGgmlType(type_id);
    if (traits == nullptr) {
      return Error(absl::StatusCode::kInvalidArgument, type_at,
                   absl::StrCat(what, " has unknown ggml type ", type_id));
    }
    info.type = traits->type;
    const uint64_t row = n_dims == 0 ? 1 : info.dims[0];
    if (row % traits->block_elements != 0) {
      return Error(
          absl::StatusCode::kInvalidArgument, type_at,
          absl::StrCat(what, " is ", traits->name, " with shape ",
                       DimsString(info.dims), ", but ", traits->name,
                       " packs rows in blocks of ", traits->block_elements,
                       " and ne[0] = ", row, " is not a multiple of that"));
    }
    // A whole number of blocks, since ne[0] is a multiple of the block.
    const uint64_t blocks = elements / traits->block_elements;
    if (blocks > kMaxInt64 / traits->block_bytes) {
      return Error(absl::StatusCode::kInvalidArgument, type_at,
                   absl::StrCat(what, " is ", traits->name, " with shape ",
                                DimsString(info.dims),
                                ": its size in bytes overflows int64"));
    }
    info.bytes = blocks * traits->block_bytes;
    if (absl::Status s =
            ReadU64(&info.offset, absl::StrCat("the offset of ", what));
        !s.ok()) {
      return s;
    }
    if (info.offset % file_.alignment_ != 0) {
      return Error(
          absl::StatusCode::kInvalidArgument, offset_ - 8,
          absl::StrCat(what, " has data offset ", info.offset,
                       ", not a multiple of the alignment ", file_.alignment_));
    }
    if (!file_.tensor_index_.emplace(info.name, file_.tensors_.size()).second) {
      return Error(absl::StatusCode::kInvalidArgument, at,
                   absl::StrCat("duplicate ", what));
    }
    file_.tensors_.push_back(std::move(info));
    info_offsets_.push_back(at);
    return absl::OkStatus();
  }

  // Every tensor's bytes lie inside the data section, and no two tensors
  // share a byte.
  absl::Status CheckTensorPlacement() const {
    const std::vector<GgufTensorInfo>& tensors = file_.tensors_;
    if (tensors.empty()) return absl::OkStatus();
    const uint64_t data_offset = file_.data_offset_;
    if (data_offset > size()) {
      return Error(absl::StatusCode::kDataLoss, offset_,
                   absl::StrCat("the data section would start at ", data_offset,
                                ", past the end of the file (", size(),
                                " bytes); truncated?"));
    }
    const uint64_t data_bytes = size() - data_offset;
    for (size_t i = 0; i < tensors.size(); ++i) {
      const GgufTensorInfo& t = tensors[i];
      if (t.offset > data_bytes || t.bytes > data_bytes - t.offset) {
        return Error(
            absl::StatusCode::kDataLoss, info_offsets_[i],
            absl::StrCat("tensor ", Quote(t.name), " (", GgmlTypeName(t.type),
                         " ", DimsString(t.dims), ", ", t.bytes,
                         " bytes at data offset ", t.offset,
                         ") runs past the end of the data section (",
                         data_bytes, " bytes from file offset ", data_offset,
                         "); truncated?"));
      }
    }
    // Ties keep file order, so the error names the later tensor.
    std::vector<size_t> order(tensors.size());
    for (size_t i = 0; i < order.size(); ++i) order[i] = i;
    std::stable_sort(order.begin(), order.end(),
                     [&tensors](size_t a, size_t b) {
                       return tensors[a].offset < tensors[b].offset;
                     });
    const GgufTensorInfo* previous = nullptr;
    for (size_t i : order) {
      const GgufTensorInfo& t = tensors[i];
      if (t.bytes == 0) continue;
      // Both ends lie inside the file, so the sum cannot overflow.
      if (previous != nullptr &&
          previous->offset + previous->bytes > t.offset) {
        return Error(
            absl::StatusCode::kInvalidArgument, info_offsets_[i],
            absl::StrCat("tensor ", Quote(t.name), " at data offset ", t.offset,
                         " overlaps tensor ", Quote(previous->name), " (",
                         previous->bytes, " bytes at data offset ",
                         previous->offset, ")"));
      }
      previous = &t;
    }
    return absl::OkStatus();
  }

  GgufFile file_;
  uint64_t offset_ = 0;
  std::string buffer_;  // file bytes [buffer_start_, + buffer_.size())
  uint64_t buffer_start_ = 0;
  std::vector<uint64_t> info_offsets_;  // where each tensor's info starts
};

absl::StatusOr<GgufFile> GgufFile::Open(const std::string& path) {
  const int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return absl::ErrnoToStatus(errno, absl::StrCat("open ", path));
  struct stat st;
  if (fstat(fd, &st) != 0) {
    const int error = errno;
    close(fd);
    return absl::ErrnoToStatus(error, absl::StrCat("stat ", path));
  }
  if (!S_ISREG(st.st_mode)) {
    close(fd);
    return absl::InvalidArgumentError(
        absl::StrCat(path, " is not a regular file"));
  }
  auto source =
      std::make_shared<GgufByteSource>(fd, static_cast<uint64_t>(st.st_size));
  return GgufParser(std::move(source), path).Parse();
}

absl::StatusOr<GgufFile> GgufFile::Parse(std::string bytes,
                                         std::string name_for_errors) {
  auto source = std::make_shared<GgufByteSource>(std::move(bytes));
  return GgufParser(std::move(source), std::move(name_for_errors)).Parse();
}

bool GgufFile::Has(absl::string_view key) const {
  return values_.contains(key);
}

absl::StatusOr<const GgufFile::Value*> GgufFile::Find(
    absl::string_view key) const {
  auto it = values_.find(key);
  if (it == values_.end()) {
    return absl::NotFoundError(
        absl::StrCat(name_, ": no metadata key ", Quote(key)));
  }
  return &it->second;
}

absl::Status GgufFile::WrongType(absl::string_view key, const Value& value,
                                 absl::string_view wanted) const {
  std::string actual = GgufValueTypeName(value.type);
  if (value.type == GgufValueType::kArray) {
    absl::StrAppend(&actual, " of ", value.count, " ",
                    GgufValueTypeName(value.element_type));
  }
  return absl::InvalidArgumentError(absl::StrCat(
      name_, ": metadata key ", Quote(key), " is ", actual, ", not ", wanted));
}

absl::StatusOr<GgufValueType> GgufFile::GetType(absl::string_view key) const {
  absl::StatusOr<const Value*> value = Find(key);
  if (!value.ok()) return value.status();
  return (*value)->type;
}

absl::StatusOr<GgufValueType> GgufFile::GetArrayElementType(
    absl::string_view key) const {
  absl::StatusOr<const Value*> value = Find(key);
  if (!value.ok()) return value.status();
  if ((*value)->type != GgufValueType::kArray) {
    return WrongType(key, **value, "an array");
  }
  return (*value)->element_type;
}

absl::StatusOr<int64_t> GgufFile::GetInt(absl::string_view key) const {
  absl::StatusOr<const Value*> value = Find(key);
  if (!value.ok()) return value.status();
  if (!IsInteger((*value)->type)) return WrongType(key, **value, "an integer");
  std::optional<int64_t> i = IntegerAt((*value)->type, (*value)->bytes.data());
  if (!i.has_value()) {
    return absl::InvalidArgumentError(absl::StrCat(
        name_, ": metadata key ", Quote(key), " is uint64 ",
        LoadLe((*value)->bytes.data(), 8), ", which does not fit in int64"));
  }
  return *i;
}

absl::StatusOr<double> GgufFile::GetFloat(absl::string_view key) const {
  absl::StatusOr<const Value*> value = Find(key);
  if (!value.ok()) return value.status();
  const GgufValueType type = (*value)->type;
  if (!IsFloat(type) && !IsInteger(type)) {
    return WrongType(key, **value, "a number");
  }
  return NumberAt(type, (*value)->bytes.data());
}

absl::StatusOr<bool> GgufFile::GetBool(absl::string_view key) const {
  absl::StatusOr<const Value*> value = Find(key);
  if (!value.ok()) return value.status();
  if ((*value)->type != GgufValueType::kBool) {
    return WrongType(key, **value, "a bool");
  }
  return (*value)->bytes[0] != 0;
}

absl::StatusOr<std::string> GgufFile::GetString(absl::string_view key) const {
  absl::StatusOr<const Value*> value = Find(key);
  if (!value.ok()) return value.status();
  if ((*value)->type != GgufValueType::kString) {
    return WrongType(key, **value, "a string");
  }
  return (*value)->bytes;
}

absl::StatusOr<std::vector<std::string>> GgufFile::GetStringArray(
    absl::string_view key) const {
  absl::StatusOr<const Value*> value = Find(key);
  if (!value.ok()) return value.status();
  if ((*value)->type != GgufValueType::kArray ||
      (*value)->element_type != GgufValueType::kString) {
    return WrongType(key, **value, "an array of strings");
  }
  return (*value)->strings;
}

absl::StatusOr<std::vector<int64_t>> GgufFile::GetIntArray(
    absl::string_view key) const {
  absl::StatusOr<const Value*> found = Find(key);
  if (!found.ok()) return found.status();
  const Value& value = **found;
  if (value.type != GgufValueType::kArray || !IsInteger(value.element_type)) {
    return WrongType(key, value, "an array of integers");
  }
  const size_t width = ScalarBytes(value.element_type);
  std::vector<int64_t> out(value.count);
  for (uint64_t i = 0; i < value.count; ++i) {
    std::optional<int64_t> v =
        IntegerAt(value.element_type, value.bytes.data() + i * width);
    if (!v.has_value()) {
      return absl::InvalidArgumentError(absl::StrCat(
          name_, ": metadata key ", Quote(key), "[", i, "] is uint64 ",
          LoadLe(value.bytes.data() + i * width, 8),
          ", which does not fit in int64"));
    }
    out[i] = *v;
  }
  return out;
}

absl::StatusOr<std::vector<double>> GgufFile::GetFloatArray(
    absl::string_view key) const {
  absl::StatusOr<const Value*> found = Find(key);
  if (!found.ok()) return found.status();
  const Value& value = **found;
  if (value.type != GgufValueType::kArray ||
      (!IsFloat(value.element_type) && !IsInteger(value.element_type))) {
    return WrongType(key, value, "an array of numbers");
  }
  const size_t width = ScalarBytes(value.element_type);
  std::vector<double> out(value.count);
  for (uint64_t i = 0; i < value.count; ++i) {
    out[i] = NumberAt(value.element_type, value.bytes.data() + i * width);
  }
  return out;
}

std::vector<std::string> GgufFile::Keys() const { return keys_; }

const GgufTensorInfo* GgufFile::FindTensor(absl::string_view name) const {
  auto it = tensor_index_.find(name);
  return it == tensor_index_.end() ? nullptr : &tensors_[it->second];
}

absl::StatusOr<const GgufTensorInfo*> GgufFile::FindForRead(
    absl::string_view name) const {
  const GgufTensorInfo* info = FindTensor(name);
  if (info == nullptr) {
    return absl::NotFoundError(
        absl::StrCat(name_, ": no tensor named ", Quote(name)));
  }
  return info;
}

absl::StatusOr<std::string> GgufFile::ReadRaw(absl::string_view name) const {
  absl::StatusOr<const GgufTensorInfo*> info = FindForRead(name);
  if (!info.ok()) return info.status();
  // Parsing checked that the tensor lies inside the file, so this
  // allocation is no larger than the file.
  std::string bytes((*info)->bytes, '\0');
  const uint64_t at = data_offset_ + (*info)->offset;
  if (absl::Status s = source_->Read(at, bytes.size(), bytes.data()); !s.ok()) {
    return absl::Status(
        s.code(), absl::StrCat(name_, ": offset ", at, ": reading tensor ",
                               Quote(name), ": ", s.message()));
  }
  return bytes;
}

absl::StatusOr<std::vector<float>> GgufFile::ReadF32(
    absl::string_view name) const {
  absl::StatusOr<const GgufTensorInfo*> info = FindForRead(name);
  if (!info.ok()) return info.status();
  if (!CanDequantize((*info)->type)) {
    return absl::UnimplementedError(absl::StrCat(
        name_, ": tensor ", Quote(name), " is ", GgmlTypeName((*info)->type),
        ", which ReadF32 cannot dequantize (it reads F32, F16, BF16, Q4_0, "
        "Q4_1, Q5_0, Q5_1 and Q8_0); ReadRaw gives its bytes"));
  }
  absl::StatusOr<std::string> bytes = ReadRaw(name);
  if (!bytes.ok()) return bytes.status();
  std::vector<float> out((*info)->elements());
  if (absl::Status s =
          DequantizeToF32((*info)->type, *bytes, absl::MakeSpan(out));
      !s.ok()) {
    return absl::Status(s.code(), absl::StrCat(name_, ": tensor ", Quote(name),
                                               ": ", s.message()));
  }
  return out;
}

}  // namespace kvcache::model
