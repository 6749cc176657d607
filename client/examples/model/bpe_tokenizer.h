// Byte-level BPE tokenizer (the GPT-2 family, as SmolLM2 and Llama 3 use),
// built from a vocabulary and a merge list such as a GGUF file's
// tokenizer.ggml.* metadata.
//
// Encoding, in the order the Hugging Face tokenizer applies it:
//  1. control tokens (`<|im_start|>`, ...) found in the text become their
//     own ids, leftmost and longest first;
//  2. the text between them is split around every numeric character (each
//     digit is a piece of its own), then by the GPT-2 pattern
//     's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+|
//     ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
//  3. each piece's bytes are mapped to the printable stand-ins GPT-2 uses and
//     merged pairwise, lowest merge rank first, into vocabulary tokens.
//
// Thread-safety: Encode and Decode are const and may run concurrently; the
// cache of encoded pieces is guarded by a mutex.
#ifndef KVCACHE_CLIENT_EXAMPLES_MODEL_BPE_TOKENIZER_H_
#define KVCACHE_CLIENT_EXAMPLES_MODEL_BPE_TOKENIZER_H_

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "absl/types/span.h"

namespace kvcache::model {

class GgufFile;

// tokenizer.ggml.token_type values.
enum class TokenType : int32_t {
  kNormal = 1,
  kUnknown = 2,
  kControl = 3,
  kUserDefined = 4,
  kUnused = 5,
  kByte = 6,
};

class BpeTokenizer {
 public:
  // `tokens[i]` is token i's text in GPT-2's byte-to-character mapping,
  // `merges` are "left right" pairs in rank order, `types` has one entry per
  // token (control and user-defined tokens are matched in raw text).
  // INVALID_ARGUMENT if a merge is malformed or names a pair whose result is
  // not in the vocabulary, if the sizes disagree, or a token repeats.
  static absl::StatusOr<std::unique_ptr<BpeTokenizer>> Create(
      std::vector<std::string> tokens, absl::Span<const std::string> merges,
      absl::Span<const int64_t> types);

  // From tokenizer.ggml.{model, tokens, merges, token_type}; UNIMPLEMENTED
  // unless the model is "gpt2" (byte-level BPE).
  static absl::StatusOr<std::unique_ptr<BpeTokenizer>> FromGguf(
      const GgufFile& file);

  ~BpeTokenizer();

  int vocab_size() const { return static_cast<int>(tokens_.size()); }

  // The ids of `text` (UTF-8; invalid sequences are encoded byte by byte;
  // a byte the vocabulary has no token for is dropped, as the reference
  // tokenizer drops it). INTERNAL if the pattern engine fails.
  absl::StatusOr<std::vector<int32_t>> Encode(absl::string_view text) const;

  // The text of `ids`; control tokens are written as their text.
  // INVALID_ARGUMENT for an id outside the vocabulary.
  absl::StatusOr<std::string> Decode(absl::Span<const int32_t> ids) const;

  // The id of a token given in its raw text (e.g. "<|im_end|>"); NOT_FOUND
  // if there is none.
  absl::StatusOr<int32_t> TokenId(absl::string_view raw_text) const;

 private:
  struct Regex;
  BpeTokenizer() = default;

  // Appends the ids of one pre-tokenized piece.
  absl::Status EncodePiece(absl::string_view piece,
                           std::vector<int32_t>* ids) const;
  // Appends the ids of text holding no control token.
  absl::Status EncodeOrdinary(absl::string_view text,
                              std::vector<int32_t>* ids) const;

  std::vector<std::string> tokens_;  // in the byte-mapped alphabet
  absl::flat_hash_map<std::string, int32_t> ids_;
  // "left right" -> rank; lower merges first.
  absl::flat_hash_map<std::string, int32_t> merge_ranks_;
  // Control and user-defined tokens in raw text, longest first.
  std::vector<std::pair<std::string, int32_t>> specials_;
  std::unique_ptr<Regex> pattern_;
  mutable absl::Mutex cache_mu_;
  mutable absl::flat_hash_map<std::string, std::vector<int32_t>> cache_
      ABSL_GUARDED_BY(cache_mu_);
};

}  // namespace kvcache::model

#endif  // KVCACHE_CLIENT_EXAMPLES_MODEL_BPE_TOKENIZER_H_
