// AVX-512 kernels (F, BW, VL, DQ, VNNI; compiled with those flags and called only after
// cpu_features() says the CPU has them). 16 floats per register; tails use masked loads.
#include <immintrin.h>

#include <algorithm>
#include <array>
#include <cstring>
#include <limits>
#include <type_traits>
#include <utility>

#include "kernels/low_bit_packed.hpp"
#include "kernels/q8_packed.hpp"
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

// Horizontal sums of four accumulators at once, stored to y[0..n) (n <= 4). Each vector is
// summed in one fixed order whatever its neighbours (halves of 256, then of 128, then pairs,
// as _mm512_reduce_add_ps does), so every tile shape gives the same bits; sharing the shuffles
// between four vectors costs a third of four separate reductions.
inline void reduce4_store(__m512 a, __m512 b, __m512 c, __m512 d, float* y, int n) {
  const __m512 ab = _mm512_add_ps(_mm512_shuffle_f32x4(a, b, 0x44), _mm512_shuffle_f32x4(a, b, 0xEE));
  const __m512 cd = _mm512_add_ps(_mm512_shuffle_f32x4(c, d, 0x44), _mm512_shuffle_f32x4(c, d, 0xEE));
  const __m512 u = _mm512_add_ps(_mm512_shuffle_f32x4(ab, cd, 0x88), _mm512_shuffle_f32x4(ab, cd, 0xDD));
  const __m512 w = _mm512_add_ps(u, _mm512_permute_ps(u, 0x4E));
  const __m512 r = _mm512_add_ps(w, _mm512_permute_ps(w, 0xB1));
  const __m512 packed = _mm512_permutexvar_ps(_mm512_setr_epi32(0, 4, 8, 12, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0), r);
  _mm_mask_storeu_ps(y, static_cast<__mmask8>((1u << n) - 1), _mm512_castps512_ps128(packed));
}

template <int MT, int NT>
inline void store_tile(__m512 (&acc)[MT][NT], float* y, int64_t ldy) {
  static_assert(NT <= 4, "reduce4_store handles four columns");
  const __m512 z = _mm512_setzero_ps();
  for (int i = 0; i < MT; ++i)
    reduce4_store(acc[i][0], NT > 1 ? acc[i][NT > 1 ? 1 : 0] : z, NT > 2 ? acc[i][NT > 2 ? 2 : 0] : z,
                  NT > 3 ? acc[i][NT > 3 ? 3 : 0] : z, y + i * ldy, NT);
}

// Weight rows in each type, widened to f32 as they are loaded; the widening is exact (a Q8_0
// value d * q has at most 11 + 8 significant bits), so a tile on a row type gives bit for bit
// what gemm_f32 gives on the widened row. load(row, e) returns elements e..e+15 of a row.
struct F32Rows {
  using T = float;
  static __m512 load(const float* r, int64_t e) { return _mm512_loadu_ps(r + e); }
  static __m512 load(const float* r, int64_t e, __mmask16 m) { return _mm512_maskz_loadu_ps(m, r + e); }
  static const void* at(const float* r, int64_t e) { return r + e; }
};
struct F16Rows {
  using T = uint16_t;
  static __m512 load(const uint16_t* r, int64_t e) { return load_f16(r + e); }
  static __m512 load(const uint16_t* r, int64_t e, __mmask16 m) { return load_f16_mask(r + e, m); }
  static const void* at(const uint16_t* r, int64_t e) { return r + e; }
};
struct Q8Rows {
  using T = BlockQ8_0;
};
struct BF16Rows {
  using T = uint16_t;
  static __m512 load(const uint16_t* r, int64_t e) { return load_bf16(r + e); }
  static __m512 load(const uint16_t* r, int64_t e, __mmask16 m) { return load_bf16_mask(r + e, m); }
  static const void* at(const uint16_t* r, int64_t e) { return r + e; }
};
// An MT x NT tile: each output has one accumulator fed 16 products at a time in K order; the
// tile's independent accumulators (up to 24) keep both FMA units busy. When the weights stream
// from memory (decode), each row is prefetched at the same place in the next tile's rows (the
// matrix is read in row order): the hardware prefetchers alone leave the cores waiting. A panel
// already in L2 (prefill) is not prefetched: that would only push the activations out of L1.
template <typename Rows, bool Prefetch, int MT, int NT>
void tile(const float* x, int64_t ldx, const typename Rows::T* w, int64_t ldw, int64_t k, float* y, int64_t ldy) {
  __m512 acc[MT][NT];
  for (int i = 0; i < MT; ++i)
    for (int j = 0; j < NT; ++j) acc[i][j] = _mm512_setzero_ps();
  int64_t e = 0;
  for (; e + 16 <= k; e += 16) {
    __m512 xv[MT];
    for (int i = 0; i < MT; ++i) xv[i] = _mm512_loadu_ps(x + i * ldx + e);
    for (int j = 0; j < NT; ++j) {
      if constexpr (Prefetch) _mm_prefetch(static_cast<const char*>(Rows::at(w + (j + NT) * ldw, e)), _MM_HINT_T0);
      const __m512 wv = Rows::load(w + j * ldw, e);
      for (int i = 0; i < MT; ++i) acc[i][j] = _mm512_fmadd_ps(xv[i], wv, acc[i][j]);
    }
  }
  if (e < k) {
    const __mmask16 m = tail_mask(k - e);
    __m512 xv[MT];
    for (int i = 0; i < MT; ++i) xv[i] = _mm512_maskz_loadu_ps(m, x + i * ldx + e);
    for (int j = 0; j < NT; ++j) {
      const __m512 wv = Rows::load(w + j * ldw, e, m);
      for (int i = 0; i < MT; ++i) acc[i][j] = _mm512_fmadd_ps(xv[i], wv, acc[i][j]);
    }
  }
  store_tile(acc, y, ldy);
}

