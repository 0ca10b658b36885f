// The scalar kernels: the reference every SIMD path is tested against, and the fallback on CPUs
// without AVX2.
#include <algorithm>
#include <cmath>
#include <cstring>

#include "kernels/low_bit_packed.hpp"
#include "kernels/q8_packed.hpp"
#include "kernels/vec.hpp"

namespace celer {
namespace {

float dot_f32(const float* a, const float* b, int64_t k) {
  float sum = 0;
  for (int64_t i = 0; i < k; ++i) sum += a[i] * b[i];
  return sum;
}

// One tile for every weight type: element(row, e) widens element e of a weight row to f32.
template <typename T, typename Element>
void tile(const float* x, int64_t ldx, int mt, const T* w, int64_t ldw, int nt, int64_t k, float* y, int64_t ldy,
          Element element) {
  for (int i = 0; i < mt; ++i)
    for (int j = 0; j < nt; ++j) {
      float sum = 0;
      for (int64_t e = 0; e < k; ++e) sum += x[i * ldx + e] * element(w + j * ldw, e);
      y[i * ldy + j] = sum;
    }
}

void gemm_f32(const float* x, int64_t ldx, int mt, const float* w, int64_t ldw, int nt, int64_t k, float* y,
              int64_t ldy) {
  tile(x, ldx, mt, w, ldw, nt, k, y, ldy, [](const float* r, int64_t e) { return r[e]; });
}

void gemm_f16(const float* x, int64_t ldx, int mt, const uint16_t* w, int64_t ldw, int nt, int64_t k, float* y,
              int64_t ldy) {
  tile(x, ldx, mt, w, ldw, nt, k, y, ldy, [](const uint16_t* r, int64_t e) { return fp16_to_f32(r[e]); });
}

void gemm_bf16(const float* x, int64_t ldx, int mt, const uint16_t* w, int64_t ldw, int nt, int64_t k, float* y,
               int64_t ldy) {
  tile(x, ldx, mt, w, ldw, nt, k, y, ldy, [](const uint16_t* r, int64_t e) { return bf16_to_f32(r[e]); });
}

void gemm_q8_0_widened(const float* x, int64_t ldx, int mt, const BlockQ8_0* w, int64_t ldw, int nt, int64_t k,
                       float* y, int64_t ldy) {
  tile(x, ldx, mt, w, ldw, nt, k, y, ldy, [](const BlockQ8_0* r, int64_t e) {
    const BlockQ8_0& b = r[e / kQ8Block];
    return fp16_to_f32(b.d) * b.qs[e % kQ8Block];
  });
}

// Walks the packed layout (q8_packed.hpp) one output at a time.
void gemm_q8_packed(const int8_t* xq, const float* xd, const int32_t* xb, int64_t ldx, int mt, const uint8_t* w,
                    int64_t ldg, int ng, int64_t nb, int n_rows, float* y, int64_t ldy, const PackedPrefetch&) {
  const int64_t ldd = ldx / kQ8Block;
  for (int i = 0; i < mt; ++i)
    for (int r = 0; r < std::min(n_rows, ng * kPackRows); ++r) {
      const uint8_t* group = w + (r / kPackRows) * ldg;
      const int lane = r % kPackRows;
      float f = 0;
      for (int64_t b = 0; b < nb; ++b) {
        int32_t s = xb[i * ldd + b];
        for (int e = 0; e < kQ8Block; ++e)
          s += int32_t{group[packed_quant_offset(b, lane, e)]} * xq[i * ldx + b * kQ8Block + e];
        uint16_t d;
        std::memcpy(&d, group + packed_scale_offset(nb, b, lane), 2);
        f = std::fma(static_cast<float>(s), fp16_to_f32(d) * xd[i * ldd + b], f);
      }
      y[i * ldy + r] = f;
    }
}

// y[i * ldy + r] = output(i, group of row r, its lane) for every activation row i < mt and
// weight row r of the tile's ng packed groups below n_rows.
template <typename F>
void each_packed_output(int mt, const uint8_t* w, int64_t ldg, int ng, int n_rows, float* y, int64_t ldy, F output) {
  for (int i = 0; i < mt; ++i)
    for (int r = 0; r < std::min(n_rows, ng * kPackRows); ++r) y[i * ldy + r] = output(i, w + (r / kPackRows) * ldg, r % kPackRows);
}

// Walks the packed 4/5-bit layout (low_bit_packed.hpp) one output at a time.
void gemm_q4_packed(int bits, const int8_t* xq, const float* xd, const int32_t* xb, int64_t ldx, int mt,
                    const uint8_t* w, int64_t ldg, int ng, int64_t nb, int n_rows, float* y, int64_t ldy,
                    const PackedPrefetch&) {
  const int64_t ldd = ldx / kQ8Block, bb = low_bit_block_bytes(bits);
  each_packed_output(mt, w, ldg, ng, n_rows, y, ldy, [&](int i, const uint8_t* group, int lane) {
    float f = 0;
    for (int64_t b = 0; b < nb; ++b) {
      const uint8_t* block = group + b * bb;
      const int8_t* x = xq + i * ldx + b * kQ8Block;
      int32_t s = 0;
      for (int e = 0; e < kQ8Block; ++e) s += packed_low_bit_q(block, bits, lane, e) * x[e];
      float ws, wo;
      std::memcpy(&ws, block + q4_scales_offset(bits) + lane * 4, 4);
      std::memcpy(&wo, block + q4_scales_offset(bits) + kQ4ScaleBytes + lane * 4, 4);
      const float dx = xd[i * ldd + b];
      f = std::fma(static_cast<float>(s), ws * dx, f);
      f = std::fma(wo, dx * static_cast<float>(xb[i * ldd + b] / -128), f);
    }
    return f;
  });
}

// Walks the packed 6-bit layout (low_bit_packed.hpp) one output at a time.
void gemm_q6_packed(const int8_t* xq, const float* xd, const int32_t* x16, int64_t ldx, int mt, const uint8_t* w,
                    int64_t ldg, int ng, int64_t nb, int n_rows, float* y, int64_t ldy, const PackedPrefetch&) {
  const int64_t ldd = ldx / kQ8Block, ld16 = ldx / 16, bb = low_bit_block_bytes(6);
  each_packed_output(mt, w, ldg, ng, n_rows, y, ldy, [&](int i, const uint8_t* group, int lane) {
    float f = 0;
    for (int64_t b = 0; b < nb; ++b) {
      const uint8_t* block = group + b * bb;
      const int8_t* x = xq + i * ldx + b * kQ8Block;
      int32_t s[2] = {0, 0};
      for (int e = 0; e < kQ8Block; ++e) s[e / 16] += packed_low_bit_q(block, 6, lane, e) * x[e];
      uint16_t d;
      std::memcpy(&d, block + kQ6DOffset + 2 * lane, 2);
      const float dw = fp16_to_f32(d), dx = xd[i * ldd + b];
      for (int h = 0; h < 2; ++h) {
        const auto sc = static_cast<int8_t>(block[kQ6ScaleOffset + h * kPackRows + lane]);
        f = std::fma(static_cast<float>(s[h] - 32 * x16[i * ld16 + 2 * b + h]), dw * static_cast<float>(sc) * dx, f);
      }
    }
    return f;
  });
}

void quantize_act_q8(const float* x, int8_t* q, float* d, int32_t* bias, int64_t k) {
  for (int64_t b = 0; b < k / kQ8Block; ++b) {
    const float* xb = x + b * kQ8Block;
    float amax = 0;
    for (int i = 0; i < kQ8Block; ++i) amax = std::max(amax, std::fabs(xb[i]));
    d[b] = amax / 127.0f;
    const float id = amax != 0 ? 127.0f / amax : 0.0f;
    int32_t sum = 0;
    for (int i = 0; i < kQ8Block; ++i) sum += q[b * kQ8Block + i] = static_cast<int8_t>(std::nearbyint(xb[i] * id));
    bias[b] = -128 * sum;
  }
}

void to_f32_f16(const uint16_t* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = fp16_to_f32(src[i]);
}

void f32_to_f16_saturating(const float* src, uint16_t* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = f32_to_fp16(std::clamp(src[i], -65504.0f, 65504.0f));
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

// KV elements as f32: stored f32 or f16.
inline float kv_float(float x) { return x; }
inline float kv_float(uint16_t x) { return fp16_to_f32(x); }

template <typename T>
void attn_scores(const T* kt, const float* const* q, int nq, int hd, float scale, float* const* s) {
  for (int i = 0; i < nq; ++i) {
    float acc[16] = {};
    for (int d = 0; d < hd; ++d)
      for (int j = 0; j < 16; ++j) acc[j] += q[i][d] * kv_float(kt[d * 16 + j]);
    for (int j = 0; j < 16; ++j) s[i][j] = acc[j] * scale;
  }
}

template <typename T>
void attn_accumulate(const T* v, const float* const* p, int nq, int hd, int n_slots, float* const* out) {
  for (int i = 0; i < nq; ++i)
    for (int j = 0; j < n_slots; ++j)
      for (int d = 0; d < hd; ++d) out[i][d] += p[i][j] * kv_float(v[j * hd + d]);
}

// Q8_0 KV: each run of 32 dimensions is summed apart and scaled by its slot's scale.
void attn_scores_q8(const int8_t* kt, const float* kd, const float* const* q, int nq, int hd, float scale,
                    float* const* s) {
  for (int i = 0; i < nq; ++i) {
    float total[16] = {};
    for (int c = 0; c < hd / kQ8Block; ++c) {
      float acc[16] = {};
      for (int d = c * kQ8Block; d < (c + 1) * kQ8Block; ++d)
        for (int j = 0; j < 16; ++j) acc[j] += q[i][d] * kt[d * 16 + j];
      for (int j = 0; j < 16; ++j) total[j] += acc[j] * kd[c * 16 + j];
    }
    for (int j = 0; j < 16; ++j) s[i][j] = total[j] * scale;
  }
}

void attn_accumulate_q8(const int8_t* v, const float* vd, const float* const* p, int nq, int hd, int n_slots,
                        float* const* out) {
  const int nc = hd / kQ8Block;
  for (int i = 0; i < nq; ++i)
    for (int j = 0; j < n_slots; ++j)
      for (int c = 0; c < nc; ++c) {
        const float w = p[i][j] * vd[j * nc + c];
        for (int d = c * kQ8Block; d < (c + 1) * kQ8Block; ++d) out[i][d] += w * v[j * hd + d];
      }
}

int64_t argmax(const float* x, int64_t n) {
  int64_t best = 0;
  while (best < n - 1 && std::isnan(x[best])) ++best;
  if (std::isnan(x[best])) return 0;
  for (int64_t i = best + 1; i < n; ++i)
    if (x[i] > x[best]) best = i;
  return best;
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
  static const VecKernels k{"scalar",   dot_f32,     gemm_f32, gemm_f32,    gemm_f16, gemm_bf16, gemm_q8_0_widened, gemm_q8_packed, gemm_q4_packed, gemm_q6_packed, quantize_act_q8,
                            to_f32_f16, f32_to_f16_saturating, to_f32_bf16, to_f32_q8_0, attn_scores<float>, attn_accumulate<float>,
                            attn_scores<uint16_t>, attn_accumulate<uint16_t>, attn_scores_q8,
                            attn_accumulate_q8, exp_sum, silu_mul, argmax};
  return k;
}

}  // namespace celer
