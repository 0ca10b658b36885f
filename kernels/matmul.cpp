#include "kernels/matmul.hpp"

#include <algorithm>
#include <cstdint>
#include <span>
#include <stdexcept>
#include <string>

namespace celer {
namespace {

// 64 rows of K <= 2048 f32 is at most 512 KiB: inside one core's L2 (1-2 MiB on current x86
// servers) with room for the activation tiles streaming past it.
constexpr int64_t kPanelRows = 64;
// Decode steps have few rows: smaller panels let two threads share even a 768-row matrix evenly.
constexpr int64_t kSmallPanelRows = 16;
constexpr int64_t kSmallM = 16;
// Packed Q8_0 with fewer rows than this streams its weights (each pair meets one or two tiles);
// from 8 rows on, the tiles of a pair hide the next pair's fetch better (measured on the 134M
// model's matrices: 5-10% faster from 9 to 15 rows, even at 8).
constexpr int64_t kStreamRowsQ8 = 8;

// One packed matrix (Q8_0, or 4 to 6 bits) and where its product goes.
struct PackedProduct {
  int bits = 8;
  int64_t rows = 0, n_groups = 0, group_bytes = 0;
  const uint8_t* data = nullptr;
  float* y = nullptr;

  PackedProduct() = default;
  PackedProduct(const PackedQ8& w, float* out)
      : rows(w.rows), n_groups(w.groups()), group_bytes(w.group_bytes()), data(w.data.data()), y(out) {}
  PackedProduct(const PackedLowBit& w, float* out)
      : bits(w.bits), rows(w.rows), n_groups(w.groups()), group_bytes(w.group_bytes()), data(w.data.data()), y(out) {}
  const uint8_t* group(int64_t g) const { return data + g * group_bytes; }
};

// The packed form of w for int8 activations, in *out; false when it has none.
bool packed_product(const WeightMatrix& w, float* y, PackedProduct* out) {
  if (w.type == TensorType::q8_0 && w.packed) *out = PackedProduct(*w.packed, y);
  else if (w.packed_low_bit && packed_low_bits(w.type) != 0) *out = PackedProduct(*w.packed_low_bit, y);
  else return false;
  return true;
}

// The types whose rows the decode tiles widen in registers; the others are widened a panel at a time.
bool widened_in_registers(TensorType t) {
  return t == TensorType::f32 || t == TensorType::f16 || t == TensorType::bf16 || t == TensorType::q8_0;
}

// Int8 activations against packed Q8_0 weights, for one or more matrices with the same input
// (K columns each). Quantized once per call, row by row (the same row gives the same bytes
// whatever M is). Then each pair of weight groups meets every tile of activation rows in turn:
// the pair (2 x 16 rows x K bytes) stays in L1 while the activations, four bytes per row and
// step, come from L2. The matrices' pairs form one list for the threads, so several matrices
// cost one fork and join, not one each.
void matmul_packed(ThreadPool& pool, const VecKernels& vk, MatmulScratch& scratch, std::span<const PackedProduct> products,
                   const float* x, int64_t K, int64_t M) {
  const int64_t nb = K / kQ8Block;
  if (scratch.xq.size() < static_cast<size_t>(M * K)) scratch.xq.resize(M * K);
  if (scratch.xd.size() < static_cast<size_t>(M * nb)) scratch.xd.resize(M * nb);
  if (scratch.xb.size() < static_cast<size_t>(M * nb)) scratch.xb.resize(M * nb);
  int8_t* xq = scratch.xq.data();
  float* xd = scratch.xd.data();
  int32_t* xb = scratch.xb.data();
  // 6-bit weights meet the activations' sums per 16 values too.
  bool sums16 = false;
  for (const PackedProduct& p : products) sums16 = sums16 || p.bits == 6;
  if (sums16 && scratch.x16.size() < static_cast<size_t>(M * K / 16)) scratch.x16.resize(M * K / 16);
  int32_t* x16 = scratch.x16.data();
  pool.parallel_for(M, 16, [&](int64_t m0, int64_t m1, int) {
    for (int64_t m = m0; m < m1; ++m) {
      vk.quantize_act_q8(x + m * K, xq + m * K, xd + m * nb, xb + m * nb, K);
      if (!sums16) continue;
      for (int64_t j = 0; j < K / 16; ++j) {
        int32_t sum = 0;
        for (int e = 0; e < 16; ++e) sum += xq[m * K + 16 * j + e];
        x16[m * (K / 16) + j] = sum;
      }
    }
  });

  // The unit of work is a pair of weight groups (one tile's worth of weight rows), which meets
  // every tile of activation rows in turn, and each thread walks a run of consecutive pairs.
  // Few rows (M < 8): each pair is used once or twice, so the tiles fetch their own weights
  // just ahead (the run streams from memory). More rows: a pair's tiles are compute-bound, and
  // meanwhile they fetch the pair the thread takes next into L2, each tile a share of it, so
  // the next pair's first tile does not wait on memory (ThreadPool::parallel_runs: the runs
  // stay in order, and idle threads take over the ends of unfinished ones).
  const bool stream = M < kStreamRowsQ8;
  const int64_t n_tiles = (M + kTileM - 1) / kTileM;
  auto n_pairs_of = [](const PackedProduct& w) { return (w.n_groups + kPackTileGroups - 1) / kPackTileGroups; };
  int64_t n_pairs = 0;
  for (const PackedProduct& p : products) n_pairs += n_pairs_of(p);
  // Pair q of the list: its product and first group.
  auto locate = [&](int64_t q, size_t& i, int64_t& g0) {
    for (i = 0; q >= n_pairs_of(products[i]); ++i) q -= n_pairs_of(products[i]);
    g0 = q * kPackTileGroups;
  };
  auto pair = [&](int64_t q, int64_t next_q) {
    size_t i;
    int64_t g0;
    locate(q, i, g0);
    const PackedProduct& w = products[i];
    const int64_t N = w.rows;
    const int ng = static_cast<int>(std::min<int64_t>(kPackTileGroups, w.n_groups - g0));
    const int n_rows = static_cast<int>(std::min<int64_t>(int64_t{ng} * kPackRows, N - g0 * kPackRows));
    const uint8_t* next = nullptr;
    int64_t next_bytes = 0;
    if (!stream && next_q >= 0) {
      size_t ni;
      int64_t ng0;
      locate(next_q, ni, ng0);
      const PackedProduct& nw = products[ni];
      next = nw.group(ng0);
      next_bytes = std::min<int64_t>(kPackTileGroups, nw.n_groups - ng0) * nw.group_bytes;
    }
    for (int64_t t = 0; t < n_tiles; ++t) {
      const int64_t m0 = t * kTileM;
      const int mt = static_cast<int>(std::min<int64_t>(kTileM, M - m0));
      PackedPrefetch prefetch{stream};
      if (next) {  // this tile's share of the next pair, in whole cache lines
        const int64_t from = next_bytes * t / n_tiles / 64 * 64, to = next_bytes * (t + 1) / n_tiles / 64 * 64;
        prefetch.next = next + from;
        prefetch.next_bytes = to - from;
      }
      float* out = w.y + m0 * N + g0 * kPackRows;
      if (w.bits == 8)
        vk.gemm_q8_packed(xq + m0 * K, xd + m0 * nb, xb + m0 * nb, K, mt, w.group(g0), w.group_bytes, ng, nb, n_rows, out,
                          N, prefetch);
      else if (w.bits == 6)
        vk.gemm_q6_packed(xq + m0 * K, xd + m0 * nb, x16 + m0 * (K / 16), K, mt, w.group(g0), w.group_bytes, ng, nb,
                          n_rows, out, N, prefetch);
      else
        vk.gemm_q4_packed(w.bits, xq + m0 * K, xd + m0 * nb, xb + m0 * nb, K, mt, w.group(g0), w.group_bytes, ng, nb,
                          n_rows, out, N, prefetch);
    }
  };
  if (stream) {  // a run per thread, as in matmul's decode plan: nothing to fetch ahead
    pool.parallel_for(n_pairs, (n_pairs + pool.size() - 1) / pool.size(), [&](int64_t q0, int64_t q1, int) {
      for (int64_t q = q0; q < q1; ++q) pair(q, -1);
    });
    return;
  }
  pool.parallel_runs(n_pairs, [&](int64_t q, int, int64_t next_q) { pair(q, next_q); });
}

}  // namespace

void MatmulScratch::reserve(int n_threads, int64_t max_rows, int64_t max_cols) {
  xq.resize(static_cast<size_t>(max_rows * max_cols));
  xd.resize(static_cast<size_t>(max_rows * max_cols / kQ8Block));
  xb.resize(static_cast<size_t>(max_rows * max_cols / kQ8Block));
  panels.resize(n_threads);
  for (auto& p : panels) p.resize(static_cast<size_t>(kPanelRows * max_cols));
  x16.resize(static_cast<size_t>(max_rows * max_cols / 16));
}

const char* to_string(Q8Activations mode) { return mode == Q8Activations::int8 ? "int8" : "f32"; }

void matmul(ThreadPool& pool, const VecKernels& vk, MatmulScratch& scratch, const WeightMatrix& w,
            const float* x, int64_t M, float* y, Q8Activations q8) {
  if (q8 == Q8Activations::int8 && (w.type == TensorType::q8_0 || packed_low_bits(w.type) != 0)) {
    PackedProduct product;
    if (!packed_product(w, y, &product))
      throw std::invalid_argument(std::string("matmul: int8 activations need the ") + to_string(w.type) +
                                  " weights packed (pack_q8_0 or pack_low_bit)");
    matmul_packed(pool, vk, scratch, {&product, 1}, x, w.cols, M);
    return;
  }
  if (!widened_in_registers(w.type) && packed_low_bits(w.type) == 0)
    throw std::invalid_argument(std::string("matmul: ") + to_string(w.type) +
                                " weights are converted to Q8_0 when a model loads");
  const int64_t K = w.cols;
  const int64_t N = w.rows;
  // Grown only if the caller did not reserve enough (tests); the engine reserves up front.
  if (scratch.panels.size() < static_cast<size_t>(pool.size())) scratch.panels.resize(pool.size());
  for (auto& p : scratch.panels)
    if (p.size() < static_cast<size_t>(kPanelRows * K)) p.resize(kPanelRows * K);

  const int64_t P = M >= kSmallM ? kPanelRows : kSmallPanelRows;
  const int64_t n_panels = (N + P - 1) / P;
  // Decode is memory-bound: each thread streams one contiguous run of rows, which the hardware
  // prefetchers follow; panels handed out alternately would restart them every few KiB.
  // Prefill is compute-bound: panels one at a time balance the threads.
  const int64_t grain = M >= kSmallM ? 1 : (n_panels + pool.size() - 1) / pool.size();
  pool.parallel_for(n_panels, grain, [&](int64_t p0, int64_t p1, int thread) {
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t n0 = p * P;
      const int64_t rows = std::min(P, N - n0);
      if (M < kSmallM && widened_in_registers(w.type)) {
        // Few rows: widen the weights in registers as they stream past.
        for (int64_t m0 = 0; m0 < M; m0 += kTileM) {
          const int mt = static_cast<int>(std::min<int64_t>(kTileM, M - m0));
          for (int64_t j = 0; j < rows; j += kTileN) {
            const int nt = static_cast<int>(std::min<int64_t>(kTileN, rows - j));
            const uint8_t* wr = w.row(n0 + j);
            float* yt = y + m0 * N + n0 + j;
            switch (w.type) {
              case TensorType::f16: vk.gemm_f16(x + m0 * K, K, mt, reinterpret_cast<const uint16_t*>(wr), K, nt, K, yt, N); break;
              case TensorType::bf16: vk.gemm_bf16(x + m0 * K, K, mt, reinterpret_cast<const uint16_t*>(wr), K, nt, K, yt, N); break;
              case TensorType::q8_0:
                vk.gemm_q8_0_widened(x + m0 * K, K, mt, reinterpret_cast<const BlockQ8_0*>(wr), K / kQ8Block, nt, K, yt, N);
                break;
              case TensorType::f32: vk.gemm_f32(x + m0 * K, K, mt, reinterpret_cast<const float*>(wr), K, nt, K, yt, N); break;
              default: break;  // not reached: widened_in_registers
            }
          }
        }
        continue;
      }
      // Many rows (or 4- to 6-bit weights): widen the panel once, then reuse it for every
      // tile of x. F32 rows that are already cache-line aligned are used in place.
      const float* panel = reinterpret_cast<const float*>(w.row(n0));
      if (w.type != TensorType::f32 || reinterpret_cast<uintptr_t>(panel) % kCacheLine != 0 || (K * 4) % kCacheLine != 0) {
        float* buf = scratch.panels[thread].data();
        row_to_f32(vk, w.type, w.row(n0), buf, rows * K);
        panel = buf;
      }
      for (int64_t m0 = 0; m0 < M; m0 += kTileM) {
        const int mt = static_cast<int>(std::min<int64_t>(kTileM, M - m0));
        for (int64_t j = 0; j < rows; j += kTileN)
          vk.gemm_f32_cached(x + m0 * K, K, mt, panel + j * K, K, static_cast<int>(std::min<int64_t>(kTileN, rows - j)), K,
                      y + m0 * N + n0 + j, N);
      }
    }
  });
}

