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
    uint8_t* group = p.data.data() + g * p.group_bytes();
    for (int r = 0; r < kPackRows; ++r) {
      const int64_t row = g * kPackRows + r;
      for (int64_t b = 0; b < nb; ++b) {
        uint16_t d = 0;
        int8_t q[kQ8Block] = {};
        if (row < rows) {
          const BlockQ8_0& blk = w[row * nb + b];
          d = blk.d;
          std::memcpy(q, blk.qs, kQ8Block);
        }
        for (int e = 0; e < kQ8Block; ++e)
          group[packed_quant_offset(b, r, e)] = static_cast<uint8_t>(std::max(-127, static_cast<int>(q[e])) + 128);
        std::memcpy(group + packed_scale_offset(nb, b, r), &d, 2);
      }
    }
  }
  return p;
}

float packed_q8_value(const PackedQ8& p, int64_t row, int64_t col) {
  const uint8_t* group = p.group(row / kPackRows);
  const int r = static_cast<int>(row % kPackRows);
  const int64_t b = col / kQ8Block;
  const int q = int{group[packed_quant_offset(b, r, static_cast<int>(col % kQ8Block))]} - 128;
  uint16_t d;
  std::memcpy(&d, group + packed_scale_offset(p.blocks(), b, r), 2);
  return fp16_to_f32(d) * static_cast<float>(q);
}

}  // namespace celer
