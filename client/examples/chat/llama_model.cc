// llama2.c checkpoint loading and forward pass (see llama_model.h).
#include "client/examples/chat/llama_model.h"

#include <cblas.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <fstream>
#include <string>
#include <tuple>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "client/examples/chat/activations.h"
#include "client/examples/model/gguf.h"
#include "codec/half.h"

namespace kvcache::chat {
namespace {

constexpr int kHeaderFields = 7;
constexpr size_t kHeaderBytes = kHeaderFields * sizeof(int32_t);
// Far above any real llama2.c model; keeps the size arithmetic below from
// overflowing 64 bits on a garbage header.
constexpr int32_t kMaxHeaderField = 1 << 20;

// Dot product with eight independent partial sums: without -ffast-math the
// compiler may not reorder one running sum, but it can vectorise these.
float Dot(const float* a, const float* b, int n) {
  float acc[8] = {};
  int i = 0;
  for (; i + 8 <= n; i += 8) {
    for (int j = 0; j < 8; ++j) acc[j] += a[i + j] * b[i + j];
  }
  for (int j = 0; i < n; ++i, ++j) acc[j] += a[i] * b[i];
  return ((acc[0] + acc[4]) + (acc[1] + acc[5])) +
         ((acc[2] + acc[6]) + (acc[3] + acc[7]));
}

// out[t][r] = w[r] . x[t] for a row-major weight w[rows][cols] and n inputs
// x[n][cols].
void MatMul(const float* w, int rows, int cols, const float* x, int n,
            float* out) {
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n, rows, cols, 1.0f, x,
              cols, w, cols, 0.0f, out, rows);
}

// out = x / sqrt(mean(x^2) + eps) * weight, for n rows of `dim`. The norm is
// formed in double and rounded once, as numpy does in kvdump.py.
void RmsNorm(const float* x, const float* weight, int dim, int n, float eps,
             float* out) {
  for (int t = 0; t < n; ++t) {
    const float* row = x + static_cast<size_t>(t) * dim;
    float* dst = out + static_cast<size_t>(t) * dim;
    const float mean_square = Dot(row, row, dim) / static_cast<float>(dim);
    const float norm =
        static_cast<float>(std::sqrt(static_cast<double>(mean_square) + eps));
    for (int i = 0; i < dim; ++i) dst[i] = row[i] / norm * weight[i];
  }
}

// Rotates each adjacent pair (v[2j], v[2j+1]) of every head in a row of
// `width` floats by angle pos * freq[j]. Done in double and rounded once,
// like the reference, so keys round to the same fp16 values.
void Rope(float* v, int width, int head_dim, const double* cos_pos,
          const double* sin_pos) {
  for (int h = 0; h < width; h += head_dim) {
    for (int j = 0; j < head_dim / 2; ++j) {
      const double a = v[h + 2 * j];
      const double b = v[h + 2 * j + 1];
      v[h + 2 * j] = static_cast<float>(a * cos_pos[j] - b * sin_pos[j]);
      v[h + 2 * j + 1] = static_cast<float>(a * sin_pos[j] + b * cos_pos[j]);
    }
  }
}

void AddInPlace(float* x, const float* y, size_t n) {
  for (size_t i = 0; i < n; ++i) x[i] += y[i];
}

// Causal grouped-query attention: row t of q ([n][heads * head_dim], the
// token at position start + t) attends to positions 0..start+t of keys and
// values ([start + n][kv_heads * head_dim]); results go to out, laid out as q.
void Attend(const float* q, const float* keys, const float* values, int n,
            int start, int heads, int kv_heads, int head_dim, float* out) {
  // Query rows a tile at a time bound the score buffer.
  constexpr int kQueryTile = 128;
  const int dim = heads * head_dim, kv_dim = kv_heads * head_dim;
  const int group = heads / kv_heads;
  const float inv_scale = 1.0f / std::sqrt(static_cast<float>(head_dim));
  std::vector<float> scores;
  for (int t0 = 0; t0 < n; t0 += kQueryTile) {
    const int rows = std::min(kQueryTile, n - t0);
    const int cols = start + t0 + rows;  // positions the tile's last row sees
    scores.resize(static_cast<size_t>(rows) * cols);
    for (int h = 0; h < heads; ++h) {
      const float* k_head = keys + (h / group) * head_dim;
      const float* v_head = values + (h / group) * head_dim;
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, rows, cols, head_dim,
                  inv_scale, q + static_cast<size_t>(t0) * dim + h * head_dim,
                  dim, k_head, kv_dim, 0.0f, scores.data(), cols);
      for (int r = 0; r < rows; ++r) {
        float* row = &scores[static_cast<size_t>(r) * cols];
        const int visible = start + t0 + r + 1;
        Softmax(row, visible);
        std::fill(row + visible, row + cols, 0.0f);
      }
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, rows, head_dim,
                  cols, 1.0f, scores.data(), cols, v_head, kv_dim, 0.0f,
                  out + static_cast<size_t>(t0) * dim + h * head_dim, dim);
    }
  }
}

