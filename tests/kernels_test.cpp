// Every kernel on every SIMD path this CPU has, against a plain double-precision reference, on
// random data and odd sizes (tails of every length).
#include <catch2/catch.hpp>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <random>
#include <vector>

#include "kernels/attention.hpp"
#include "kernels/cpu_features.hpp"
#include "kernels/matmul.hpp"
#include "kernels/ops.hpp"
#include "kernels/low_bit_packed.hpp"
#include "kernels/vec.hpp"
#include "runtime/gguf_writer.hpp"

using namespace celer;

namespace {

std::vector<const VecKernels*> kernel_sets() {
  std::vector<const VecKernels*> sets{&vec_scalar()};
  if (cpu_features().avx2_fma && vec_avx2()) sets.push_back(vec_avx2());
  if (cpu_features().avx512 && vec_avx512()) sets.push_back(vec_avx512());
  return sets;
}

std::vector<float> random_vector(std::mt19937& rng, int64_t n, float scale = 1.0f) {
  std::uniform_real_distribution<float> u(-scale, scale);
  std::vector<float> v(n);
  for (float& x : v) x = u(rng);
  return v;
}

double dot_ref(const std::vector<float>& a, const std::vector<float>& b) {
  double s = 0;
  for (size_t i = 0; i < a.size(); ++i) s += static_cast<double>(a[i]) * b[i];
  return s;
}

std::vector<float> decode(TensorType type, const std::vector<uint8_t>& bytes, int64_t n) {
  std::vector<float> out(n);
  row_to_f32(vec_scalar(), type, bytes.data(), out.data(), n);
  return out;
}

// The packed copies int8 activations need (Q8_0, 4 to 6 bits), pointed at by w.
struct Packed {
  PackedQ8 q8;
  PackedLowBit low_bit;
};
void pack_for_int8(WeightMatrix& w, Packed& p) {
  if (w.type == TensorType::q8_0) {
    p.q8 = pack_q8_0(static_cast<const BlockQ8_0*>(w.data), w.rows, w.cols);
    w.packed = &p.q8;
  } else if (packed_low_bits(w.type) != 0) {
    p.low_bit = pack_low_bit(w.type, w.data, w.rows, w.cols);
    w.packed_low_bit = &p.low_bit;
  }
}

// Prefetching is a hint that must not change results: nothing (mode 0), the tile's own weights
// ahead (1), or another region (2).
PackedPrefetch prefetch_mode(int mode, const uint8_t* other) {
  return mode == 0 ? PackedPrefetch{} : mode == 1 ? PackedPrefetch{true} : PackedPrefetch{false, other, 3 * 64};
}

constexpr TensorType kLowBitTypes[] = {TensorType::q4_0, TensorType::q4_1, TensorType::q4_k, TensorType::q5_0,
                                       TensorType::q5_1, TensorType::q5_k, TensorType::q6_k};

}  // namespace

TEST_CASE("fp16 and bf16 conversions round-trip and round to nearest even", "[kernels]") {
  for (uint32_t h = 0; h < 0x10000; ++h) {
    if ((h & 0x7c00) == 0x7c00 && (h & 0x3ff)) continue;  // NaNs
    REQUIRE(f32_to_fp16(fp16_to_f32(static_cast<uint16_t>(h))) == h);
  }
  CHECK(fp16_to_f32(0x3c00) == 1.0f);
  CHECK(fp16_to_f32(0xc000) == -2.0f);
  CHECK(f32_to_fp16(65504.0f) == 0x7bff);
  CHECK(f32_to_fp16(1e6f) == 0x7c00);
  CHECK(bf16_to_f32(f32_to_bf16(1.5f)) == 1.5f);
  CHECK(f32_to_bf16(1.0f + 1.0f / 256) == f32_to_bf16(1.0f));  // tie rounds to even
}

TEST_CASE("dot products and f32 tiles match the double reference on every path", "[kernels]") {
  std::mt19937 rng(1);
  for (const VecKernels* vk : kernel_sets()) {
    for (int64_t k : {1, 3, 15, 16, 17, 31, 33, 63, 64, 65, 100, 768, 1001}) {
      INFO(vk->name << " k=" << k);
      const auto a = random_vector(rng, k), b = random_vector(rng, k);
      CHECK(vk->dot_f32(a.data(), b.data(), k) == Approx(dot_ref(a, b)).margin(1e-4));
      // Every tile shape; rows at a stride larger than k, as in a real matrix.
      const int64_t ld = k + 5;
      const auto x = random_vector(rng, kTileM * ld), w = random_vector(rng, kTileN * ld);
      for (int mt = 1; mt <= kTileM; ++mt)
        for (int nt = 1; nt <= kTileN; ++nt) {
          std::vector<float> y(mt * 7, -1.0f);
          vk->gemm_f32(x.data(), ld, mt, w.data(), ld, nt, k, y.data(), 7);
          for (int i = 0; i < mt; ++i)
            for (int j = 0; j < 7; ++j) {
              if (j >= nt) {
                REQUIRE(y[i * 7 + j] == -1.0f);  // nothing written outside the tile
                continue;
              }
              double ref = 0;
              for (int64_t e = 0; e < k; ++e) ref += double(x[i * ld + e]) * w[j * ld + e];
              REQUIRE(y[i * 7 + j] == Approx(ref).margin(1e-4));
            }
        }
    }
  }
}