// The Q8_0 tile walks whole blocks: one scale conversion per block and row, the same 16-wide
// steps in K order as the generic tile (so still bit-identical to gemm_f32 on widened rows).
template <int MT, int NT>
void tile_q8_widened(const float* x, int64_t ldx, const BlockQ8_0* w, int64_t ldw, int64_t k, float* y, int64_t ldy) {
  __m512 acc[MT][NT];
  for (int i = 0; i < MT; ++i)
    for (int j = 0; j < NT; ++j) acc[i][j] = _mm512_setzero_ps();
  for (int64_t b = 0; b < k / kQ8Block; ++b) {
    const int64_t e = b * kQ8Block;
    __m512 x0[MT], x1[MT];
    for (int i = 0; i < MT; ++i) {
      x0[i] = _mm512_loadu_ps(x + i * ldx + e);
      x1[i] = _mm512_loadu_ps(x + i * ldx + e + 16);
    }
    for (int j = 0; j < NT; ++j) {
      const BlockQ8_0& blk = w[j * ldw + b];
      _mm_prefetch(reinterpret_cast<const char*>(&blk + NT * ldw), _MM_HINT_T0);
      const __m512 d = _mm512_set1_ps(_cvtsh_ss(blk.d));
      const __m512 w0 = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk.qs)))), d);
      const __m512 w1 = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk.qs + 16)))), d);
      for (int i = 0; i < MT; ++i) acc[i][j] = _mm512_fmadd_ps(x0[i], w0, acc[i][j]);
      for (int i = 0; i < MT; ++i) acc[i][j] = _mm512_fmadd_ps(x1[i], w1, acc[i][j]);
    }
  }
  store_tile(acc, y, ldy);
}

// What a packed tile fetches while it computes block b of nb (see PackedPrefetch): with
// `Prefetch` (decode, the weights stream from memory) the block 4 blocks on (blocks lie
// block_bytes apart) in each of its R groups; otherwise block b's share of the next_lines
// lines at `next`.
template <bool Prefetch, int R>
void fetch_ahead(const uint8_t* blk, int64_t ldg, int64_t block_bytes, int64_t b, int64_t nb, const uint8_t* next,
                 int64_t next_lines) {
  if constexpr (Prefetch) {
    for (int r = 0; r < R; ++r)
      for (int64_t line = 0; line < block_bytes / 64; ++line)
        _mm_prefetch(reinterpret_cast<const char*>(blk + r * ldg + 4 * block_bytes + line * 64), _MM_HINT_T0);
  } else {
    for (int64_t line = b * next_lines / nb; line < (b + 1) * next_lines / nb; ++line)
      _mm_prefetch(reinterpret_cast<const char*>(next + line * 64), _MM_HINT_T1);
  }
}

// The outputs of a packed tile of R groups x C activation rows: the first n_rows of its rows.
template <int R, int C>
void store_groups(const __m512 (&acc)[R][C], int n_rows, float* y, int64_t ldy) {
  for (int r = 0; r < R; ++r) {
    const int rows = std::min(kPackRows, n_rows - r * kPackRows);
    if (rows <= 0) break;
    const __mmask16 m = rows == kPackRows ? static_cast<__mmask16>(0xFFFF) : tail_mask(rows);
    for (int c = 0; c < C; ++c) _mm512_mask_storeu_ps(y + c * ldy + r * kPackRows, m, acc[r][c]);
  }
}

