// AVX2 + FMA + F16C kernels (compiled with -mavx2 -mfma -mf16c, called only after cpu_features()
// says the CPU has them). 8 floats per register; four independent accumulators hide the FMA
// latency (4 cycles, 2 per cycle on Skylake-class cores).
#include <immintrin.h>

#include <algorithm>
#include <type_traits>
#include <cmath>
#include <cstring>
#include <limits>

#include "kernels/low_bit_packed.hpp"
#include "kernels/q8_packed.hpp"
#include "kernels/vec.hpp"

namespace celer {
namespace {

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline __m256 load_f16(const uint16_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
inline __m256 load_bf16(const uint16_t* p) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16));
}

// Four accumulators cover the FMA latency (4 cycles, 2 FMAs per cycle).
float dot_f32(const float* a, const float* b, int64_t k) {
  __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  int64_t i = 0;
  for (; i + 32 <= k; i += 32) {
    a0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), a0);
    a1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), a1);
    a2 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 16), _mm256_loadu_ps(b + i + 16), a2);
    a3 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 24), _mm256_loadu_ps(b + i + 24), a3);
  }
  for (; i + 8 <= k; i += 8) a0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), a0);
  float sum = hsum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
  for (; i < k; ++i) sum += a[i] * b[i];
  return sum;
}

// Weight rows in each type, widened to f32 as they are loaded (exactly, see vec.hpp);
// load(row, e) returns elements e..e+7 of a row.
struct F32Rows {
  using T = float;
  static __m256 load(const float* r, int64_t e) { return _mm256_loadu_ps(r + e); }
  static const void* at(const float* r, int64_t e) { return r + e; }
  static constexpr int kLine = 16;  // elements per cache line: one prefetch each
};
struct F16Rows {
  using T = uint16_t;
  static __m256 load(const uint16_t* r, int64_t e) { return load_f16(r + e); }
  static const void* at(const uint16_t* r, int64_t e) { return r + e; }
  static constexpr int kLine = 32;
};
struct BF16Rows {
  using T = uint16_t;
  static __m256 load(const uint16_t* r, int64_t e) { return load_bf16(r + e); }
  static const void* at(const uint16_t* r, int64_t e) { return r + e; }
  static constexpr int kLine = 32;
};
struct Q8Rows {  // K is a multiple of 32: never a tail
  using T = BlockQ8_0;
  static __m256 load(const BlockQ8_0* r, int64_t e) {
    const BlockQ8_0& b = r[e / kQ8Block];
    const __m128i q = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(b.qs + e % kQ8Block));
    return _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q)), _mm256_set1_ps(_cvtsh_ss(b.d)));
  }
  static const void* at(const BlockQ8_0* r, int64_t e) { return r + e / kQ8Block; }
  static constexpr int kLine = kQ8Block;  // a block (34 bytes) at a time
};

template <typename Rows, int MT, int NT>
void tail(const float* x, int64_t ldx, const typename Rows::T* w, int64_t ldw, int64_t e, int64_t k, __m256 (&acc)[MT][NT]);

// An MT x NT tile (MT <= 3: 12 accumulators, 3 activation vectors and a weight vector fill AVX2's
// 16 registers, and 12 independent FMA chains keep both FMA pipes busy where 8 left them waiting):
// each output has one accumulator fed 8 products at a time in K order. The last partial vector
// is copied to zero-padded buffers first, so every row type shares one tail path. With
// `Prefetch` (weights streaming from memory, as in decode) each row also fetches, a cache line
// at a time, the line the next tile's row will need at the same column.
template <typename Rows, int MT, int NT, bool Prefetch = true>
void tile(const float* x, int64_t ldx, const typename Rows::T* w, int64_t ldw, int64_t k, float* y, int64_t ldy) {
  __m256 acc[MT][NT];
  for (int i = 0; i < MT; ++i)
    for (int j = 0; j < NT; ++j) acc[i][j] = _mm256_setzero_ps();
  int64_t e = 0;
  for (; e + 8 <= k; e += 8) {
    __m256 xv[MT];
    for (int i = 0; i < MT; ++i) xv[i] = _mm256_loadu_ps(x + i * ldx + e);
    for (int j = 0; j < NT; ++j) {
      if constexpr (Prefetch)
        if (e % Rows::kLine == 0) _mm_prefetch(static_cast<const char*>(Rows::at(w + (j + NT) * ldw, e)), _MM_HINT_T0);
      const __m256 wv = Rows::load(w + j * ldw, e);
      for (int i = 0; i < MT; ++i) acc[i][j] = _mm256_fmadd_ps(xv[i], wv, acc[i][j]);
    }
  }
  if constexpr (!std::is_same_v<Rows, Q8Rows>) {
    if (e < k) tail<Rows, MT, NT>(x, ldx, w, ldw, e, k, acc);
  }
  for (int i = 0; i < MT; ++i)
    for (int j = 0; j < NT; ++j) y[i * ldy + j] = hsum(acc[i][j]);
}

