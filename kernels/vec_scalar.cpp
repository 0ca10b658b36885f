// The scalar kernels: the reference every SIMD path is tested against, and the fallback on CPUs
// without AVX2.
#include <algorithm>
#include <cmath>

#include "kernels/vec.hpp"

namespace celer {
namespace {

float dot_f32(const float* a, const float* b, int64_t k) {
  float sum = 0;
  for (int64_t i = 0; i < k; ++i) sum += a[i] * b[i];
  return sum;
}

void gemm_f32(const float* x, int64_t ldx, int mt, const float* w, int64_t ldw, int nt, int64_t k, float* y,
              int64_t ldy) {
  for (int i = 0; i < mt; ++i)
    for (int j = 0; j < nt; ++j) y[i * ldy + j] = dot_f32(x + i * ldx, w + j * ldw, k);
}

void gemm_q8_0(const int8_t* xq, const float* xd, int64_t ldx, int mt, const BlockQ8_0* w, int64_t ldw, int nt,
               int64_t k, float* y, int64_t ldy) {
  const int64_t nb = k / kQ8Block;
  for (int i = 0; i < mt; ++i)
    for (int j = 0; j < nt; ++j) {
      const int8_t* xr = xq + i * ldx;
      const float* dr = xd + i * (ldx / kQ8Block);
      const BlockQ8_0* wr = w + j * ldw;
      float sum = 0;
      for (int64_t b = 0; b < nb; ++b) {
        int32_t isum = 0;
        for (int e = 0; e < kQ8Block; ++e) isum += int32_t{wr[b].qs[e]} * int32_t{xr[b * kQ8Block + e]};
        sum += static_cast<float>(isum) * dr[b] * fp16_to_f32(wr[b].d);
      }
      y[i * ldy + j] = sum;
    }
}

void quantize_act_q8(const float* x, int8_t* q, float* d, int64_t k) {
  for (int64_t b = 0; b < k / kQ8Block; ++b) {
    const float* xb = x + b * kQ8Block;
    float amax = 0;
    for (int i = 0; i < kQ8Block; ++i) amax = std::max(amax, std::fabs(xb[i]));
    d[b] = amax / 127.0f;
    const float id = amax != 0 ? 127.0f / amax : 0.0f;
    for (int i = 0; i < kQ8Block; ++i) q[b * kQ8Block + i] = static_cast<int8_t>(std::nearbyint(xb[i] * id));
  }
}

void to_f32_f16(const uint16_t* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = fp16_to_f32(src[i]);
}

void to_f32_bf16(const uint16_t* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = bf16_to_f32(src[i]);
}

void to_f32_q8_0(const BlockQ8_0* src, float* dst, int64_t n) {
  for (int64_t b = 0; b < n / kQ8Block; ++b) {
    const float d = fp16_to_f32(src[b].d);
    for (int i = 0; i < kQ8Block; ++i) dst[b * kQ8Block + i] = d * src[b].qs[i];
  }
}

void axpy(float a, const float* x, float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += a * x[i];
}

float exp_sum(float* x, int64_t n, float max) {
  float sum = 0;
  for (int64_t i = 0; i < n; ++i) sum += (x[i] = std::exp(x[i] - max));
  return sum;
}

void silu_mul(const float* g, const float* u, float* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = g[i] / (1.0f + std::exp(-g[i])) * u[i];
}

}  // namespace

const VecKernels& vec_scalar() {
  static const VecKernels k{"scalar",    dot_f32,     gemm_f32,    gemm_q8_0, quantize_act_q8, to_f32_f16,
                            to_f32_bf16, to_f32_q8_0, axpy,        exp_sum,   silu_mul};
  return k;
}

}  // namespace celer