TEST_CASE("f16, bf16 and widened Q8_0 tiles equal the f32 tile on the widened rows, bit for bit", "[kernels]") {
  std::mt19937 rng(2);
  for (const VecKernels* vk : kernel_sets()) {
    for (int64_t k : {32, 64, 96, 100, 768, 2080}) {
      const auto x = random_vector(rng, kTileM * k, 3.0f);
      const auto wf = random_vector(rng, kTileN * k);
      for (TensorType type : {TensorType::f16, TensorType::bf16, TensorType::q8_0}) {
        if (k % block_elems(type) != 0) continue;
        INFO(vk->name << " " << to_string(type) << " k=" << k);
        const auto bytes = encode_tensor(type, wf.data(), kTileN * k);
        const auto widened = decode(type, bytes, kTileN * k);
        for (int mt = 1; mt <= kTileM; ++mt)
          for (int nt = 1; nt <= kTileN; ++nt) {
            std::vector<float> y(mt * kTileN), ref(mt * kTileN);
            vk->gemm_f32(x.data(), k, mt, widened.data(), k, nt, k, ref.data(), kTileN);
            const auto* w16 = reinterpret_cast<const uint16_t*>(bytes.data());
            if (type == TensorType::f16) vk->gemm_f16(x.data(), k, mt, w16, k, nt, k, y.data(), kTileN);
            else if (type == TensorType::bf16) vk->gemm_bf16(x.data(), k, mt, w16, k, nt, k, y.data(), kTileN);
            else vk->gemm_q8_0_widened(x.data(), k, mt, reinterpret_cast<const BlockQ8_0*>(bytes.data()), k / kQ8Block, nt,
                                       k, y.data(), kTileN);
            for (int i = 0; i < mt; ++i)
              for (int j = 0; j < nt; ++j) REQUIRE(y[i * kTileN + j] == ref[i * kTileN + j]);
          }
      }
    }
  }
}

TEST_CASE("packing Q8_0 rows keeps every weight and pads the last group", "[kernels]") {
  std::mt19937 rng(12);
  const int64_t rows = 37, cols = 96;  // three groups, the last with 5 real rows
  const auto wf = random_vector(rng, rows * cols);
  auto bytes = encode_tensor(TensorType::q8_0, wf.data(), rows * cols);
  auto* blocks = reinterpret_cast<BlockQ8_0*>(bytes.data());
  blocks[5].qs[3] = -128;  // never written by a quantizer: stored as -127
  const PackedQ8 p = pack_q8_0(blocks, rows, cols);
  REQUIRE(p.groups() == 3);
  CHECK(p.group_bytes() % 64 == 0);
  CHECK(reinterpret_cast<uintptr_t>(p.data.data()) % 64 == 0);
  const auto widened = decode(TensorType::q8_0, bytes, rows * cols);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) {
      INFO("row " << r << " column " << c);
      const bool clamped = r * cols + c == 5 * kQ8Block + 3;
      REQUIRE(packed_q8_value(p, r, c) == (clamped ? widened[r * cols + c] * 127.0f / 128.0f : widened[r * cols + c]));
    }
  for (int64_t r = rows; r < p.groups() * kPackRows; ++r) CHECK(packed_q8_value(p, r, 0) == 0.0f);
  CHECK_THROWS_AS(pack_q8_0(blocks, rows, 100), std::invalid_argument);
}

