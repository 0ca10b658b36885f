// Which SIMD instruction sets this CPU (and its OS) lets us use, detected once at run time.
#pragma once

namespace celer {

struct CpuFeatures {
  bool avx2_fma = false;  // AVX2 + FMA + F16C: Haswell and later, every x86-64 server since 2014
  bool avx512 = false;    // AVX-512 F/BW/VL + VNNI (int8 dot products): Ice Lake, Sapphire Rapids, Zen 4
};

const CpuFeatures& cpu_features();

// One polite step of a spin-wait: PAUSE on x86 (the core lets a sibling run and saves power).
inline void cpu_relax() {
#if defined(__x86_64__)
  __builtin_ia32_pause();
#endif
}

}  // namespace celer