// Packed Q8_0 (q8_packed.hpp): R groups of 16 weight rows x C activation rows. Each 64-byte
// step of a group holds 4 quants of each of its 16 rows; one dpbusd multiplies it by 4
// activation bytes broadcast to all lanes, adding 4 products into each row's int32 lane: 64
// multiply-adds per instruction, with each lane its own output, so nothing is reduced across
// lanes. A block (8 steps) is then scaled once per output: convert, one multiply of the two
// scales, one FMA. The weights are the unsigned operand (stored +128), the activations the
// signed one, and each block's sum starts at the activations' bias (-128 * sum(q)).
template <bool Prefetch, int R, int C>
void tile_q8_packed(const int8_t* xq, const float* xd, const int32_t* xb, int64_t ldx, const uint8_t* w, int64_t ldg,
                    int64_t nb, int n_rows, float* y, int64_t ldy, const uint8_t* next, int64_t next_bytes) {
  const int64_t ldd = ldx / kQ8Block;
  const uint8_t* scales = w + nb * kPackQuantBytes;
  const int64_t next_lines = (next_bytes + 63) / 64;
  __m512 acc[R][C];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) acc[r][c] = _mm512_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* q = w + b * kPackQuantBytes;
    __m512i s[R][C];
    for (int c = 0; c < C; ++c) {
      const __m512i bias = _mm512_set1_epi32(xb[c * ldd + b]);
      for (int r = 0; r < R; ++r) s[r][c] = bias;
    }
    fetch_ahead<Prefetch, R>(q, ldg, kPackQuantBytes, b, nb, next, next_lines);
    for (int step = 0; step < kQ8Block / 4; ++step) {
      __m512i wv[R];
      for (int r = 0; r < R; ++r) wv[r] = _mm512_load_si512(q + r * ldg + step * 64);  // groups start on cache lines
      for (int c = 0; c < C; ++c) {
        int32_t a4;
        std::memcpy(&a4, xq + c * ldx + b * kQ8Block + step * 4, 4);
        const __m512i av = _mm512_set1_epi32(a4);
        for (int r = 0; r < R; ++r) s[r][c] = _mm512_dpbusd_epi32(s[r][c], wv[r], av);
      }
    }
    __m512 ws[R];
    for (int r = 0; r < R; ++r)
      ws[r] = _mm512_cvtph_ps(_mm256_load_si256(reinterpret_cast<const __m256i*>(scales + r * ldg + b * kPackScaleBytes)));
    for (int c = 0; c < C; ++c) {
      const __m512 xs = _mm512_set1_ps(xd[c * ldd + b]);
      for (int r = 0; r < R; ++r) acc[r][c] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s[r][c]), _mm512_mul_ps(ws[r], xs), acc[r][c]);
    }
  }
  store_groups(acc, n_rows, y, ldy);
}

// Packed 4/5-bit weights (low_bit_packed.hpp): R groups of 16 weight rows x C activation rows, as
// tile_q8_packed. Each 64-byte load holds steps t and t + 4 of a block in its low and high
// nibbles; an AND and a shift give the two step vectors (at 5 bits a masked add puts each
// lane's fifth bit back), and each meets its 4 activation bytes in one dpbusd. The weights are
// the unsigned operand as they are; their offsets meet the activations' block sums instead.
template <int Bits, bool Prefetch, int R, int C>
void tile_q4_packed(const int8_t* xq, const float* xd, const int32_t* xb, int64_t ldx, const uint8_t* w, int64_t ldg,
                    int64_t nb, int n_rows, float* y, int64_t ldy, const uint8_t* next, int64_t next_bytes) {
  constexpr int64_t bb = low_bit_block_bytes(Bits), so = q4_scales_offset(Bits);
  const int64_t ldd = ldx / kQ8Block;
  const int64_t next_lines = (next_bytes + 63) / 64;
  const __m512i low4 = _mm512_set1_epi8(15);
  [[maybe_unused]] const __m512i fifth = _mm512_set1_epi8(16);
  __m512 acc[R][C];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) acc[r][c] = _mm512_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* blk = w + b * bb;
    fetch_ahead<Prefetch, R>(blk, ldg, bb, b, nb, next, next_lines);
    __m512i s[R][C];
    for (int r = 0; r < R; ++r)
      for (int c = 0; c < C; ++c) s[r][c] = _mm512_setzero_si512();
    for (int t = 0; t < 4; ++t) {
      __m512i lo[R], hi[R];
      for (int r = 0; r < R; ++r) {
        const __m512i v = _mm512_load_si512(blk + r * ldg + t * 64);  // blocks start on cache lines
        lo[r] = _mm512_and_si512(v, low4);
        hi[r] = _mm512_and_si512(_mm512_srli_epi16(v, 4), low4);
        if constexpr (Bits == 5) {
          uint64_t mlo, mhi;
          std::memcpy(&mlo, blk + r * ldg + kQ4NibbleBytes + t * 8, 8);
          std::memcpy(&mhi, blk + r * ldg + kQ4NibbleBytes + (t + 4) * 8, 8);
          lo[r] = _mm512_mask_add_epi8(lo[r], _cvtu64_mask64(mlo), lo[r], fifth);
          hi[r] = _mm512_mask_add_epi8(hi[r], _cvtu64_mask64(mhi), hi[r], fifth);
        }
      }
      for (int c = 0; c < C; ++c) {
        int32_t a_lo, a_hi;
        std::memcpy(&a_lo, xq + c * ldx + b * kQ8Block + t * 4, 4);
        std::memcpy(&a_hi, xq + c * ldx + b * kQ8Block + 16 + t * 4, 4);
        const __m512i vlo = _mm512_set1_epi32(a_lo), vhi = _mm512_set1_epi32(a_hi);
        for (int r = 0; r < R; ++r) s[r][c] = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(s[r][c], lo[r], vlo), hi[r], vhi);
      }
    }
    __m512 ws[R], wo[R];
    for (int r = 0; r < R; ++r) {
      ws[r] = _mm512_load_ps(blk + r * ldg + so);
      wo[r] = _mm512_load_ps(blk + r * ldg + so + kQ4ScaleBytes);
    }
    for (int c = 0; c < C; ++c) {
      const float dx = xd[c * ldd + b];
      const __m512 vdx = _mm512_set1_ps(dx), vxs = _mm512_set1_ps(dx * static_cast<float>(xb[c * ldd + b] / -128));
      for (int r = 0; r < R; ++r)
        acc[r][c] = _mm512_fmadd_ps(wo[r], vxs, _mm512_fmadd_ps(_mm512_cvtepi32_ps(s[r][c]), _mm512_mul_ps(ws[r], vdx), acc[r][c]));
    }
  }
  store_groups(acc, n_rows, y, ldy);
}