TEST_CASE("Q8_0 activation quantization and packed integer tiles match the reference", "[kernels]") {
  std::mt19937 rng(2);
  for (const VecKernels* vk : kernel_sets()) {
    for (int64_t k : {32, 64, 96, 768, 2048, 2080}) {
      INFO(vk->name << " k=" << k);
      const int64_t nb = k / kQ8Block;
      const auto x = random_vector(rng, kTileM * k, 3.0f);
      std::vector<int8_t> xq(kTileM * k), xq_ref(kTileM * k);
      std::vector<float> xd(kTileM * nb), xd_ref(kTileM * nb);
      std::vector<int32_t> xb(kTileM * nb), xb_ref(kTileM * nb);
      for (int i = 0; i < kTileM; ++i) {
        vk->quantize_act_q8(x.data() + i * k, xq.data() + i * k, xd.data() + i * nb, xb.data() + i * nb, k);
        vec_scalar().quantize_act_q8(x.data() + i * k, xq_ref.data() + i * k, xd_ref.data() + i * nb,
                                     xb_ref.data() + i * nb, k);
      }
      for (int64_t e = 0; e < kTileM * k; ++e) REQUIRE(std::abs(xq[e] - xq_ref[e]) <= 1);
      for (int64_t b = 0; b < kTileM * nb; ++b) REQUIRE(xd[b] == xd_ref[b]);
      for (int64_t b = 0; b < kTileM * nb; ++b) {
        int32_t sum = 0;
        for (int e = 0; e < kQ8Block; ++e) sum += xq[b * kQ8Block + e];
        REQUIRE(xb[b] == -128 * sum);
      }
      // Dequantized activations are within half a step of the originals.
      for (int64_t e = 0; e < kTileM * k; ++e) REQUIRE(std::fabs(xq[e] * xd[e / kQ8Block] - x[e]) <= xd[e / kQ8Block] * 0.5001f);

      const int64_t n = 2 * kPackRows - 3;  // the second group partly padding
      const auto wf = random_vector(rng, n * k);
      const auto wbytes = encode_tensor(TensorType::q8_0, wf.data(), n * k);
      const auto* w = reinterpret_cast<const BlockQ8_0*>(wbytes.data());
      const PackedQ8 packed = pack_q8_0(w, n, k);
      for (int mt = 1; mt <= kTileM; ++mt)
        for (int ng = 1; ng <= kPackTileGroups; ++ng)
          for (int mode = 0; mode < 3; ++mode) {
            const PackedPrefetch prefetch = prefetch_mode(mode, packed.group(0));
            INFO("mt " << mt << " groups " << ng << " prefetch mode " << mode);
            const int n_rows = static_cast<int>(std::min<int64_t>(ng * kPackRows, n));
            std::vector<float> y(mt * n, -1.0f), same(mt * n, -1.0f);
            vk->gemm_q8_packed(xq.data(), xd.data(), xb.data(), k, mt, packed.group(0), packed.group_bytes(), ng, nb, n_rows,
                               y.data(), n, prefetch);
            vec_scalar().gemm_q8_packed(xq.data(), xd.data(), xb.data(), k, mt, packed.group(0), packed.group_bytes(), ng,
                                        nb, n_rows, same.data(), n, prefetch);
            for (int i = 0; i < mt; ++i)
              for (int j = 0; j < n; ++j) {
                if (j >= n_rows) {  // outside the call's rows: untouched
                  REQUIRE(y[i * n + j] == -1.0f);
                  continue;
                }
                // Exact integer block sums, scaled in double; and the same bits on every ISA.
                double ref = 0;
                for (int64_t b = 0; b < nb; ++b) {
                  int64_t isum = 0;
                  for (int e = 0; e < kQ8Block; ++e) isum += int64_t{w[j * nb + b].qs[e]} * xq[i * k + b * kQ8Block + e];
                  ref += double(isum) * xd[i * nb + b] * fp16_to_f32(w[j * nb + b].d);
                }
                REQUIRE(y[i * n + j] == Approx(ref).epsilon(1e-5).margin(1e-4));
                REQUIRE(y[i * n + j] == same[i * n + j]);
              }
          }
    }
  }
}

TEST_CASE("packing 4- to 6-bit rows keeps every weight exactly and pads the last group", "[kernels]") {
  std::mt19937 rng(15);
  const int64_t rows = 37, cols = 512;  // three groups, the last with 5 real rows; two K super-blocks
  const auto wf = random_vector(rng, rows * cols);
  for (TensorType type : kLowBitTypes) {
    INFO(to_string(type));
    const auto bytes = encode_tensor(type, wf.data(), rows * cols);
    const PackedLowBit p = pack_low_bit(type, bytes.data(), rows, cols);
    REQUIRE(p.bits == packed_low_bits(type));
    REQUIRE(p.groups() == 3);
    CHECK(p.group_bytes() % 64 == 0);
    CHECK(reinterpret_cast<uintptr_t>(p.data.data()) % 64 == 0);
    const auto widened = decode(type, bytes, rows * cols);  // dequantize_row, the file's values
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = 0; c < cols; ++c) {
        INFO("row " << r << " column " << c);
        REQUIRE(packed_low_bit_value(p, r, c) == widened[r * cols + c]);
      }
    for (int64_t r = rows; r < p.groups() * kPackRows; ++r) CHECK(packed_low_bit_value(p, r, 7) == 0.0f);
  }
  const auto bytes = encode_tensor(TensorType::q4_k, wf.data(), 256);
  CHECK_THROWS_AS(pack_low_bit(TensorType::q4_k, bytes.data(), 1, 96), std::invalid_argument);   // not whole super-blocks
  CHECK_THROWS_AS(pack_low_bit(TensorType::q3_k, bytes.data(), 1, 256), std::invalid_argument);  // not 4 to 6 bits
}

