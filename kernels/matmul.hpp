// Matrix multiplication against a weight matrix in any supported type:
//   y[m, n] = sum_k x[m, k] * w[n, k]        x: [M, K] f32, w: [N, K] (GGUF rows), y: [M, N] f32
//
// Plan: the N weight rows are cut into panels that threads take in turn. A panel (64 rows when
// many activation rows share it, 16 for decode) stays in L2 while every 4-row tile of x, held
// in L1, meets it 4 weight rows at a time (VecKernels::gemm_*). F16 and BF16 panels are first
// expanded to f32 (exact); Q8_0 weights meet activations quantized to int8 once per call, with
// integer dot products. Each output comes from one accumulator in one K order, so the result of
// a row never depends on M or the panel split (batch invariance, see vec.hpp).
#pragma once

#include <cstdint>
#include <vector>

#include "kernels/thread_pool.hpp"
#include "kernels/types.hpp"
#include "kernels/vec.hpp"

namespace celer {

struct WeightMatrix {  // [rows, cols]: `rows` rows of `cols` contiguous elements
  TensorType type = TensorType::f32;
  const void* data = nullptr;
  int64_t rows = 0;
  int64_t cols = 0;
  const uint8_t* row(int64_t r) const {
    return static_cast<const uint8_t*>(data) + r * row_bytes(type, cols);
  }
};

// Scratch owned by whoever runs matmuls on a pool, sized once (reserve) so that a forward pass
// never allocates: quantized activations and per-thread f32 panels.
class MatmulScratch {
 public:
  void reserve(int n_threads, int64_t max_rows, int64_t max_cols);
  std::vector<int8_t> xq;                  // [M, K]
  std::vector<float> xd;                   // [M, K / 32]
  std::vector<std::vector<float>> panels;  // per thread: [panel rows, K]
};

void matmul(ThreadPool& pool, const VecKernels& vk, MatmulScratch& scratch, const WeightMatrix& w,
            const float* x, int64_t M, float* y);

// The plain reference: weights expanded to f32, dot products in double, single-threaded.
void matmul_reference(const WeightMatrix& w, const float* x, int64_t M, float* y);

}  // namespace celer
