// Byte-level BPE (see bpe_tokenizer.h).
#include "client/examples/model/bpe_tokenizer.h"

#include <pcre2.h>

#include <algorithm>
#include <array>
#include <limits>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "client/examples/model/gguf.h"

namespace kvcache::model {
namespace {

// GPT-2's pre-tokenizer pattern. Alternatives are tried in order at each
// position, as the reference implementation's regex engine does.
constexpr char kPiecePattern[] =
    R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";
// A numeric character: each is split off on its own before the pattern runs.
constexpr char kNumericPattern[] = R"(\p{N})";

void AppendUtf8(uint32_t code_point, std::string* out) {
  if (code_point < 0x80) {
    out->push_back(static_cast<char>(code_point));
  } else if (code_point < 0x800) {
    out->push_back(static_cast<char>(0xC0 | (code_point >> 6)));
    out->push_back(static_cast<char>(0x80 | (code_point & 0x3F)));
  } else {
    out->push_back(static_cast<char>(0xE0 | (code_point >> 12)));
    out->push_back(static_cast<char>(0x80 | ((code_point >> 6) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | (code_point & 0x3F)));
  }
}

// GPT-2 maps each byte to a printable character so that tokens are text:
// printable Latin-1 bytes stand for themselves, the other 68 take the code
// points from 256 up, in byte order.
const std::array<std::string, 256>& ByteToChars() {
  static const auto* table = [] {
    auto* t = new std::array<std::string, 256>;
    auto printable = [](int b) {
      return (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) ||
             (b >= 0xAE && b <= 0xFF);
    };
    uint32_t next = 256;
    for (int b = 0; b < 256; ++b) {
      AppendUtf8(printable(b) ? b : next++, &(*t)[b]);
    }
    return t;
  }();
  return *table;
}

// The inverse of ByteToChars, by code point.
const absl::flat_hash_map<uint32_t, uint8_t>& CharToByte() {
  static const auto* table = [] {
    auto* t = new absl::flat_hash_map<uint32_t, uint8_t>;
    const auto& chars = ByteToChars();
    for (int b = 0; b < 256; ++b) {
      const auto* s = reinterpret_cast<const unsigned char*>(chars[b].data());
      uint32_t cp = s[0];
      if (chars[b].size() == 2) cp = ((s[0] & 0x1F) << 6) | (s[1] & 0x3F);
      (*t)[cp] = static_cast<uint8_t>(b);
    }
    return t;
  }();
  return *table;
}

// Splits UTF-8 `s` into code points; a byte that starts no valid sequence
// stands alone.
std::vector<absl::string_view> CodePoints(absl::string_view s) {
  std::vector<absl::string_view> out;
  size_t i = 0;
  while (i < s.size()) {
    const auto lead = static_cast<unsigned char>(s[i]);
    size_t n = lead < 0x80       ? 1
               : lead >> 5 == 6  ? 2
               : lead >> 4 == 14 ? 3
               : lead >> 3 == 30 ? 4
                                 : 1;
    if (i + n > s.size()) n = 1;
    for (size_t k = 1; k < n; ++k) {
      if ((static_cast<unsigned char>(s[i + k]) & 0xC0) != 0x80) n = 1;
    }
    out.push_back(s.substr(i, n));
    i += n;
  }
  return out;
}

uint32_t DecodeCodePoint(absl::string_view c) {
  const auto* s = reinterpret_cast<const unsigned char*>(c.data());
  switch (c.size()) {
    case 2:
      return ((s[0] & 0x1F) << 6) | (s[1] & 0x3F);
    case 3:
      return ((s[0] & 0x0F) << 12) | ((s[1] & 0x3F) << 6) | (s[2] & 0x3F);
    case 4:
      return ((s[0] & 0x07) << 18) | ((s[1] & 0x3F) << 12) |
             ((s[2] & 0x3F) << 6) | (s[3] & 0x3F);
    default:
      return s[0];
  }
}

}  // namespace

// A compiled PCRE2 pattern: Unicode properties, invalid UTF-8 tolerated,
// JIT-compiled where the platform allows.
struct BpeTokenizer::Regex {
  pcre2_code* piece = nullptr;
  pcre2_code* numeric = nullptr;

