// AVX-512 kernels (F, BW, VL, DQ, VNNI; compiled with those flags and called only after
// cpu_features() says the CPU has them). 16 floats per register; tails use masked loads.
#include <immintrin.h>

#include "kernels/vec.hpp"

namespace celer {
namespace {

inline __mmask16 tail_mask(int64_t n) { return static_cast<__mmask16>((1u << n) - 1); }

inline __m512 load_f16(const uint16_t* p) { return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
inline __m512 load_f16_mask(const uint16_t* p, __mmask16 m) { return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p)); }
inline __m512 load_bf16(const uint16_t* p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
}
inline __m512 load_bf16_mask(const uint16_t* p, __mmask16 m) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
}

// Four accumulators cover the FMA latency (4 cycles, 2 FMAs per cycle).
float dot_f32(const float* a, const float* b, int64_t k) {
  __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  int64_t i = 0;
  for (; i + 64 <= k; i += 64) {
    a0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), a0);
    a1 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i + 16), _mm512_loadu_ps(b + i + 16), a1);
    a2 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i + 32), _mm512_loadu_ps(b + i + 32), a2);
    a3 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i + 48), _mm512_loadu_ps(b + i + 48), a3);
  }
  for (; i + 16 <= k; i += 16) a0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), a0);
  if (i < k) {
    const __mmask16 m = tail_mask(k - i);
    a1 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, a + i), _mm512_maskz_loadu_ps(m, b + i), a1);
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
}

// An MT x NT tile: each output has one accumulator fed 16 products at a time in K order; the
// tile's independent accumulators (up to 16) keep both FMA units busy.
template <int MT, int NT>
void tile_f32(const float* x, int64_t ldx, const float* w, int64_t ldw, int64_t k, float* y, int64_t ldy) {
  __m512 acc[MT][NT];
  for (int i = 0; i < MT; ++i)
    for (int j = 0; j < NT; ++j) acc[i][j] = _mm512_setzero_ps();
  int64_t e = 0;
  for (; e + 16 <= k; e += 16) {
    __m512 xv[MT];
    for (int i = 0; i < MT; ++i) xv[i] = _mm512_loadu_ps(x + i * ldx + e);
    for (int j = 0; j < NT; ++j) {
      const __m512 wv = _mm512_loadu_ps(w + j * ldw + e);
      for (int i = 0; i < MT; ++i) acc[i][j] = _mm512_fmadd_ps(xv[i], wv, acc[i][j]);
    }
  }
  if (e < k) {
    const __mmask16 m = tail_mask(k - e);
    __m512 xv[MT];
    for (int i = 0; i < MT; ++i) xv[i] = _mm512_maskz_loadu_ps(m, x + i * ldx + e);
    for (int j = 0; j < NT; ++j) {
      const __m512 wv = _mm512_maskz_loadu_ps(m, w + j * ldw + e);
      for (int i = 0; i < MT; ++i) acc[i][j] = _mm512_fmadd_ps(xv[i], wv, acc[i][j]);
    }
  }
  for (int i = 0; i < MT; ++i)
    for (int j = 0; j < NT; ++j) y[i * ldy + j] = _mm512_reduce_add_ps(acc[i][j]);
}

