// Attention of one query head over a sequence's keys and values stored in a paged KV cache:
// blocks of kKvBlock positions, found through the sequence's block table.
#pragma once

#include <cstdint>

#include "kernels/vec.hpp"

namespace celer {

// Positions per KV block. 16 f32 scores are one AVX-512 register: a block's 16 keys are scored
// by broadcasting q one dimension at a time against 16 contiguous key values (no horizontal sums).
constexpr int kKvBlock = 16;

// One layer's KV memory for n_kv_heads heads of head_dim:
//   K: [n_blocks, n_kv_heads, head_dim, kKvBlock]  (transposed: a dimension's 16 slots contiguous)
//   V: [n_blocks, n_kv_heads, kKvBlock, head_dim]  (a slot's vector contiguous)
struct KvLayerView {
  float* k = nullptr;
  float* v = nullptr;
  int n_kv_heads = 0;
  int head_dim = 0;
  int64_t block_offset(int32_t block, int kv_head) const {
    return (static_cast<int64_t>(block) * n_kv_heads + kv_head) * kKvBlock * head_dim;
  }
  float& k_at(int32_t block, int kv_head, int slot, int dim) const {
    return k[block_offset(block, kv_head) + static_cast<int64_t>(dim) * kKvBlock + slot];
  }
  float& v_at(int32_t block, int kv_head, int slot, int dim) const {
    return v[block_offset(block, kv_head) + static_cast<int64_t>(slot) * head_dim + dim];
  }
};

// Stores one position's key and value vectors ([head_dim] each) into its block and slot.
void kv_store(const KvLayerView& kv, int32_t block, int kv_head, int slot, const float* k, const float* v);

// Causal attention of nq <= kAttnRows consecutive query tokens of one sequence for one query
// head: query i (q + i * q_stride) sits at position first_ctx - 1 + i and sees positions
// [0, first_ctx + i); position j lives in block block_table[j / kKvBlock] at slot j % kKvBlock.
//   out_i = softmax(scale * q_i . K) V        (out + i * out_stride)
// scores: scratch of kAttnRows rows of scores_stride >= first_ctx + nq - 1 rounded up to kKvBlock.
// A query's result does not depend on nq (the tile only shares the K and V loads).
void attend(const VecKernels& vk, const float* q, int64_t q_stride, int nq, const KvLayerView& kv, int kv_head,
            const int32_t* block_table, int32_t first_ctx, float scale, float* scores, int64_t scores_stride,
            float* out, int64_t out_stride);

// Plain double-precision reference of the same.
void attend_reference(const float* q, const KvLayerView& kv, int kv_head, const int32_t* block_table,
                      int32_t n_ctx, float scale, float* out);

}  // namespace celer
