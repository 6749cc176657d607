#include "client/host_decode_sink.h"

#include "absl/strings/str_cat.h"
#include "codec/codec.h"

namespace kvcache {

absl::Status HostDecodeSink::Consume(size_t index, absl::string_view bytes,
                                     bool) {
  if (index >= destinations_.size()) {
    return absl::InvalidArgumentError(
        absl::StrCat("chunk ", index, " has no destination (",
                     destinations_.size(), " given)"));
  }
  if (absl::Status s =
          codec::DecodeChunk(bytes, destinations_[index], profile_);
      !s.ok()) {
    return absl::Status(s.code(),
                        absl::StrCat("chunk ", index, ": ", s.message()));
  }
  ++decoded_;
  return absl::OkStatus();
}

}  // namespace kvcache