TEST_CASE("packed 4- to 6-bit tiles give exact block sums and the same bits on every ISA", "[kernels]") {
  std::mt19937 rng(16);
  for (const VecKernels* vk : kernel_sets())
    for (TensorType type : kLowBitTypes)
      for (int64_t k : {256, 768, 2304}) {
        INFO(vk->name << " " << to_string(type) << " k=" << k);
        const int64_t nb = k / kQ8Block;
        const auto x = random_vector(rng, kTileM * k, 3.0f);
        std::vector<int8_t> xq(kTileM * k);
        std::vector<float> xd(kTileM * nb);
        std::vector<int32_t> xb(kTileM * nb);
        std::vector<int32_t> x16(kTileM * k / 16, 0);
        for (int i = 0; i < kTileM; ++i)
          vec_scalar().quantize_act_q8(x.data() + i * k, xq.data() + i * k, xd.data() + i * nb, xb.data() + i * nb, k);
        for (int64_t e = 0; e < kTileM * k; ++e) x16[e / 16] += xq[e];
        // A partial first group, or the second group partly padding.
        const int64_t n = k == 256 ? 7 : 2 * kPackRows - 3;
        const auto wf = random_vector(rng, n * k);
        const auto wbytes = encode_tensor(type, wf.data(), n * k);
        const PackedLowBit packed = pack_low_bit(type, wbytes.data(), n, k);
        const auto widened = decode(type, wbytes, n * k);
        for (int mt = 1; mt <= kTileM; ++mt)
          for (int ng = 1; ng <= std::min<int64_t>(kPackTileGroups, packed.groups()); ++ng)
            for (int mode = 0; mode < 3; ++mode) {
              const PackedPrefetch prefetch = prefetch_mode(mode, packed.group(0));
              INFO("mt " << mt << " groups " << ng << " prefetch mode " << mode);
              const int n_rows = static_cast<int>(std::min<int64_t>(ng * kPackRows, n));
              std::vector<float> y(mt * n, -1.0f), same(mt * n, -1.0f);
              for (int pass = 0; pass < 2; ++pass) {  // this set, then the scalar reference
                const VecKernels* set = pass == 0 ? vk : &vec_scalar();
                float* out = pass == 0 ? y.data() : same.data();
                if (packed.bits == 6)
                  set->gemm_q6_packed(xq.data(), xd.data(), x16.data(), k, mt, packed.group(0), packed.group_bytes(), ng, nb,
                                      n_rows, out, n, prefetch);
                else
                  set->gemm_q4_packed(packed.bits, xq.data(), xd.data(), xb.data(), k, mt, packed.group(0),
                                      packed.group_bytes(), ng, nb, n_rows, out, n, prefetch);
              }
              for (int i = 0; i < mt; ++i)
                for (int j = 0; j < n; ++j) {
                  if (j >= n_rows) {
                    REQUIRE(y[i * n + j] == -1.0f);
                    continue;
                  }
                  // The dequantized weights against the dequantized activations, in double.
                  double ref = 0;
                  for (int64_t e = 0; e < k; ++e)
                    ref += double(widened[j * k + e]) * xq[i * k + e] * xd[i * nb + e / kQ8Block];
                  REQUIRE(y[i * n + j] == Approx(ref).epsilon(1e-5).margin(1e-4));
                  REQUIRE(y[i * n + j] == same[i * n + j]);
                }
            }
      }
}

TEST_CASE("row conversions, exp_sum and silu_mul match the reference", "[kernels]") {
  std::mt19937 rng(3);
  for (const VecKernels* vk : kernel_sets()) {
    for (int64_t n : {1, 7, 16, 17, 32, 45, 64, 100, 1000}) {
      INFO(vk->name << " n=" << n);
      const auto v = random_vector(rng, n, 4.0f);
      for (TensorType t : {TensorType::f16, TensorType::bf16}) {
        const auto bytes = encode_tensor(t, v.data(), n);
        std::vector<float> out(n);
        row_to_f32(*vk, t, bytes.data(), out.data(), n);
        CHECK(out == decode(t, bytes, n));
      }
      if (n % kQ8Block == 0) {
        const auto bytes = encode_tensor(TensorType::q8_0, v.data(), n);
        std::vector<float> out(n);
        row_to_f32(*vk, TensorType::q8_0, bytes.data(), out.data(), n);
        CHECK(out == decode(TensorType::q8_0, bytes, n));
      }
      auto e = v;
      const float max = *std::max_element(v.begin(), v.end());
      const float sum = vk->exp_sum(e.data(), n, max);
      double sum_ref = 0;
      for (int64_t i = 0; i < n; ++i) {
        const double r = std::exp(double(v[i]) - max);
        sum_ref += r;
        CHECK(e[i] == Approx(r).epsilon(1e-6).margin(1e-7));
      }
      CHECK(sum == Approx(sum_ref).epsilon(1e-6));

      const auto u = random_vector(rng, n);
      std::vector<float> s(n);
      vk->silu_mul(v.data(), u.data(), s.data(), n);
      for (int64_t i = 0; i < n; ++i) CHECK(s[i] == Approx(v[i] / (1 + std::exp(-double(v[i]))) * u[i]).epsilon(1e-5).margin(1e-6));
    }
  }
}