absl::Status CheckConfig(const LlamaConfig& c, const std::string& path) {
  const std::pair<const char*, int> fields[] = {{"dim", c.dim},
                                                {"hidden_dim", c.hidden_dim},
                                                {"n_layers", c.layers},
                                                {"n_heads", c.heads},
                                                {"n_kv_heads", c.kv_heads},
                                                {"vocab_size", c.vocab_size},
                                                {"seq_len", c.seq_len}};
  for (const auto& [name, value] : fields) {
    if (value <= 0 || value > kMaxHeaderField) {
      return absl::InvalidArgumentError(absl::StrCat(
          path, ": header field ", name, " = ", value, " is out of range [1, ",
          kMaxHeaderField, "]; not a llama2.c checkpoint?"));
    }
  }
  if (c.dim % c.heads != 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        path, ": dim ", c.dim, " is not a multiple of n_heads ", c.heads));
  }
  if (c.heads % c.kv_heads != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat(path, ": n_heads ", c.heads,
                     " is not a multiple of n_kv_heads ", c.kv_heads));
  }
  if (c.head_dim() % 2 != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat(path, ": head dim ", c.head_dim(),
                     " is odd; RoPE rotates pairs of channels"));
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<LlamaModel> LlamaModel::Load(const std::string& path) {
  std::ifstream file(path, std::ios::binary);
  if (!file) return absl::NotFoundError(absl::StrCat("cannot open ", path));
  char magic[4] = {};
  file.read(magic, sizeof(magic));
  if (file && std::string(magic, sizeof(magic)) == "GGUF") {
    return LoadGguf(path);
  }
  return LoadLlama2c(path);
}

