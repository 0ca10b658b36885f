// 4-, 5- and 6-bit weights (Q4_0, Q4_1, Q4_K; Q5_0, Q5_1, Q5_K; Q6_K) repacked for int8 dot
// products.
//
// The 4- and 5-bit formats all read, per 32 weights of a row, as w = s * q + o with q an
// unsigned integer of 4 or 5 bits: Q4_0 is s = d, o = -8d; Q4_1 is s = d, o = m; Q4_K is
// s = d * sc, o = -dmin * m for the sub-block's 6-bit sc and m (Q5_* the same with 5 bits).
// Both products are exact in f32 (an f16 times a 6-bit integer), so s * q + o is bit for bit
// what dequantize_row gives. Q6_K reads as w = d * sc * (q - 32), q of 6 bits, an int8 sc per
// 16 weights and an f16 d per 256. Packing keeps q at its width:
//
//   group g (rows 16g .. 16g+15), block b of 32 columns, low_bit_block_bytes(bits) bytes each:
//     nibbles[t][r][i]  (t < 4, r < 16, i < 4): q(row, 32b + 4t + i) & 15 in the low nibble,
//                        q(row, 32b + 16 + 4t + i) & 15 in the high nibble          256 bytes
//   then at 4 and 5 bits
//     high[s]           (5 bits only, s < 8): a 64-bit mask, bit 4r + i = the fifth bit of
//                        q(row, 32b + 4s + i)                                         64 bytes
//     scales[r], offsets[r]: s and o as f32                                          128 bytes
//   or at 6 bits
//     top[u][r][i]      (u < 2): the top two bits of q(row, 32b + 16h + 4t + i), t = 2u + v,
//                        at bit 4v + 2h of the byte (h, v < 2)                       128 bytes
//     sc_lo[r], sc_hi[r]: the int8 scales of columns 0-15 and 16-31                   32 bytes
//     d[r]: the f16 d                                                                  32 bytes
//
// so one 64-byte load holds steps t and t + 4 (4 columns of each of 16 rows), which an AND and
// a shift split into the two vectors that meet 4 activation bytes broadcast to every lane, as
// in q8_packed.hpp; the 32 bytes of each half serve AVX2's 8-row lanes. The unsigned q is
// dpbusd's (and maddubs's) first operand as it is; o (or 32 sc d) meets the activations' sums:
//   sum_j w_j x_j = s d_x sum_j q_j q_x,j + o d_x sum_j q_x,j.
// A group takes 0.75 bytes per weight at 4 bits (a Q4 file holds 0.56), 0.875 at 5 and at 6
// (Q6_K files 0.82). Rows past the end of the matrix are padding (all 0).
#pragma once

#include <cstdint>

#include "kernels/aligned.hpp"
#include "kernels/q8_packed.hpp"
#include "kernels/types.hpp"

namespace celer {

constexpr int64_t kQ4NibbleBytes = int64_t{kPackRows} * kQ8Block / 2;  // 256
constexpr int64_t kQ4HighBytes = int64_t{kPackRows} * kQ8Block / 8;    // 64
constexpr int64_t kQ4ScaleBytes = int64_t{kPackRows} * 4;              // 64, and as many offsets
constexpr int64_t kQ6TopBytes = int64_t{kPackRows} * kQ8Block / 4;     // 128
constexpr int64_t kQ6ScaleOffset = kQ4NibbleBytes + kQ6TopBytes;       // sc_lo, then sc_hi
constexpr int64_t kQ6DOffset = kQ6ScaleOffset + 2 * kPackRows;

constexpr int64_t low_bit_block_bytes(int bits) {
  return bits == 6 ? kQ6DOffset + 2 * kPackRows : kQ4NibbleBytes + (bits == 5 ? kQ4HighBytes : 0) + 2 * kQ4ScaleBytes;
}
constexpr int64_t q4_scales_offset(int bits) { return kQ4NibbleBytes + (bits == 5 ? kQ4HighBytes : 0); }
static_assert(low_bit_block_bytes(4) % 64 == 0 && low_bit_block_bytes(5) % 64 == 0 && low_bit_block_bytes(6) % 64 == 0,
              "every block starts on a cache line");

// 4, 5 or 6 for the types packed this way, 0 for any other.
int packed_low_bits(TensorType type);

struct PackedLowBit {
  int bits = 4;
  int64_t rows = 0;  // of the original matrix
  int64_t cols = 0;  // a multiple of 32 (of 256 for the K types)
  AlignedVector<uint8_t> data;

  int64_t blocks() const { return cols / kQ8Block; }
  int64_t groups() const { return (rows + kPackRows - 1) / kPackRows; }
  int64_t group_bytes() const { return blocks() * low_bit_block_bytes(bits); }  // a multiple of 64
  const uint8_t* group(int64_t g) const { return data.data() + g * group_bytes(); }
};

// Packs `rows` GGUF rows of `cols` columns of a type packed_low_bits accepts, stored back to
// back. Throws std::invalid_argument for any other type or a column count its blocks do not
// divide.
PackedLowBit pack_low_bit(TensorType type, const void* rows_data, int64_t rows, int64_t cols);

// The integer q of column e (< 32) of lane `lane` (< 16) in one packed block of `bits` bits: the
// layout above, read one element at a time (the scalar kernels and packed_low_bit_value).
inline int packed_low_bit_q(const uint8_t* block, int bits, int lane, int e) {
  const int t = e % 16 / 4, at = lane * 4 + e % 4;
  const uint8_t byte = block[t * 64 + at];
  const int q = e < 16 ? byte & 15 : byte >> 4;
  if (bits == 5) return q | (block[kQ4NibbleBytes + (e / 4) * 8 + at / 8] >> (at % 8) & 1) << 4;
  if (bits == 6) return q | (block[kQ4NibbleBytes + (t / 2) * 64 + at] >> (4 * (t % 2) + 2 * (e / 16)) & 3) << 4;
  return q;
}

// Element (row, col) of a packed matrix as s * q + o or d * sc * (q - 32) (for tests and inspection).
float packed_low_bit_value(const PackedLowBit& p, int64_t row, int64_t col);

}  // namespace celer