TEST_CASE("argmax finds the first largest value and never a NaN", "[kernels]") {
  std::mt19937 rng(21);
  for (const VecKernels* vk : kernel_sets()) {
    for (int64_t n : {1, 2, 15, 16, 17, 31, 33, 100, 32000}) {
      INFO(vk->name << " n=" << n);
      // Few distinct values, so the largest one repeats and only the first occurrence is right.
      std::vector<float> x(n);
      for (float& v : x) v = static_cast<float>(static_cast<int>(rng() % 7)) - 3.0f;
      REQUIRE(vk->argmax(x.data(), n) == std::max_element(x.begin(), x.end()) - x.begin());
      const int64_t last = n - 1;  // a new maximum in the tail
      x[last] = 10.0f;
      REQUIRE(vk->argmax(x.data(), n) == last);
      x[0] = 10.0f;  // tied with the tail: the first wins
      REQUIRE(vk->argmax(x.data(), n) == 0);
      // NaNs, anywhere (first included), are passed over.
      x.assign(n, -1.0f);
      for (int64_t i = 0; i < n; i += 3) x[i] = std::nanf("");
      if (n > 1) {
        x[n / 2 + (n / 2 % 3 == 0)] = 5.0f;
        REQUIRE(vk->argmax(x.data(), n) == n / 2 + (n / 2 % 3 == 0));
      }
      x.assign(n, -std::numeric_limits<float>::infinity());
      REQUIRE(vk->argmax(x.data(), n) == 0);
      x.assign(n, std::nanf(""));
      REQUIRE(vk->argmax(x.data(), n) == 0);
    }
  }
}

TEST_CASE("exp_sum stays finite and exact at the range limits", "[kernels]") {
  for (const VecKernels* vk : kernel_sets()) {
    std::vector<float> v{0.0f, -50.0f, -87.0f, -200.0f, -1e30f, 0.5f, -0.5f, -10.0f, 0.0f, 0.0f, 0.0f, 0.0f,
                         0.0f, 0.0f, 0.0f, 0.0f, -3.0f};
    auto e = v;
    vk->exp_sum(e.data(), static_cast<int64_t>(e.size()), 0.5f);
    for (size_t i = 0; i < v.size(); ++i) {
      INFO(vk->name << " x=" << v[i]);
      CHECK(std::isfinite(e[i]));
      CHECK(e[i] == Approx(std::exp(double(v[i]) - 0.5)).epsilon(1e-6).margin(1e-30));
    }
  }
}

TEST_CASE("matmul matches the reference for every type, plan and shape", "[kernels]") {
  std::mt19937 rng(4);
  ThreadPool pool(2);
  for (const VecKernels* vk : kernel_sets()) {
    MatmulScratch scratch;
    for (TensorType type : {TensorType::f32, TensorType::f16, TensorType::bf16, TensorType::q8_0, TensorType::q4_0,
                            TensorType::q4_1, TensorType::q5_0, TensorType::q5_1, TensorType::q4_k, TensorType::q5_k,
                            TensorType::q6_k}) {
      for (auto [M, N, K] : {std::tuple<int64_t, int64_t, int64_t>{1, 5, 64}, {3, 37, 96}, {7, 300, 64},
                             {8, 33, 128}, {19, 517, 96}, {64, 64, 256}, {5, 70, 172}, {2, 40, 512}, {17, 33, 256}}) {
        if (K % block_elems(type) != 0) continue;
        INFO(vk->name << " " << to_string(type) << " M=" << M << " N=" << N << " K=" << K);
        const auto wf = random_vector(rng, N * K);
        const auto bytes = encode_tensor(type, wf.data(), N * K);
        WeightMatrix w{type, bytes.data(), N, K};
        Packed packed;
        pack_for_int8(w, packed);
        const auto x = random_vector(rng, M * K);
        std::vector<float> y(M * N), ref(M * N);
        matmul_reference(w, x.data(), M, ref.data());
        for (Q8Activations q8 : {Q8Activations::f32, Q8Activations::int8}) {
          INFO("q8 activations " << to_string(q8));
          matmul(pool, *vk, scratch, w, x.data(), M, y.data(), q8);
          // int8 activations: half a quantization step per value, random signs.
          const bool int8 = (type == TensorType::q8_0 || packed_low_bits(type) != 0) && q8 == Q8Activations::int8;
          if (int8) {  // the int8 path needs the packed form
            const WeightMatrix unpacked{type, bytes.data(), N, K};
            CHECK_THROWS_AS(matmul(pool, *vk, scratch, unpacked, x.data(), M, y.data(), q8), std::invalid_argument);
          }
          const double tol = int8 ? 0.02 * std::sqrt(double(K)) : 1e-3;
          for (int64_t i = 0; i < M * N; ++i) REQUIRE(y[i] == Approx(ref[i]).margin(tol));
        }
      }
    }
  }
}