// The last partial vector, through zero-padded copies, so that every row type shares it.
template <typename Rows, int MT, int NT>
void tail(const float* x, int64_t ldx, const typename Rows::T* w, int64_t ldw, int64_t e, int64_t k, __m256 (&acc)[MT][NT]) {
  {
    alignas(32) float xt[MT][8] = {};
    alignas(32) typename Rows::T wt[NT][8] = {};
    for (int i = 0; i < MT; ++i)
      for (int64_t t = e; t < k; ++t) xt[i][t - e] = x[i * ldx + t];
    for (int j = 0; j < NT; ++j)
      for (int64_t t = e; t < k; ++t) wt[j][t - e] = w[j * ldw + t];
    for (int j = 0; j < NT; ++j) {
      const __m256 wv = Rows::load(wt[j], 0);
      for (int i = 0; i < MT; ++i) acc[i][j] = _mm256_fmadd_ps(_mm256_load_ps(xt[i]), wv, acc[i][j]);
    }
  }
}

// The outputs of one packed group's tile (two halves of 8 rows, C activation rows): the first
// n_rows of its 16 rows.
template <int C>
void store_group(const __m256 (&acc)[2][C], int n_rows, float* y, int64_t ldy) {
  alignas(32) float out[kPackRows];
  for (int c = 0; c < C; ++c) {
    _mm256_store_ps(out, acc[0][c]);
    _mm256_store_ps(out + 8, acc[1][c]);
    std::memcpy(y + c * ldy, out, sizeof(float) * std::min(kPackRows, n_rows));
  }
}

// Packed Q8_0 (q8_packed.hpp), one group of 16 weight rows (two halves of 8) x C activation
// rows. AVX2 has no u8 x s8 product that cannot saturate, so each 4-byte step uses the signed
// quants (stored + 128) with the sign trick: |a| times q with a's sign, pairs summed in int16
// (at most 2 * 127 * 127), then in int32. That is the exact block sum the AVX-512 kernel gets,
// scaled the same way, so both give the same bits.
template <int C>
void tile_q8_packed(const int8_t* xq, const float* xd, int64_t ldx, const uint8_t* w, int64_t nb, int n_rows,
                    float* y, int64_t ldy) {
  const int64_t ldd = ldx / kQ8Block;
  const uint8_t* scales = w + nb * kPackQuantBytes;
  const __m256i flip = _mm256_set1_epi8(static_cast<char>(0x80));
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 acc[2][C];
  for (int h = 0; h < 2; ++h)
    for (int c = 0; c < C; ++c) acc[h][c] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* q = w + b * kPackQuantBytes;
    __m256i s[2][C];
    for (int h = 0; h < 2; ++h)
      for (int c = 0; c < C; ++c) s[h][c] = _mm256_setzero_si256();
    for (int step = 0; step < kQ8Block / 4; ++step) {
      __m256i wv[2];
      for (int h = 0; h < 2; ++h)
        wv[h] = _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + step * 64 + h * 32)), flip);
      for (int c = 0; c < C; ++c) {
        int32_t a4;
        std::memcpy(&a4, xq + c * ldx + b * kQ8Block + step * 4, 4);
        const __m256i av = _mm256_set1_epi32(a4);
        const __m256i aa = _mm256_sign_epi8(av, av);
        for (int h = 0; h < 2; ++h)
          s[h][c] = _mm256_add_epi32(s[h][c], _mm256_madd_epi16(_mm256_maddubs_epi16(aa, _mm256_sign_epi8(wv[h], av)), ones));
      }
    }
    for (int h = 0; h < 2; ++h) {
      const __m256 ws = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(scales + b * kPackScaleBytes + h * 16)));
      for (int c = 0; c < C; ++c)
        acc[h][c] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s[h][c]), _mm256_mul_ps(ws, _mm256_set1_ps(xd[c * ldd + b])), acc[h][c]);
    }
  }
  store_group(acc, n_rows, y, ldy);
}

