// The small per-token ops of a transformer layer: RMSNorm and rotary position embedding.
#pragma once

#include <cstdint>

#include "kernels/vec.hpp"

namespace celer {

// out = x / sqrt(mean(x^2) + eps) * weight          x, out, weight: [n]
void rmsnorm(const VecKernels& vk, const float* x, const float* weight, float eps, int64_t n, float* out);

enum class RopeStyle {
  normal,  // rotate adjacent pairs (x[2i], x[2i+1]): Llama as GGUF stores it
  neox,    // rotate halves (x[i], x[i + n_rot/2]): Qwen2, GPT-NeoX
};

// The rotation of one position: cos_sin[2i], cos_sin[2i+1] = cos, sin of pos * base^(-2i/n_rot).
void rope_angles(int64_t pos, int n_rot, float freq_base, float* cos_sin);  // cos_sin: [n_rot]
// Rotates the first n_rot dimensions of one head vector x: [head_dim].
void rope_apply(float* x, int n_rot, const float* cos_sin, RopeStyle style);

}  // namespace celer