TEST_CASE("a row's matmul result is bit-identical whatever else is in the batch", "[kernels]") {
  std::mt19937 rng(8);
  ThreadPool pool(2);
  const int64_t N = 300, K = 256;
  for (const VecKernels* vk : kernel_sets()) {
    MatmulScratch scratch;
    for (TensorType type : {TensorType::f32, TensorType::f16, TensorType::bf16, TensorType::q8_0, TensorType::q4_0,
                            TensorType::q5_1, TensorType::q4_k, TensorType::q5_k, TensorType::q6_k}) {
      if (K % block_elems(type) != 0) continue;
      INFO(vk->name << " " << to_string(type));
      const auto wf = random_vector(rng, N * K);
      const auto bytes = encode_tensor(type, wf.data(), N * K);
      WeightMatrix w{type, bytes.data(), N, K};
      Packed packed;
      pack_for_int8(w, packed);
      const auto x = random_vector(rng, 40 * K);
      std::vector<float> all(40 * N), one(N);
      for (Q8Activations q8 : {Q8Activations::f32, Q8Activations::int8}) {
        matmul(pool, *vk, scratch, w, x.data(), 40, all.data(), q8);  // the large-M plan
        for (int64_t m : {0, 5, 17, 39}) {
          matmul(pool, *vk, scratch, w, x.data() + m * K, 1, one.data(), q8);  // the decode plan
          REQUIRE(std::equal(one.begin(), one.end(), all.begin() + m * N));
        }
      }
    }
  }
}

TEST_CASE("matmuls sharing an input give the bits of separate matmuls", "[kernels]") {
  std::mt19937 rng(14);
  ThreadPool pool(2);
  const int64_t K = 256;
  const int64_t Ns[] = {48, 37, 80};  // different heights, one with a partial group
  for (const VecKernels* vk : kernel_sets())
    for (TensorType type : {TensorType::q8_0, TensorType::f32, TensorType::q4_0})
      for (Q8Activations q8 : {Q8Activations::int8, Q8Activations::f32})
        for (int64_t M : {1, 5, 16, 23}) {
          INFO(vk->name << " " << to_string(type) << " " << to_string(q8) << " M=" << M);
          MatmulScratch scratch;
          std::vector<std::vector<uint8_t>> bytes;
          std::vector<Packed> packed(3);
          WeightMatrix ws[3];
          for (int i = 0; i < 3; ++i) {
            // With Q4_0: a mix, as a Q4_K_M file mixes 4 and 6 bits (Q4_0, Q6_K, Q8_0).
            const TensorType t = type != TensorType::q4_0 ? type : i == 0 ? TensorType::q4_0 : i == 1 ? TensorType::q6_k : TensorType::q8_0;
            const auto wf = random_vector(rng, Ns[i] * K);
            bytes.push_back(encode_tensor(t, wf.data(), Ns[i] * K));
            ws[i] = WeightMatrix{t, bytes.back().data(), Ns[i], K};
            pack_for_int8(ws[i], packed[i]);
          }
          const auto x = random_vector(rng, M * K);
          std::vector<float> together[3], alone(M * 80);
          for (int i = 0; i < 3; ++i) together[i].assign(M * Ns[i], -1.0f);
          const WeightMatrix* w[] = {&ws[0], &ws[1], &ws[2]};
          float* const y[] = {together[0].data(), together[1].data(), together[2].data()};
          matmul_shared_input(pool, *vk, scratch, w, x.data(), M, y, q8);
          for (int i = 0; i < 3; ++i) {
            matmul(pool, *vk, scratch, ws[i], x.data(), M, alone.data(), q8);
            REQUIRE(std::equal(together[i].begin(), together[i].end(), alone.begin()));
          }
        }
}

TEST_CASE("rmsnorm and rope match their definitions", "[kernels]") {
  std::mt19937 rng(5);
  const auto x = random_vector(rng, 77), w = random_vector(rng, 77);
  for (const VecKernels* vk : kernel_sets()) {
    std::vector<float> out(77);
    rmsnorm(*vk, x.data(), w.data(), 1e-5f, 77, out.data());
    double ms = 0;
    for (float v : x) ms += double(v) * v;
    ms /= 77;
    for (int i = 0; i < 77; ++i) CHECK(out[i] == Approx(x[i] / std::sqrt(ms + 1e-5) * w[i]).epsilon(1e-5));
  }
  const int n_rot = 16;
  std::vector<float> cs(n_rot);
  rope_angles(37, n_rot, 10000.0f, cs.data());
  for (RopeStyle style : {RopeStyle::normal, RopeStyle::neox}) {
    auto v = random_vector(rng, 20);
    auto r = v;
    rope_apply(r.data(), n_rot, cs.data(), style);
    for (int i = 0; i < n_rot / 2; ++i) {
      const double theta = 37.0 * std::pow(10000.0, -2.0 * i / n_rot);
      const int a = style == RopeStyle::normal ? 2 * i : i;
      const int b = style == RopeStyle::normal ? 2 * i + 1 : i + n_rot / 2;
      CHECK(r[a] == Approx(v[a] * std::cos(theta) - v[b] * std::sin(theta)).margin(1e-5));
      CHECK(r[b] == Approx(v[a] * std::sin(theta) + v[b] * std::cos(theta)).margin(1e-5));
    }
    for (int i = n_rot; i < 20; ++i) CHECK(r[i] == v[i]);  // past n_rot: untouched
  }
}

