// A decoder-only transformer read from GGUF: its hyper-parameters, views of its weights inside
// the mapped file, and its tokenizer. Architectures: `llama` (Llama 1/2/3, Mistral, TinyStories),
// `qwen2` (Llama plus biases on Q, K and V, NeoX-ordered RoPE) and `chatglm` (ChatGLM3, GLM-4:
// fused QKV with bias, RoPE over half of each head, fused gate-and-up FFN), laid out as llama.cpp
// writes them. The fused tensors are read as views of their row ranges, so the engine and tensor
// parallelism see the same LayerWeights for every architecture.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "kernels/matmul.hpp"
#include "kernels/ops.hpp"
#include "runtime/gguf.hpp"
#include "runtime/model_card.hpp"
#include "runtime/tokenizer.hpp"

namespace celer {

struct LayerWeights {
  std::vector<float> attn_norm;   // [n_embd]
  WeightMatrix wq, wk, wv, wo;    // [n_head*hd, n_embd], [n_kv*hd, n_embd] x2, [n_embd, n_head*hd]
  std::vector<float> bq, bk, bv;  // qwen2 and chatglm (optional there), else empty
  std::vector<float> ffn_norm;    // [n_embd]
  WeightMatrix w_gate, w_up;      // [n_ff, n_embd]
  WeightMatrix w_down;            // [n_embd, n_ff]
};

class Model {
 public:
  explicit Model(const std::string& path);  // throws Error naming the file and the problem

  const ModelConfig& config() const { return card_->config(); }
  const Tokenizer& tokenizer() const { return card_->tokenizer(); }
  const GgufFile& file() const { return *file_; }
  const std::string& name() const { return card_->name(); }
  // The metadata alone, for what only tokenizes (request actors, gateways); shared, and kept
  // alive by whoever holds it.
  const std::shared_ptr<const ModelCard>& card() const { return card_; }

  const WeightMatrix& token_embd() const { return token_embd_; }  // [n_vocab, n_embd]
  const WeightMatrix& output() const { return output_; }          // [n_vocab, n_embd], may alias token_embd
  const std::vector<float>& output_norm() const { return output_norm_; }
  const std::vector<LayerWeights>& layers() const { return layers_; }

  // Bytes of weights one decode step reads: every matrix once, plus one embedding row.
  uint64_t weight_bytes_per_token() const;
  // Total parameters (for reports).
  uint64_t n_params() const;
  // The weight type most matrices are computed in (for reports), and the type the file stores
  // them in (a Q3_K file is computed in Q8_0: see the converted matrices below).
  TensorType main_type() const { return layers_.empty() ? output_.type : layers_[0].w_up.type; }
  TensorType stored_type() const;

 private:
  std::shared_ptr<const GgufFile> file_;
  std::shared_ptr<const ModelCard> card_;
  // Matrices of Q2_K and Q3_K, converted to Q8_0 at load (the others are views into the
  // mapped file).
  std::vector<std::unique_ptr<BlockQ8_0[]>> converted_;
  WeightMatrix token_embd_, output_;
  std::vector<float> output_norm_;
  std::vector<LayerWeights> layers_;
};

}  // namespace celer