// Packed 4/5-bit weights (low_bit_packed.hpp), one group of 16 rows (two halves of 8) x C
// activation rows. The unsigned q is maddubs's unsigned operand as it is, so no sign trick is
// needed; pairs of products land in int16, which holds a whole block's 4-bit sums (at most
// 8 * 2 * 15 * 127 per lane) but only one step pair's at 5 bits, so those widen to int32 per
// pair. Exact block sums, scaled as the AVX-512 kernel scales them: the same bits.
template <int Bits, int C>
void tile_q4_packed(const int8_t* xq, const float* xd, const int32_t* xb, int64_t ldx, const uint8_t* w, int64_t nb,
                    int n_rows, float* y, int64_t ldy) {
  constexpr int64_t bb = low_bit_block_bytes(Bits), so = q4_scales_offset(Bits);
  const int64_t ldd = ldx / kQ8Block;
  const __m256i low4 = _mm256_set1_epi8(15);
  const __m256i ones = _mm256_set1_epi16(1);
  // At 5 bits: byte j of a half takes bit j % 8 of byte j / 8 of its 32-bit mask.
  [[maybe_unused]] const __m256i spread = _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1,  //
                                                           2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3);
  [[maybe_unused]] const __m256i bit = _mm256_setr_epi8(1, 2, 4, 8, 16, 32, 64, -128, 1, 2, 4, 8, 16, 32, 64, -128,  //
                                                        1, 2, 4, 8, 16, 32, 64, -128, 1, 2, 4, 8, 16, 32, 64, -128);
  [[maybe_unused]] const __m256i fifth = _mm256_set1_epi8(16);
  auto fifth_bits = [&](const uint8_t* masks, int step, int h) {
    uint32_t m;
    std::memcpy(&m, masks + step * 8 + h * 4, 4);
    const __m256i sel = _mm256_and_si256(_mm256_shuffle_epi8(_mm256_set1_epi32(static_cast<int>(m)), spread), bit);
    return _mm256_and_si256(_mm256_cmpeq_epi8(sel, bit), fifth);
  };
  __m256 acc[2][C];
  for (int h = 0; h < 2; ++h)
    for (int c = 0; c < C; ++c) acc[h][c] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* blk = w + b * bb;
    __m256i s32[2][C], s16[2][C];
    for (int h = 0; h < 2; ++h)
      for (int c = 0; c < C; ++c) s32[h][c] = s16[h][c] = _mm256_setzero_si256();
    for (int t = 0; t < 4; ++t) {
      __m256i lo[2], hi[2];
      for (int h = 0; h < 2; ++h) {
        const __m256i v = _mm256_load_si256(reinterpret_cast<const __m256i*>(blk + t * 64 + h * 32));
        lo[h] = _mm256_and_si256(v, low4);
        hi[h] = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);
        if constexpr (Bits == 5) {
          lo[h] = _mm256_or_si256(lo[h], fifth_bits(blk + kQ4NibbleBytes, t, h));
          hi[h] = _mm256_or_si256(hi[h], fifth_bits(blk + kQ4NibbleBytes, t + 4, h));
        }
      }
      for (int c = 0; c < C; ++c) {
        int32_t a_lo, a_hi;
        std::memcpy(&a_lo, xq + c * ldx + b * kQ8Block + t * 4, 4);
        std::memcpy(&a_hi, xq + c * ldx + b * kQ8Block + 16 + t * 4, 4);
        const __m256i vlo = _mm256_set1_epi32(a_lo), vhi = _mm256_set1_epi32(a_hi);
        for (int h = 0; h < 2; ++h) {
          s16[h][c] = _mm256_add_epi16(s16[h][c], _mm256_add_epi16(_mm256_maddubs_epi16(lo[h], vlo), _mm256_maddubs_epi16(hi[h], vhi)));
          if constexpr (Bits == 5) {
            s32[h][c] = _mm256_add_epi32(s32[h][c], _mm256_madd_epi16(s16[h][c], ones));
            s16[h][c] = _mm256_setzero_si256();
          }
        }
      }
    }
    for (int h = 0; h < 2; ++h) {
      const __m256 ws = _mm256_load_ps(reinterpret_cast<const float*>(blk + so + h * 32));
      const __m256 wo = _mm256_load_ps(reinterpret_cast<const float*>(blk + so + kQ4ScaleBytes + h * 32));
      for (int c = 0; c < C; ++c) {
        if constexpr (Bits == 4) s32[h][c] = _mm256_madd_epi16(s16[h][c], ones);
        const float dx = xd[c * ldd + b];
        const __m256 vxs = _mm256_set1_ps(dx * static_cast<float>(xb[c * ldd + b] / -128));
        acc[h][c] = _mm256_fmadd_ps(wo, vxs, _mm256_fmadd_ps(_mm256_cvtepi32_ps(s32[h][c]), _mm256_mul_ps(ws, _mm256_set1_ps(dx)), acc[h][c]));
      }
    }
  }
  store_group(acc, n_rows, y, ldy);
}