absl::StatusOr<LlamaModel> LlamaModel::LoadLlama2c(const std::string& path) {
  std::ifstream file(path, std::ios::binary | std::ios::ate);
  if (!file) return absl::NotFoundError(absl::StrCat("cannot open ", path));
  const auto file_size = static_cast<uint64_t>(file.tellg());
  if (file_size < kHeaderBytes) {
    return absl::InvalidArgumentError(
        absl::StrCat(path, ": ", file_size, " bytes is shorter than the ",
                     kHeaderBytes, "-byte llama2.c header"));
  }
  int32_t header[kHeaderFields];
  file.seekg(0);
  file.read(reinterpret_cast<char*>(header), kHeaderBytes);

  LlamaConfig config;
  config.dim = header[0];
  config.hidden_dim = header[1];
  config.layers = header[2];
  config.heads = header[3];
  config.kv_heads = header[4];
  // llama2.c marks a separate classifier matrix with a negative vocab size.
  config.shared_classifier = header[5] > 0;
  config.vocab_size = header[5] == INT32_MIN ? 0 : std::abs(header[5]);
  config.seq_len = header[6];
  if (absl::Status status = CheckConfig(config, path); !status.ok()) {
    return status;
  }

  // Every field is at most 2^20, so each tensor has at most 2^60 floats and
  // the total, a handful of them, stays below 2^63.
  const Tensors tensors = Layout(config, /*legacy_rope_table=*/true);
  const uint64_t floats = tensors.end;
  const uint64_t payload = file_size - kHeaderBytes;
  if (payload % sizeof(float) != 0 || payload / sizeof(float) != floats) {
    return absl::InvalidArgumentError(absl::StrCat(
        path, ": file is ", file_size, " bytes but its header (dim=",
        config.dim, " hidden_dim=", config.hidden_dim,
        " n_layers=", config.layers, " n_heads=", config.heads,
        " n_kv_heads=", config.kv_heads, " vocab_size=", header[5],
        " seq_len=", config.seq_len, ") implies ", kHeaderBytes, " + 4 * ",
        floats, " bytes: truncated, padded or not a llama2.c checkpoint"));
  }
  std::vector<float> weights(floats);
  if (!file.read(reinterpret_cast<char*>(weights.data()),
                 static_cast<std::streamsize>(floats * sizeof(float)))) {
    return absl::DataLossError(absl::StrCat(path, ": short read"));
  }
  return LlamaModel(config, tensors, std::move(weights));
}

