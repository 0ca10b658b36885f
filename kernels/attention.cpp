#include "kernels/attention.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

namespace celer {

void kv_store(const VecKernels& vk, const KvLayerView& kv, int32_t block, int kv_head, int slot, const float* k,
              const float* v) {
  const int hd = kv.head_dim;
  const int64_t base = kv.block_offset(block, kv_head);
  if (kv.type == TensorType::q8_0) {
    // quantize_act_q8 gives int8 values and a scale per 32 (its bias is not needed here).
    const int nc = hd / kQ8Block;
    int8_t kq[kMaxHeadDim];
    float kd[kMaxHeadDim / kQ8Block];
    int32_t unused[kMaxHeadDim / kQ8Block];
    vk.quantize_act_q8(k, kq, kd, unused, hd);
    int8_t* kb = static_cast<int8_t*>(kv.k) + base + slot;
    for (int d = 0; d < hd; ++d) kb[d * kKvBlock] = kq[d];
    float* ks = kv.k_block_scales(block, kv_head);
    for (int c = 0; c < nc; ++c) ks[c * kKvBlock + slot] = kd[c];
    float* vs = kv.v_block_scales(block, kv_head) + slot * nc;
    vk.quantize_act_q8(v, static_cast<int8_t*>(kv.v) + base + static_cast<int64_t>(slot) * hd, vs, unused, hd);
    return;
  }
  if (kv.type == TensorType::f16) {
    uint16_t* kb = static_cast<uint16_t*>(kv.k) + base + slot;
    uint16_t kh[kMaxHeadDim];
    vk.f32_to_f16_saturating(k, kh, hd);
    for (int d = 0; d < hd; ++d) kb[d * kKvBlock] = kh[d];
    vk.f32_to_f16_saturating(v, static_cast<uint16_t*>(kv.v) + base + static_cast<int64_t>(slot) * hd, hd);
    return;
  }
  float* kb = static_cast<float*>(kv.k) + base + slot;
  for (int d = 0; d < hd; ++d) kb[d * kKvBlock] = k[d];
  std::memcpy(static_cast<float*>(kv.v) + base + static_cast<int64_t>(slot) * hd, v, sizeof(float) * hd);
}

void attend(const VecKernels& vk, const float* q, int64_t q_stride, int nq, const KvLayerView& kv, int head0,
            int n_heads, int group, const int32_t* block_table, int32_t first_ctx, float scale, float* scores,
            int64_t scores_stride, float* out, int64_t out_stride) {
  const int hd = kv.head_dim;
  const int32_t n_blocks = (first_ctx + nq - 1 + kKvBlock - 1) / kKvBlock;
  int kv_heads[kAttnHeads];
  for (int j = 0; j < n_heads; ++j) kv_heads[j] = (head0 + j) / group;
  // Row i of head j: its query, its scores and its output.
  auto query = [&](int j, int i) { return q + i * q_stride + j * hd; };
  auto score_row = [&](int j, int i) { return scores + (j * kAttnRows + i) * scores_stride; };
  auto output = [&](int j, int i) { return out + i * out_stride + j * hd; };

  // A head's block is 16 positions' K (or V): 1-4 KiB, each block somewhere else in the cache.
  // The next block is fetched while this one is worked on (decode attention reads its whole
  // context from memory every step).
  const int64_t block_bytes = int64_t{kKvBlock} * hd * kv.element_bytes();
  auto prefetch = [&](const uint8_t* p) {
    for (int64_t off = 0; off < block_bytes; off += 64) __builtin_prefetch(p + off);
  };
  // Scores of whole blocks, block by block and within a block head by head; slots past a
  // query's context are set to weight 0 below.
  for (int32_t b = 0; b < n_blocks; ++b)
    for (int j = 0; j < n_heads; ++j) {
      const int h = kv_heads[j];
      if (b + 1 < n_blocks) prefetch(kv.k_block(block_table[b + 1], h));
      else prefetch(kv.v_block(block_table[0], h));
      const float* qs[kAttnRows];
      float* ss[kAttnRows];
      for (int i = 0; i < nq; ++i) qs[i] = query(j, i), ss[i] = score_row(j, i) + b * kKvBlock;
      if (kv.type == TensorType::q8_0)
        vk.attn_scores_q8(reinterpret_cast<const int8_t*>(kv.k_block(block_table[b], h)),
                          kv.k_block_scales(block_table[b], h), qs, nq, hd, scale, ss);
      else if (kv.type == TensorType::f16)
        vk.attn_scores_f16(reinterpret_cast<const uint16_t*>(kv.k_block(block_table[b], h)), qs, nq, hd, scale, ss);
      else
        vk.attn_scores(reinterpret_cast<const float*>(kv.k_block(block_table[b], h)), qs, nq, hd, scale, ss);
    }
  float inv_sum[kAttnHeads][kAttnRows];
  for (int j = 0; j < n_heads; ++j)
    for (int i = 0; i < nq; ++i) {
      float* s = score_row(j, i);
      const int32_t n = first_ctx + i;
      const float max = *std::max_element(s, s + n);
      inv_sum[j][i] = 1.0f / vk.exp_sum(s, n, max);
      std::fill(s + n, s + n_blocks * kKvBlock, 0.0f);
      std::memset(output(j, i), 0, sizeof(float) * hd);
    }
  // The last query sees the most slots; past them a block may hold another sequence's stale
  // values, which the weighted sum must not touch (0 * inf is NaN).
  const int32_t n_seen = first_ctx + nq - 1;
  for (int32_t b = 0; b < n_blocks; ++b) {
    const int n_slots = static_cast<int>(std::min<int32_t>(kKvBlock, n_seen - b * kKvBlock));
    for (int j = 0; j < n_heads; ++j) {
      const int h = kv_heads[j];
      if (b + 1 < n_blocks) prefetch(kv.v_block(block_table[b + 1], h));
      const float* ps[kAttnRows];
      float* outs[kAttnRows];
      for (int i = 0; i < nq; ++i) ps[i] = score_row(j, i) + b * kKvBlock, outs[i] = output(j, i);
      if (kv.type == TensorType::q8_0)
        vk.attn_accumulate_q8(reinterpret_cast<const int8_t*>(kv.v_block(block_table[b], h)),
                              kv.v_block_scales(block_table[b], h), ps, nq, hd, n_slots, outs);
      else if (kv.type == TensorType::f16)
        vk.attn_accumulate_f16(reinterpret_cast<const uint16_t*>(kv.v_block(block_table[b], h)), ps, nq, hd, n_slots,
                               outs);
      else
        vk.attn_accumulate(reinterpret_cast<const float*>(kv.v_block(block_table[b], h)), ps, nq, hd, n_slots, outs);
    }
  }
  for (int j = 0; j < n_heads; ++j)
    for (int i = 0; i < nq; ++i) {
      float* o = output(j, i);
      for (int d = 0; d < hd; ++d) o[d] *= inv_sum[j][i];
    }
}

void attend_reference(const float* q, const KvLayerView& kv, int kv_head, const int32_t* block_table,
                      int32_t n_ctx, float scale, float* out) {
  const int hd = kv.head_dim;
  std::vector<double> s(n_ctx);
  double max = -1e300;
  for (int32_t j = 0; j < n_ctx; ++j) {
    double d = 0;
    for (int i = 0; i < hd; ++i) d += static_cast<double>(kv.k_value(block_table[j / kKvBlock], kv_head, j % kKvBlock, i)) * q[i];
    s[j] = d * scale;
    max = std::max(max, s[j]);
  }
  double sum = 0;
  for (double& x : s) sum += (x = std::exp(x - max));
  for (int i = 0; i < hd; ++i) {
    double acc = 0;
    for (int32_t j = 0; j < n_ctx; ++j) acc += s[j] * kv.v_value(block_table[j / kKvBlock], kv_head, j % kKvBlock, i);
    out[i] = static_cast<float>(acc / sum);
  }
}

}  // namespace celer
