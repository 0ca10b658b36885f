// Q8_0 weights repacked for int8 dot products (Q8Activations::int8).
//
// GGUF stores a Q8_0 matrix row by row, 34-byte blocks of 32 quants and an f16 scale. An int8
// dot product instruction (VNNI's dpbusd) multiplies 4 bytes by 4 bytes into each of 16 int32
// lanes; to fill every lane with a different output row, 16 weight rows are interleaved:
//
//   group g (rows 16g .. 16g+15), for each block b of 32 columns, then the scales:
//     quants[b][s][r][i] = q(row 16g + r, column 32b + 4s + i) + 128    s < 8, r < 16, i < 4
//     scales[b][r]       = the f16 scale of block b of row 16g + r
//
// so step s of block b is one 64-byte vector (4 quants of each of 16 rows) that meets 4
// activation bytes broadcast to every lane. The quants are stored offset by 128 (unsigned, as
// dpbusd wants its first operand); the activation side subtracts 128 * sum(a) per block (the
// "bias" quantize_act_q8 returns) so each block's int32 sum is exactly sum(q * a). Rows past the
// end of the matrix are padding (quant 0, scale 0). A quant of -128, which Q8_0 quantizers never
// write (they round x / d with d = absmax / 127), is stored as -127: the AVX2 kernel's sign trick
// needs |q| <= 127. A group takes the file's 34 bytes per 32
// weights, rounded up to a cache line.
#pragma once

#include <cstdint>

#include "kernels/aligned.hpp"
#include "kernels/types.hpp"

namespace celer {

constexpr int kPackRows = 16;                                   // weight rows per group
constexpr int64_t kPackQuantBytes = int64_t{kPackRows} * kQ8Block;  // one block's quants in a group
constexpr int64_t kPackScaleBytes = int64_t{kPackRows} * 2;         // one block's scales in a group

// Byte offsets inside a group: the quant of row r (of the group's 16) at column e of block b,
// and that row's scale for block b (after the nb blocks of quants).
constexpr int64_t packed_quant_offset(int64_t b, int r, int e) {
  return b * kPackQuantBytes + ((e / 4) * kPackRows + r) * 4 + e % 4;
}
constexpr int64_t packed_scale_offset(int64_t nb, int64_t b, int r) {
  return nb * kPackQuantBytes + (b * kPackRows + r) * 2;
}

struct PackedQ8 {
  int64_t rows = 0;  // of the original matrix
  int64_t cols = 0;  // a multiple of 32
  AlignedVector<uint8_t> data;

  int64_t blocks() const { return cols / kQ8Block; }
  int64_t groups() const { return (rows + kPackRows - 1) / kPackRows; }
  // Rounded up to a cache line so that every group's quants start on one.
  int64_t group_bytes() const { return (blocks() * (kPackQuantBytes + kPackScaleBytes) + 63) / 64 * 64; }
  const uint8_t* group(int64_t g) const { return data.data() + g * group_bytes(); }
};

// Packs `rows` GGUF Q8_0 rows of `cols` columns (cols a multiple of 32, rows stored back to back).
PackedQ8 pack_q8_0(const BlockQ8_0* w, int64_t rows, int64_t cols);

// Element (row, col) of a packed matrix, as the f32 value d * q (for tests and inspection).
float packed_q8_value(const PackedQ8& p, int64_t row, int64_t col);

}  // namespace celer
