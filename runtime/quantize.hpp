// `celer quantize`: a GGUF file rewritten with its weight matrices in another type, by the
// preset rules llama.cpp's quantizer applies (so a Q4_K_M made here is laid out like the Q4_K_M
// files people download, and llama.cpp reads it):
//
//   preset           matrices   output.weight (token_embd when tied)   attn_v / ffn_down
//   f16 bf16 q8_0    the type   the type                               the type
//   q4_0 q4_1 q5_0   the type   Q6_K                                   the type
//   q5_1 q6_k
//   q4_k_s           Q4_K       Q6_K                                   Q5_K in the first 4 (attn_v) / first 1/8 (ffn_down) layers
//   q5_k_s           Q5_K       Q6_K                                   Q5_K
//   q4_k_m           Q4_K       Q6_K                                   Q6_K in the first and last 1/8 of the layers and every third between
//   q5_k_m           Q5_K       Q6_K                                   Q6_K, the same layers
//
// A matrix whose rows a K-quant's 256-weight super-blocks do not divide takes Q5_0 for Q4_K,
// Q5_1 for Q5_K and Q8_0 for Q6_K (F16 when even 32 does not divide them), as llama.cpp does.
// 1-D tensors (norms, biases) stay F32. The metadata is copied, with general.file_type set to
// the preset's number.
#pragma once

#include <cstdint>
#include <functional>
#include <optional>
#include <string>

#include "kernels/types.hpp"

namespace celer {

enum class QuantizePreset { f16, bf16, q8_0, q4_0, q4_1, q5_0, q5_1, q6_k, q4_k_s, q4_k_m, q5_k_s, q5_k_m };

std::optional<QuantizePreset> quantize_preset_from_name(const std::string& name);  // "q4_k_m", ...
const char* quantize_preset_names();  // for messages: "f16, bf16, q8_0, ..."

// The type the preset gives a 2-D tensor `name` (rows of `row_length`) in a model of `n_layer`
// blocks; `layer` is its block's index (-1 outside the blocks).
TensorType preset_tensor_type(QuantizePreset preset, const std::string& name, int64_t row_length, int layer, int n_layer,
                              bool has_output);

// Reads `in`, writes `out`. `progress` (if set) hears each tensor as it is done: (done, total).
// Throws Error naming the file and the problem (unreadable input, a tensor type celer does not
// read, an output that cannot be written).
void quantize_file(const std::string& in, const std::string& out, QuantizePreset preset,
                   const std::function<void(size_t done, size_t total)>& progress = {});

}  // namespace celer