// Packed 6-bit weights (Q6_K, low_bit_packed.hpp), one group of 16 rows (two halves of 8) x C
// activation rows, a block in two halves of columns as in the AVX-512 kernel. maddubs's pairs
// (at most 2 * 63 * 127) fit int16 and widen to int32 every step. The same bits as AVX-512.
template <int C>
void tile_q6_packed(const int8_t* xq, const float* xd, const int32_t* x16, int64_t ldx, const uint8_t* w, int64_t nb,
                    int n_rows, float* y, int64_t ldy) {
  constexpr int64_t bb = low_bit_block_bytes(6);
  const int64_t ldd = ldx / kQ8Block, ld16 = ldx / 16;
  const __m256i low4 = _mm256_set1_epi8(15), top2 = _mm256_set1_epi8(0x30);
  const __m256i ones = _mm256_set1_epi16(1);
  auto top_bits = [&](__m256i top, int shift) {
    switch (shift) {
      case 0: return _mm256_and_si256(_mm256_slli_epi16(top, 4), top2);
      case 2: return _mm256_and_si256(_mm256_slli_epi16(top, 2), top2);
      case 4: return _mm256_and_si256(top, top2);
      default: return _mm256_and_si256(_mm256_srli_epi16(top, 2), top2);
    }
  };
  __m256 acc[2][C];
  for (int g = 0; g < 2; ++g)
    for (int c = 0; c < C; ++c) acc[g][c] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* blk = w + b * bb;
    __m256 d[2];  // the rows' d, for both column halves
    for (int g = 0; g < 2; ++g) d[g] = _mm256_cvtph_ps(_mm_load_si128(reinterpret_cast<const __m128i*>(blk + kQ6DOffset + 16 * g)));
    for (int h = 0; h < 2; ++h) {
      __m256 wsc[2];  // d * sc of the column half h, per row, for row halves g
      for (int g = 0; g < 2; ++g) {
        const __m128i sc = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(blk + kQ6ScaleOffset + h * kPackRows + 8 * g));
        wsc[g] = _mm256_mul_ps(d[g], _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(sc)));
      }
      __m256i s[2][C];
      for (int g = 0; g < 2; ++g)
        for (int c = 0; c < C; ++c) s[g][c] = _mm256_setzero_si256();
      for (int t = 0; t < 4; ++t) {
        __m256i wq[2];
        for (int g = 0; g < 2; ++g) {
          const __m256i v = _mm256_load_si256(reinterpret_cast<const __m256i*>(blk + t * 64 + g * 32));
          const __m256i top = _mm256_load_si256(reinterpret_cast<const __m256i*>(blk + kQ4NibbleBytes + (t / 2) * 64 + g * 32));
          const __m256i nib = h == 0 ? _mm256_and_si256(v, low4) : _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);
          wq[g] = _mm256_or_si256(nib, top_bits(top, 4 * (t % 2) + 2 * h));
        }
        for (int c = 0; c < C; ++c) {
          int32_t a4;
          std::memcpy(&a4, xq + c * ldx + b * kQ8Block + 16 * h + t * 4, 4);
          const __m256i av = _mm256_set1_epi32(a4);
          for (int g = 0; g < 2; ++g) s[g][c] = _mm256_add_epi32(s[g][c], _mm256_madd_epi16(_mm256_maddubs_epi16(wq[g], av), ones));
        }
      }
      for (int c = 0; c < C; ++c) {
        const __m256i x32 = _mm256_set1_epi32(32 * x16[c * ld16 + 2 * b + h]);
        const __m256 vdx = _mm256_set1_ps(xd[c * ldd + b]);
        for (int g = 0; g < 2; ++g)
          acc[g][c] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(s[g][c], x32)), _mm256_mul_ps(wsc[g], vdx), acc[g][c]);
      }
    }
  }
  store_group(acc, n_rows, y, ldy);
}