// Q8_0 tile, two blocks (64 values) per step. VNNI's dpbusd multiplies unsigned by signed bytes
// and sums groups of four into int32. The activations are made unsigned by adding 128 (a sign
// bit flip), and the extra 128 * sum(w) is subtracted up front by starting each block's int32
// sum at -128 * sum(w): one dpbusd per output per step. The int32 sums are exact; each block's is
// scaled by its two scales and added to the output's f32 accumulator.
template <int MT, int NT>
void tile_q8(const int8_t* xq, const float* xd, int64_t ldx, const BlockQ8_0* w, int64_t ldw, int64_t k, float* y,
             int64_t ldy) {
  const int64_t nb = k / kQ8Block;
  const int64_t ldd = ldx / kQ8Block;
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  const __m512i ones = _mm512_set1_epi8(1);
  __m512 acc[MT][NT];
  for (int i = 0; i < MT; ++i)
    for (int j = 0; j < NT; ++j) acc[i][j] = _mm512_setzero_ps();
  for (int64_t b = 0; b < nb; b += 2) {
    const bool pair = b + 1 < nb;
    __m512i xu[MT];
    __m512 xs[MT];
    for (int i = 0; i < MT; ++i) {
      const int8_t* p = xq + i * ldx + b * kQ8Block;
      const __m512i v = pair ? _mm512_loadu_si512(p) : _mm512_zextsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
      xu[i] = _mm512_xor_si512(v, flip);
      const float* d = xd + i * ldd + b;
      xs[i] = _mm512_insertf32x8(_mm512_set1_ps(d[0]), _mm256_set1_ps(pair ? d[1] : 0.0f), 1);
    }
    for (int j = 0; j < NT; ++j) {
      const BlockQ8_0* wb = w + j * ldw + b;
      const __m256i lo = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb[0].qs));
      const __m512i wv = pair ? _mm512_inserti64x4(_mm512_castsi256_si512(lo), _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb[1].qs)), 1)
                              : _mm512_zextsi256_si512(lo);
      const __m512i bias = _mm512_sub_epi32(_mm512_setzero_si512(), _mm512_slli_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), ones, wv), 7));
      const __m512 ws = _mm512_insertf32x8(_mm512_set1_ps(_cvtsh_ss(wb[0].d)), _mm256_set1_ps(pair ? _cvtsh_ss(wb[1].d) : 0.0f), 1);
      for (int i = 0; i < MT; ++i) {
        const __m512i s = _mm512_dpbusd_epi32(bias, xu[i], wv);
        acc[i][j] = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(s), xs[i]), ws, acc[i][j]);
      }
    }
  }
  for (int i = 0; i < MT; ++i)
    for (int j = 0; j < NT; ++j) y[i * ldy + j] = _mm512_reduce_add_ps(acc[i][j]);
}


using TileF32 = void (*)(const float*, int64_t, const float*, int64_t, int64_t, float*, int64_t);
using TileQ8 = void (*)(const int8_t*, const float*, int64_t, const BlockQ8_0*, int64_t, int64_t, float*, int64_t);

constexpr TileF32 kTilesF32[kTileM][kTileN] = {
    {tile_f32<1, 1>, tile_f32<1, 2>, tile_f32<1, 3>, tile_f32<1, 4>},
    {tile_f32<2, 1>, tile_f32<2, 2>, tile_f32<2, 3>, tile_f32<2, 4>},
    {tile_f32<3, 1>, tile_f32<3, 2>, tile_f32<3, 3>, tile_f32<3, 4>},
    {tile_f32<4, 1>, tile_f32<4, 2>, tile_f32<4, 3>, tile_f32<4, 4>}};
constexpr TileQ8 kTilesQ8[kTileM][kTileN] = {
    {tile_q8<1, 1>, tile_q8<1, 2>, tile_q8<1, 3>, tile_q8<1, 4>},
    {tile_q8<2, 1>, tile_q8<2, 2>, tile_q8<2, 3>, tile_q8<2, 4>},
    {tile_q8<3, 1>, tile_q8<3, 2>, tile_q8<3, 3>, tile_q8<3, 4>},
    {tile_q8<4, 1>, tile_q8<4, 2>, tile_q8<4, 3>, tile_q8<4, 4>}};

void gemm_f32(const float* x, int64_t ldx, int mt, const float* w, int64_t ldw, int nt, int64_t k, float* y,
              int64_t ldy) {
  kTilesF32[mt - 1][nt - 1](x, ldx, w, ldw, k, y, ldy);
}

void gemm_q8_0(const int8_t* xq, const float* xd, int64_t ldx, int mt, const BlockQ8_0* w, int64_t ldw, int nt,
               int64_t k, float* y, int64_t ldy) {
  kTilesQ8[mt - 1][nt - 1](xq, xd, ldx, w, ldw, k, y, ldy);
}

void quantize_act_q8(const float* x, int8_t* q, float* d, int64_t k) {
  for (int64_t b = 0; b < k / kQ8Block; ++b) {
    const __m512 v0 = _mm512_loadu_ps(x + b * kQ8Block);
    const __m512 v1 = _mm512_loadu_ps(x + b * kQ8Block + 16);
    const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
    d[b] = amax / 127.0f;
    const __m512 id = _mm512_set1_ps(amax != 0 ? 127.0f / amax : 0.0f);
    // cvtps_epi32 rounds to nearest even, as the scalar path's nearbyint does.
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + b * kQ8Block), _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(v0, id))));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + b * kQ8Block + 16), _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(v1, id))));
  }
}

