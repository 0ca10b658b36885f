#include "kernels/ops.hpp"

#include <cmath>

namespace celer {

void rmsnorm(const VecKernels& vk, const float* x, const float* weight, float eps, int64_t n, float* out) {
  const float mean_sq = vk.dot_f32(x, x, n) / static_cast<float>(n);
  const float scale = 1.0f / std::sqrt(mean_sq + eps);
  for (int64_t i = 0; i < n; ++i) out[i] = x[i] * scale * weight[i];
}

void rope_angles(int64_t pos, int n_rot, float freq_base, float* cos_sin) {
  // Computed in double: at position 4096 a float angle would already be off by ~1e-4 rad.
  for (int i = 0; i < n_rot / 2; ++i) {
    const double theta = static_cast<double>(pos) * std::pow(static_cast<double>(freq_base), -2.0 * i / n_rot);
    cos_sin[2 * i] = static_cast<float>(std::cos(theta));
    cos_sin[2 * i + 1] = static_cast<float>(std::sin(theta));
  }
}

void rope_apply(float* x, int n_rot, const float* cos_sin, RopeStyle style) {
  const int half = n_rot / 2;
  for (int i = 0; i < half; ++i) {
    const float c = cos_sin[2 * i], s = cos_sin[2 * i + 1];
    float* a = style == RopeStyle::normal ? x + 2 * i : x + i;
    float* b = style == RopeStyle::normal ? x + 2 * i + 1 : x + i + half;
    const float x0 = *a, x1 = *b;
    *a = x0 * c - x1 * s;
    *b = x0 * s + x1 * c;
  }
}

}  // namespace celer
