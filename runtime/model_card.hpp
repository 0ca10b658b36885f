// What a GGUF model file says about itself, read from its metadata alone: the architecture and
// hyper-parameters, the tokenizer, the name and the chat template. No weight is read: a node that
// only tokenizes and routes (the router's, a gateway's) holds a card and not the Model, and its
// copy of the file may be a vocab-only GGUF of the same model. A Model has a card of its own.
#pragma once

#include <memory>
#include <string>

#include "kernels/ops.hpp"  // RopeStyle
#include "runtime/gguf.hpp"
#include "runtime/tokenizer.hpp"

namespace celer {

enum class Architecture { llama, qwen2, chatglm };

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
  int n_rot = 0;        // rotated dimensions of each head (head_dim for Llama and Qwen2, half of it for GLM)
  float rms_eps = 1e-5f;
  float rope_freq_base = 10000.0f;
  RopeStyle rope_style = RopeStyle::normal;
};

class ModelCard {
 public:
  explicit ModelCard(const std::string& path);  // throws Error naming the file and the problem
  explicit ModelCard(std::shared_ptr<const GgufFile> file);

  // n_vocab is the tokenizer's (a Model checks that its embedding has as many rows).
  const ModelConfig& config() const { return config_; }
  const Tokenizer& tokenizer() const { return *tokenizer_; }
  const std::string& name() const { return name_; }                     // general.name, else the path
  const std::string& chat_template() const { return chat_template_; }   // "" when the file has none
  const GgufFile& file() const { return *file_; }

 private:
  std::shared_ptr<const GgufFile> file_;
  std::unique_ptr<Tokenizer> tokenizer_;
  ModelConfig config_;
  std::string name_;
  std::string chat_template_;
};

}  // namespace celer
