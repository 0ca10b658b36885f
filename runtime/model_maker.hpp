// Writes random-weight models of any size as GGUF, with the tokenizer copied from a vocab-only
// GGUF. The arithmetic and memory traffic are those of a trained model of the same shape, which
// is what speed work and tests of big shapes need.
#pragma once

#include <cstdint>
#include <string>

#include "kernels/types.hpp"

namespace celer {

struct ModelSpec {
  std::string arch = "llama";  // llama, qwen2 or chatglm (GLM-4 shaped: fused QKV and gate-up)
  int dim = 768;
  int layers = 12;
  int heads = 12;
  int kv_heads = 12;
  int ffn = 2048;
  int context = 2048;
  std::string vocab_path;  // GGUF with tokenizer.ggml.* metadata
  TensorType type = TensorType::f32;
  uint64_t seed = 1;
};

void make_model(const ModelSpec& spec, const std::string& out_path);  // throws Error

}  // namespace celer
