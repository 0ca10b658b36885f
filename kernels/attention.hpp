// Attention of one query head over a sequence's keys and values stored in a paged KV cache:
// blocks of kKvBlock positions, found through the sequence's block table.
#pragma once

#include <cstdint>
#include <cstring>

#include "kernels/vec.hpp"

namespace celer {

// Positions per KV block. 16 f32 scores are one AVX-512 register: a block's 16 keys are scored
// by broadcasting q one dimension at a time against 16 contiguous key values (no horizontal sums).
constexpr int kKvBlock = 16;
// Largest head size the kernels take (real models use 64-256); models with more are refused.
constexpr int kMaxHeadDim = 512;

// Bytes of one KV element of a cache of this type (f32, f16 or q8_0; q8_0's scales apart).
constexpr int64_t kv_element_bytes(TensorType type) {
  return type == TensorType::f16 ? 2 : type == TensorType::q8_0 ? 1 : 4;
}

// One layer's KV memory for n_kv_heads heads of head_dim:
//   K: [n_blocks, n_kv_heads, head_dim, kKvBlock]  (transposed: a dimension's 16 slots contiguous)
//   V: [n_blocks, n_kv_heads, kKvBlock, head_dim]  (a slot's vector contiguous)
// Elements are f32, or f16 (type f16): half the bytes every decode step reads for each position
// of its context, as llama.cpp stores its cache by default. f16 values are rounded to nearest
// and saturate at +-65504 (VecKernels::f32_to_f16_saturating): a value past f16's range stays
// the largest finite one instead of becoming an infinity in the attention. Or Q8_0 (type
// q8_0, head_dim a multiple of 32): int8 values, each run of 32 dimensions of a slot with its
// own f32 scale (absmax / 127, as quantize_act_q8 computes), a quarter of f32's bytes plus an
// eighth for the scales; the scales live apart, K's as [block][head][head_dim / 32][16] (a run's
// 16 slots together), V's as [block][head][16][head_dim / 32].
struct KvLayerView {
  void* k = nullptr;
  void* v = nullptr;
  int n_kv_heads = 0;
  int head_dim = 0;
  TensorType type = TensorType::f32;  // f32, f16 or q8_0
  float* k_scales = nullptr;          // q8_0 only
  float* v_scales = nullptr;
  int64_t block_offset(int32_t block, int kv_head) const {  // in elements
    return (static_cast<int64_t>(block) * n_kv_heads + kv_head) * kKvBlock * head_dim;
  }
  int64_t element_bytes() const { return kv_element_bytes(type); }
  // The view does not own the memory; like the pointers, the blocks it finds are writable.
  uint8_t* k_block(int32_t block, int kv_head) const {
    return static_cast<uint8_t*>(k) + block_offset(block, kv_head) * element_bytes();
  }
  uint8_t* v_block(int32_t block, int kv_head) const {
    return static_cast<uint8_t*>(v) + block_offset(block, kv_head) * element_bytes();
  }
  // A block's scales (q8_0): kKvBlock * head_dim / 32 of them per head, for K and for V.
  float* k_block_scales(int32_t block, int kv_head) const { return k_scales + block_offset(block, kv_head) / 32; }
  float* v_block_scales(int32_t block, int kv_head) const { return v_scales + block_offset(block, kv_head) / 32; }
  float k_value(int32_t block, int kv_head, int slot, int dim) const {
    const float x = element(k_block(block, kv_head), int64_t{dim} * kKvBlock + slot);
    return type == TensorType::q8_0 ? x * k_block_scales(block, kv_head)[(dim / 32) * kKvBlock + slot] : x;
  }
  float v_value(int32_t block, int kv_head, int slot, int dim) const {
    const float x = element(v_block(block, kv_head), int64_t{slot} * head_dim + dim);
    return type == TensorType::q8_0 ? x * v_block_scales(block, kv_head)[slot * (head_dim / 32) + dim / 32] : x;
  }

 private:
  float element(const uint8_t* base, int64_t i) const {
    if (type == TensorType::q8_0) return static_cast<float>(static_cast<int8_t>(base[i]));
    if (type == TensorType::f16) {
      uint16_t h;
      std::memcpy(&h, base + 2 * i, 2);
      return fp16_to_f32(h);
    }
    float f;
    std::memcpy(&f, base + 4 * i, 4);
    return f;
  }
};

// Stores one position's key and value vectors ([head_dim] each) into its block and slot,
// converting to the cache's element type.
void kv_store(const VecKernels& vk, const KvLayerView& kv, int32_t block, int kv_head, int slot, const float* k,
              const float* v);

// Query heads one attend call takes at most. A block's K (and V) for consecutive KV heads are
// adjacent in the cache, so walking the heads block by block reads runs of a few KiB where one
// head alone reads 1-2 KiB here and there: measured, random runs of 4 KiB read ~25% faster than
// runs of 1-2 KiB on the 2-core VM, and decode attention is bound by exactly those reads.
constexpr int kAttnHeads = 4;

// Causal attention of nq <= kAttnRows consecutive query tokens of one sequence for n_heads <=
// kAttnHeads consecutive query heads head0, head0 + 1, ...; query head h reads KV head h /
// group. Query i of head j (q + i * q_stride + j * head_dim) sits at position first_ctx - 1 + i
// and sees positions [0, first_ctx + i); position p lives in block block_table[p / kKvBlock] at
// slot p % kKvBlock.
//   out_ij = softmax(scale * q_ij . K_j) V_j        (out + i * out_stride + j * head_dim)
// scores: scratch of kAttnHeads * kAttnRows rows of scores_stride >= first_ctx + nq - 1 rounded
// up to kKvBlock. A query's result depends neither on nq nor on n_heads (they only share loads
// and the walk through memory).
void attend(const VecKernels& vk, const float* q, int64_t q_stride, int nq, const KvLayerView& kv, int head0,
            int n_heads, int group, const int32_t* block_table, int32_t first_ctx, float scale, float* scores,
            int64_t scores_stride, float* out, int64_t out_stride);

// Plain double-precision reference of the same.
void attend_reference(const float* q, const KvLayerView& kv, int kv_head, const int32_t* block_table,
                      int32_t n_ctx, float scale, float* out);

}  // namespace celer