absl::StatusOr<LlamaModel> LlamaModel::LoadGguf(const std::string& path) {
  absl::StatusOr<model::GgufFile> file = model::GgufFile::Open(path);
  if (!file.ok()) return file.status();
  absl::StatusOr<std::string> arch = file->GetString("general.architecture");
  if (!arch.ok()) return arch.status();
  if (*arch != "llama") {
    return absl::UnimplementedError(absl::StrCat(
        path, ": architecture \"", *arch, "\"; only \"llama\" is implemented"));
  }
  LlamaConfig config;
  const std::pair<const char*, int*> ints[] = {
      {"llama.embedding_length", &config.dim},
      {"llama.feed_forward_length", &config.hidden_dim},
      {"llama.block_count", &config.layers},
      {"llama.attention.head_count", &config.heads},
      {"llama.attention.head_count_kv", &config.kv_heads},
      {"llama.context_length", &config.seq_len}};
  for (const auto& [key, field] : ints) {
    absl::StatusOr<int64_t> value = file->GetInt(key);
    if (!value.ok()) return value.status();
    if (*value <= 0 || *value > kMaxHeaderField) {
      return absl::InvalidArgumentError(
          absl::StrCat(path, ": ", key, " = ", *value, " is out of range [1, ",
                       kMaxHeaderField, "]"));
    }
    *field = static_cast<int>(*value);
  }
  const model::GgufTensorInfo* embedding =
      file->FindTensor("token_embd.weight");
  if (embedding == nullptr || embedding->dims.size() != 2 ||
      embedding->dims[1] > static_cast<uint64_t>(kMaxHeaderField)) {
    return absl::InvalidArgumentError(
        absl::StrCat(path, ": no two-dimensional token_embd.weight"));
  }
  config.vocab_size = static_cast<int>(embedding->dims[1]);
  config.shared_classifier = file->FindTensor("output.weight") == nullptr;
  absl::StatusOr<double> eps =
      file->GetFloat("llama.attention.layer_norm_rms_epsilon");
  if (!eps.ok()) return eps.status();
  config.rms_eps = static_cast<float>(*eps);
  // llama.cpp's default when a file does not say.
  config.rope_theta = file->GetFloat("llama.rope.freq_base").value_or(10000.0);
  if (absl::Status status = CheckConfig(config, path); !status.ok()) {
    return status;
  }
  if (file->Has("llama.rope.dimension_count") &&
      file->GetInt("llama.rope.dimension_count").value_or(0) !=
          config.head_dim()) {
    return absl::UnimplementedError(absl::StrCat(
        path, ": RoPE over part of a head (llama.rope.dimension_count != ",
        config.head_dim(), ") is not implemented"));
  }

  // Every tensor the model needs, checked against the file before anything
  // is allocated: the hyperparameters come from the file too, and only
  // tensors that are really there (the reader has checked they lie inside
  // it) bound what the weights take.
  struct Wanted {
    std::string name;
    uint64_t cols, rows;  // a vector has one row and one dimension
    size_t at;            // where it goes in the weights
  };
  const Tensors tensors = Layout(config, /*legacy_rope_table=*/false);
  const uint64_t dim = config.dim, hidden = config.hidden_dim,
                 kv_dim = config.kv_dim(), vocab = config.vocab_size;
  std::vector<Wanted> wanted = {
      {"token_embd.weight", dim, vocab, tensors.embedding},
      {"output_norm.weight", dim, 1, tensors.rms_final}};
  if (!config.shared_classifier) {
    wanted.push_back({"output.weight", dim, vocab, tensors.classifier});
  }
  for (int l = 0; l < config.layers; ++l) {
    const std::string blk = absl::StrCat("blk.", l, ".");
    // (name, cols, rows, where layer 0's tensor starts)
    const std::tuple<const char*, uint64_t, uint64_t, size_t> layer_tensors[] =
        {{"attn_norm.weight", dim, 1, tensors.rms_att},
         {"attn_q.weight", dim, dim, tensors.wq},
         {"attn_k.weight", dim, kv_dim, tensors.wk},
         {"attn_v.weight", dim, kv_dim, tensors.wv},
         {"attn_output.weight", dim, dim, tensors.wo},
         {"ffn_norm.weight", dim, 1, tensors.rms_ffn},
         {"ffn_gate.weight", dim, hidden, tensors.w1},
         {"ffn_down.weight", hidden, dim, tensors.w2},
         {"ffn_up.weight", dim, hidden, tensors.w3}};
    for (const auto& [name, cols, rows, first] : layer_tensors) {
      wanted.push_back({blk + name, cols, rows, first + l * cols * rows});
    }
  }
  for (const Wanted& w : wanted) {
    const model::GgufTensorInfo* info = file->FindTensor(w.name);
    const bool vector_ok = w.rows == 1 && info != nullptr &&
                           info->dims.size() == 1 && info->dims[0] == w.cols;
    const bool matrix_ok = info != nullptr && info->dims.size() == 2 &&
                           info->dims[0] == w.cols && info->dims[1] == w.rows;
    if (!vector_ok && !matrix_ok) {
      return absl::InvalidArgumentError(
          absl::StrCat(path, ": tensor ", w.name,
                       info == nullptr ? " is missing" : " has the wrong shape",
                       "; expected [", w.cols,
                       w.rows == 1 ? "" : absl::StrCat(", ", w.rows), "]"));
    }
  }
  std::vector<float> weights(tensors.end);
  for (const Wanted& w : wanted) {
    absl::StatusOr<std::vector<float>> values = file->ReadF32(w.name);
    if (!values.ok()) return values.status();
    std::copy(values->begin(), values->end(), weights.begin() + w.at);
  }
  return LlamaModel(config, tensors, std::move(weights));
}

LlamaModel::Tensors LlamaModel::Layout(const LlamaConfig& config,
                                       bool legacy_rope_table) {
  const uint64_t dim = config.dim, hidden = config.hidden_dim,
                 layers = config.layers, vocab = config.vocab_size,
                 kv_dim = config.kv_dim();
  // Tensors lie back to back in this order.
  uint64_t offset = 0;
  auto take = [&offset](uint64_t floats) {
    const uint64_t at = offset;
    offset += floats;
    return at;
  };
  Tensors t;
  t.embedding = take(vocab * dim);
  t.rms_att = take(layers * dim);
  t.wq = take(layers * dim * dim);
  t.wk = take(layers * kv_dim * dim);
  t.wv = take(layers * kv_dim * dim);
  t.wo = take(layers * dim * dim);
  t.rms_ffn = take(layers * dim);
  t.w1 = take(layers * hidden * dim);
  t.w2 = take(layers * dim * hidden);
  t.w3 = take(layers * hidden * dim);
  t.rms_final = take(dim);
  // Legacy RoPE cos and sin tables, [seq_len][head_dim / 2] each; RoPE is
  // recomputed in double instead.
  if (legacy_rope_table) {
    take(static_cast<uint64_t>(config.seq_len) * config.head_dim());
  }
  t.classifier = config.shared_classifier ? t.embedding : take(vocab * dim);
  t.end = offset;
  return t;
}