TEST_CASE("paged attention matches the reference across scattered blocks, f32 and f16", "[kernels]") {
  std::mt19937 rng(6);
  const std::vector<int32_t> table{7, 2, 8, 0, 5};  // out of order, as a real pool hands them out
  for (TensorType type : {TensorType::f32, TensorType::f16, TensorType::q8_0})
    for (int hd : {8, 24, 64, 72, 96}) {
      if (type == TensorType::q8_0 && hd % kQ8Block != 0) continue;
      const int n_kv = 2, n_blocks = 9;
      const int64_t elems = int64_t{n_blocks} * n_kv * kKvBlock * hd;
      AlignedVector<uint8_t> k(elems * 4), v(elems * 4);
      std::vector<float> k_scales(elems / kQ8Block), v_scales(elems / kQ8Block);
      KvLayerView kv{k.data(), v.data(), n_kv, hd, type, k_scales.data(), v_scales.data()};
      // Every slot filled through kv_store, which puts a position's vectors where k_value /
      // v_value find them (rounded to f16 in an f16 cache).
      for (int32_t b = 0; b < n_blocks; ++b)
        for (int h = 0; h < n_kv; ++h)
          for (int slot = 0; slot < kKvBlock; ++slot) {
            const auto k1 = random_vector(rng, hd), v1 = random_vector(rng, hd);
            kv_store(vec_scalar(), kv, b, h, slot, k1.data(), v1.data());
            for (int d = 0; d < hd; ++d) {
              if (type == TensorType::q8_0) {  // within half a step of a scale of absmax / 127
                const int c = d / kQ8Block;
                float kmax = 0, vmax = 0;
                for (int e = c * kQ8Block; e < (c + 1) * kQ8Block; ++e)
                  kmax = std::max(kmax, std::fabs(k1[e])), vmax = std::max(vmax, std::fabs(v1[e]));
                REQUIRE(std::fabs(kv.k_value(b, h, slot, d) - k1[d]) <= kmax / 127 * 0.5001f);
                REQUIRE(std::fabs(kv.v_value(b, h, slot, d) - v1[d]) <= vmax / 127 * 0.5001f);
                continue;
              }
              const float kr = type == TensorType::f16 ? fp16_to_f32(f32_to_fp16(k1[d])) : k1[d];
              const float vr = type == TensorType::f16 ? fp16_to_f32(f32_to_fp16(v1[d])) : v1[d];
              REQUIRE((kv.k_value(b, h, slot, d) == kr && kv.v_value(b, h, slot, d) == vr));
            }
          }
      for (const VecKernels* vk : kernel_sets()) {
        for (int32_t n_ctx : {1, 15, 16, 17, 40, 77}) {
          INFO(vk->name << " " << to_string(type) << " hd=" << hd << " n_ctx=" << n_ctx);
          // kAttnRows consecutive queries at positions n_ctx - 1, n_ctx, ...
          // kAttnHeads query heads sharing the 2 KV heads (group 2: heads 0, 1 read KV head 0;
          // 2, 3 read KV head 1), all attended in one call.
          const int group = kAttnHeads / n_kv;
          const int64_t q_dim = int64_t{kAttnHeads} * hd;
          const auto q = random_vector(rng, kAttnRows * q_dim, 2.0f);
          const int64_t stride = 80;
          std::vector<float> scores(kAttnHeads * kAttnRows * stride), out(kAttnRows * q_dim), ref(hd), alone(hd);
          attend(*vk, q.data(), q_dim, kAttnRows, kv, 0, kAttnHeads, group, table.data(), n_ctx, 0.2f, scores.data(),
                 stride, out.data(), q_dim);
          for (int j = 0; j < kAttnHeads; ++j)
            for (int i = 0; i < kAttnRows; ++i) {
              const float* got = out.data() + i * q_dim + j * hd;
              attend_reference(q.data() + i * q_dim + j * hd, kv, j / group, table.data(), n_ctx + i, 0.2f, ref.data());
              for (int d = 0; d < hd; ++d) CHECK(got[d] == Approx(ref[d]).margin(1e-5));
              // The same query and head attended alone gives the same bits.
              attend(*vk, q.data() + i * q_dim + j * hd, q_dim, 1, kv, j, 1, group, table.data(), n_ctx + i, 0.2f,
                     scores.data(), stride, alone.data(), hd);
              for (int d = 0; d < hd; ++d) REQUIRE(alone[d] == got[d]);
            }
        }
      }
    }
}

