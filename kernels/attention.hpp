// Attention of one query head over a sequence's keys and values stored in a paged KV cache:
// fixed-size blocks of positions, found through the sequence's block table.
#pragma once

#include <cstdint>

#include "kernels/vec.hpp"

namespace celer {

// One layer's K or V memory: [n_blocks, n_kv_heads, block_size, head_dim] f32. Keeping a head's
// positions of one block contiguous makes the inner loop stream block_size * head_dim floats.
struct KvLayerView {
  float* k = nullptr;
  float* v = nullptr;
  int block_size = 16;
  int n_kv_heads = 0;
  int head_dim = 0;
  int64_t offset(int32_t block, int kv_head, int slot) const {
    return ((static_cast<int64_t>(block) * n_kv_heads + kv_head) * block_size + slot) * head_dim;
  }
};

// out = softmax(scale * q . K[0..n_ctx)) V for kv head `kv_head`; positions j live in block
// block_table[j / block_size] at slot j % block_size. scores: scratch of n_ctx floats.
void attend(const VecKernels& vk, const float* q, const KvLayerView& kv, int kv_head, const int32_t* block_table,
            int32_t n_ctx, float scale, float* scores, float* out);

// Plain double-precision reference of the same.
void attend_reference(const float* q, const KvLayerView& kv, int kv_head, const int32_t* block_table,
                      int32_t n_ctx, float scale, float* out);

}  // namespace celer
