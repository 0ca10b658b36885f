// The block formats GGUF files hold beyond F32, F16, BF16 and Q8_0 (Q4_0, Q4_1, Q5_0, Q5_1,
// Q2_K ... Q6_K; layouts in kernels/types.hpp): the scalar reference that reads them, a
// quantizer that writes them, their parts as the packed kernels take them (low_bit_packed.hpp),
// and the conversion to Q8_0 a model makes when it loads Q2_K or Q3_K. All of them are plain
// loops over one row; they run at load or write time, never in a step.
#pragma once

#include <cstdint>

#include "kernels/types.hpp"

namespace celer {

// dst[0..n) = the weights of a row of `type` (any type; n a multiple of block_elems(type)).
void dequantize_row(TensorType type, const void* src, float* dst, int64_t n);

// Writes the n values of src as a row of `type` (row_bytes(type, n) bytes): per block (and
// sub-block), the scale (and offset) of least squared error among a few dozen tried around the
// block's range, the weights rounded to nearest on it. Q8_0 keeps max|w| / 127 (exactly what
// a model's load-time conversion assumes).
void quantize_row(TensorType type, const float* src, void* dst, int64_t n);

// A row of any block type as Q8_0 blocks (n / 32 of them). Q4_0 and Q5_0 keep their scales and
// integers (lossless); the others are re-rounded per 32 weights to d = max|w| / 127, an error of
// at most d / 2 per weight.
void convert_row_to_q8_0(TensorType type, const void* src, BlockQ8_0* dst, int64_t n);

// A row of Q4_0, Q4_1, Q5_0, Q5_1, Q4_K or Q5_K read as w = s * q + o per 32 weights: q[0..n)
// the unsigned integers (0..15 or 0..31), s and o [0..n / 32) per block, so that s * q + o is
// exactly what dequantize_row gives (low_bit_packed.hpp packs them). Throws std::invalid_argument
// for any other type.
void affine_blocks(TensorType type, const void* src, int64_t n, uint8_t* q, float* s, float* o);

// A row of Q6_K as its parts, w = d * sc * (q - 32): q[0..n) (0..63), the int8 scale of each
// 16 weights sc[0..n / 16), the f16 d of each 256 d[0..n / 256).
void q6k_parts(const void* src, int64_t n, uint8_t* q, int8_t* sc, uint16_t* d);

}  // namespace celer
