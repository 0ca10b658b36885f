// celer make-model: write a random-weight GGUF model of any shape.
#include <cstdio>
#include <string>

#include "cluster/cli/commands.hpp"
#include "runtime/error.hpp"
#include "runtime/model_maker.hpp"
#include "runtime/quantize.hpp"

namespace celer::cli {

Command add_make_model(CLI::App& app) {
  auto spec = std::make_shared<ModelSpec>();
  auto type = std::make_shared<std::string>("f32");
  auto out = std::make_shared<std::string>();
  CLI::App* c = app.add_subcommand("make-model", "Write a random-weight GGUF model (tokenizer from a vocab GGUF)");
  c->add_option("--arch", spec->arch, "llama, qwen2 or chatglm (GLM-4 layout, with GLM's special tokens added to the vocab)");
  c->add_option("--dim", spec->dim, "Embedding size");
  c->add_option("--layers", spec->layers, "Transformer blocks");
  c->add_option("--heads", spec->heads, "Attention heads");
  c->add_option("--kv-heads", spec->kv_heads, "Key/value heads (grouped-query attention)");
  c->add_option("--ffn", spec->ffn, "Feed-forward size");
  c->add_option("--context", spec->context, "Context length written to the metadata");
  c->add_option("--vocab", spec->vocab_path, "GGUF file to copy the tokenizer from")->required();
  c->add_option("--type", *type,
                 "Weight type: f32, f16, bf16, q8_0, q4_0, q4_1, q5_0, q5_1, q4_k, q5_k, q6_k (every matrix), or a "
                 "preset of celer quantize: q4_k_s, q4_k_m, q5_k_s, q5_k_m");
  c->add_option("--seed", spec->seed, "Random seed (the same seed gives the same f32 values for every type)");
  c->add_option("out", *out, "Output GGUF path")->required();
  return [spec, type, out] {
    if (tensor_type_from_string(type->c_str(), &spec->type)) {
      make_model(*spec, *out);
    } else if (const auto preset = quantize_preset_from_name(*type)) {
      // A preset mixes types by tensor: the F32 model first, then celer quantize's rules.
      spec->type = TensorType::f32;
      const std::string f32 = *out + ".f32.tmp";
      make_model(*spec, f32);
      try {
        quantize_file(f32, *out, *preset);
      } catch (...) {
        std::remove(f32.c_str());
        throw;
      }
      std::remove(f32.c_str());
    } else {
      throw Error(ErrorCode::invalid_argument, "--type must be f32, f16, bf16, q8_0, q4_0, q4_1, q5_0, q5_1, q4_k, q5_k, q6_k, "
                                               "q4_k_s, q4_k_m, q5_k_s or q5_k_m, not '" + *type + "'");
    }
    std::fprintf(stderr, "wrote %s\n", out->c_str());
    return 0;
  };
}

}  // namespace celer::cli
