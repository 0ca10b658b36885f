#include "kernels/q8_packed.hpp"

#include <algorithm>
#include <cstring>
#include <stdexcept>

namespace celer {

PackedQ8 pack_q8_0(const BlockQ8_0* w, int64_t rows, int64_t cols) {
  if (cols % kQ8Block != 0 || rows < 0) throw std::invalid_argument("pack_q8_0: columns must be a multiple of 32");
  PackedQ8 p;
  p.rows = rows;
  p.cols = cols;
  const int64_t nb = p.blocks();
  p.data.assign(static_cast<size_t>(p.groups() * p.group_bytes()), 0);
  for (int64_t g = 0; g < p.groups(); ++g) {
    uint8_t* quants = p.data.data() + g * p.group_bytes();
    uint8_t* scales = quants + nb * kPackQuantBytes;
    for (int r = 0; r < kPackRows; ++r) {
      const int64_t row = g * kPackRows + r;
      for (int64_t b = 0; b < nb; ++b) {
        uint8_t* qb = quants + b * kPackQuantBytes;
        uint16_t d = 0;
        int8_t q[kQ8Block] = {};
        if (row < rows) {
          const BlockQ8_0& blk = w[row * nb + b];
          d = blk.d;
          std::memcpy(q, blk.qs, kQ8Block);
        }
        for (int s = 0; s < kQ8Block / 4; ++s)
          for (int i = 0; i < 4; ++i)
            qb[(s * kPackRows + r) * 4 + i] = static_cast<uint8_t>(std::max(-127, static_cast<int>(q[4 * s + i])) + 128);
        std::memcpy(scales + (b * kPackRows + r) * 2, &d, 2);
      }
    }
  }
  return p;
}

float packed_q8_value(const PackedQ8& p, int64_t row, int64_t col) {
  const uint8_t* quants = p.group(row / kPackRows);
  const int r = static_cast<int>(row % kPackRows);
  const int64_t b = col / kQ8Block;
  const int e = static_cast<int>(col % kQ8Block);
  const int q = int{quants[b * kPackQuantBytes + ((e / 4) * kPackRows + r) * 4 + e % 4]} - 128;
  uint16_t d;
  std::memcpy(&d, quants + p.blocks() * kPackQuantBytes + (b * kPackRows + r) * 2, 2);
  return fp16_to_f32(d) * static_cast<float>(q);
}

}  // namespace celer
