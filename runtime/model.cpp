#include "runtime/model.hpp"

#include "kernels/attention.hpp"
#include "kernels/low_bit_packed.hpp"
#include "kernels/quants.hpp"

#include "runtime/error.hpp"

namespace celer {
namespace {

std::string shape_string(const int64_t* ne, int n) {
  std::string s = "[";
  for (int i = 0; i < n; ++i) s += (i ? ", " : "") + std::to_string(ne[i]);
  return s + "]";
}

class Loader {
 public:
  Loader(const GgufFile& f, std::vector<std::unique_ptr<BlockQ8_0[]>>& converted) : f_(f), converted_(converted) {}

  const GgufTensor& tensor(const std::string& name, std::initializer_list<int64_t> shape) const {
    const GgufTensor* t = f_.find_tensor(name);
    if (!t) throw Error(ErrorCode::invalid_file, f_.path() + ": missing tensor '" + name + "'");
    check_shape(*t, shape);
    return *t;
  }
  const GgufTensor* optional(const std::string& name, std::initializer_list<int64_t> shape) const {
    const GgufTensor* t = f_.find_tensor(name);
    if (t) check_shape(*t, shape);
    return t;
  }
  WeightMatrix matrix(const std::string& name, int64_t cols, int64_t rows) const {
    const GgufTensor& t = tensor(name, {cols, rows});
    // 4- to 6-bit matrices are packed by the engine as they are (kernels/low_bit_packed.hpp).
    if (is_compute_type(t.type) || packed_low_bits(t.type) != 0) return WeightMatrix{t.type, t.data, rows, cols};
    // Q2_K and Q3_K: converted once to Q8_0, which the kernels compute with
    // (kernels/quants.hpp says what that costs in precision).
    const int64_t blocks_per_row = cols / kQ8Block;
    converted_.push_back(std::make_unique<BlockQ8_0[]>(static_cast<size_t>(blocks_per_row * rows)));
    BlockQ8_0* out = converted_.back().get();
    const auto* in = static_cast<const uint8_t*>(t.data);
    for (int64_t r = 0; r < rows; ++r)
      convert_row_to_q8_0(t.type, in + r * row_bytes(t.type, cols), out + r * blocks_per_row, cols);
    return WeightMatrix{TensorType::q8_0, out, rows, cols};
  }
  // Norm weights and biases are tiny: copy them to f32 whatever their stored type.
  std::vector<float> vector(const GgufTensor& t) const {
    std::vector<float> v(static_cast<size_t>(t.ne[0]));
    row_to_f32(vec_scalar(), t.type, t.data, v.data(), t.ne[0]);
    return v;
  }
  std::vector<float> vector(const std::string& name, int64_t n) const { return vector(tensor(name, {n})); }