// Packed 6-bit weights (Q6_K, low_bit_packed.hpp): R groups x C activation rows, a block in two
// halves (columns 0-15 from the low nibbles, 16-31 from the high ones), for each half has its
// own scale. A nibble vector and its top-bit vector give the 6-bit weights of one step: the
// nibble masked out, the top pair shifted to bits 4-5. Each half's exact sum, less 32 times the
// activations' sum, is scaled once per output.
template <bool Prefetch, int R, int C>
void tile_q6_packed(const int8_t* xq, const float* xd, const int32_t* x16, int64_t ldx, const uint8_t* w, int64_t ldg,
                    int64_t nb, int n_rows, float* y, int64_t ldy, const uint8_t* next, int64_t next_bytes) {
  constexpr int64_t bb = low_bit_block_bytes(6);
  const int64_t ldd = ldx / kQ8Block, ld16 = ldx / 16;
  const int64_t next_lines = (next_bytes + 63) / 64;
  const __m512i low4 = _mm512_set1_epi8(15), top2 = _mm512_set1_epi8(0x30);
  // Bits 4v + 2h .. 4v + 2h + 1 of each top byte moved to bits 4-5.
  auto top_bits = [&](__m512i top, int shift) {
    switch (shift) {
      case 0: return _mm512_and_si512(_mm512_slli_epi16(top, 4), top2);
      case 2: return _mm512_and_si512(_mm512_slli_epi16(top, 2), top2);
      case 4: return _mm512_and_si512(top, top2);
      default: return _mm512_and_si512(_mm512_srli_epi16(top, 2), top2);
    }
  };
  __m512 acc[R][C];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) acc[r][c] = _mm512_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* blk = w + b * bb;
    fetch_ahead<Prefetch, R>(blk, ldg, bb, b, nb, next, next_lines);
    __m512 d[R];  // the rows' d, for both halves
    for (int r = 0; r < R; ++r)
      d[r] = _mm512_cvtph_ps(_mm256_load_si256(reinterpret_cast<const __m256i*>(blk + r * ldg + kQ6DOffset)));
    for (int h = 0; h < 2; ++h) {
      __m512 wsc[R];  // d * sc of the half, per row
      for (int r = 0; r < R; ++r) {
        const __m128i sc = _mm_load_si128(reinterpret_cast<const __m128i*>(blk + r * ldg + kQ6ScaleOffset + h * kPackRows));
        wsc[r] = _mm512_mul_ps(d[r], _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(sc)));
      }
      __m512i s[R][C];
      for (int r = 0; r < R; ++r)
        for (int c = 0; c < C; ++c) s[r][c] = _mm512_setzero_si512();
      for (int t = 0; t < 4; ++t) {
        __m512i wq[R];
        for (int r = 0; r < R; ++r) {
          const __m512i v = _mm512_load_si512(blk + r * ldg + t * 64);
          const __m512i top = _mm512_load_si512(blk + r * ldg + kQ4NibbleBytes + (t / 2) * 64);
          const __m512i nib = h == 0 ? _mm512_and_si512(v, low4) : _mm512_and_si512(_mm512_srli_epi16(v, 4), low4);
          wq[r] = _mm512_or_si512(nib, top_bits(top, 4 * (t % 2) + 2 * h));
        }
        for (int c = 0; c < C; ++c) {
          int32_t a4;
          std::memcpy(&a4, xq + c * ldx + b * kQ8Block + 16 * h + t * 4, 4);
          const __m512i av = _mm512_set1_epi32(a4);
          for (int r = 0; r < R; ++r) s[r][c] = _mm512_dpbusd_epi32(s[r][c], wq[r], av);
        }
      }
      for (int c = 0; c < C; ++c) {
        const __m512i x32 = _mm512_set1_epi32(32 * x16[c * ld16 + 2 * b + h]);
        const __m512 vdx = _mm512_set1_ps(xd[c * ldd + b]);
        for (int r = 0; r < R; ++r)
          acc[r][c] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(s[r][c], x32)), _mm512_mul_ps(wsc[r], vdx), acc[r][c]);
      }
    }
  }
  store_groups(acc, n_rows, y, ldy);
}