template <typename Rows>
using Tile = void (*)(const float*, int64_t, const typename Rows::T*, int64_t, int64_t, float*, int64_t);
template <typename Rows, bool Prefetch = true>
constexpr Tile<Rows> kTiles[3][kTileN] = {
    {tile<Rows, 1, 1, Prefetch>, tile<Rows, 1, 2, Prefetch>, tile<Rows, 1, 3, Prefetch>, tile<Rows, 1, 4, Prefetch>},
    {tile<Rows, 2, 1, Prefetch>, tile<Rows, 2, 2, Prefetch>, tile<Rows, 2, 3, Prefetch>, tile<Rows, 2, 4, Prefetch>},
    {tile<Rows, 3, 1, Prefetch>, tile<Rows, 3, 2, Prefetch>, tile<Rows, 3, 3, Prefetch>, tile<Rows, 3, 4, Prefetch>}};

// Tiles of up to kTileM rows run as sub-tiles of three rows: every output is computed the same way
// in either case.
template <typename Rows, bool Prefetch = true>
void gemm_rows(const float* x, int64_t ldx, int mt, const typename Rows::T* w, int64_t ldw, int nt, int64_t k,
               float* y, int64_t ldy) {
  for (int i = 0; i < mt; i += 3)
    kTiles<Rows, Prefetch>[std::min(3, mt - i) - 1][nt - 1](x + i * ldx, ldx, w, ldw, k, y + i * ldy, ldy);
}
void gemm_f32(const float* x, int64_t ldx, int mt, const float* w, int64_t ldw, int nt, int64_t k, float* y,
              int64_t ldy) {
  gemm_rows<F32Rows>(x, ldx, mt, w, ldw, nt, k, y, ldy);
}
void gemm_f32_cached(const float* x, int64_t ldx, int mt, const float* w, int64_t ldw, int nt, int64_t k, float* y,
                     int64_t ldy) {
  gemm_rows<F32Rows, false>(x, ldx, mt, w, ldw, nt, k, y, ldy);
}
void gemm_f16(const float* x, int64_t ldx, int mt, const uint16_t* w, int64_t ldw, int nt, int64_t k, float* y,
              int64_t ldy) {
  gemm_rows<F16Rows>(x, ldx, mt, w, ldw, nt, k, y, ldy);
}
void gemm_bf16(const float* x, int64_t ldx, int mt, const uint16_t* w, int64_t ldw, int nt, int64_t k, float* y,
               int64_t ldy) {
  gemm_rows<BF16Rows>(x, ldx, mt, w, ldw, nt, k, y, ldy);
}

void gemm_q8_0_widened(const float* x, int64_t ldx, int mt, const BlockQ8_0* w, int64_t ldw, int nt, int64_t k,
                       float* y, int64_t ldy) {
  gemm_rows<Q8Rows>(x, ldx, mt, w, ldw, nt, k, y, ldy);
}

void gemm_q8_packed(const int8_t* xq, const float* xd, const int32_t*, int64_t ldx, int mt, const uint8_t* w, int64_t ldg,
                    int ng, int64_t nb, int n_rows, float* y, int64_t ldy, const PackedPrefetch&) {
  for (int g = 0; g < ng && g * kPackRows < n_rows; ++g)
    for (int i = 0; i < mt; i += 2) {
      const int8_t* x = xq + i * ldx;
      const float* d = xd + i * (ldx / kQ8Block);
      float* out = y + i * ldy + g * kPackRows;
      if (mt - i >= 2)
        tile_q8_packed<2>(x, d, ldx, w + g * ldg, nb, n_rows - g * kPackRows, out, ldy);
      else
        tile_q8_packed<1>(x, d, ldx, w + g * ldg, nb, n_rows - g * kPackRows, out, ldy);
    }
}

