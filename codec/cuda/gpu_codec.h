// CUDA batch decoder and encoder for codec bitstreams (codec/FORMAT.md).
// Bit-exact with the CPU codec: DecodeBatch writes the values DecodeChunk
// would, EncodeBatch the bytes EncodeChunk would. The decoder reads every
// version, transform streams (format v3) with their model profile uploaded
// as a DeviceProfile; the encoder writes the levels without a transform.
//
// A batch is any number of chunks of one model (layers, KV heads, head dim,
// dtype); each chunk has its own token count and its own place in a KV
// layout: a contiguous [layers][K,V][tokens][channels] buffer, or slots of a
// paged cache named by a block table. All pointers in jobs and layouts are
// device pointers, except the job arrays themselves, which stay on the host.
//
// Both calls only enqueue work on the given stream: they never synchronize
// with the device, and the host may reuse the job arrays once they return.
// Each chunk gets a ChunkError code in a device array; a failed chunk leaves
// its destination untouched and never stops the rest of the batch.
//
// Thread-safety: calls keep no state; concurrent calls need their own
// workspaces.
#ifndef KVCACHE_CODEC_CUDA_GPU_CODEC_H_
#define KVCACHE_CODEC_CUDA_GPU_CODEC_H_

#include <cstdint>
#include <memory>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "codec/codec.h"

// cudaStream_t without the CUDA headers, so host-only code can hold one.
struct CUstream_st;

namespace kvcache::codec::gpu {

using Stream = CUstream_st*;  // Same type as cudaStream_t.

// Per-chunk result, in the int32_t status array the calls fill.
enum ChunkError : int32_t {
  kOk = 0,
  kBadHeader = 1,       // Magic, header fields or section sizes.
  kUnsupported = 2,     // Format version or transform this code lacks.
  kShapeMismatch = 3,   // Stream's shape or dtype differs from the layout's.
  kChecksum = 4,        // CRC32C mismatch.
  kBadTables = 5,       // Choice bits, frequency tables or block directory.
  kBadBlock = 6,        // A rANS block.
  kBadDestination = 7,  // A block id outside the paged cache.
  kOutputTooSmall = 8,  // Encoder: the stream exceeds the job's capacity.
  kNeedsProfile = 9,    // A transform stream whose profile the batch lacks.
};
// Returns a short name for a status code ("ok", "checksum", ...).
const char* ChunkErrorName(int32_t code);

// Where KV values live. Element (layer l, kv = 0 for K / 1 for V, token t,
// channel c = kv_head * head_dim + dim) of a chunk is at:
//   kContiguous: chunk.values[((2 * l + kv) * chunk.tokens + t) * C + c]
//   kPaged: with slot = chunk.first_slot + t,
//           b = chunk.block_ids[slot / block_tokens],
//           s = slot % block_tokens,
//     layer_base(l)[b * block_stride + kv * kv_stride + s * token_stride + c]
//     where layer_base(l) = layer_bases[l] if set, else base + l *
//     layer_stride.
// Strides count 16-bit elements; C = kv_heads * head_dim.
struct KvLayout {
  enum class Kind { kContiguous, kPaged };
  Kind kind = Kind::kContiguous;
  uint32_t layers = 0;
  uint32_t kv_heads = 0;
  uint32_t head_dim = 0;
  DType dtype = DType::kFloat16;
  // kPaged only.
  uint16_t* const* layer_bases = nullptr;  // Device array of `layers`.
  uint16_t* base = nullptr;
  int64_t layer_stride = 0;
  int64_t block_stride = 0;
  int64_t kv_stride = 0;
  int64_t token_stride = 0;
  uint32_t block_tokens = 0;
  uint32_t num_blocks = 0;  // Block ids must be in [0, num_blocks).

  uint32_t Channels() const { return kv_heads * head_dim; }
  // The shape of a chunk of `tokens` tokens in this layout.
  ChunkShape ShapeOf(uint32_t tokens) const {
    return ChunkShape{layers, tokens, kv_heads, head_dim, dtype};
  }

