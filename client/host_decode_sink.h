// A ChunkSink that decodes fetched codec chunks on the CPU into buffers the
// caller owns: the worker path for hosts without a GPU, and the reference
// the GPU sink is checked against.
//
// Thread-compatible.
#ifndef KVCACHE_CLIENT_HOST_DECODE_SINK_H_
#define KVCACHE_CLIENT_HOST_DECODE_SINK_H_

#include <cstdint>
#include <vector>

#include "absl/status/status.h"
#include "absl/types/span.h"
#include "client/prefix_fetcher.h"
#include "codec/profile.h"

namespace kvcache {

class HostDecodeSink : public ChunkSink {
 public:
  // destinations[i] receives chunk i's values, [layers][K,V][tokens]
  // [kv_heads * head_dim], and must be exactly that size. The buffers must
  // outlive the sink.
  // `profile`, if any, is the model profile that chunks at the transform
  // levels name, and must outlive the sink.
  explicit HostDecodeSink(std::vector<absl::Span<uint16_t>> destinations,
                          const codec::ModelProfile* profile = nullptr)
      : destinations_(std::move(destinations)), profile_(profile) {}

  // Decodes the chunk at once; INVALID_ARGUMENT for a chunk with no
  // destination or of another shape, DATA_LOSS (from the codec) for a
  // corrupt one, FAILED_PRECONDITION for one that names a profile the sink
  // lacks, each naming the chunk.
  absl::Status Consume(size_t index, absl::string_view bytes,
                       bool stable) override;
  absl::Status Finish() override { return absl::OkStatus(); }

  // Chunks decoded so far.
  size_t decoded() const { return decoded_; }

 private:
  const std::vector<absl::Span<uint16_t>> destinations_;
  const codec::ModelProfile* const profile_;
  size_t decoded_ = 0;
};

}  // namespace kvcache

#endif  // KVCACHE_CLIENT_HOST_DECODE_SINK_H_