void gemm_q4_packed(int bits, const int8_t* xq, const float* xd, const int32_t* xb, int64_t ldx, int mt,
                    const uint8_t* w, int64_t ldg, int ng, int64_t nb, int n_rows, float* y, int64_t ldy,
                    const PackedPrefetch&) {
  using Tile = void (*)(const int8_t*, const float*, const int32_t*, int64_t, const uint8_t*, int64_t, int, float*, int64_t);
  static constexpr Tile tiles[2][2] = {{tile_q4_packed<4, 1>, tile_q4_packed<4, 2>}, {tile_q4_packed<5, 1>, tile_q4_packed<5, 2>}};
  const int64_t ldd = ldx / kQ8Block;
  for (int g = 0; g < ng && g * kPackRows < n_rows; ++g)
    for (int i = 0; i < mt; i += 2)
      tiles[bits == 5][std::min(2, mt - i) - 1](xq + i * ldx, xd + i * ldd, xb + i * ldd, ldx, w + g * ldg, nb,
                                                n_rows - g * kPackRows, y + i * ldy + g * kPackRows, ldy);
}

void gemm_q6_packed(const int8_t* xq, const float* xd, const int32_t* x16, int64_t ldx, int mt, const uint8_t* w,
                    int64_t ldg, int ng, int64_t nb, int n_rows, float* y, int64_t ldy, const PackedPrefetch&) {
  const int64_t ldd = ldx / kQ8Block, ld16 = ldx / 16;
  for (int g = 0; g < ng && g * kPackRows < n_rows; ++g)
    for (int i = 0; i < mt; i += 2) {
      auto* tile = mt - i >= 2 ? tile_q6_packed<2> : tile_q6_packed<1>;
      tile(xq + i * ldx, xd + i * ldd, x16 + i * ld16, ldx, w + g * ldg, nb, n_rows - g * kPackRows, y + i * ldy + g * kPackRows, ldy);
    }
}

void quantize_act_q8(const float* x, int8_t* q, float* d, int32_t* bias, int64_t k) {
  const __m256 sign_mask = _mm256_set1_ps(-0.0f);
  for (int64_t b = 0; b < k / kQ8Block; ++b) {
    const float* xb = x + b * kQ8Block;
    __m256 v[4];
    __m256 amax = _mm256_setzero_ps();
    for (int j = 0; j < 4; ++j) {
      v[j] = _mm256_loadu_ps(xb + 8 * j);
      amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign_mask, v[j]));
    }
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    m = _mm_max_ss(m, _mm_movehdup_ps(m));
    const float a = _mm_cvtss_f32(m);
    d[b] = a / 127.0f;
    const __m256 id = _mm256_set1_ps(a != 0 ? 127.0f / a : 0.0f);
    __m256i qi[4];
    for (int j = 0; j < 4; ++j) qi[j] = _mm256_cvtps_epi32(_mm256_mul_ps(v[j], id));  // round to nearest even
    // Pack 32 int32 -> 32 int8; packs work within 128-bit lanes, so fix the order afterwards.
    __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(qi[0], qi[1]), _mm256_packs_epi32(qi[2], qi[3]));
    p = _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + b * kQ8Block), p);
    alignas(32) int32_t sums[8];
    _mm256_store_si256(reinterpret_cast<__m256i*>(sums),
                       _mm256_add_epi32(_mm256_add_epi32(qi[0], qi[1]), _mm256_add_epi32(qi[2], qi[3])));
    int32_t sum = 0;
    for (int32_t v : sums) sum += v;
    bias[b] = -128 * sum;
  }
}

void to_f32_f16(const uint16_t* src, float* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(dst + i, load_f16(src + i));
  for (; i < n; ++i) dst[i] = fp16_to_f32(src[i]);
}

// F16C rounds to nearest even (imm 0); clamping first keeps finite values finite (max/min keep NaN
// only from their second operand, so NaN passes through as the source).
void f32_to_f16_saturating(const float* src, uint16_t* dst, int64_t n) {
  const __m256 hi = _mm256_set1_ps(65504.0f), lo = _mm256_set1_ps(-65504.0f);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 x = _mm256_max_ps(lo, _mm256_min_ps(hi, _mm256_loadu_ps(src + i)));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i), _mm256_cvtps_ph(x, 0));
  }
  for (; i < n; ++i) dst[i] = f32_to_fp16(std::clamp(src[i], -65504.0f, 65504.0f));
}

