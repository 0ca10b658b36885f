#include "kernels/attention.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

namespace celer {

void attend(const VecKernels& vk, const float* q, const KvLayerView& kv, int kv_head, const int32_t* block_table,
            int32_t n_ctx, float scale, float* scores, float* out) {
  const int bs = kv.block_size;
  const int hd = kv.head_dim;
  float max = -std::numeric_limits<float>::infinity();
  for (int32_t j0 = 0; j0 < n_ctx; j0 += bs) {
    const float* kb = kv.k + kv.offset(block_table[j0 / bs], kv_head, 0);
    const int n = std::min(bs, n_ctx - j0);
    for (int s = 0; s < n; ++s) {
      const float v = vk.dot_f32(kb + s * hd, q, hd) * scale;
      scores[j0 + s] = v;
      max = std::max(max, v);
    }
  }
  const float inv_sum = 1.0f / vk.exp_sum(scores, n_ctx, max);
  std::memset(out, 0, sizeof(float) * hd);
  for (int32_t j0 = 0; j0 < n_ctx; j0 += bs) {
    const float* vb = kv.v + kv.offset(block_table[j0 / bs], kv_head, 0);
    const int n = std::min(bs, n_ctx - j0);
    for (int s = 0; s < n; ++s) vk.axpy(scores[j0 + s] * inv_sum, vb + s * hd, out, hd);
  }
}

void attend_reference(const float* q, const KvLayerView& kv, int kv_head, const int32_t* block_table,
                      int32_t n_ctx, float scale, float* out) {
  const int hd = kv.head_dim;
  std::vector<double> s(n_ctx);
  double max = -1e300;
  for (int32_t j = 0; j < n_ctx; ++j) {
    const float* k = kv.k + kv.offset(block_table[j / kv.block_size], kv_head, j % kv.block_size);
    double d = 0;
    for (int i = 0; i < hd; ++i) d += static_cast<double>(k[i]) * q[i];
    s[j] = d * scale;
    max = std::max(max, s[j]);
  }
  double sum = 0;
  for (double& x : s) sum += (x = std::exp(x - max));
  for (int i = 0; i < hd; ++i) {
    double acc = 0;
    for (int32_t j = 0; j < n_ctx; ++j)
      acc += s[j] * kv.v[kv.offset(block_table[j / kv.block_size], kv_head, j % kv.block_size) + i];
    out[i] = static_cast<float>(acc / sum);
  }
}

}  // namespace celer
