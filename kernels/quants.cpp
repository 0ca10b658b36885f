#include "kernels/quants.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <stdexcept>
#include <string>

namespace celer {
namespace {

// ---- reading ----------------------------------------------------------------------------

uint32_t load_qh(const uint8_t qh[4]) {
  uint32_t h;
  std::memcpy(&h, qh, 4);
  return h;
}

// The 32 integers of a Q4_0 / Q4_1 block, before scale and offset.
void nibbles(const uint8_t qs[16], int q[32]) {
  for (int j = 0; j < 16; ++j) {
    q[j] = qs[j] & 0xF;
    q[j + 16] = qs[j] >> 4;
  }
}

// The 32 integers (0..31) of a Q5_0 / Q5_1 block.
void five_bits(const uint8_t qs[16], const uint8_t qh[4], int q[32]) {
  const uint32_t h = load_qh(qh);
  for (int j = 0; j < 16; ++j) {
    q[j] = (qs[j] & 0xF) | (((h >> j) & 1) << 4);
    q[j + 16] = (qs[j] >> 4) | (((h >> (j + 16)) & 1) << 4);
  }
}

// Sub-block j's (0..7) 6-bit scale and min of a Q4_K / Q5_K super-block: the first four sit in
// the low 6 bits of bytes 0-3 (scales) and 4-7 (mins); the last four have their low 4 bits in
// bytes 8-11 and their top 2 bits in the top bits of bytes 0-3 and 4-7.
void scale_min_k(int j, const uint8_t s[12], int* sc, int* m) {
  if (j < 4) {
    *sc = s[j] & 63;
    *m = s[j + 4] & 63;
  } else {
    *sc = (s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4);
    *m = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
  }
}

void set_scale_min_k(int j, int sc, int m, uint8_t s[12]) {
  if (j < 4) {
    s[j] = static_cast<uint8_t>((s[j] & 0xC0) | sc);
    s[j + 4] = static_cast<uint8_t>((s[j + 4] & 0xC0) | m);
  } else {
    s[j + 4] = static_cast<uint8_t>((sc & 0xF) | ((m & 0xF) << 4));
    s[j - 4] = static_cast<uint8_t>((s[j - 4] & 0x3F) | ((sc >> 4) << 6));
    s[j] = static_cast<uint8_t>((s[j] & 0x3F) | ((m >> 4) << 6));
  }
}

// Element e (0..255) of a Q4_K / Q5_K super-block: 64-element chunk c = e / 64 takes the low
// nibbles of qs[32c .. 32c+31] for its first 32 and the high nibbles for the next 32; in Q5_K
// the fifth bit of chunk c's first half is bit 2c of qh[l], of its second half bit 2c + 1.
int q4k_nibble(const uint8_t qs[128], int e) {
  const int c = e / 64, l = e % 32;
  return (e % 64) < 32 ? qs[32 * c + l] & 0xF : qs[32 * c + l] >> 4;
}
// Which bit of qh[e % 32] holds element e's fifth bit (both directions use it).
int q5k_high_bit_index(int e) { return 2 * (e / 64) + ((e % 64) < 32 ? 0 : 1); }
int q5k_high_bit(const uint8_t qh[32], int e) { return (qh[e % 32] >> q5k_high_bit_index(e)) & 1; }

// Element e (0..255) of a Q6_K super-block, 0..63: each 128-element half h has 64 bytes of low
// nibbles (elements l and l + 64 share byte l, elements 32 + l and 96 + l share byte 32 + l) and
// 32 bytes of high bit pairs (elements l, 32 + l, 64 + l, 96 + l in bits 0-1, 2-3, 4-5, 6-7).
int q6k_value(const BlockQ6_K& b, int e) {
  const int h = e / 128, i = e % 128, quarter = i / 32, l = i % 32;
  const uint8_t lo = b.ql[64 * h + (quarter % 2) * 32 + l];
  const int low = quarter < 2 ? lo & 0xF : lo >> 4;
  const int high = (b.qh[32 * h + l] >> (2 * quarter)) & 3;
  return low | (high << 4);
}
int q6k_scale_index(int e) { return e / 16; }  // 16 sub-blocks of 16, in element order

template <class Block, class F>
void each_block(const void* src, int64_t n, int64_t per_block, F f) {
  const Block* b = static_cast<const Block*>(src);
  for (int64_t i = 0; i < n / per_block; ++i) f(b[i], i * per_block);
}

// ---- writing ----------------------------------------------------------------------------

int clamp_round(float v, int lo, int hi) { return std::clamp(static_cast<int>(std::lround(v)), lo, hi); }

// The grids below are chosen by trying scales around the block's range and keeping the one of
// least squared error, each candidate's scale refitted by least squares to the integers it
// rounds to: a few percent less error than the range alone gives, which is what keeps 4-bit
// models close to their F32 copies.
constexpr int kCandidates = 24;

// w = s * q, q in [qmin, qmax]; returns s.
float fit_symmetric(const float* x, int n, int qmin, int qmax) {
  float amax = 0, max = 0;
  for (int i = 0; i < n; ++i)
    if (std::fabs(x[i]) > amax) amax = std::fabs(x[i]), max = x[i];
  if (amax == 0) return 0;
  float best_s = max / static_cast<float>(qmin), best_err = INFINITY;
  for (int c = 0; c <= 2 * kCandidates; ++c) {
    // The largest magnitude near qmin (the side with one more integer), or near qmax.
    const bool low_side = c <= kCandidates;
    const float t = (low_side ? static_cast<float>(-qmin) : static_cast<float>(qmax)) - 1.0f +
                    1.5f * static_cast<float>(low_side ? c : c - kCandidates - 1) / kCandidates;
    if (t <= 0) continue;
    const float s0 = low_side ? -max / t : max / t;
    double qx = 0, qq = 0;
    for (int i = 0; i < n; ++i) {
      const int q = clamp_round(x[i] / s0, qmin, qmax);
      qx += double(q) * x[i];
      qq += double(q) * q;
    }
    const float s = qq > 0 ? static_cast<float>(qx / qq) : s0;
    double err = 0;
    for (int i = 0; i < n; ++i) {
      const float e = x[i] - s * static_cast<float>(clamp_round(x[i] / s, qmin, qmax));
      err += double(e) * e;
    }
    if (err < best_err) best_err = static_cast<float>(err), best_s = s;
  }
  return best_s;
}

// w = s * q + lo, q in [0, levels], s >= 0 (and lo <= 0 when `lo_nonpositive`: the K-quants
// store the offset as a non-negative min that is subtracted).
void fit_affine(const float* x, int n, int levels, bool lo_nonpositive, float* s_out, float* lo_out) {
  float mn = x[0], mx = x[0];
  for (int i = 1; i < n; ++i) mn = std::min(mn, x[i]), mx = std::max(mx, x[i]);
  if (lo_nonpositive) mn = std::min(mn, 0.0f);
  *s_out = 0;
  *lo_out = mn;
  if (mx <= mn) return;
  float best_err = INFINITY;
  for (int c = 0; c <= kCandidates; ++c) {
    const float s0 = (mx - mn) / (static_cast<float>(levels) - 1.0f + 1.5f * static_cast<float>(c) / kCandidates);
    double sq = 0, sx = 0, sqq = 0, sqx = 0;
    for (int i = 0; i < n; ++i) {
      const int q = clamp_round((x[i] - mn) / s0, 0, levels);
      sq += q, sx += x[i], sqq += double(q) * q, sqx += double(q) * x[i];
    }
    // Least squares of x on q: s = cov(q, x) / var(q), lo = mean(x) - s mean(q).
    const double var = sqq - sq * sq / n;
    float s = var > 0 ? static_cast<float>((sqx - sq * sx / n) / var) : s0;
    float lo = static_cast<float>((sx - s * sq) / n);
    if (lo_nonpositive && lo > 0) {
      lo = 0;
      s = sqq > 0 ? static_cast<float>(sqx / sqq) : s0;
    }
    if (!(s > 0)) continue;
    double err = 0;
    for (int i = 0; i < n; ++i) {
      const float e = x[i] - (s * static_cast<float>(clamp_round((x[i] - lo) / s, 0, levels)) + lo);
      err += double(e) * e;
    }
    if (err < best_err) best_err = static_cast<float>(err), *s_out = s, *lo_out = lo;
  }
}

// Symmetric 32-weight formats (Q4_0, Q5_0): w = d * (q - half).
void quantize_symmetric(const float* x, int half, uint16_t* d_out, int q[32]) {
  *d_out = f32_to_fp16(fit_symmetric(x, 32, -half, half - 1));
  const float d = fp16_to_f32(*d_out);
  const float inv = d != 0 ? 1.0f / d : 0.0f;
  for (int j = 0; j < 32; ++j) q[j] = clamp_round(x[j] * inv, -half, half - 1) + half;
}

// Affine 32-weight formats (Q4_1, Q5_1): w = d * q + m.
void quantize_affine(const float* x, int levels, uint16_t* d_out, uint16_t* m_out, int q[32]) {
  float s, lo;
  fit_affine(x, 32, levels, false, &s, &lo);
  *d_out = f32_to_fp16(s);
  *m_out = f32_to_fp16(lo);
  const float d = fp16_to_f32(*d_out), m = fp16_to_f32(*m_out);
  const float inv = d != 0 ? 1.0f / d : 0.0f;
  for (int j = 0; j < 32; ++j) q[j] = clamp_round((x[j] - m) * inv, 0, levels);
}

void pack_nibbles(const int q[32], uint8_t qs[16]) {
  for (int j = 0; j < 16; ++j) qs[j] = static_cast<uint8_t>((q[j] & 0xF) | ((q[j + 16] & 0xF) << 4));
}
void pack_fifth_bits(const int q[32], uint8_t qh[4]) {
  uint32_t h = 0;
  for (int j = 0; j < 32; ++j) h |= static_cast<uint32_t>((q[j] >> 4) & 1) << j;
  std::memcpy(qh, &h, 4);
}

// Q4_K / Q5_K: each sub-block of 32 gets its grid (step s, min mn = -lo); the super-block's d
// and dmin make the largest of them 63, the sub-blocks' 6-bit integers are rounded against
// them, and the weights against the steps and mins those give. Returns the integers q
// (0..levels) of the 256 weights.
void quantize_k_affine(const float* x, int levels, uint16_t* d_out, uint16_t* dmin_out, uint8_t scales[12], int q[kQK]) {
  float s[8], mn[8];
  for (int j = 0; j < 8; ++j) {
    float lo;
    fit_affine(x + 32 * j, 32, levels, true, &s[j], &lo);
    mn[j] = -lo;
  }
  const float s_max = *std::max_element(s, s + 8), mn_max = *std::max_element(mn, mn + 8);
  *d_out = f32_to_fp16(s_max / 63.0f);
  *dmin_out = f32_to_fp16(mn_max / 63.0f);
  const float d = fp16_to_f32(*d_out), dmin = fp16_to_f32(*dmin_out);
  std::memset(scales, 0, 12);
  for (int j = 0; j < 8; ++j) {
    const int sc = d != 0 ? clamp_round(s[j] / d, 0, 63) : 0;
    const int m = dmin != 0 ? clamp_round(mn[j] / dmin, 0, 63) : 0;
    set_scale_min_k(j, sc, m, scales);
    const float step = d * static_cast<float>(sc), off = dmin * static_cast<float>(m);
    const float inv = step != 0 ? 1.0f / step : 0.0f;
    for (int l = 0; l < 32; ++l) q[32 * j + l] = clamp_round((x[32 * j + l] + off) * inv, 0, levels);
  }
}

void pack_q4k_nibbles(const int q[kQK], uint8_t qs[128]) {
  for (int c = 0; c < 4; ++c)
    for (int l = 0; l < 32; ++l)
      qs[32 * c + l] = static_cast<uint8_t>((q[64 * c + l] & 0xF) | ((q[64 * c + 32 + l] & 0xF) << 4));
}

void quantize_q6k(const float* x, BlockQ6_K& b) {
  float s[16];
  for (int j = 0; j < 16; ++j) s[j] = fit_symmetric(x + 16 * j, 16, -32, 31);
  float s_max = 0;
  for (float v : s) s_max = std::max(s_max, std::fabs(v));
  b.d = f32_to_fp16(s_max / 127.0f);
  const float d = fp16_to_f32(b.d);
  int q[kQK];
  for (int j = 0; j < 16; ++j) {
    const int sc = d != 0 ? clamp_round(s[j] / d, -127, 127) : 0;
    b.scales[j] = static_cast<int8_t>(sc);
    const float step = d * static_cast<float>(sc);
    const float inv = step != 0 ? 1.0f / step : 0.0f;
    for (int l = 0; l < 16; ++l) q[16 * j + l] = clamp_round(x[16 * j + l] * inv, -32, 31) + 32;
  }
  std::memset(b.ql, 0, sizeof b.ql);
  std::memset(b.qh, 0, sizeof b.qh);
  for (int e = 0; e < kQK; ++e) {
    const int h = e / 128, i = e % 128, quarter = i / 32, l = i % 32;
    uint8_t& lo = b.ql[64 * h + (quarter % 2) * 32 + l];
    lo = static_cast<uint8_t>(lo | (quarter < 2 ? (q[e] & 0xF) : (q[e] & 0xF) << 4));
    b.qh[32 * h + l] = static_cast<uint8_t>(b.qh[32 * h + l] | ((q[e] >> 4) << (2 * quarter)));
  }
}

[[noreturn]] void not_a_block_type(const char* what, TensorType type) {
  throw std::invalid_argument(std::string(what) + ": no block format for type " + to_string(type));
}

}  // namespace

void dequantize_row(TensorType type, const void* src, float* dst, int64_t n) {
  switch (type) {
    case TensorType::f32: std::memcpy(dst, src, static_cast<size_t>(n) * 4); return;
    case TensorType::f16:
      for (int64_t i = 0; i < n; ++i) dst[i] = fp16_to_f32(static_cast<const uint16_t*>(src)[i]);
      return;
    case TensorType::bf16:
      for (int64_t i = 0; i < n; ++i) dst[i] = bf16_to_f32(static_cast<const uint16_t*>(src)[i]);
      return;
    case TensorType::q8_0:
      each_block<BlockQ8_0>(src, n, 32, [&](const BlockQ8_0& b, int64_t at) {
        const float d = fp16_to_f32(b.d);
        for (int j = 0; j < 32; ++j) dst[at + j] = d * static_cast<float>(b.qs[j]);
      });
      return;
    case TensorType::q4_0:
      each_block<BlockQ4_0>(src, n, 32, [&](const BlockQ4_0& b, int64_t at) {
        int q[32];
        nibbles(b.qs, q);
        const float d = fp16_to_f32(b.d);
        for (int j = 0; j < 32; ++j) dst[at + j] = d * static_cast<float>(q[j] - 8);
      });
      return;
    case TensorType::q4_1:
      each_block<BlockQ4_1>(src, n, 32, [&](const BlockQ4_1& b, int64_t at) {
        int q[32];
        nibbles(b.qs, q);
        const float d = fp16_to_f32(b.d), m = fp16_to_f32(b.m);
        for (int j = 0; j < 32; ++j) dst[at + j] = d * static_cast<float>(q[j]) + m;
      });
      return;
    case TensorType::q5_0:
      each_block<BlockQ5_0>(src, n, 32, [&](const BlockQ5_0& b, int64_t at) {
        int q[32];
        five_bits(b.qs, b.qh, q);
        const float d = fp16_to_f32(b.d);
        for (int j = 0; j < 32; ++j) dst[at + j] = d * static_cast<float>(q[j] - 16);
      });
      return;
    case TensorType::q5_1:
      each_block<BlockQ5_1>(src, n, 32, [&](const BlockQ5_1& b, int64_t at) {
        int q[32];
        five_bits(b.qs, b.qh, q);
        const float d = fp16_to_f32(b.d), m = fp16_to_f32(b.m);
        for (int j = 0; j < 32; ++j) dst[at + j] = d * static_cast<float>(q[j]) + m;
      });
      return;
    case TensorType::q4_k:
      each_block<BlockQ4_K>(src, n, kQK, [&](const BlockQ4_K& b, int64_t at) {
        const float d = fp16_to_f32(b.d), dmin = fp16_to_f32(b.dmin);
        for (int e = 0; e < kQK; ++e) {
          int sc, m;
          scale_min_k(e / 32, b.scales, &sc, &m);
          dst[at + e] = d * static_cast<float>(sc) * static_cast<float>(q4k_nibble(b.qs, e)) - dmin * static_cast<float>(m);
        }
      });
      return;
    case TensorType::q5_k:
      each_block<BlockQ5_K>(src, n, kQK, [&](const BlockQ5_K& b, int64_t at) {
        const float d = fp16_to_f32(b.d), dmin = fp16_to_f32(b.dmin);
        for (int e = 0; e < kQK; ++e) {
          int sc, m;
          scale_min_k(e / 32, b.scales, &sc, &m);
          const int q = q4k_nibble(b.qs, e) | (q5k_high_bit(b.qh, e) << 4);
          dst[at + e] = d * static_cast<float>(sc) * static_cast<float>(q) - dmin * static_cast<float>(m);
        }
      });
      return;
    case TensorType::q2_k:
      each_block<BlockQ2_K>(src, n, kQK, [&](const BlockQ2_K& b, int64_t at) {
        const float d = fp16_to_f32(b.d), dmin = fp16_to_f32(b.dmin);
        for (int e = 0; e < kQK; ++e) {
          // 128-element half h, 32-element quarter j of it: bits 2j..2j+1 of qs[32h + e % 32].
          const int h = e / 128, j = (e % 128) / 32;
          const int q = (b.qs[32 * h + e % 32] >> (2 * j)) & 3;
          const uint8_t sm = b.scales[e / 16];
          dst[at + e] = d * static_cast<float>(sm & 0xF) * static_cast<float>(q) - dmin * static_cast<float>(sm >> 4);
        }
      });
      return;
    case TensorType::q3_k:
      each_block<BlockQ3_K>(src, n, kQK, [&](const BlockQ3_K& b, int64_t at) {
        const float d = fp16_to_f32(b.d);
        for (int e = 0; e < kQK; ++e) {
          const int h = e / 128, j = (e % 128) / 32, l = e % 32;
          const int low = (b.qs[32 * h + l] >> (2 * j)) & 3;
          const bool high = (b.hmask[l] >> (4 * h + j)) & 1;
          // Scale s = 4 * group + k (16 of them): its low 4 bits are the low (groups 0, 1) or
          // high (groups 2, 3) nibble of byte k (groups 0, 2) or 4 + k (groups 1, 3); its top 2
          // bits are bits 2 * group of byte 8 + k.
          const int s = e / 16, k = s % 4, group = s / 4;
          const uint8_t byte = b.scales[(group % 2) * 4 + k];
          const int nibble = group < 2 ? byte & 0xF : byte >> 4;
          const int top = (b.scales[8 + k] >> (2 * group)) & 3;
          const int sc = nibble | (top << 4);
          dst[at + e] = d * static_cast<float>(sc - 32) * static_cast<float>(low - (high ? 0 : 4));
        }
      });
      return;
    case TensorType::q6_k:
      each_block<BlockQ6_K>(src, n, kQK, [&](const BlockQ6_K& b, int64_t at) {
        const float d = fp16_to_f32(b.d);
        for (int e = 0; e < kQK; ++e)
          dst[at + e] = d * static_cast<float>(b.scales[q6k_scale_index(e)]) * static_cast<float>(q6k_value(b, e) - 32);
      });
      return;
  }
  not_a_block_type("dequantize_row", type);
}

void quantize_row(TensorType type, const float* src, void* dst, int64_t n) {
  switch (type) {
    case TensorType::f32: std::memcpy(dst, src, static_cast<size_t>(n) * 4); return;
    case TensorType::f16:
      for (int64_t i = 0; i < n; ++i) static_cast<uint16_t*>(dst)[i] = f32_to_fp16(src[i]);
      return;
    case TensorType::bf16:
      for (int64_t i = 0; i < n; ++i) static_cast<uint16_t*>(dst)[i] = f32_to_bf16(src[i]);
      return;
    case TensorType::q8_0: {
      auto* blocks = static_cast<BlockQ8_0*>(dst);
      for (int64_t b = 0; b < n / 32; ++b) {
        const float* x = src + b * 32;
        float amax = 0;
        for (int j = 0; j < 32; ++j) amax = std::max(amax, std::fabs(x[j]));
        const float d = amax / 127.0f;
        const float inv = d != 0 ? 1.0f / d : 0.0f;
        blocks[b].d = f32_to_fp16(d);
        for (int j = 0; j < 32; ++j) blocks[b].qs[j] = static_cast<int8_t>(std::lround(x[j] * inv));
      }
      return;
    }
    case TensorType::q4_0: {
      auto* blocks = static_cast<BlockQ4_0*>(dst);
      for (int64_t b = 0; b < n / 32; ++b) {
        int q[32];
        quantize_symmetric(src + b * 32, 8, &blocks[b].d, q);
        pack_nibbles(q, blocks[b].qs);
      }
      return;
    }
    case TensorType::q4_1: {
      auto* blocks = static_cast<BlockQ4_1*>(dst);
      for (int64_t b = 0; b < n / 32; ++b) {
        int q[32];
        quantize_affine(src + b * 32, 15, &blocks[b].d, &blocks[b].m, q);
        pack_nibbles(q, blocks[b].qs);
      }
      return;
    }
    case TensorType::q5_0: {
      auto* blocks = static_cast<BlockQ5_0*>(dst);
      for (int64_t b = 0; b < n / 32; ++b) {
        int q[32];
        quantize_symmetric(src + b * 32, 16, &blocks[b].d, q);
        pack_nibbles(q, blocks[b].qs);
        pack_fifth_bits(q, blocks[b].qh);
      }
      return;
    }
    case TensorType::q5_1: {
      auto* blocks = static_cast<BlockQ5_1*>(dst);
      for (int64_t b = 0; b < n / 32; ++b) {
        int q[32];
        quantize_affine(src + b * 32, 31, &blocks[b].d, &blocks[b].m, q);
        pack_nibbles(q, blocks[b].qs);
        pack_fifth_bits(q, blocks[b].qh);
      }
      return;
    }
    case TensorType::q4_k: {
      auto* blocks = static_cast<BlockQ4_K*>(dst);
      for (int64_t b = 0; b < n / kQK; ++b) {
        int q[kQK];
        quantize_k_affine(src + b * kQK, 15, &blocks[b].d, &blocks[b].dmin, blocks[b].scales, q);
        pack_q4k_nibbles(q, blocks[b].qs);
      }
      return;
    }
    case TensorType::q5_k: {
      auto* blocks = static_cast<BlockQ5_K*>(dst);
      for (int64_t b = 0; b < n / kQK; ++b) {
        int q[kQK];
        quantize_k_affine(src + b * kQK, 31, &blocks[b].d, &blocks[b].dmin, blocks[b].scales, q);
        pack_q4k_nibbles(q, blocks[b].qs);
        std::memset(blocks[b].qh, 0, sizeof blocks[b].qh);
        for (int e = 0; e < kQK; ++e)
          blocks[b].qh[e % 32] = static_cast<uint8_t>(blocks[b].qh[e % 32] | (((q[e] >> 4) & 1) << q5k_high_bit_index(e)));
      }
      return;
    }
    case TensorType::q2_k:
    case TensorType::q3_k:
      throw std::invalid_argument(std::string("quantize_row: celer reads ") + to_string(type) + " but does not write it");
    case TensorType::q6_k: {
      auto* blocks = static_cast<BlockQ6_K*>(dst);
      for (int64_t b = 0; b < n / kQK; ++b) quantize_q6k(src + b * kQK, blocks[b]);
      return;
    }
  }
  not_a_block_type("quantize_row", type);
}

void convert_row_to_q8_0(TensorType type, const void* src, BlockQ8_0* dst, int64_t n) {
  if (type == TensorType::q4_0 || type == TensorType::q5_0) {
    // Their integers minus the offset fit int8 under the block's own scale: nothing is lost.
    const int64_t nb = n / 32;
    for (int64_t b = 0; b < nb; ++b) {
      int q[32];
      if (type == TensorType::q4_0) {
        const BlockQ4_0& x = static_cast<const BlockQ4_0*>(src)[b];
        nibbles(x.qs, q);
        dst[b].d = x.d;
        for (int j = 0; j < 32; ++j) dst[b].qs[j] = static_cast<int8_t>(q[j] - 8);
      } else {
        const BlockQ5_0& x = static_cast<const BlockQ5_0*>(src)[b];
        five_bits(x.qs, x.qh, q);
        dst[b].d = x.d;
        for (int j = 0; j < 32; ++j) dst[b].qs[j] = static_cast<int8_t>(q[j] - 16);
      }
    }
    return;
  }
  if (type == TensorType::q8_0) {
    std::memcpy(dst, src, static_cast<size_t>(n / 32) * sizeof(BlockQ8_0));
    return;
  }
  // A super-block at a time (256 values, or 32 for the 32-weight formats) through f32.
  const int64_t chunk = block_elems(type) > 1 ? block_elems(type) : 32;
  const int64_t chunk_bytes = row_bytes(type, chunk);
  float values[kQK];
  for (int64_t at = 0; at < n; at += chunk) {
    dequantize_row(type, static_cast<const uint8_t*>(src) + at / chunk * chunk_bytes, values, chunk);
    quantize_row(TensorType::q8_0, values, dst + at / 32, chunk);
  }
}

void affine_blocks(TensorType type, const void* src, int64_t n, uint8_t* q, float* s, float* o) {
  auto put = [&](int64_t block, const int* ints, float scale, float offset) {
    for (int j = 0; j < 32; ++j) q[block * 32 + j] = static_cast<uint8_t>(ints[j]);
    s[block] = scale;
    o[block] = offset;
  };
  // Q4_K / Q5_K (qh null for Q4_K): eight sub-blocks of 32, each with its 6-bit scale and min.
  auto k_super_block = [&](uint16_t d16, uint16_t dmin16, const uint8_t scales[12], const uint8_t qs[128],
                           const uint8_t* qh, int64_t at) {
    const float d = fp16_to_f32(d16), dmin = fp16_to_f32(dmin16);
    for (int j = 0; j < 8; ++j) {
      int sc, m, v[32];
      scale_min_k(j, scales, &sc, &m);
      for (int l = 0; l < 32; ++l) v[l] = q4k_nibble(qs, 32 * j + l) | (qh ? q5k_high_bit(qh, 32 * j + l) << 4 : 0);
      put(at / 32 + j, v, d * static_cast<float>(sc), -(dmin * static_cast<float>(m)));
    }
  };
  switch (type) {
    case TensorType::q4_0:
      each_block<BlockQ4_0>(src, n, 32, [&](const BlockQ4_0& b, int64_t at) {
        int v[32];
        nibbles(b.qs, v);
        const float d = fp16_to_f32(b.d);
        put(at / 32, v, d, -8.0f * d);
      });
      return;
    case TensorType::q4_1:
      each_block<BlockQ4_1>(src, n, 32, [&](const BlockQ4_1& b, int64_t at) {
        int v[32];
        nibbles(b.qs, v);
        put(at / 32, v, fp16_to_f32(b.d), fp16_to_f32(b.m));
      });
      return;
    case TensorType::q5_0:
      each_block<BlockQ5_0>(src, n, 32, [&](const BlockQ5_0& b, int64_t at) {
        int v[32];
        five_bits(b.qs, b.qh, v);
        const float d = fp16_to_f32(b.d);
        put(at / 32, v, d, -16.0f * d);
      });
      return;
    case TensorType::q5_1:
      each_block<BlockQ5_1>(src, n, 32, [&](const BlockQ5_1& b, int64_t at) {
        int v[32];
        five_bits(b.qs, b.qh, v);
        put(at / 32, v, fp16_to_f32(b.d), fp16_to_f32(b.m));
      });
      return;
    case TensorType::q4_k:
      each_block<BlockQ4_K>(src, n, kQK, [&](const BlockQ4_K& b, int64_t at) {
        k_super_block(b.d, b.dmin, b.scales, b.qs, nullptr, at);
      });
      return;
    case TensorType::q5_k:
      each_block<BlockQ5_K>(src, n, kQK, [&](const BlockQ5_K& b, int64_t at) {
        k_super_block(b.d, b.dmin, b.scales, b.qs, b.qh, at);
      });
      return;
    default: break;
  }
  throw std::invalid_argument(std::string("affine_blocks: ") + to_string(type) + " is not a 4- or 5-bit format of 32-weight blocks");
}

void q6k_parts(const void* src, int64_t n, uint8_t* q, int8_t* sc, uint16_t* d) {
  each_block<BlockQ6_K>(src, n, kQK, [&](const BlockQ6_K& b, int64_t at) {
    for (int e = 0; e < kQK; ++e) q[at + e] = static_cast<uint8_t>(q6k_value(b, e));
    for (int j = 0; j < kQK / 16; ++j) sc[at / 16 + j] = b.scales[j];
    d[at / kQK] = b.d;
  });
}

}  // namespace celer