void to_f32_bf16(const uint16_t* src, float* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(dst + i, load_bf16(src + i));
  for (; i < n; ++i) dst[i] = bf16_to_f32(src[i]);
}

void to_f32_q8_0(const BlockQ8_0* src, float* dst, int64_t n) {
  for (int64_t b = 0; b < n / kQ8Block; ++b) {
    const __m256 d = _mm256_set1_ps(_cvtsh_ss(src[b].d));
    for (int j = 0; j < 4; ++j) {
      const __m128i q = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(src[b].qs + 8 * j));
      _mm256_storeu_ps(dst + b * kQ8Block + 8 * j, _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q))));
    }
  }
}

// 8 KV elements as f32, stored f32 or f16.
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const uint16_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
inline float kv_float(float x) { return x; }
inline float kv_float(uint16_t x) { return _cvtsh_ss(x); }

// Two partial sums over the dimensions (d mod 2) per half of the block, one query at a time.
template <typename T>
void attn_scores(const T* kt, const float* const* qs, int nq, int hd, float scale, float* const* ss) {
  for (int i = 0; i < nq; ++i) {
    const float* q = qs[i];
    __m256 lo0 = _mm256_setzero_ps(), hi0 = lo0, lo1 = lo0, hi1 = lo0;
    int d = 0;
    for (; d + 2 <= hd; d += 2) {
      const __m256 q0 = _mm256_set1_ps(q[d]), q1 = _mm256_set1_ps(q[d + 1]);
      lo0 = _mm256_fmadd_ps(q0, load8(kt + d * 16), lo0);
      hi0 = _mm256_fmadd_ps(q0, load8(kt + d * 16 + 8), hi0);
      lo1 = _mm256_fmadd_ps(q1, load8(kt + (d + 1) * 16), lo1);
      hi1 = _mm256_fmadd_ps(q1, load8(kt + (d + 1) * 16 + 8), hi1);
    }
    if (d < hd) {
      const __m256 q0 = _mm256_set1_ps(q[d]);
      lo0 = _mm256_fmadd_ps(q0, load8(kt + d * 16), lo0);
      hi0 = _mm256_fmadd_ps(q0, load8(kt + d * 16 + 8), hi0);
    }
    const __m256 sc = _mm256_set1_ps(scale);
    _mm256_storeu_ps(ss[i], _mm256_mul_ps(_mm256_add_ps(lo0, lo1), sc));
    _mm256_storeu_ps(ss[i] + 8, _mm256_mul_ps(_mm256_add_ps(hi0, hi1), sc));
  }
}

template <typename T>
void attn_accumulate(const T* v, const float* const* ps, int nq, int hd, int n_slots, float* const* outs) {
  for (int i = 0; i < nq; ++i) {
    const float* p = ps[i];
    float* out = outs[i];
    int d = 0;
    for (; d + 8 <= hd; d += 8) {
      __m256 acc = _mm256_loadu_ps(out + d);
      for (int j = 0; j < n_slots; ++j) acc = _mm256_fmadd_ps(_mm256_set1_ps(p[j]), load8(v + j * hd + d), acc);
      _mm256_storeu_ps(out + d, acc);
    }
    for (; d < hd; ++d)
      for (int j = 0; j < n_slots; ++j) out[d] += p[j] * kv_float(v[j * hd + d]);
  }
}

inline __m256 load8_i8(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}

// Q8_0 KV, one query at a time: per run of 32 dimensions, two halves of the block's 16 slots,
// scaled by the run's slot scales into the total.
void attn_scores_q8(const int8_t* kt, const float* kd, const float* const* qs, int nq, int hd, float scale,
                    float* const* ss) {
  for (int i = 0; i < nq; ++i) {
    const float* q = qs[i];
    __m256 tlo = _mm256_setzero_ps(), thi = tlo;
    for (int c = 0; c < hd / kQ8Block; ++c) {
      __m256 lo = _mm256_setzero_ps(), hi = lo;
      for (int d = c * kQ8Block; d < (c + 1) * kQ8Block; ++d) {
        const __m256 qd = _mm256_set1_ps(q[d]);
        lo = _mm256_fmadd_ps(qd, load8_i8(kt + d * 16), lo);
        hi = _mm256_fmadd_ps(qd, load8_i8(kt + d * 16 + 8), hi);
      }
      tlo = _mm256_fmadd_ps(lo, _mm256_loadu_ps(kd + c * 16), tlo);
      thi = _mm256_fmadd_ps(hi, _mm256_loadu_ps(kd + c * 16 + 8), thi);
    }
    const __m256 sc = _mm256_set1_ps(scale);
    _mm256_storeu_ps(ss[i], _mm256_mul_ps(tlo, sc));
    _mm256_storeu_ps(ss[i] + 8, _mm256_mul_ps(thi, sc));
  }
}

