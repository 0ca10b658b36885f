#include <cstdlib>
#include <cstring>

#include "kernels/cpu_features.hpp"
#include "kernels/quants.hpp"
#include "kernels/vec.hpp"

namespace celer {

#if !defined(CELER_X86_SIMD)
const VecKernels* vec_avx2() { return nullptr; }
const VecKernels* vec_avx512() { return nullptr; }
#endif

const VecKernels& vec_best() {
  static const VecKernels* best = [] {
    const char* cap = std::getenv("CELER_SIMD");
    const bool allow512 = !cap || std::strcmp(cap, "avx512") == 0;
    const bool allow2 = allow512 || std::strcmp(cap, "avx2") == 0;
    const CpuFeatures& f = cpu_features();
    if (allow512 && f.avx512 && vec_avx512()) return vec_avx512();
    if (allow2 && f.avx2_fma && vec_avx2()) return vec_avx2();
    return &vec_scalar();
  }();
  return *best;
}

void row_to_f32(const VecKernels& k, TensorType type, const void* src, float* dst, int64_t n) {
  switch (type) {
    case TensorType::f32: std::memcpy(dst, src, n * sizeof(float)); break;
    case TensorType::f16: k.to_f32_f16(static_cast<const uint16_t*>(src), dst, n); break;
    case TensorType::bf16: k.to_f32_bf16(static_cast<const uint16_t*>(src), dst, n); break;
    case TensorType::q8_0: k.to_f32_q8_0(static_cast<const BlockQ8_0*>(src), dst, n); break;
    default: dequantize_row(type, src, dst, n); break;  // the formats only files hold (scalar)
  }
}

}  // namespace celer