void to_f32_f16(const uint16_t* src, float* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) _mm512_storeu_ps(dst + i, load_f16(src + i));
  if (i < n) _mm512_mask_storeu_ps(dst + i, tail_mask(n - i), load_f16_mask(src + i, tail_mask(n - i)));
}

void to_f32_bf16(const uint16_t* src, float* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) _mm512_storeu_ps(dst + i, load_bf16(src + i));
  if (i < n) _mm512_mask_storeu_ps(dst + i, tail_mask(n - i), load_bf16_mask(src + i, tail_mask(n - i)));
}

void to_f32_q8_0(const BlockQ8_0* src, float* dst, int64_t n) {
  for (int64_t b = 0; b < n / kQ8Block; ++b) {
    const __m512 d = _mm512_set1_ps(_cvtsh_ss(src[b].d));
    const __m128i q0 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src[b].qs));
    const __m128i q1 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src[b].qs + 16));
    _mm512_storeu_ps(dst + b * kQ8Block, _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q0))));
    _mm512_storeu_ps(dst + b * kQ8Block + 16, _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q1))));
  }
}

void axpy(float a, const float* x, float* y, int64_t n) {
  const __m512 va = _mm512_set1_ps(a);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) _mm512_storeu_ps(y + i, _mm512_fmadd_ps(va, _mm512_loadu_ps(x + i), _mm512_loadu_ps(y + i)));
  if (i < n) {
    const __mmask16 m = tail_mask(n - i);
    _mm512_mask_storeu_ps(y + i, m, _mm512_fmadd_ps(va, _mm512_maskz_loadu_ps(m, x + i), _mm512_maskz_loadu_ps(m, y + i)));
  }
}

// exp(x) = 2^n * e^r, n = round(x / ln 2), |r| <= ln2 / 2, e^r by its Taylor polynomial to r^6
// (relative error below 2e-7); scalef applies 2^n without building exponent bits by hand. ln 2 is
// split in two so that n * ln2 is exact.
inline __m512 exp_ps(__m512 x) {
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.0f)), _mm512_set1_ps(88.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504089f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187e-06f), r);
  __m512 p = _mm512_set1_ps(1.0f / 720);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

float exp_sum(float* x, int64_t n, float max) {
  const __m512 vmax = _mm512_set1_ps(max);
  __m512 acc = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m512 e = exp_ps(_mm512_sub_ps(_mm512_loadu_ps(x + i), vmax));
    _mm512_storeu_ps(x + i, e);
    acc = _mm512_add_ps(acc, e);
  }
  if (i < n) {
    const __mmask16 m = tail_mask(n - i);
    const __m512 e = exp_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, x + i), vmax));
    _mm512_mask_storeu_ps(x + i, m, e);
    acc = _mm512_mask_add_ps(acc, m, acc, e);
  }
  return _mm512_reduce_add_ps(acc);
}

void silu_mul(const float* g, const float* u, float* out, int64_t n) {
  const __m512 one = _mm512_set1_ps(1.0f);
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = n - i >= 16 ? __mmask16(0xffff) : tail_mask(n - i);
    const __m512 vg = _mm512_maskz_loadu_ps(m, g + i);
    const __m512 e = exp_ps(_mm512_sub_ps(_mm512_setzero_ps(), vg));
    _mm512_mask_storeu_ps(out + i, m, _mm512_mul_ps(_mm512_div_ps(vg, _mm512_add_ps(one, e)), _mm512_maskz_loadu_ps(m, u + i)));
  }
}

}  // namespace

const VecKernels* vec_avx512() {
  static const VecKernels k{"avx512",    dot_f32,     gemm_f32, gemm_q8_0, quantize_act_q8, to_f32_f16,
                            to_f32_bf16, to_f32_q8_0, axpy,     exp_sum,   silu_mul};
  return &k;
}

}  // namespace celer
