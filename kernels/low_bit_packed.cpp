#include "kernels/low_bit_packed.hpp"

#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "kernels/quants.hpp"

namespace celer {

int packed_low_bits(TensorType type) {
  switch (type) {
    case TensorType::q4_0:
    case TensorType::q4_1:
    case TensorType::q4_k: return 4;
    case TensorType::q5_0:
    case TensorType::q5_1:
    case TensorType::q5_k: return 5;
    case TensorType::q6_k: return 6;
    default: return 0;
  }
}

PackedLowBit pack_low_bit(TensorType type, const void* rows_data, int64_t rows, int64_t cols) {
  const int bits = packed_low_bits(type);
  if (bits == 0) throw std::invalid_argument(std::string("pack_low_bit: ") + to_string(type) + " is not a 4-, 5- or 6-bit format");
  if (rows < 0 || cols % block_elems(type) != 0)
    throw std::invalid_argument(std::string("pack_low_bit: ") + std::to_string(cols) + " columns of " + to_string(type) +
                                " are not whole blocks of " + std::to_string(block_elems(type)));
  PackedLowBit p;
  p.bits = bits;
  p.rows = rows;
  p.cols = cols;
  const int64_t nb = p.blocks(), bb = low_bit_block_bytes(bits);
  p.data.assign(static_cast<size_t>(p.groups() * p.group_bytes()), 0);
  std::vector<uint8_t> q(static_cast<size_t>(cols));
  std::vector<float> s(static_cast<size_t>(nb)), o(static_cast<size_t>(nb));
  std::vector<int8_t> sc(static_cast<size_t>(cols / 16));
  std::vector<uint16_t> d(static_cast<size_t>(cols / kQK + 1));
  for (int64_t row = 0; row < rows; ++row) {
    const uint8_t* src = static_cast<const uint8_t*>(rows_data) + row * row_bytes(type, cols);
    if (bits == 6)
      q6k_parts(src, cols, q.data(), sc.data(), d.data());
    else
      affine_blocks(type, src, cols, q.data(), s.data(), o.data());
    uint8_t* group = p.data.data() + row / kPackRows * p.group_bytes();
    const int r = static_cast<int>(row % kPackRows);
    for (int64_t b = 0; b < nb; ++b) {
      uint8_t* block = group + b * bb;
      const uint8_t* v = q.data() + b * kQ8Block;
      for (int t = 0; t < 4; ++t)
        for (int i = 0; i < 4; ++i)
          block[t * 64 + r * 4 + i] = static_cast<uint8_t>((v[4 * t + i] & 15) | (v[16 + 4 * t + i] & 15) << 4);
      if (bits == 6) {
        for (int t = 0; t < 4; ++t)
          for (int h = 0; h < 2; ++h)
            for (int i = 0; i < 4; ++i)
              block[kQ4NibbleBytes + (t / 2) * 64 + r * 4 + i] |=
                  static_cast<uint8_t>((v[16 * h + 4 * t + i] >> 4) << (4 * (t % 2) + 2 * h));
        block[kQ6ScaleOffset + r] = static_cast<uint8_t>(sc[b * 2]);
        block[kQ6ScaleOffset + kPackRows + r] = static_cast<uint8_t>(sc[b * 2 + 1]);
        std::memcpy(block + kQ6DOffset + 2 * r, &d[b * kQ8Block / kQK], 2);
        continue;
      }
      if (bits == 5)
        for (int step = 0; step < 8; ++step)
          for (int i = 0; i < 4; ++i)
            block[kQ4NibbleBytes + step * 8 + (r * 4 + i) / 8] |= static_cast<uint8_t>((v[4 * step + i] >> 4 & 1) << ((r * 4 + i) % 8));
      std::memcpy(block + q4_scales_offset(bits) + r * 4, &s[b], 4);
      std::memcpy(block + q4_scales_offset(bits) + kQ4ScaleBytes + r * 4, &o[b], 4);
    }
  }
  return p;
}

float packed_low_bit_value(const PackedLowBit& p, int64_t row, int64_t col) {
  const int r = static_cast<int>(row % kPackRows);
  const int64_t b = col / kQ8Block;
  const int e = static_cast<int>(col % kQ8Block);
  const uint8_t* block = p.group(row / kPackRows) + b * low_bit_block_bytes(p.bits);
  const int q = packed_low_bit_q(block, p.bits, r, e);
  if (p.bits == 6) {
    uint16_t d;
    std::memcpy(&d, block + kQ6DOffset + 2 * r, 2);
    const auto sc = static_cast<int8_t>(block[kQ6ScaleOffset + (e / 16) * kPackRows + r]);
    return fp16_to_f32(d) * static_cast<float>(sc) * static_cast<float>(q - 32);
  }
  float s, o;
  std::memcpy(&s, block + q4_scales_offset(p.bits) + r * 4, 4);
  std::memcpy(&o, block + q4_scales_offset(p.bits) + kQ4ScaleBytes + r * 4, 4);
  return s * static_cast<float>(q) + o;
}

}  // namespace celer