TEST_CASE("an f16 KV cache rounds to nearest and saturates instead of storing infinities", "[kernels]") {
  std::mt19937 rng(13);
  const int hd = 40;
  for (const VecKernels* vk : kernel_sets()) {
    INFO(vk->name);
    AlignedVector<uint8_t> k(kKvBlock * hd * 2), v(kKvBlock * hd * 2);
    KvLayerView kv{k.data(), v.data(), 1, hd, TensorType::f16};
    std::vector<float> big(hd, 1e9f), small(hd, -1e9f);
    kv_store(*vk, kv, 0, 0, 3, big.data(), small.data());
    for (int d = 0; d < hd; ++d) {
      CHECK(kv.k_value(0, 0, 3, d) == 65504.0f);
      CHECK(kv.v_value(0, 0, 3, d) == -65504.0f);
    }
    auto x = random_vector(rng, hd, 70000.0f);
    x[7] = std::numeric_limits<float>::quiet_NaN();
    x[8] = 1e-6f;  // a subnormal half
    std::vector<uint16_t> h(hd);
    vk->f32_to_f16_saturating(x.data(), h.data(), hd);
    for (int d = 0; d < hd; ++d) {
      INFO(x[d]);
      if (d == 7) CHECK(std::isnan(fp16_to_f32(h[d])));
      else CHECK(h[d] == f32_to_fp16(std::clamp(x[d], -65504.0f, 65504.0f)));
    }
  }
}

TEST_CASE("a slot holding infinities or NaN does not reach a query that may not see it", "[kernels]") {
  std::mt19937 rng(15);
  const int hd = 64;
  for (const VecKernels* vk : kernel_sets())
    for (TensorType type : {TensorType::f32, TensorType::f16, TensorType::q8_0}) {
      INFO(vk->name << " " << to_string(type));
      AlignedVector<uint8_t> k(kKvBlock * hd * 4), v(kKvBlock * hd * 4);
      std::vector<float> ks(kKvBlock * hd / kQ8Block), vs(kKvBlock * hd / kQ8Block);
      KvLayerView kv{k.data(), v.data(), 1, hd, type, ks.data(), vs.data()};
      for (int slot = 0; slot < 3; ++slot) {
        const auto k1 = random_vector(rng, hd), v1 = random_vector(rng, hd);
        kv_store(*vk, kv, 0, 0, slot, k1.data(), v1.data());
      }
      // Slot 3 is another sequence's stale position: infinities and NaN.
      std::vector<float> bad(hd, std::numeric_limits<float>::infinity());
      bad[5] = std::numeric_limits<float>::quiet_NaN();
      kv_store(*vk, kv, 0, 0, 3, bad.data(), bad.data());
      const auto q = random_vector(rng, hd);
      std::vector<float> scores(kKvBlock), out(hd);
      const int32_t table[] = {0};
      attend(*vk, q.data(), hd, 1, kv, 0, 1, 1, table, 3, 0.125f, scores.data(), kKvBlock, out.data(), hd);
      for (float o : out) REQUIRE(std::isfinite(o));
    }
}

TEST_CASE("the thread pool runs every index exactly once, many times over", "[kernels]") {
  ThreadPool pool(3);
  std::vector<int> hits(1000);
  for (int round = 0; round < 200; ++round)
    pool.parallel_for(1000, 7, [&](int64_t b, int64_t e, int) {
      for (int64_t i = b; i < e; ++i) ++hits[i];
    });
  for (int h : hits) REQUIRE(h == 200);
  std::atomic<int> threads_seen{0};
  pool.run([&](int) { threads_seen.fetch_add(1); });
  CHECK(threads_seen.load() == 3);
}

TEST_CASE("parallel_runs takes every index once, each thread in order, with a true next hint", "[kernels]") {
  for (int n_threads : {1, 2, 3}) {
    ThreadPool pool(n_threads);
    for (int64_t n : {1, 2, 5, 64, 1001}) {
      INFO(n_threads << " threads, n=" << n);
      for (int round = 0; round < 50; ++round) {
        std::vector<std::atomic<int>> hits(n);
        std::vector<std::vector<std::pair<int64_t, int64_t>>> seen(n_threads);  // (i, next) per thread
        for (auto& v : seen) v.reserve(n);
        pool.parallel_runs(n, [&](int64_t i, int thread, int64_t next) {
          hits[i].fetch_add(1);
          seen[thread].push_back({i, next});
        });
        for (auto& h : hits) REQUIRE(h.load() == 1);
        // A thread's own run comes in order; a hint names the index right after (which the
        // thread takes next unless another thread took it first).
        for (const auto& v : seen)
          for (const auto& [i, next] : v)
            if (next >= 0) REQUIRE(next == i + 1);
        if (n_threads == 1)
          for (size_t k = 0; k < seen[0].size(); ++k) REQUIRE(seen[0][k].first == static_cast<int64_t>(k));
      }
    }
  }
}