void matmul_shared_input(ThreadPool& pool, const VecKernels& vk, MatmulScratch& scratch,
                         std::span<const WeightMatrix* const> ws, const float* x, int64_t M, std::span<float* const> ys,
                         Q8Activations q8) {
  if (ws.size() != ys.size()) throw std::invalid_argument("matmul_shared_input: one output per matrix");
  constexpr size_t kMaxProducts = 4;
  PackedProduct products[kMaxProducts];
  bool together = q8 == Q8Activations::int8 && !ws.empty() && ws.size() <= kMaxProducts;
  for (size_t i = 0; together && i < ws.size(); ++i)
    together = packed_product(*ws[i], ys[i], &products[i]) && ws[i]->cols == ws[0]->cols;
  if (together) {
    matmul_packed(pool, vk, scratch, {products, ws.size()}, x, ws[0]->cols, M);
    return;
  }
  for (size_t i = 0; i < ws.size(); ++i) matmul(pool, vk, scratch, *ws[i], x, M, ys[i], q8);
}

void matmul_reference(const WeightMatrix& w, const float* x, int64_t M, float* y) {
  const VecKernels& vk = vec_scalar();
  std::vector<float> row(w.cols);
  for (int64_t n = 0; n < w.rows; ++n) {
    row_to_f32(vk, w.type, w.row(n), row.data(), w.cols);
    for (int64_t m = 0; m < M; ++m) {
      double sum = 0;
      for (int64_t k = 0; k < w.cols; ++k) sum += static_cast<double>(row[k]) * x[m * w.cols + k];
      y[m * w.rows + n] = static_cast<float>(sum);
    }
  }
}

}  // namespace celer
