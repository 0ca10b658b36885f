// Vector kernels: the inner loops every op is built from, one implementation per instruction
// set (scalar, AVX2+FMA+F16C, AVX-512+VNNI), picked once at run time. Each works on one row or
// one small tile; the threading and cache blocking live in the ops that call them (matmul.cpp,
// attention.cpp).
//
// The matmul tiles compute every output y[m][n] with its own accumulator, walking K in one fixed
// order, whatever the tile's shape. So a row's result does not depend on how many rows share the
// step or where the tile boundaries fall: a sequence gets bit-identical logits alone or batched.
#pragma once

#include <cstdint>

#include "kernels/types.hpp"

namespace celer {

// Largest tile: kTileM activation rows x kTileN weight rows. 4 x 4 keeps 16 accumulators, 4
// activation vectors and a weight vector in AVX-512's 32 registers.
constexpr int kTileM = 6;
constexpr int kTileN = 4;
// Groups of 16 packed Q8_0 rows one gemm_q8_packed call takes at most.
constexpr int kPackTileGroups = 2;
// Queries attended together (they share each K and V block load).
constexpr int kAttnRows = 4;

// What a packed Q8_0 tile fetches from memory while it computes (hints only: results never
// change). `stream` (decode, a tile or two per weight group): its own weights, a few blocks
// ahead, for they come from memory just once. Otherwise its weights are in cache already, and
// [next, next + next_bytes) (a share of the weights the caller needs next) is fetched into L2,
// spread over the tile's blocks, so that the compute-bound tiles of one weight pair hide the
// memory latency of the next pair instead of stalling on it.
struct PackedPrefetch {
  bool stream = false;
  const uint8_t* next = nullptr;
  int64_t next_bytes = 0;
};

struct VecKernels {
  const char* name;
  // dot(a, b) of k floats.
  float (*dot_f32)(const float* a, const float* b, int64_t k);
  // y[i * ldy + j] = dot(x[i * ldx ...], w[j * ldw ...]) over k, for i < mt <= kTileM, j < nt <= kTileN.
  void (*gemm_f32)(const float* x, int64_t ldx, int mt, const float* w, int64_t ldw, int nt, int64_t k, float* y,
                   int64_t ldy);
  // gemm_f32 for weights already in cache (a widened panel): the same results, no prefetching.
  void (*gemm_f32_cached)(const float* x, int64_t ldx, int mt, const float* w, int64_t ldw, int nt, int64_t k,
                          float* y, int64_t ldy);
  // The same with f16 or bf16 weight rows, widened to f32 on load. The widening is exact, so
  // these give bit for bit what gemm_f32 gives on the widened rows: decode reads the weights in
  // place, prefill widens a panel once and reuses it.
  void (*gemm_f16)(const float* x, int64_t ldx, int mt, const uint16_t* w, int64_t ldw, int nt, int64_t k, float* y,
                   int64_t ldy);
  void (*gemm_bf16)(const float* x, int64_t ldx, int mt, const uint16_t* w, int64_t ldw, int nt, int64_t k, float* y,
                    int64_t ldy);
  // Q8_0 weight rows (ldw in blocks) widened exactly to f32 on load (d * q fits an f32
  // mantissa): bit for bit gemm_f32 on the widened rows, like gemm_f16.
  void (*gemm_q8_0_widened)(const float* x, int64_t ldx, int mt, const BlockQ8_0* w, int64_t ldw, int nt, int64_t k,
                            float* y, int64_t ldy);
  // Q8_0 weights packed by pack_q8_0 (q8_packed.hpp) against activations quantized by
  // quantize_act_q8: int8 values xq (row stride ldx), and per 32 values a scale xd and a bias xb
  // (row stride ldx / 32 both). mt <= kTileM activation rows meet ng <= kPackTileGroups groups of
  // 16 weight rows starting at w, ldg bytes apart, nb blocks each; the first n_rows of those rows
  // are real and y[i * ldy + r] gets row r's output for activation row i. Every output is
  // computed alike: f = 0, then for each block in K order f = fma(s, d_w * d_x, f), where s is
  // the block's exact int32 sum of q_w * q_x. `prefetch` says what to fetch meanwhile.
  void (*gemm_q8_packed)(const int8_t* xq, const float* xd, const int32_t* xb, int64_t ldx, int mt, const uint8_t* w,
                         int64_t ldg, int ng, int64_t nb, int n_rows, float* y, int64_t ldy,
                         const PackedPrefetch& prefetch);
  // 4- or 5-bit weights packed by pack_low_bit (low_bit_packed.hpp, `bits` 4 or 5) against the same
  // activations, with gemm_q8_packed's tile contract. Every output is computed alike: f = 0, then
  // for each block in K order f = fma(S, s_w * d_x, f) and f = fma(o_w, d_x * sum(q_x), f), where
  // S is the block's exact int32 sum of q_w * q_x and sum(q_x) = -xb / 128.
  void (*gemm_q4_packed)(int bits, const int8_t* xq, const float* xd, const int32_t* xb, int64_t ldx, int mt,
                         const uint8_t* w, int64_t ldg, int ng, int64_t nb, int n_rows, float* y, int64_t ldy,
                         const PackedPrefetch& prefetch);
  // 6-bit weights packed by pack_low_bit (Q6_K) against the same activations, with x16 the
  // activations' integer sums per 16 values (row stride ldx / 16) in place of xb. Every output is
  // computed alike: f = 0, then for each block in K order and each half h of it (columns 0-15,
  // then 16-31) f = fma(S_h - 32 * x16_h, (d_w * sc_h) * d_x, f), where S_h is the half's exact
  // int32 sum of q_w * q_x.
  void (*gemm_q6_packed)(const int8_t* xq, const float* xd, const int32_t* x16, int64_t ldx, int mt, const uint8_t* w,
                         int64_t ldg, int ng, int64_t nb, int n_rows, float* y, int64_t ldy,
                         const PackedPrefetch& prefetch);
  // x (f32, k a multiple of 32) -> int8 q and per 32: a scale d = absmax / 127 (q = round(x /
  // d)) and bias = -128 * sum(q), which cancels the +128 offset of packed weights.
  void (*quantize_act_q8)(const float* x, int8_t* q, float* d, int32_t* bias, int64_t k);
  // A row of n elements of the given type -> f32 (exactly).
  void (*to_f32_f16)(const uint16_t* src, float* dst, int64_t n);
  // f32 -> f16, rounded to nearest even and saturating at +-65504 (no infinities; NaN stays NaN).
  void (*f32_to_f16_saturating)(const float* src, uint16_t* dst, int64_t n);
  void (*to_f32_bf16)(const uint16_t* src, float* dst, int64_t n);
  void (*to_f32_q8_0)(const BlockQ8_0* src, float* dst, int64_t n);
  // Attention over one KV block of 16 positions (see attention.hpp for the layouts), for nq <=
  // kAttnRows queries that share the block (consecutive tokens of one sequence, one head):
  // s[i][j] = scale * sum_d q[i][d] * kt[d][j] for the 16 slots j, kt: [hd][16].
  void (*attn_scores)(const float* kt, const float* const* q, int nq, int hd, float scale, float* const* s);
  // out[i][d] += sum_j p[i][j] * v[j][d] over the first n_slots <= 16 slots j, v: [16][hd]. A
  // query's weights of slots it may not see are 0; slots from n_slots on are never read (another
  // sequence may have left anything there, and 0 * inf would be NaN).
  void (*attn_accumulate)(const float* v, const float* const* p, int nq, int hd, int n_slots, float* const* out);
  // The same over a KV cache stored in f16 (widened exactly on load).
  void (*attn_scores_f16)(const uint16_t* kt, const float* const* q, int nq, int hd, float scale, float* const* s);
  void (*attn_accumulate_f16)(const uint16_t* v, const float* const* p, int nq, int hd, int n_slots, float* const* out);
  // The same over a KV cache stored as Q8_0 (hd a multiple of 32): int8 values, each run of 32
  // dimensions of a slot scaled by one f32. kd: [hd / 32][16] (a run's 16 slot scales
  // together); vd: [16][hd / 32].
  void (*attn_scores_q8)(const int8_t* kt, const float* kd, const float* const* q, int nq, int hd, float scale,
                         float* const* s);
  void (*attn_accumulate_q8)(const int8_t* v, const float* vd, const float* const* p, int nq, int hd, int n_slots,
                             float* const* out);
  // x[i] = exp(x[i] - max); returns the sum of the new x. The softmax body.
  float (*exp_sum)(float* x, int64_t n, float max);
  // out[i] = silu(g[i]) * u[i] = g / (1 + exp(-g)) * u: SwiGLU's gate.
  void (*silu_mul)(const float* g, const float* u, float* out, int64_t n);
  // The index of the first largest of x[0..n), n >= 1, as std::max_element gives it; NaNs are
  // never chosen (all NaN: 0). Greedy sampling's scan of a logits row.
  int64_t (*argmax)(const float* x, int64_t n);
};

const VecKernels& vec_scalar();
const VecKernels* vec_avx2();    // nullptr when not compiled in
const VecKernels* vec_avx512();  // nullptr when not compiled in
// The fastest set this CPU supports. CELER_SIMD=scalar|avx2|avx512 in the environment caps it.
const VecKernels& vec_best();

// Any row type -> f32 through `k`.
void row_to_f32(const VecKernels& k, TensorType type, const void* src, float* dst, int64_t n);

}  // namespace celer
