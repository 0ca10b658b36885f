#include "kernels/attention.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

namespace celer {

void kv_store(const KvLayerView& kv, int32_t block, int kv_head, int slot, const float* k, const float* v) {
  float* kb = kv.k + kv.block_offset(block, kv_head) + slot;
  for (int d = 0; d < kv.head_dim; ++d) kb[d * kKvBlock] = k[d];
  std::memcpy(kv.v + kv.block_offset(block, kv_head) + static_cast<int64_t>(slot) * kv.head_dim, v,
              sizeof(float) * kv.head_dim);
}

void attend(const VecKernels& vk, const float* q, const KvLayerView& kv, int kv_head, const int32_t* block_table,
            int32_t n_ctx, float scale, float* scores, float* out) {
  const int hd = kv.head_dim;
  const int32_t n_blocks = (n_ctx + kKvBlock - 1) / kKvBlock;
  // Scores of whole blocks; the slots past n_ctx in the last block are computed and ignored.
  for (int32_t b = 0; b < n_blocks; ++b)
    vk.attn_scores(kv.k + kv.block_offset(block_table[b], kv_head), q, hd, scale, scores + b * kKvBlock);
  const float max = *std::max_element(scores, scores + n_ctx);
  const float sum = vk.exp_sum(scores, n_ctx, max);
  std::memset(out, 0, sizeof(float) * hd);
  for (int32_t b = 0; b < n_blocks; ++b)
    vk.attn_accumulate(kv.v + kv.block_offset(block_table[b], kv_head), scores + b * kKvBlock,
                       std::min(kKvBlock, n_ctx - b * kKvBlock), hd, out);
  const float inv = 1.0f / sum;
  for (int d = 0; d < hd; ++d) out[d] *= inv;
}

void attend_reference(const float* q, const KvLayerView& kv, int kv_head, const int32_t* block_table,
                      int32_t n_ctx, float scale, float* out) {
  const int hd = kv.head_dim;
  std::vector<double> s(n_ctx);
  double max = -1e300;
  for (int32_t j = 0; j < n_ctx; ++j) {
    double d = 0;
    for (int i = 0; i < hd; ++i) d += static_cast<double>(kv.k_at(block_table[j / kKvBlock], kv_head, j % kKvBlock, i)) * q[i];
    s[j] = d * scale;
    max = std::max(max, s[j]);
  }
  double sum = 0;
  for (double& x : s) sum += (x = std::exp(x - max));
  for (int i = 0; i < hd; ++i) {
    double acc = 0;
    for (int32_t j = 0; j < n_ctx; ++j) acc += s[j] * kv.v_at(block_table[j / kKvBlock], kv_head, j % kKvBlock, i);
    out[i] = static_cast<float>(acc / sum);
  }
}

}  // namespace celer