  ~Regex() {
    pcre2_code_free(piece);
    pcre2_code_free(numeric);
  }

  static absl::StatusOr<pcre2_code*> Compile(const char* pattern) {
    int error = 0;
    PCRE2_SIZE offset = 0;
    pcre2_code* code = pcre2_compile(
        reinterpret_cast<PCRE2_SPTR>(pattern), PCRE2_ZERO_TERMINATED,
        PCRE2_UTF | PCRE2_UCP | PCRE2_MATCH_INVALID_UTF, &error, &offset,
        nullptr);
    if (code == nullptr) {
      PCRE2_UCHAR message[256];
      pcre2_get_error_message(error, message, sizeof(message));
      return absl::InternalError(
          absl::StrCat("cannot compile the pre-tokenizer pattern at ", offset,
                       ": ", reinterpret_cast<const char*>(message)));
    }
    pcre2_jit_compile(code, PCRE2_JIT_COMPLETE);  // falls back to interpreting
    return code;
  }

  // Cuts `text` into the matches of `code` and the runs between them, left
  // to right, and calls `on_piece(begin, end, matched)` for each. Runs
  // between matches are bytes no alternative takes (invalid UTF-8 only, for
  // the piece pattern), which must still be encoded.
  template <typename F>
  static absl::Status ForEachPiece(const pcre2_code* code,
                                   absl::string_view text, F on_piece) {
    pcre2_match_data* match =
        pcre2_match_data_create_from_pattern(code, nullptr);
    size_t at = 0;    // where the next match is searched from
    size_t done = 0;  // text before this has been handed out
    absl::Status status;
    while (status.ok() && at < text.size()) {
      const int rc =
          pcre2_match(code, reinterpret_cast<PCRE2_SPTR>(text.data()),
                      text.size(), at, 0, match, nullptr);
      if (rc == PCRE2_ERROR_NOMATCH) break;
      if (rc < 0) {
        status = absl::InternalError(
            absl::StrCat("pre-tokenizer match failed: code ", rc));
        break;
      }
      const PCRE2_SIZE* span = pcre2_get_ovector_pointer(match);
      if (span[1] == span[0]) {  // neither pattern matches the empty string,
        ++at;                    // but never loop on one that would
        continue;
      }
      if (span[0] > done) status = on_piece(done, span[0], false);
      if (status.ok()) status = on_piece(span[0], span[1], true);
      done = at = span[1];
    }
    pcre2_match_data_free(match);
    if (status.ok() && done < text.size()) {
      status = on_piece(done, text.size(), false);
    }
    return status;
  }
};

BpeTokenizer::~BpeTokenizer() = default;

absl::StatusOr<std::unique_ptr<BpeTokenizer>> BpeTokenizer::Create(
    std::vector<std::string> tokens, absl::Span<const std::string> merges,
    absl::Span<const int64_t> types) {
  if (tokens.empty() || tokens.size() > std::numeric_limits<int32_t>::max()) {
    return absl::InvalidArgumentError(
        absl::StrCat("vocabulary of ", tokens.size(), " tokens"));
  }
  if (types.size() != tokens.size()) {
    return absl::InvalidArgumentError(absl::StrCat(
        types.size(), " token types for ", tokens.size(), " tokens"));
  }
  std::unique_ptr<BpeTokenizer> t(new BpeTokenizer);
  t->ids_.reserve(tokens.size());
  for (size_t i = 0; i < tokens.size(); ++i) {
    if (!t->ids_.emplace(tokens[i], static_cast<int32_t>(i)).second) {
      return absl::InvalidArgumentError(absl::StrCat(
          "token ", i, " (\"", tokens[i], "\") repeats an earlier token"));
    }
    const auto type = static_cast<TokenType>(types[i]);
    if (type == TokenType::kControl || type == TokenType::kUserDefined) {
      t->specials_.emplace_back(tokens[i], static_cast<int32_t>(i));
    }
  }
  for (const auto& [text, id] : t->specials_) {
    if (text.empty()) {
      return absl::InvalidArgumentError(
          absl::StrCat("control token ", id, " is empty"));
    }
  }
  std::stable_sort(t->specials_.begin(), t->specials_.end(),
                   [](const auto& a, const auto& b) {
                     return a.first.size() > b.first.size();
                   });
  t->merge_ranks_.reserve(merges.size());
  for (size_t rank = 0; rank < merges.size(); ++rank) {
    const std::string& merge = merges[rank];
    const size_t space = merge.find(' ');
    if (space == std::string::npos || space == 0 || space + 1 >= merge.size() ||
        merge.find(' ', space + 1) != std::string::npos) {
      return absl::InvalidArgumentError(absl::StrCat(
          "merge ", rank, " (\"", merge, "\") is not \"left right\""));
    }
    const std::string joined =
        absl::StrCat(merge.substr(0, space), merge.substr(space + 1));
    if (!t->ids_.contains(joined)) {
      return absl::InvalidArgumentError(
          absl::StrCat("merge ", rank, " (\"", merge, "\") makes \"", joined,
                       "\", which is not in the vocabulary"));
    }
    // The first occurrence of a pair is its rank, as in the reference.
    t->merge_ranks_.emplace(merge, static_cast<int32_t>(rank));
  }
  t->tokens_ = std::move(tokens);
  t->pattern_ = std::make_unique<Regex>();
  absl::StatusOr<pcre2_code*> piece = Regex::Compile(kPiecePattern);
  if (!piece.ok()) return piece.status();
  t->pattern_->piece = *piece;
  absl::StatusOr<pcre2_code*> numeric = Regex::Compile(kNumericPattern);
  if (!numeric.ok()) return numeric.status();
  t->pattern_->numeric = *numeric;
  return t;
}

absl::StatusOr<std::unique_ptr<BpeTokenizer>> BpeTokenizer::FromGguf(
    const GgufFile& file) {
  absl::StatusOr<std::string> model = file.GetString("tokenizer.ggml.model");
  if (!model.ok()) return model.status();
  if (*model != "gpt2") {
    return absl::UnimplementedError(
        absl::StrCat("tokenizer.ggml.model is \"", *model,
                     "\"; only byte-level BPE (\"gpt2\") is implemented"));
  }
  absl::StatusOr<std::vector<std::string>> tokens =
      file.GetStringArray("tokenizer.ggml.tokens");
  if (!tokens.ok()) return tokens.status();
  absl::StatusOr<std::vector<std::string>> merges =
      file.GetStringArray("tokenizer.ggml.merges");
  if (!merges.ok()) return merges.status();
  absl::StatusOr<std::vector<int64_t>> types =
      file.GetIntArray("tokenizer.ggml.token_type");
  if (!types.ok()) return types.status();
  return Create(*std::move(tokens), *merges, *types);
}

absl::Status BpeTokenizer::EncodePiece(absl::string_view piece,
                                       std::vector<int32_t>* ids) const {
  {
    absl::MutexLock lock(&cache_mu_);
    auto it = cache_.find(piece);
    if (it != cache_.end()) {
      ids->insert(ids->end(), it->second.begin(), it->second.end());
      return absl::OkStatus();
    }
  }
  const auto& byte_chars = ByteToChars();
  // A byte without a token of its own is dropped, as the reference does
  // when it has no unknown token (SmolLM2 lacks a few control bytes).
  std::vector<std::string> symbols;
  symbols.reserve(piece.size());
  for (unsigned char byte : piece) {
    if (ids_.contains(byte_chars[byte])) symbols.push_back(byte_chars[byte]);
  }

  // Merge the lowest-ranked adjacent pair, leftmost first, until none is in
  // the merge list. Pieces are words, so the quadratic scan stays short.
  std::string pair;
  while (symbols.size() > 1) {
    int32_t best_rank = std::numeric_limits<int32_t>::max();
    size_t best = 0;
    for (size_t i = 0; i + 1 < symbols.size(); ++i) {
      pair.assign(symbols[i]).append(" ").append(symbols[i + 1]);
      auto it = merge_ranks_.find(pair);
      if (it != merge_ranks_.end() && it->second < best_rank) {
        best_rank = it->second;
        best = i;
      }
    }
    if (best_rank == std::numeric_limits<int32_t>::max()) break;
    symbols[best] += symbols[best + 1];
    symbols.erase(symbols.begin() + best + 1);
  }

  std::vector<int32_t> piece_ids;
  piece_ids.reserve(symbols.size());
  for (const std::string& symbol : symbols) {
    // Every merge's result is in the vocabulary (Create checks it).
    piece_ids.push_back(ids_.at(symbol));
  }
  ids->insert(ids->end(), piece_ids.begin(), piece_ids.end());
  absl::MutexLock lock(&cache_mu_);
  cache_.emplace(piece, std::move(piece_ids));
  return absl::OkStatus();
}

absl::Status BpeTokenizer::EncodeOrdinary(absl::string_view text,
                                          std::vector<int32_t>* ids) const {
  // Numeric characters are pieces of their own; the pattern cuts the rest.
  return Regex::ForEachPiece(
      pattern_->numeric, text, [&](size_t b, size_t e, bool numeric) {
        const absl::string_view run = text.substr(b, e - b);
        if (numeric) return EncodePiece(run, ids);
        return Regex::ForEachPiece(
            pattern_->piece, run, [&](size_t pb, size_t pe, bool) {
              return EncodePiece(run.substr(pb, pe - pb), ids);
            });
      });
}

absl::StatusOr<std::vector<int32_t>> BpeTokenizer::Encode(
    absl::string_view text) const {
  std::vector<int32_t> ids;
  size_t done = 0;  // text before this is encoded
  for (size_t at = 0; at < text.size(); ++at) {
    for (const auto& [special, id] : specials_) {
      if (text.substr(at, special.size()) != special) continue;
      if (absl::Status s = EncodeOrdinary(text.substr(done, at - done), &ids);
          !s.ok()) {
        return s;
      }
      ids.push_back(id);
      done = at + special.size();
      at = done - 1;
      break;
    }
  }
  if (absl::Status s = EncodeOrdinary(text.substr(done), &ids); !s.ok()) {
    return s;
  }
  return ids;
}

absl::StatusOr<std::string> BpeTokenizer::Decode(
    absl::Span<const int32_t> ids) const {
  const auto& char_to_byte = CharToByte();
  std::string text;
  for (int32_t id : ids) {
    if (id < 0 || id >= vocab_size()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "token id ", id, " outside the vocabulary of ", vocab_size()));
    }
    for (absl::string_view c : CodePoints(tokens_[id])) {
      auto it = char_to_byte.find(DecodeCodePoint(c));
      if (it != char_to_byte.end()) {
        text.push_back(static_cast<char>(it->second));
      } else {
        text.append(c.data(), c.size());
      }
    }
  }
  return text;
}

absl::StatusOr<int32_t> BpeTokenizer::TokenId(
    absl::string_view raw_text) const {
  for (const auto& [special, id] : specials_) {
    if (special == raw_text) return id;
  }
  std::string mapped;
  for (unsigned char byte : raw_text) mapped += ByteToChars()[byte];
  auto it = ids_.find(mapped);
  if (it == ids_.end()) {
    return absl::NotFoundError(
        absl::StrCat("no token \"", raw_text, "\" in the vocabulary"));
  }
  return it->second;
}

}  // namespace kvcache::model
