// Element types of weight tensors, with the block layouts GGUF defines for them, and the scalar
// conversions every kernel's reference path uses.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>

namespace celer {

// Values are GGUF's (ggml_type) so a tensor's type field can be cast directly. The kernels
// compute with f32, f16, bf16 and Q8_0; the other block formats are what downloaded files hold,
// read and written by kernels/quants.hpp (and converted to Q8_0 when a model loads).
enum class TensorType : uint32_t {
  f32 = 0,
  f16 = 1,
  q4_0 = 2,
  q4_1 = 3,
  q5_0 = 6,
  q5_1 = 7,
  q8_0 = 8,
  q2_k = 10,
  q3_k = 11,
  q4_k = 12,
  q5_k = 13,
  q6_k = 14,
  bf16 = 30,
};

// True for the types the matmul kernels take as they are (the rest are converted first).
inline bool is_compute_type(TensorType t) {
  return t == TensorType::f32 || t == TensorType::f16 || t == TensorType::bf16 || t == TensorType::q8_0;
}

const char* to_string(TensorType type);
bool tensor_type_from_string(const char* name, TensorType* out);  // "f32", "q8_0", ...

// Q8_0: 32 weights share one fp16 scale; w[i] = d * qs[i]. 34 bytes, no padding (ggml's block_q8_0).
constexpr int kQ8Block = 32;
struct BlockQ8_0 {
  uint16_t d;  // fp16 scale
  int8_t qs[kQ8Block];
};
static_assert(sizeof(BlockQ8_0) == 34, "GGUF's Q8_0 block is 34 bytes");

// The 32-weight formats (ggml's block_q4_0 ... block_q5_1). Element j < 16 of a block is the low
// nibble of qs[j], element j + 16 its high nibble; Q5 formats keep each element's fifth bit in
// qh (bit j for element j, as a little-endian uint32).
struct BlockQ4_0 {
  uint16_t d;  // w = d * (q - 8), q in 0..15
  uint8_t qs[16];
};
struct BlockQ4_1 {
  uint16_t d, m;  // w = d * q + m
  uint8_t qs[16];
};
struct BlockQ5_0 {
  uint16_t d;  // w = d * (q - 16), q in 0..31
  uint8_t qh[4];
  uint8_t qs[16];
};
struct BlockQ5_1 {
  uint16_t d, m;  // w = d * q + m
  uint8_t qh[4];
  uint8_t qs[16];
};
static_assert(sizeof(BlockQ4_0) == 18 && sizeof(BlockQ4_1) == 20 && sizeof(BlockQ5_0) == 22 && sizeof(BlockQ5_1) == 24,
              "GGUF's 32-weight block sizes");

// The K-quants: super-blocks of 256 weights (ggml's block_q2_K ... block_q6_K).
// Q2_K: 16 sub-blocks of 16, each with a 4-bit scale and a 4-bit min in one byte;
// w = d * sc * q - dmin * m, q in 0..3. Q3_K: 16 sub-blocks of 16 with 6-bit scales (offset by
// 32) packed into 12 bytes; w = d * (sc - 32) * (q - 4 * !high_bit), q's low 2 bits in qs.
// Q4_K / Q5_K: 8 sub-blocks of 32, each with a 6-bit scale and a 6-bit min packed into
// `scales`; w = d * sc * q - dmin * m. Q6_K: 16 sub-blocks of 16 with int8 scales;
// w = d * sc * (q - 32), q in 0..63.
constexpr int kQK = 256;
struct BlockQ2_K {
  uint8_t scales[16];  // low nibble: scale, high nibble: min
  uint8_t qs[64];
  uint16_t d, dmin;
};
struct BlockQ3_K {
  uint8_t hmask[32];  // each element's third bit (set: no -4)
  uint8_t qs[64];
  uint8_t scales[12];
  uint16_t d;
};
struct BlockQ4_K {
  uint16_t d, dmin;
  uint8_t scales[12];
  uint8_t qs[128];
};
struct BlockQ5_K {
  uint16_t d, dmin;
  uint8_t scales[12];
  uint8_t qh[32];
  uint8_t qs[128];
};
struct BlockQ6_K {
  uint8_t ql[128];  // low 4 bits
  uint8_t qh[64];   // high 2 bits
  int8_t scales[16];
  uint16_t d;
};
static_assert(sizeof(BlockQ2_K) == 84 && sizeof(BlockQ3_K) == 110, "GGUF's Q2_K and Q3_K block sizes");
static_assert(sizeof(BlockQ4_K) == 144 && sizeof(BlockQ5_K) == 176 && sizeof(BlockQ6_K) == 210, "GGUF's K-quant block sizes");

// Elements per block and bytes per block of a type (blocks of 1 for the float types).
int64_t block_elems(TensorType type);
int64_t block_bytes(TensorType type);
// Bytes of a row of n elements; n must be a multiple of block_elems(type).
inline int64_t row_bytes(TensorType type, int64_t n) { return n / block_elems(type) * block_bytes(type); }

// IEEE half <-> float, exact in both directions for representable values (round to nearest even).
// `static` on purpose: the SIMD kernel files include this header under -mavx2/-mavx512 flags, and
// internal linkage keeps the linker from picking one of those copies for code run on any CPU.
static inline float fp16_to_f32(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000) << 16;
  uint32_t exp = (h >> 10) & 0x1f;
  uint32_t mant = h & 0x3ff;
  uint32_t bits;
  if (exp == 0) {
    if (mant == 0) {
      bits = sign;
    } else {  // subnormal: normalise
      exp = 127 - 15 + 1;
      while ((mant & 0x400) == 0) {
        mant <<= 1;
        --exp;
      }
      mant &= 0x3ff;
      bits = sign | (exp << 23) | (mant << 13);
    }
  } else if (exp == 31) {
    bits = sign | 0x7f800000u | (mant << 13);
  } else {
    bits = sign | ((exp + 127 - 15) << 23) | (mant << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

static inline uint16_t f32_to_fp16(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  const uint32_t sign = (x >> 16) & 0x8000;
  const uint32_t abs = x & 0x7fffffffu;
  if (abs >= 0x7f800000u) return static_cast<uint16_t>(sign | 0x7c00 | (abs > 0x7f800000u ? 0x200 : 0));
  if (abs >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00);  // overflow to inf
  if (abs < 0x38800000u) {                                              // subnormal or zero in half
    if (abs < 0x33000000u) return static_cast<uint16_t>(sign);
    const uint32_t e = abs >> 23;
    const uint32_t m = (abs & 0x7fffff) | 0x800000;
    const uint32_t shift = 126 - e;  // 14..24
    uint32_t h = m >> shift;
    const uint32_t rem = m & ((1u << shift) - 1);
    const uint32_t half = 1u << (shift - 1);
    if (rem > half || (rem == half && (h & 1))) ++h;
    return static_cast<uint16_t>(sign | h);
  }
  uint32_t h = ((abs - 0x38000000u) >> 13);
  const uint32_t rem = abs & 0x1fff;
  if (rem > 0x1000 || (rem == 0x1000 && (h & 1))) ++h;
  return static_cast<uint16_t>(sign | h);
}

static inline float bf16_to_f32(uint16_t b) {
  const uint32_t bits = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

static inline uint16_t f32_to_bf16(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  if ((x & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((x >> 16) | 0x40);  // quiet NaN
  x += 0x7fff + ((x >> 16) & 1);  // round to nearest even
  return static_cast<uint16_t>(x >> 16);
}

}  // namespace celer