LlamaModel::LlamaModel(const LlamaConfig& config, const Tensors& tensors,
                       std::vector<float> weights)
    : config_(config), weights_(std::move(weights)), tensors_(tensors) {
  const int half = config.head_dim() / 2;
  rope_freq_.resize(half);
  for (int j = 0; j < half; ++j) {
    rope_freq_[j] =
        1.0 / std::pow(config.rope_theta, 2.0 * j / config.head_dim());
  }
}

KvCacheShape LlamaModel::CacheShape(int block_tokens, int num_blocks) const {
  KvCacheShape shape;
  shape.layers = config_.layers;
  shape.kv_heads = config_.kv_heads;
  shape.head_dim = config_.head_dim();
  shape.block_tokens = block_tokens;
  shape.num_blocks = num_blocks;
  return shape;
}

absl::StatusOr<std::vector<float>> LlamaModel::Prefill(
    PagedKvCache* cache, SequenceId seq, absl::Span<const int32_t> tokens,
    LogitsFor logits_for, PrefillTrace* trace) const {
  const KvCacheShape& shape = cache->shape();
  if (shape.layers != config_.layers || shape.kv_heads != config_.kv_heads ||
      shape.head_dim != config_.head_dim()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "KV cache shape (layers=", shape.layers, " kv_heads=", shape.kv_heads,
        " head_dim=", shape.head_dim,
        ") does not fit the model (layers=", config_.layers,
        " kv_heads=", config_.kv_heads, " head_dim=", config_.head_dim(), ")"));
  }
  if (tokens.empty()) return absl::InvalidArgumentError("no tokens to run");
  for (int32_t token : tokens) {
    if (token < 0 || token >= config_.vocab_size) {
      return absl::InvalidArgumentError(absl::StrCat(
          "token ", token, " outside the vocabulary of ", config_.vocab_size));
    }
  }
  absl::StatusOr<int> start = cache->Length(seq);
  if (!start.ok()) return start.status();
  if (tokens.size() > static_cast<size_t>(config_.seq_len - *start)) {
    return absl::OutOfRangeError(absl::StrCat(
        *start, " + ", tokens.size(), " tokens exceed the model's context of ",
        config_.seq_len));
  }
  if (absl::Status status = cache->Extend(seq, tokens.size()); !status.ok()) {
    return status;
  }
  absl::StatusOr<std::vector<float>> logits =
      Run(cache, seq, *start, tokens, logits_for, trace);
  if (!logits.ok()) cache->Truncate(seq, *start).IgnoreError();
  return logits;
}