 private:
  void check_shape(const GgufTensor& t, std::initializer_list<int64_t> shape) const {
    const int n = static_cast<int>(shape.size());
    bool ok = t.n_dims == n;
    int i = 0;
    for (int64_t want : shape) ok = ok && t.ne[i++] == want;
    if (!ok)
      throw Error(ErrorCode::invalid_file, f_.path() + ": tensor '" + t.name + "' has shape " +
                                               shape_string(t.ne, t.n_dims) + " but the model's metadata needs " +
                                               shape_string(shape.begin(), n));
  }
  const GgufFile& f_;
  std::vector<std::unique_ptr<BlockQ8_0[]>>& converted_;
};

}  // namespace

Model::Model(const std::string& path) : file_(std::make_shared<GgufFile>(path)), card_(std::make_shared<ModelCard>(file_)) {
  const GgufFile& f = *file_;
  const ModelConfig& c = card_->config();
  Loader load(f, converted_);

  const GgufTensor* embd = f.find_tensor("token_embd.weight");
  if (!embd) throw Error(ErrorCode::invalid_file, path + ": missing tensor 'token_embd.weight'");
  const int64_t rows = embd->n_dims == 2 ? embd->ne[1] : 0;
  if (rows != c.n_vocab)
    throw Error(ErrorCode::invalid_file, path + ": the tokenizer has " + std::to_string(c.n_vocab) +
                                             " tokens but token_embd.weight has " + std::to_string(rows) + " rows");
  token_embd_ = load.matrix("token_embd.weight", c.n_embd, c.n_vocab);
  output_norm_ = load.vector("output_norm.weight", c.n_embd);
  // Models with tied embeddings (Qwen2 0.5B, TinyStories variants) have no output.weight.
  output_ = load.optional("output.weight", {c.n_embd, c.n_vocab}) ? load.matrix("output.weight", c.n_embd, c.n_vocab)
                                                                 : token_embd_;

  const int64_t q_dim = int64_t{c.n_head} * c.head_dim;
  const int64_t kv_dim = int64_t{c.n_head_kv} * c.head_dim;
  layers_.resize(c.n_layer);
  for (int i = 0; i < c.n_layer; ++i) {
    const std::string p = "blk." + std::to_string(i) + ".";
    LayerWeights& l = layers_[i];
    l.attn_norm = load.vector(p + "attn_norm.weight", c.n_embd);
    const bool glm = c.arch == Architecture::chatglm;
    if (glm && f.find_tensor(p + "attn_qkv.weight")) {
      // GLM's fused QKV: the rows of Q, then K, then V, as are its bias's elements. The engine
      // computes with views of the three row ranges, as with separate tensors.
      const int64_t n = q_dim + 2 * kv_dim;
      const WeightMatrix qkv = load.matrix(p + "attn_qkv.weight", c.n_embd, n);
      l.wq = qkv.rows_view(0, q_dim);
      l.wk = qkv.rows_view(q_dim, kv_dim);
      l.wv = qkv.rows_view(q_dim + kv_dim, kv_dim);
      if (const GgufTensor* b = load.optional(p + "attn_qkv.bias", {n})) {
        const std::vector<float> bias = load.vector(*b);
        l.bq.assign(bias.begin(), bias.begin() + q_dim);
        l.bk.assign(bias.begin() + q_dim, bias.begin() + q_dim + kv_dim);
        l.bv.assign(bias.begin() + q_dim + kv_dim, bias.end());
      }
    } else {
      l.wq = load.matrix(p + "attn_q.weight", c.n_embd, q_dim);
      l.wk = load.matrix(p + "attn_k.weight", c.n_embd, kv_dim);
      l.wv = load.matrix(p + "attn_v.weight", c.n_embd, kv_dim);
      if (c.arch == Architecture::qwen2) {
        l.bq = load.vector(p + "attn_q.bias", q_dim);
        l.bk = load.vector(p + "attn_k.bias", kv_dim);
        l.bv = load.vector(p + "attn_v.bias", kv_dim);
      } else if (glm) {  // GLM written with separate Q, K, V: their biases are optional
        if (const GgufTensor* b = load.optional(p + "attn_q.bias", {q_dim})) l.bq = load.vector(*b);
        if (const GgufTensor* b = load.optional(p + "attn_k.bias", {kv_dim})) l.bk = load.vector(*b);
        if (const GgufTensor* b = load.optional(p + "attn_v.bias", {kv_dim})) l.bv = load.vector(*b);
      }
    }
    l.wo = load.matrix(p + "attn_output.weight", q_dim, c.n_embd);
    l.ffn_norm = load.vector(p + "ffn_norm.weight", c.n_embd);
    if (glm) {
      // GLM's fused gate-and-up: rows [0, n_ff) go through SiLU and multiply rows [n_ff, 2 n_ff).
      const WeightMatrix up = load.matrix(p + "ffn_up.weight", c.n_embd, 2 * int64_t{c.n_ff});
      l.w_gate = up.rows_view(0, c.n_ff);
      l.w_up = up.rows_view(c.n_ff, c.n_ff);
    } else {
      l.w_gate = load.matrix(p + "ffn_gate.weight", c.n_embd, c.n_ff);
      l.w_up = load.matrix(p + "ffn_up.weight", c.n_embd, c.n_ff);
    }
    l.w_down = load.matrix(p + "ffn_down.weight", c.n_ff, c.n_embd);
  }
}

uint64_t Model::weight_bytes_per_token() const {
  auto bytes = [](const WeightMatrix& w) { return static_cast<uint64_t>(row_bytes(w.type, w.cols)) * w.rows; };
  uint64_t total = bytes(output_) + row_bytes(token_embd_.type, token_embd_.cols);
  for (const LayerWeights& l : layers_)
    total += bytes(l.wq) + bytes(l.wk) + bytes(l.wv) + bytes(l.wo) + bytes(l.w_gate) + bytes(l.w_up) + bytes(l.w_down);
  return total;
}

TensorType Model::stored_type() const {
  const GgufTensor* t = file_->find_tensor(layers_.empty() ? "output.weight" : "blk.0.ffn_up.weight");
  return t ? t->type : main_type();
}

uint64_t Model::n_params() const {
  uint64_t n = 0;
  for (const GgufTensor& t : file_->tensors()) n += static_cast<uint64_t>(t.n_elements());
  return n;
}

}  // namespace celer
