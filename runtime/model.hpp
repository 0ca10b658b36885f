// A decoder-only transformer read from GGUF: its hyper-parameters, views of its weights inside
// the mapped file, and its tokenizer. Architectures: `llama` (Llama 1/2/3, Mistral, TinyStories)
// and `qwen2` (Llama plus biases on Q, K and V, NeoX-ordered RoPE).
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "kernels/matmul.hpp"
#include "kernels/ops.hpp"
#include "runtime/gguf.hpp"
#include "runtime/tokenizer.hpp"

namespace celer {

enum class Architecture { llama, qwen2 };

struct ModelConfig {
  Architecture arch = Architecture::llama;
  std::string arch_name;
  int n_vocab = 0;
  int n_embd = 0;
  int n_layer = 0;
  int n_head = 0;
  int n_head_kv = 0;
  int head_dim = 0;
  int n_ff = 0;
  int n_ctx_train = 0;  // the context length the model was trained for
  int n_rot = 0;        // rotated dimensions of each head (== head_dim for Llama and Qwen2)
  float rms_eps = 1e-5f;
  float rope_freq_base = 10000.0f;
  RopeStyle rope_style = RopeStyle::normal;
};

struct LayerWeights {
  std::vector<float> attn_norm;   // [n_embd]
  WeightMatrix wq, wk, wv, wo;    // [n_head*hd, n_embd], [n_kv*hd, n_embd] x2, [n_embd, n_head*hd]
  std::vector<float> bq, bk, bv;  // qwen2 only, else empty
  std::vector<float> ffn_norm;    // [n_embd]
  WeightMatrix w_gate, w_up;      // [n_ff, n_embd]
  WeightMatrix w_down;            // [n_embd, n_ff]
};

class Model {
 public:
  explicit Model(const std::string& path);  // throws Error naming the file and the problem

  const ModelConfig& config() const { return config_; }
  const Tokenizer& tokenizer() const { return *tokenizer_; }
  const GgufFile& file() const { return *file_; }
  const std::string& name() const { return name_; }

  const WeightMatrix& token_embd() const { return token_embd_; }  // [n_vocab, n_embd]
  const WeightMatrix& output() const { return output_; }          // [n_vocab, n_embd], may alias token_embd
  const std::vector<float>& output_norm() const { return output_norm_; }
  const std::vector<LayerWeights>& layers() const { return layers_; }

  // Bytes of weights one decode step reads: every matrix once, plus one embedding row.
  uint64_t weight_bytes_per_token() const;
  // Total parameters (for reports).
  uint64_t n_params() const;
  // The weight type most matrices have (for reports).
  TensorType main_type() const { return layers_.empty() ? output_.type : layers_[0].w_up.type; }

 private:
  std::unique_ptr<GgufFile> file_;
  std::unique_ptr<Tokenizer> tokenizer_;
  ModelConfig config_;
  std::string name_;
  WeightMatrix token_embd_, output_;
  std::vector<float> output_norm_;
  std::vector<LayerWeights> layers_;
};

}  // namespace celer
