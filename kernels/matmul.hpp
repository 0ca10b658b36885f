// Matrix multiplication against a weight matrix in any supported type:
//   y[m, n] = sum_k x[m, k] * w[n, k]        x: [M, K] f32, w: [N, K] (GGUF rows), y: [M, N] f32
//
// Plan: the N weight rows are cut into panels that threads take in turn. Prefill (many rows of
// x): a panel of 64 weight rows is widened to f32 once (exactly) into a cache-line-aligned
// buffer (f32 rows are copied: GGUF aligns tensors to 32 bytes only) and stays in L2 while every
// tile of kTileM rows of x, held in L1, meets it kTileN weight rows at a time
// (VecKernels::gemm_f32). Decode (few rows): each thread streams one contiguous run of weight
// rows from memory and widens them in registers (gemm_f16 / gemm_bf16 / gemm_q8_0_widened).
// Q8_0 weights can instead meet activations quantized to int8 once per call, in int8 dot
// products, in prefill and decode alike (Q8Activations::int8): the weights are then repacked
// once, 16 rows interleaved (q8_packed.hpp), and the same packed tile serves both; 4- to 6-bit
// weights (Q4_0 ... Q6_K) are packed likewise at their own width (low_bit_packed.hpp) and meet the
// same int8 activations. With f32 activations those are widened a panel at a time. Each output
// comes from one accumulator in one K order, so the result of a row never depends on M or the
// panel split (batch invariance, see vec.hpp).
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "kernels/aligned.hpp"
#include "kernels/low_bit_packed.hpp"
#include "kernels/q8_packed.hpp"
#include "kernels/thread_pool.hpp"
#include "kernels/types.hpp"
#include "kernels/vec.hpp"

namespace celer {

struct WeightMatrix {  // [rows, cols]: `rows` rows of `cols` contiguous elements
  TensorType type = TensorType::f32;
  const void* data = nullptr;
  int64_t rows = 0;
  int64_t cols = 0;
  const PackedQ8* packed = nullptr;     // Q8_0 only: the same weights packed for int8 activations
  const PackedLowBit* packed_low_bit = nullptr;  // 4- to 6-bit types only: the same, see low_bit_packed.hpp
  const uint8_t* row(int64_t r) const {
    return static_cast<const uint8_t*>(data) + r * row_bytes(type, cols);
  }
  // Rows [first, first + n): a view into the same memory (not of the packed copies, which the
  // engine makes for the views it computes with).
  WeightMatrix rows_view(int64_t first, int64_t n) const { return {type, row(first), n, cols}; }
};

// Scratch owned by whoever runs matmuls on a pool, sized once (reserve) so that a forward pass
// never allocates: a widened weight panel per thread.
class MatmulScratch {
 public:
  void reserve(int n_threads, int64_t max_rows, int64_t max_cols);
  AlignedVector<int8_t> xq;                  // [M, K]: activations quantized for Q8_0 weights
  AlignedVector<float> xd;                   // [M, K / 32]: their scales
  AlignedVector<int32_t> xb;                 // [M, K / 32]: their biases (see quantize_act_q8)
  AlignedVector<int32_t> x16;                // [M, K / 16]: their sums per 16 (for 6-bit weights)
  std::vector<AlignedVector<float>> panels;  // per thread: [panel rows, K]
};

// How Q8_0 weights meet the activations. Either way a row's result does not depend on the batch.
enum class Q8Activations {
  f32,   // weights widened exactly to f32, like F16: the most accurate
  int8,  // activations quantized to int8 per row, int8 dot products (llama.cpp's arithmetic):
         // the default, and the fastest prefill and decode; needs WeightMatrix::packed (Q8_0)
         // or WeightMatrix::packed_low_bit (4 to 6 bits)
};
const char* to_string(Q8Activations mode);

// Throws std::invalid_argument for int8 activations on Q8_0, 4- to 6-bit weights that were not
// packed, and for weights of the other types only files hold (Q2_K, Q3_K: a model converts them).
void matmul(ThreadPool& pool, const VecKernels& vk, MatmulScratch& scratch, const WeightMatrix& w,
            const float* x, int64_t M, float* y, Q8Activations q8 = Q8Activations::f32);

// y_i = x w_i^T for several matrices with the same input x (Q, K and V; gate and up). Packed
// matrices with int8 activations (up to 4, the same K, any mix of Q8_0 and 4 to 6 bits) share one quantization of x and
// one parallel loop over all their weight pairs; anything else runs as one matmul each. The results
// are those of separate matmuls, bit for bit.
void matmul_shared_input(ThreadPool& pool, const VecKernels& vk, MatmulScratch& scratch,
                         std::span<const WeightMatrix* const> w, const float* x, int64_t M, std::span<float* const> y,
                         Q8Activations q8 = Q8Activations::f32);

// The plain reference: weights expanded to f32, dot products in double, single-threaded.
void matmul_reference(const WeightMatrix& w, const float* x, int64_t M, float* y);

}  // namespace celer