  static KvLayout Contiguous(uint32_t layers, uint32_t kv_heads,
                             uint32_t head_dim, DType dtype);
  // One cache per layer, each [num_blocks][2][block_tokens][kv_heads]
  // [head_dim] (vLLM / FlashInfer); `layer_bases` is a device array.
  static KvLayout PagedPerLayer(uint16_t* const* layer_bases,
                                uint32_t num_blocks, uint32_t block_tokens,
                                uint32_t layers, uint32_t kv_heads,
                                uint32_t head_dim, DType dtype);
  // One allocation [layers][num_blocks][2][block_tokens][kv_heads][head_dim].
  static KvLayout PagedLayerMajor(uint16_t* base, uint32_t num_blocks,
                                  uint32_t block_tokens, uint32_t layers,
                                  uint32_t kv_heads, uint32_t head_dim,
                                  DType dtype);
};

// One chunk's place in a layout.
struct KvChunkRef {
  uint32_t tokens = 0;
  uint16_t* values = nullptr;          // kContiguous (read-only to encode).
  const int32_t* block_ids = nullptr;  // kPaged.
  uint32_t first_slot = 0;             // kPaged: slot of token 0.
};

// Largest chunk (values) the GPU codec takes; bigger ones are rejected.
inline constexpr uint64_t kMaxGpuChunkValues = uint64_t{1} << 30;

// A model profile (codec/profile.h) in device memory, which decoding
// transform streams needs. Upload is synchronous; the profile must outlive
// every batch that uses it.
class DeviceProfile {
 public:
  // What kernels read.
  struct View {
    uint8_t id[16];
    uint32_t layers;
    uint32_t kv_heads;
    uint32_t head_dim;
    uint32_t rope;           // RopeLayout
    const double* inv_freq;  // [head_dim / 2]
    const float* mean;       // [head][dim]
    const float* basis;      // [head][component][dim]
  };

  static absl::StatusOr<std::unique_ptr<DeviceProfile>> Upload(
      const ModelProfile& profile);
  ~DeviceProfile();
  DeviceProfile(const DeviceProfile&) = delete;
  DeviceProfile& operator=(const DeviceProfile&) = delete;

  const ProfileId& id() const { return id_; }
  const View& view() const { return view_; }

 private:
  DeviceProfile() = default;
  ProfileId id_{};
  View view_{};
  void* memory_ = nullptr;
};

// Decoding a batch a few layers at a time, for streams whose bytes arrive
// layer by layer: a stream's blocks follow layer order, so layers
// [first, first + count) decode once a stream's bytes up to the end of the
// last of them (codec::LayerEnds) are in place, beside its headers, tables
// and directory.
struct LayerRange {
  uint32_t first = 0;
  // Layers this call decodes; 0: all of them (the fields below are then
  // ignored).
  uint32_t count = 0;
  // The workspace holds the parse of an earlier call of this sequence:
  // same layout, jobs, workspace, status array, stream and count. Skips
  // parsing headers and tables again; a chunk that failed in an earlier
  // call stays failed.
  bool parsed = false;
  // Checks each stream's CRC32C, which needs all of its bytes: set it on
  // the call that decodes the last layers. Values decoded by earlier calls
  // were not yet known to be intact; a mismatch shows in this call's status.
  bool verify_checksum = true;
};

struct DecodeJob {
  const uint8_t* stream = nullptr;  // Device copy of the bitstream.
  uint64_t stream_bytes = 0;
  KvChunkRef dest;  // dest.tokens must match the stream.
};

// Device workspace DecodeBatch needs for `jobs` (and `profile`), in bytes.
uint64_t DecodeWorkspaceBytes(const KvLayout& layout,
                              absl::Span<const DecodeJob> jobs,
                              const DeviceProfile* profile = nullptr,
                              LayerRange layers = {});

// Decodes jobs[i].stream into its destination and sets status[i] (device,
// jobs.size() entries). Returns InvalidArgument for a bad layout, job or
// workspace and Internal if a launch fails; corrupt streams are reported
// only through `status`, and so is a transform stream when `profile` is not
// the one it names (kNeedsProfile). `layers` decodes only some layers.
absl::Status DecodeBatch(const KvLayout& layout,
                         absl::Span<const DecodeJob> jobs, void* workspace,
                         uint64_t workspace_bytes, int32_t* status,
                         Stream stream, const DeviceProfile* profile = nullptr,
                         LayerRange layers = {});

struct EncodeJob {
  KvChunkRef src;
  uint8_t* out = nullptr;  // Device buffer for the bitstream.
  uint64_t out_capacity = 0;
};

// Bytes a chunk's bitstream can take at most; a capacity this large never
// fails with kOutputTooSmall.
uint64_t MaxEncodedBytes(const ChunkShape& shape);

// Device workspace EncodeBatch needs for `jobs`, in bytes.
uint64_t EncodeWorkspaceBytes(const KvLayout& layout,
                              absl::Span<const EncodeJob> jobs);

// Encodes each job's chunk at `level` into jobs[i].out, sets out_bytes[i]
// to the stream's length and status[i] (both device arrays of jobs.size()).
// Errors as for DecodeBatch; InvalidArgument for a transform level, which
// only the CPU encoder writes.
absl::Status EncodeBatch(const KvLayout& layout,
                         absl::Span<const EncodeJob> jobs, Level level,
                         void* workspace, uint64_t workspace_bytes,
                         uint64_t* out_bytes, int32_t* status, Stream stream);

}  // namespace kvcache::codec::gpu

#endif  // KVCACHE_CODEC_CUDA_GPU_CODEC_H_