void attn_accumulate_q8(const int8_t* v, const float* vd, const float* const* ps, int nq, int hd, int n_slots,
                        float* const* outs) {
  const int nc = hd / kQ8Block;
  for (int i = 0; i < nq; ++i)
    for (int c = 0; c < nc; ++c) {
      float* out = outs[i] + c * kQ8Block;
      __m256 acc[4];
      for (int k = 0; k < 4; ++k) acc[k] = _mm256_loadu_ps(out + 8 * k);
      for (int j = 0; j < n_slots; ++j) {
        const __m256 w = _mm256_set1_ps(ps[i][j] * vd[j * nc + c]);
        for (int k = 0; k < 4; ++k) acc[k] = _mm256_fmadd_ps(w, load8_i8(v + j * hd + c * kQ8Block + 8 * k), acc[k]);
      }
      for (int k = 0; k < 4; ++k) _mm256_storeu_ps(out + 8 * k, acc[k]);
    }
}

// exp(x) = 2^n * e^r with n = round(x / ln 2), |r| <= ln2 / 2, and e^r by its Taylor polynomial
// to r^6 (relative error below 2e-7 on that interval). ln 2 is split in two so n * ln2 is exact.
inline __m256 exp_ps(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.0f)), _mm256_set1_ps(88.0f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504089f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693145751953125f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.428606765330187e-06f), r);
  __m256 p = _mm256_set1_ps(1.0f / 720);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

// Two passes: the largest value (max_ps drops a NaN when its other operand is a number), then
// the first index holding it.
int64_t argmax(const float* x, int64_t n) {
  __m256 m = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) m = _mm256_max_ps(_mm256_loadu_ps(x + i), m);
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, m);
  float best = lanes[0];
  for (int l = 1; l < 8; ++l) best = std::max(best, lanes[l]);
  for (; i < n; ++i) best = x[i] > best ? x[i] : best;
  const __m256 b = _mm256_set1_ps(best);
  for (i = 0; i + 8 <= n; i += 8) {
    const int hit = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(x + i), b, _CMP_EQ_OQ));
    if (hit) return i + __builtin_ctz(hit);
  }
  for (; i < n; ++i)
    if (x[i] == best) return i;
  return 0;  // every value NaN
}

float exp_sum(float* x, int64_t n, float max) {
  const __m256 vmax = _mm256_set1_ps(max);
  __m256 acc = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 e = exp_ps(_mm256_sub_ps(_mm256_loadu_ps(x + i), vmax));
    _mm256_storeu_ps(x + i, e);
    acc = _mm256_add_ps(acc, e);
  }
  float sum = hsum(acc);
  for (; i < n; ++i) sum += (x[i] = std::exp(x[i] - max));
  return sum;
}

void silu_mul(const float* g, const float* u, float* out, int64_t n) {
  const __m256 one = _mm256_set1_ps(1.0f);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 vg = _mm256_loadu_ps(g + i);
    const __m256 e = exp_ps(_mm256_sub_ps(_mm256_setzero_ps(), vg));
    _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_div_ps(vg, _mm256_add_ps(one, e)), _mm256_loadu_ps(u + i)));
  }
  for (; i < n; ++i) out[i] = g[i] / (1.0f + std::exp(-g[i])) * u[i];
}

}  // namespace

const VecKernels* vec_avx2() {
  static const VecKernels k{"avx2",   dot_f32,     gemm_f32, gemm_f32_cached, gemm_f16, gemm_bf16, gemm_q8_0_widened, gemm_q8_packed, gemm_q4_packed, gemm_q6_packed, quantize_act_q8,
                            to_f32_f16, f32_to_f16_saturating, to_f32_bf16, to_f32_q8_0, attn_scores<float>, attn_accumulate<float>,
                          attn_scores<uint16_t>, attn_accumulate<uint16_t>, attn_scores_q8,
                          attn_accumulate_q8, exp_sum, silu_mul, argmax};
  return &k;
}

}  // namespace celer
