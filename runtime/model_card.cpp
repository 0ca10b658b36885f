#include "runtime/model_card.hpp"

#include "kernels/attention.hpp"  // kMaxHeadDim
#include "runtime/error.hpp"

namespace celer {
namespace {

int positive(const GgufFile& f, const std::string& key, int64_t v) {
  if (v <= 0 || v > (1 << 24))
    throw Error(ErrorCode::invalid_file, f.path() + ": metadata '" + key + "' = " + std::to_string(v) + " is out of range");
  return static_cast<int>(v);
}

ModelConfig read_config(const GgufFile& f) {
  ModelConfig c;
  c.arch_name = f.get_string("general.architecture");
  if (c.arch_name == "llama") {
    c.arch = Architecture::llama;
    c.rope_style = RopeStyle::normal;
  } else if (c.arch_name == "qwen2") {
    c.arch = Architecture::qwen2;
    c.rope_style = RopeStyle::neox;
  } else if (c.arch_name == "chatglm") {
    // ChatGLM3 and GLM-4 rotate adjacent pairs of the first rope.dimension_count (half) of each
    // head's dimensions, as llama.cpp computes them (its LLAMA_ROPE_TYPE_NORM for chatglm).
    c.arch = Architecture::chatglm;
    c.rope_style = RopeStyle::normal;
  } else {
    throw Error(ErrorCode::unsupported,
                f.path() + ": architecture '" + c.arch_name + "' is not supported (llama, qwen2, chatglm are)");
  }
  const std::string a = c.arch_name + ".";
  auto get = [&](const std::string& key) { return positive(f, a + key, f.get_int(a + key)); };
  auto get_or = [&](const std::string& key, int64_t d) { return positive(f, a + key, f.get_int(a + key, d)); };
  c.n_embd = get("embedding_length");
  c.n_layer = get("block_count");
  c.n_ff = get("feed_forward_length");
  c.n_head = get("attention.head_count");
  c.n_head_kv = get_or("attention.head_count_kv", c.n_head);
  c.n_ctx_train = get_or("context_length", 2048);
  if (c.n_embd % c.n_head != 0 && !f.has(a + "attention.key_length"))
    throw Error(ErrorCode::invalid_file, f.path() + ": embedding_length is not a multiple of head_count");
  c.head_dim = get_or("attention.key_length", c.n_embd / c.n_head);
  if (c.head_dim < 1 || c.head_dim > kMaxHeadDim)
    throw Error(ErrorCode::unsupported, f.path() + ": head size " + std::to_string(c.head_dim) + " is outside 1.." +
                                            std::to_string(kMaxHeadDim));
  if (f.get_int(a + "attention.value_length", c.head_dim) != c.head_dim)
    throw Error(ErrorCode::unsupported, f.path() + ": key and value head sizes differ");
  if (c.n_head % c.n_head_kv != 0)
    throw Error(ErrorCode::invalid_file, f.path() + ": head_count " + std::to_string(c.n_head) +
                                             " is not a multiple of head_count_kv " + std::to_string(c.n_head_kv));
  c.n_rot = get_or("rope.dimension_count", c.head_dim);
  if (c.n_rot > c.head_dim || c.n_rot % 2 != 0)
    throw Error(ErrorCode::invalid_file, f.path() + ": rope.dimension_count " + std::to_string(c.n_rot) +
                                             " must be even and at most the head size " + std::to_string(c.head_dim));
  c.rms_eps = static_cast<float>(f.get_float(a + "attention.layer_norm_rms_epsilon", 1e-5));
  c.rope_freq_base = static_cast<float>(f.get_float(a + "rope.freq_base", 10000.0));
  if (!(c.rms_eps > 0) || !(c.rope_freq_base > 0))
    throw Error(ErrorCode::invalid_file, f.path() + ": rms epsilon and rope.freq_base must be positive");
  return c;
}

}  // namespace

ModelCard::ModelCard(const std::string& path) : ModelCard(std::make_shared<GgufFile>(path)) {}

ModelCard::ModelCard(std::shared_ptr<const GgufFile> file) : file_(std::move(file)) {
  const GgufFile& f = *file_;
  config_ = read_config(f);
  tokenizer_ = std::make_unique<Tokenizer>(f);
  config_.n_vocab = tokenizer_->n_vocab();
  name_ = f.get_string("general.name", f.path());
  chat_template_ = f.get_string("tokenizer.chat_template", "");
}

}  // namespace celer