absl::StatusOr<std::vector<float>> LlamaModel::Run(
    PagedKvCache* cache, SequenceId seq, int start,
    absl::Span<const int32_t> tokens, LogitsFor logits_for,
    PrefillTrace* trace) const {
  const LlamaConfig& c = config_;
  const int n = static_cast<int>(tokens.size());
  const int end = start + n;
  const int head_dim = c.head_dim(), kv_dim = c.kv_dim();
  const int half = head_dim / 2;
  const size_t dim = c.dim, hidden = c.hidden_dim;

  // Activations for all n tokens, row t being token t.
  std::vector<float> x(n * dim), xb(n * dim), q(n * dim), attended(n * dim);
  std::vector<float> k(n * kv_dim), v(n * kv_dim);
  std::vector<float> h1(n * hidden), h3(n * hidden);
  // The whole sequence's keys and values of one layer, widened from fp16.
  std::vector<float> keys(static_cast<size_t>(end) * kv_dim),
      values(static_cast<size_t>(end) * kv_dim);

  std::vector<double> cos_pos(static_cast<size_t>(n) * half),
      sin_pos(static_cast<size_t>(n) * half);
  for (int t = 0; t < n; ++t) {
    for (int j = 0; j < half; ++j) {
      const double angle = static_cast<double>(start + t) * rope_freq_[j];
      cos_pos[t * half + j] = std::cos(angle);
      sin_pos[t * half + j] = std::sin(angle);
    }
  }
  for (int t = 0; t < n; ++t) {
    const float* row = weights_.data() + tensors_.embedding + tokens[t] * dim;
    std::copy(row, row + dim, x.begin() + t * dim);
  }

  for (int l = 0; l < c.layers; ++l) {
    RmsNorm(x.data(), LayerTensor(tensors_.rms_att, l, dim), dim, n, c.rms_eps,
            xb.data());
    MatMul(LayerTensor(tensors_.wq, l, dim * dim), dim, dim, xb.data(), n,
           q.data());
    MatMul(LayerTensor(tensors_.wk, l, kv_dim * dim), kv_dim, dim, xb.data(), n,
           k.data());
    MatMul(LayerTensor(tensors_.wv, l, kv_dim * dim), kv_dim, dim, xb.data(), n,
           v.data());
    for (int t = 0; t < n; ++t) {
      Rope(&q[t * dim], dim, head_dim, &cos_pos[t * half], &sin_pos[t * half]);
      Rope(&k[t * kv_dim], kv_dim, head_dim, &cos_pos[t * half],
           &sin_pos[t * half]);
    }
    if (trace != nullptr) {
      if (l == 0) trace->queries.resize(c.layers * n * dim);
      std::transform(q.begin(), q.end(),
                     trace->queries.begin() + static_cast<size_t>(l) * n * dim,
                     codec::FloatToHalf);
    }
    // Round trip through the cache first: attention must see the stored
    // fp16 values, including for the tokens of this very call.
    if (absl::Status s = cache->Write(seq, l, start, n, k, v); !s.ok()) {
      return s;
    }
    if (absl::Status s = cache->Gather(seq, l, end, absl::MakeSpan(keys),
                                       absl::MakeSpan(values));
        !s.ok()) {
      return s;
    }

    Attend(q.data(), keys.data(), values.data(), n, start, c.heads, c.kv_heads,
           head_dim, attended.data());
    MatMul(LayerTensor(tensors_.wo, l, dim * dim), dim, dim, attended.data(), n,
           xb.data());
    AddInPlace(x.data(), xb.data(), x.size());

    RmsNorm(x.data(), LayerTensor(tensors_.rms_ffn, l, dim), dim, n, c.rms_eps,
            xb.data());
    MatMul(LayerTensor(tensors_.w1, l, hidden * dim), hidden, dim, xb.data(), n,
           h1.data());
    MatMul(LayerTensor(tensors_.w3, l, hidden * dim), hidden, dim, xb.data(), n,
           h3.data());
    SwiGlu(h1.data(), h3.data(), h1.size());
    MatMul(LayerTensor(tensors_.w2, l, dim * hidden), dim, hidden, h1.data(), n,
           xb.data());
    AddInPlace(x.data(), xb.data(), x.size());
  }

  const int first = logits_for == LogitsFor::kLastToken ? n - 1 : 0;
  const int rows = n - first;
  RmsNorm(&x[first * dim], weights_.data() + tensors_.rms_final, dim, rows,
          c.rms_eps, xb.data());
  std::vector<float> logits(static_cast<size_t>(rows) * c.vocab_size);
  MatMul(weights_.data() + tensors_.classifier, c.vocab_size, dim, xb.data(),
         rows, logits.data());
  return logits;
}

}  // namespace kvcache::chat