template <typename Rows>
using Tile = void (*)(const float*, int64_t, const typename Rows::T*, int64_t, int64_t, float*, int64_t);

// Tables of every tile shape, [mt - 1][nt - 1].
template <typename Rows, bool Prefetch, size_t... I>
constexpr auto make_tiles(std::index_sequence<I...>) {
  return std::array<Tile<Rows>, sizeof...(I)>{tile<Rows, Prefetch, int(I / kTileN) + 1, int(I % kTileN) + 1>...};
}
template <size_t... I>
constexpr auto make_tiles_q8_widened(std::index_sequence<I...>) {
  return std::array<Tile<Q8Rows>, sizeof...(I)>{tile_q8_widened<int(I / kTileN) + 1, int(I % kTileN) + 1>...};
}
using TileQ8 = void (*)(const int8_t*, const float*, const int32_t*, int64_t, const uint8_t*, int64_t, int64_t, int,
                       float*, int64_t, const uint8_t*, int64_t);
template <bool Prefetch, size_t... I>
constexpr auto make_tiles_q8(std::index_sequence<I...>) {
  return std::array<TileQ8, sizeof...(I)>{tile_q8_packed<Prefetch, int(I / kTileM) + 1, int(I % kTileM) + 1>...};
}
template <int Bits, bool Prefetch, size_t... I>
constexpr auto make_tiles_q4(std::index_sequence<I...>) {
  return std::array<TileQ8, sizeof...(I)>{tile_q4_packed<Bits, Prefetch, int(I / kTileM) + 1, int(I % kTileM) + 1>...};
}
template <bool Prefetch, size_t... I>
constexpr auto make_tiles_q6(std::index_sequence<I...>) {
  return std::array<TileQ8, sizeof...(I)>{tile_q6_packed<Prefetch, int(I / kTileM) + 1, int(I % kTileM) + 1>...};
}
template <typename Rows, bool Prefetch = true>
constexpr auto kTiles = make_tiles<Rows, Prefetch>(std::make_index_sequence<kTileM * kTileN>());
constexpr auto kTilesQ8Widened = make_tiles_q8_widened(std::make_index_sequence<kTileM * kTileN>());
// [groups - 1][activation rows - 1]
template <bool Prefetch>
constexpr auto kTilesQ8 = make_tiles_q8<Prefetch>(std::make_index_sequence<kPackTileGroups * kTileM>());
template <int Bits, bool Prefetch>
constexpr auto kTilesQ4 = make_tiles_q4<Bits, Prefetch>(std::make_index_sequence<kPackTileGroups * kTileM>());
template <bool Prefetch>
constexpr auto kTilesQ6 = make_tiles_q6<Prefetch>(std::make_index_sequence<kPackTileGroups * kTileM>());

void gemm_f32(const float* x, int64_t ldx, int mt, const float* w, int64_t ldw, int nt, int64_t k, float* y,
              int64_t ldy) {
  kTiles<F32Rows>[(mt - 1) * kTileN + nt - 1](x, ldx, w, ldw, k, y, ldy);
}
void gemm_f32_cached(const float* x, int64_t ldx, int mt, const float* w, int64_t ldw, int nt, int64_t k, float* y,
                     int64_t ldy) {
  kTiles<F32Rows, false>[(mt - 1) * kTileN + nt - 1](x, ldx, w, ldw, k, y, ldy);
}
void gemm_f16(const float* x, int64_t ldx, int mt, const uint16_t* w, int64_t ldw, int nt, int64_t k, float* y,
              int64_t ldy) {
  kTiles<F16Rows>[(mt - 1) * kTileN + nt - 1](x, ldx, w, ldw, k, y, ldy);
}
void gemm_bf16(const float* x, int64_t ldx, int mt, const uint16_t* w, int64_t ldw, int nt, int64_t k, float* y,
               int64_t ldy) {
  kTiles<BF16Rows>[(mt - 1) * kTileN + nt - 1](x, ldx, w, ldw, k, y, ldy);
}

void gemm_q8_0_widened(const float* x, int64_t ldx, int mt, const BlockQ8_0* w, int64_t ldw, int nt, int64_t k,
                       float* y, int64_t ldy) {
  kTilesQ8Widened[(mt - 1) * kTileN + nt - 1](x, ldx, w, ldw, k, y, ldy);
}

void gemm_q8_packed(const int8_t* xq, const float* xd, const int32_t* xb, int64_t ldx, int mt, const uint8_t* w,
                    int64_t ldg, int ng, int64_t nb, int n_rows, float* y, int64_t ldy, const PackedPrefetch& prefetch) {
  const size_t shape = static_cast<size_t>((ng - 1) * kTileM + mt - 1);
  if (prefetch.stream)
    kTilesQ8<true>[shape](xq, xd, xb, ldx, w, ldg, nb, n_rows, y, ldy, nullptr, 0);
  else
    kTilesQ8<false>[shape](xq, xd, xb, ldx, w, ldg, nb, n_rows, y, ldy, prefetch.next, prefetch.next_bytes);
}

void gemm_q4_packed(int bits, const int8_t* xq, const float* xd, const int32_t* xb, int64_t ldx, int mt,
                    const uint8_t* w, int64_t ldg, int ng, int64_t nb, int n_rows, float* y, int64_t ldy,
                    const PackedPrefetch& prefetch) {
  const size_t shape = static_cast<size_t>((ng - 1) * kTileM + mt - 1);
  const auto& tiles = prefetch.stream ? (bits == 5 ? kTilesQ4<5, true> : kTilesQ4<4, true>)
                                      : (bits == 5 ? kTilesQ4<5, false> : kTilesQ4<4, false>);
  tiles[shape](xq, xd, xb, ldx, w, ldg, nb, n_rows, y, ldy, prefetch.next, prefetch.next_bytes);
}

void gemm_q6_packed(const int8_t* xq, const float* xd, const int32_t* x16, int64_t ldx, int mt, const uint8_t* w,
                    int64_t ldg, int ng, int64_t nb, int n_rows, float* y, int64_t ldy, const PackedPrefetch& prefetch) {
  const size_t shape = static_cast<size_t>((ng - 1) * kTileM + mt - 1);
  const auto& tiles = prefetch.stream ? kTilesQ6<true> : kTilesQ6<false>;
  tiles[shape](xq, xd, x16, ldx, w, ldg, nb, n_rows, y, ldy, prefetch.next, prefetch.next_bytes);
}

void quantize_act_q8(const float* x, int8_t* q, float* d, int32_t* bias, int64_t k) {
  for (int64_t b = 0; b < k / kQ8Block; ++b) {
    const __m512 v0 = _mm512_loadu_ps(x + b * kQ8Block);
    const __m512 v1 = _mm512_loadu_ps(x + b * kQ8Block + 16);
    const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
    d[b] = amax / 127.0f;
    const __m512 id = _mm512_set1_ps(amax != 0 ? 127.0f / amax : 0.0f);
    // cvtps_epi32 rounds to nearest even, as the scalar path's nearbyint does.
    const __m512i q0 = _mm512_cvtps_epi32(_mm512_mul_ps(v0, id));
    const __m512i q1 = _mm512_cvtps_epi32(_mm512_mul_ps(v1, id));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + b * kQ8Block), _mm512_cvtsepi32_epi8(q0));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + b * kQ8Block + 16), _mm512_cvtsepi32_epi8(q1));
    bias[b] = -128 * _mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1));
  }
}

void to_f32_f16(const uint16_t* src, float* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) _mm512_storeu_ps(dst + i, load_f16(src + i));
  if (i < n) _mm512_mask_storeu_ps(dst + i, tail_mask(n - i), load_f16_mask(src + i, tail_mask(n - i)));
}

// Rounds to nearest even (imm 0); clamping first keeps finite values finite (max/min return their
// second operand when either is NaN, so NaN passes through).
void f32_to_f16_saturating(const float* src, uint16_t* dst, int64_t n) {
  const __m512 hi = _mm512_set1_ps(65504.0f), lo = _mm512_set1_ps(-65504.0f);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m512 x = _mm512_max_ps(lo, _mm512_min_ps(hi, _mm512_loadu_ps(src + i)));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i), _mm512_cvtps_ph(x, 0));
  }
  if (i < n) {
    const __mmask16 m = tail_mask(n - i);
    const __m512 x = _mm512_max_ps(lo, _mm512_min_ps(hi, _mm512_maskz_loadu_ps(m, src + i)));
    _mm256_mask_storeu_epi16(dst + i, m, _mm512_cvtps_ph(x, 0));
  }
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

// 16 KV elements as f32, stored f32 or f16 (widened exactly).
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const uint16_t* p) { return load_f16(p); }
inline __m512 load16(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
inline __m512 load16(const uint16_t* p, __mmask16 m) { return load_f16_mask(p, m); }

// Calls f(std::integral_constant<int, NQ>) for nq queries, 1 <= nq <= kAttnRows: the attention
// kernels are compiled per query count, so each keeps its accumulators in registers.
template <typename F>
void with_query_count(int nq, F&& f) {
  static_assert(kAttnRows == 4);
  switch (nq) {
    case 1: f(std::integral_constant<int, 1>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 3: f(std::integral_constant<int, 3>{}); break;
    default: f(std::integral_constant<int, 4>{}); break;
  }
}

// NQ queries against one K block: four partial sums per query over the dimensions (d mod 4),
// each K row loaded once for all queries. A query's arithmetic does not depend on NQ.
template <int NQ, typename T>
void scores_n(const T* kt, const float* const* q, int hd, float scale, float* const* s) {
  __m512 a[NQ][4];
  for (int i = 0; i < NQ; ++i)
    for (int r = 0; r < 4; ++r) a[i][r] = _mm512_setzero_ps();
  int d = 0;
  for (; d + 4 <= hd; d += 4)
    for (int r = 0; r < 4; ++r) {
      const __m512 k = load16(kt + (d + r) * 16);
      for (int i = 0; i < NQ; ++i) a[i][r] = _mm512_fmadd_ps(_mm512_set1_ps(q[i][d + r]), k, a[i][r]);
    }
  for (; d < hd; ++d) {
    const __m512 k = load16(kt + d * 16);
    for (int i = 0; i < NQ; ++i) a[i][0] = _mm512_fmadd_ps(_mm512_set1_ps(q[i][d]), k, a[i][0]);
  }
  for (int i = 0; i < NQ; ++i)
    _mm512_storeu_ps(s[i], _mm512_mul_ps(_mm512_add_ps(_mm512_add_ps(a[i][0], a[i][1]), _mm512_add_ps(a[i][2], a[i][3])),
                                         _mm512_set1_ps(scale)));
}

template <typename T>
void attn_scores(const T* kt, const float* const* q, int nq, int hd, float scale, float* const* s) {
  with_query_count(nq, [&](auto n) { scores_n<n(), T>(kt, q, hd, scale, s); });
}

// NQ queries' weighted sums of one V block: 32 dimensions at a time in registers, even and odd
// slots summed apart (independent FMA chains), each V row loaded once for all queries.
template <int NQ, typename T>
void accumulate_n(const T* v, const float* const* p, int hd, int n_slots, float* const* out) {
  for (int d0 = 0; d0 < hd; d0 += 32) {
    __mmask16 m[2];
    __m512 even[NQ][2], odd[NQ][2];
    for (int c = 0; c < 2; ++c) {
      const int d = d0 + 16 * c;
      m[c] = d >= hd ? __mmask16(0) : hd - d >= 16 ? __mmask16(0xffff) : tail_mask(hd - d);
      for (int i = 0; i < NQ; ++i) {
        even[i][c] = _mm512_maskz_loadu_ps(m[c], out[i] + d);
        odd[i][c] = _mm512_setzero_ps();
      }
    }
    for (int j = 0; j < n_slots; j += 2)
      for (int c = 0; c < 2; ++c) {
        const __m512 ve = load16(v + j * hd + d0 + 16 * c, m[c]);
        for (int i = 0; i < NQ; ++i) even[i][c] = _mm512_fmadd_ps(_mm512_set1_ps(p[i][j]), ve, even[i][c]);
        if (j + 1 == n_slots) continue;
        const __m512 vo = load16(v + (j + 1) * hd + d0 + 16 * c, m[c]);
        for (int i = 0; i < NQ; ++i) odd[i][c] = _mm512_fmadd_ps(_mm512_set1_ps(p[i][j + 1]), vo, odd[i][c]);
      }
    for (int c = 0; c < 2; ++c)
      for (int i = 0; i < NQ; ++i) _mm512_mask_storeu_ps(out[i] + d0 + 16 * c, m[c], _mm512_add_ps(even[i][c], odd[i][c]));
  }
}

template <typename T>
void attn_accumulate(const T* v, const float* const* p, int nq, int hd, int n_slots, float* const* out) {
  with_query_count(nq, [&](auto n) { accumulate_n<n(), T>(v, p, hd, n_slots, out); });
}

inline __m512 load16_i8(const int8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}

// Q8_0 KV: per run of 32 dimensions, two partial sums per query (d mod 2) over int8 keys widened
// exactly, then scaled by the run's 16 slot scales into the query's total.
template <int NQ>
void scores_q8_n(const int8_t* kt, const float* kd, const float* const* q, int hd, float scale, float* const* s) {
  __m512 total[NQ];
  for (int i = 0; i < NQ; ++i) total[i] = _mm512_setzero_ps();
  for (int c = 0; c < hd / kQ8Block; ++c) {
    __m512 a[NQ][2];
    for (int i = 0; i < NQ; ++i) a[i][0] = a[i][1] = _mm512_setzero_ps();
    for (int d = c * kQ8Block; d < (c + 1) * kQ8Block; d += 2)
      for (int r = 0; r < 2; ++r) {
        const __m512 k = load16_i8(kt + (d + r) * 16);
        for (int i = 0; i < NQ; ++i) a[i][r] = _mm512_fmadd_ps(_mm512_set1_ps(q[i][d + r]), k, a[i][r]);
      }
    const __m512 ks = _mm512_loadu_ps(kd + c * 16);
    for (int i = 0; i < NQ; ++i) total[i] = _mm512_fmadd_ps(_mm512_add_ps(a[i][0], a[i][1]), ks, total[i]);
  }
  for (int i = 0; i < NQ; ++i) _mm512_storeu_ps(s[i], _mm512_mul_ps(total[i], _mm512_set1_ps(scale)));
}

void attn_scores_q8(const int8_t* kt, const float* kd, const float* const* q, int nq, int hd, float scale,
                    float* const* s) {
  with_query_count(nq, [&](auto n) { scores_q8_n<n()>(kt, kd, q, hd, scale, s); });
}

// Q8_0 KV: a slot's run of 32 values meets the query's weight times the run's scale.
template <int NQ>
void accumulate_q8_n(const int8_t* v, const float* vd, const float* const* p, int hd, int n_slots, float* const* out) {
  const int nc = hd / kQ8Block;
  for (int c = 0; c < nc; ++c) {
    __m512 acc[NQ][2];
    for (int i = 0; i < NQ; ++i) {
      acc[i][0] = _mm512_loadu_ps(out[i] + c * kQ8Block);
      acc[i][1] = _mm512_loadu_ps(out[i] + c * kQ8Block + 16);
    }
    for (int j = 0; j < n_slots; ++j) {
      const int8_t* vr = v + j * hd + c * kQ8Block;
      const __m512 v0 = load16_i8(vr), v1 = load16_i8(vr + 16);
      for (int i = 0; i < NQ; ++i) {
        const __m512 w = _mm512_set1_ps(p[i][j] * vd[j * nc + c]);
        acc[i][0] = _mm512_fmadd_ps(w, v0, acc[i][0]);
        acc[i][1] = _mm512_fmadd_ps(w, v1, acc[i][1]);
      }
    }
    for (int i = 0; i < NQ; ++i) {
      _mm512_storeu_ps(out[i] + c * kQ8Block, acc[i][0]);
      _mm512_storeu_ps(out[i] + c * kQ8Block + 16, acc[i][1]);
    }
  }
}

void attn_accumulate_q8(const int8_t* v, const float* vd, const float* const* p, int nq, int hd, int n_slots,
                        float* const* out) {
  with_query_count(nq, [&](auto n) { accumulate_q8_n<n()>(v, vd, p, hd, n_slots, out); });
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

// Two passes: the largest value (max_ps drops a NaN when its other operand is a number), then
// the first index holding it.
int64_t argmax(const float* x, int64_t n) {
  __m512 m = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) m = _mm512_max_ps(_mm512_loadu_ps(x + i), m);
  if (i < n) m = _mm512_mask_max_ps(m, tail_mask(n - i), _mm512_maskz_loadu_ps(tail_mask(n - i), x + i), m);
  const __m512 b = _mm512_set1_ps(_mm512_reduce_max_ps(m));
  for (i = 0; i < n; i += 16) {
    const __mmask16 valid = n - i >= 16 ? __mmask16(0xffff) : tail_mask(n - i);
    const __mmask16 hit = _mm512_mask_cmp_ps_mask(valid, _mm512_maskz_loadu_ps(valid, x + i), b, _CMP_EQ_OQ);
    if (hit) return i + __builtin_ctz(hit);
  }
  return 0;  // every value NaN
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
  static const VecKernels k{"avx512",   dot_f32,     gemm_f32, gemm_f32_cached,    gemm_f16, gemm_bf16, gemm_q8_0_widened, gemm_q8_packed, gemm_q4_packed, gemm_q6_packed, quantize_act_q8,
                            to_f32_f16, f32_to_f16_saturating, to_f32_bf16, to_f32_q8_0, attn_scores<float>, attn_accumulate<float>,
                            attn_scores<uint16_t>, attn_accumulate<uint16_t>, attn_scores_q8,
                            attn_accumulate_q8, exp_sum, silu_mul, argmax};
  return &k;
}

}  // namespace celer
