// The block formats files hold (kernels/quants.hpp): reading against a double-precision
// reference written from the formats' definitions, quantization within each format's bound,
// re-quantizing what was read, and the conversion to Q8_0 a model makes at load.
#include <catch2/catch.hpp>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <iterator>
#include <random>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "kernels/low_bit_packed.hpp"
#include "kernels/quants.hpp"
#include "kernels/vec.hpp"
#include "runtime/gguf.hpp"
#include "runtime/model.hpp"

using namespace celer;

namespace {

const TensorType kBlockTypes[] = {TensorType::q4_0, TensorType::q4_1, TensorType::q5_0, TensorType::q5_1,
                                  TensorType::q4_k, TensorType::q5_k, TensorType::q6_k};
const TensorType kReadOnlyTypes[] = {TensorType::q2_k, TensorType::q3_k};  // read, not written

double h2d(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return static_cast<double>(fp16_to_f32(h));
}

// Bit i of a byte string (bit 0 = the low bit of byte 0).
int bit(const uint8_t* p, int i) { return (p[i / 8] >> (i % 8)) & 1; }

// The formats as ggml's documentation lays them out, one element at a time, in double.
double reference_value(TensorType t, const uint8_t* block, int e) {
  switch (t) {
    case TensorType::q4_0: {  // d, qs[16]
      const int q = e < 16 ? block[2 + e] & 15 : block[2 + e - 16] >> 4;
      return h2d(block) * (q - 8);
    }
    case TensorType::q4_1: {  // d, m, qs[16]
      const int q = e < 16 ? block[4 + e] & 15 : block[4 + e - 16] >> 4;
      return h2d(block) * q + h2d(block + 2);
    }
    case TensorType::q5_0: {  // d, qh[4], qs[16]
      const int lo = e < 16 ? block[6 + e] & 15 : block[6 + e - 16] >> 4;
      return h2d(block) * ((lo + 16 * bit(block + 2, e)) - 16);
    }
    case TensorType::q5_1: {  // d, m, qh[4], qs[16]
      const int lo = e < 16 ? block[8 + e] & 15 : block[8 + e - 16] >> 4;
      return h2d(block) * (lo + 16 * bit(block + 4, e)) + h2d(block + 2);
    }
    case TensorType::q4_k:
    case TensorType::q5_k: {  // d, dmin, scales[12], (qh[32],) qs[128]
      const uint8_t* s = block + 4;
      const int j = e / 32;  // sub-block
      int sc, m;
      if (j < 4) {
        sc = s[j] % 64;
        m = s[j + 4] % 64;
      } else {
        sc = s[j + 4] % 16 + 16 * (s[j - 4] / 64);
        m = s[j + 4] / 16 + 16 * (s[j] / 64);
      }
      const uint8_t* qs = block + (t == TensorType::q4_k ? 16 : 48);
      const int chunk = e / 64, in_chunk = e % 64;
      const uint8_t byte = qs[32 * chunk + in_chunk % 32];
      int q = in_chunk < 32 ? byte % 16 : byte / 16;
      if (t == TensorType::q5_k) q += 16 * ((block[16 + in_chunk % 32] >> (2 * chunk + in_chunk / 32)) & 1);
      return h2d(block) * sc * q - h2d(block + 2) * m;
    }
    case TensorType::q2_k: {  // scales[16] (scale | min << 4), qs[64], d, dmin
      const int half = e / 128, quarter = (e % 128) / 32;
      const int q = (block[16 + 32 * half + e % 32] >> (2 * quarter)) & 3;
      const uint8_t sm = block[e / 16];
      return h2d(block + 80) * (sm % 16) * q - h2d(block + 82) * (sm / 16);
    }
    case TensorType::q3_k: {  // hmask[32], qs[64], scales[12], d
      const int half = e / 128, quarter = (e % 128) / 32, l = e % 32;
      const int low = (block[32 + 32 * half + l] >> (2 * quarter)) & 3;
      const int high = bit(block + l, 4 * half + quarter);  // bit of hmask[l]
      // The 16 6-bit scales: scale 4g + k has the low (g < 2) or high nibble of byte
      // (g % 2) * 4 + k of the 12, and bits 2g, 2g + 1 of byte 8 + k on top.
      const int s = e / 16, g = s / 4, k = s % 4;
      const uint8_t* sc = block + 96;
      const int nibble = g < 2 ? sc[(g % 2) * 4 + k] % 16 : sc[(g % 2) * 4 + k] / 16;
      const int scale = nibble + 16 * ((sc[8 + k] >> (2 * g)) & 3) - 32;
      return h2d(block + 108) * scale * (low - (high ? 0 : 4));
    }
    case TensorType::q6_k: {  // ql[128], qh[64], scales[16] (int8), d
      const int half = e / 128, i = e % 128, quarter = i / 32, l = i % 32;
      const uint8_t lo_byte = block[64 * half + 32 * (quarter % 2) + l];
      const int lo = quarter < 2 ? lo_byte % 16 : lo_byte / 16;
      const int hi = (block[128 + 32 * half + l] >> (2 * quarter)) & 3;
      const int8_t sc = static_cast<int8_t>(block[192 + e / 16]);
      return h2d(block + 208) * sc * ((lo + 16 * hi) - 32);
    }
    default: break;
  }
  return NAN;
}

std::vector<float> gaussian(size_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> dist(0.0f, 1.0f);
  std::vector<float> v(n);
  for (float& x : v) x = dist(rng);
  return v;
}

// Random bytes with sane scales: any integers the format holds, finite small d.
std::vector<uint8_t> random_blocks(TensorType t, int64_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::vector<uint8_t> bytes(static_cast<size_t>(row_bytes(t, n)));
  for (uint8_t& b : bytes) b = static_cast<uint8_t>(rng());
  const int64_t bb = block_bytes(t);
  std::uniform_real_distribution<float> scale(0.001f, 0.1f);
  for (int64_t b = 0; b < n / block_elems(t); ++b) {
    uint8_t* blk = bytes.data() + b * bb;
    auto put = [&](int at) {
      const uint16_t h = f32_to_fp16(scale(rng));
      std::memcpy(blk + at, &h, 2);
    };
    if (t == TensorType::q6_k) put(208);
    else if (t == TensorType::q2_k) put(80), put(82);
    else if (t == TensorType::q3_k) put(108);
    else put(0);
    if (t == TensorType::q4_1 || t == TensorType::q5_1 || t == TensorType::q4_k || t == TensorType::q5_k) put(2);
  }
  return bytes;
}

}  // namespace

TEST_CASE("every block format reads as its definition says, on odd numbers of blocks", "[quants]") {
  std::vector<TensorType> types(std::begin(kBlockTypes), std::end(kBlockTypes));
  types.insert(types.end(), std::begin(kReadOnlyTypes), std::end(kReadOnlyTypes));
  for (TensorType t : types) {
    INFO(to_string(t));
    for (int blocks : {1, 3, 7}) {
      const int64_t n = blocks * block_elems(t);
      const auto bytes = random_blocks(t, n, 11u + static_cast<uint32_t>(blocks));
      std::vector<float> got(static_cast<size_t>(n));
      dequantize_row(t, bytes.data(), got.data(), n);
      std::vector<float> via_kernels(static_cast<size_t>(n));
      row_to_f32(vec_best(), t, bytes.data(), via_kernels.data(), n);  // what norms and embeddings read
      for (int64_t i = 0; i < n; ++i) {
        const double want = reference_value(t, bytes.data() + i / block_elems(t) * block_bytes(t), static_cast<int>(i % block_elems(t)));
        INFO("element " << i);
        REQUIRE(got[i] == Approx(want).margin(1e-6).epsilon(1e-6));
        REQUIRE(via_kernels[i] == got[i]);
      }
    }
  }
}

TEST_CASE("quantizing stays within each format's bound; re-quantizing what was read gives it back", "[quants]") {
  const int64_t n = 256 * 5;
  const auto x = gaussian(static_cast<size_t>(n), 3);
  for (TensorType t : kBlockTypes) {
    INFO(to_string(t));
    std::vector<uint8_t> bytes(static_cast<size_t>(row_bytes(t, n)));
    quantize_row(t, x.data(), bytes.data(), n);
    std::vector<float> y(static_cast<size_t>(n));
    dequantize_row(t, bytes.data(), y.data(), n);
    double se = 0, ss = 0;
    for (int64_t i = 0; i < n; ++i) {
      se += (x[i] - y[i]) * double(x[i] - y[i]);
      ss += x[i] * double(x[i]);
    }
    const double rel_rmse = std::sqrt(se / ss);
    // Round to nearest on a uniform grid: rmse = step / sqrt(12); the steps are range / 15
    // (4 bits) and range / 31 (5 bits) per block, the K-quants' a little wider (6-bit scales).
    const double bound = t == TensorType::q6_k                                ? 0.02
                         : (t == TensorType::q5_0 || t == TensorType::q5_1)   ? 0.05
                         : t == TensorType::q5_k                              ? 0.05
                                                                              : 0.11;
    INFO("relative rmse " << rel_rmse);
    CHECK(rel_rmse < bound);
    CHECK(rel_rmse > 0);
    // The 32-weight formats: each weight rounds to the nearest point of its block's grid
    // (d * (q - offset) + m): within half a step inside the grid's range, at its nearer end
    // outside it (a scale fitted by least squares may leave an outlier out).
    if (block_elems(t) == 32)
      for (int64_t b = 0; b < n / 32; ++b) {
        const uint8_t* blk = bytes.data() + b * block_bytes(t);
        const double d = h2d(blk);
        const bool affine = t == TensorType::q4_1 || t == TensorType::q5_1;
        const int levels = (t == TensorType::q4_0 || t == TensorType::q4_1) ? 15 : 31;
        const double m = affine ? h2d(blk + 2) : -d * ((levels + 1) / 2);
        const double lo = std::min(m, m + d * levels), hi = std::max(m, m + d * levels);
        for (int j = 0; j < 32; ++j) {
          const double xv = x[b * 32 + j], err = std::fabs(xv - y[b * 32 + j]);
          const double want = xv < lo ? lo - xv : xv > hi ? xv - hi : std::fabs(d) / 2;
          INFO("block " << b << " element " << j << ": " << xv << " read as " << y[b * 32 + j]);
          REQUIRE(err <= want * 1.001 + 1e-5);
        }
      }
    // What was read is on the format's grid: quantizing it again reads back the same values
    // (the 32-weight formats, whose scales come straight from the block's range), or values
    // well within the format's error (the K-quants, whose 6-bit sub-block scales are rounded
    // again against a super-block scale that may come out different).
    std::vector<uint8_t> again(bytes.size());
    quantize_row(t, y.data(), again.data(), n);
    std::vector<float> y2(static_cast<size_t>(n));
    dequantize_row(t, again.data(), y2.data(), n);
    double moved = 0, se2 = 0;
    for (int64_t i = 0; i < n; ++i) {
      moved = std::max(moved, double(std::fabs(y2[i] - y[i])));
      se2 += (y2[i] - y[i]) * double(y2[i] - y[i]);
    }
    INFO("largest change " << moved);
    if (block_elems(t) == 32) CHECK(moved < 1e-6);
    else CHECK(std::sqrt(se2 / ss) < bound / 2);
  }
}

TEST_CASE("converting to Q8_0 keeps Q4_0 and Q5_0 exactly and the others within a Q8_0 rounding", "[quants]") {
  const int64_t n = 256 * 3;
  const auto x = gaussian(static_cast<size_t>(n), 5);
  for (TensorType t : kBlockTypes) {
    INFO(to_string(t));
    std::vector<uint8_t> bytes(static_cast<size_t>(row_bytes(t, n)));
    quantize_row(t, x.data(), bytes.data(), n);
    std::vector<float> y(static_cast<size_t>(n)), z(static_cast<size_t>(n));
    dequantize_row(t, bytes.data(), y.data(), n);
    std::vector<BlockQ8_0> q8(static_cast<size_t>(n / 32));
    convert_row_to_q8_0(t, bytes.data(), q8.data(), n);
    dequantize_row(TensorType::q8_0, q8.data(), z.data(), n);
    for (int64_t b = 0; b < n / 32; ++b) {
      float amax = 0;
      for (int j = 0; j < 32; ++j) amax = std::max(amax, std::fabs(y[b * 32 + j]));
      for (int j = 0; j < 32; ++j) {
        const int64_t i = b * 32 + j;
        if (t == TensorType::q4_0 || t == TensorType::q5_0) REQUIRE(z[i] == y[i]);
        // Half a step, plus the f16 rounding of the step (2^-11 of it) times up to 127.
        else REQUIRE(std::fabs(z[i] - y[i]) <= amax / 127 * (0.5 + 127.0 / 2048) * 1.01 + 1e-6);
      }
    }
  }
}

TEST_CASE("block formats refuse what has no block layout, and Q2_K / Q3_K are read but not written", "[quants]") {
  std::vector<uint8_t> bytes(64);
  float out[32];
  CHECK_THROWS_AS(dequantize_row(static_cast<TensorType>(16), bytes.data(), out, 32), std::invalid_argument);  // IQ2_XXS
  float in[256] = {};
  std::vector<uint8_t> q2(sizeof(BlockQ2_K));
  CHECK_THROWS_AS(quantize_row(TensorType::q2_k, in, q2.data(), 256), std::invalid_argument);  // read only
}

TEST_CASE("files llama.cpp's quantizer wrote read as llama.cpp reads them, bit for bit, and load as models", "[quants]") {
  // tests/data/llama-quantize (docs/data.md): each file's tensors, and the hash of the f32
  // values llama.cpp's own dequantization gives each.
  const std::string dir = std::string(CELER_TEST_DATA) + "/llama-quantize";
  std::ifstream in(dir + "/hashes.json");
  REQUIRE(in.good());
  const nlohmann::json hashes = nlohmann::json::parse(in);
  std::vector<TensorType> types(std::begin(kBlockTypes), std::end(kBlockTypes));
  types.insert(types.end(), std::begin(kReadOnlyTypes), std::end(kReadOnlyTypes));
  for (TensorType t : types) {
    INFO(to_string(t));
    const std::string path = dir + "/llama-" + to_string(t) + ".gguf";
    const nlohmann::json& want = hashes.at(to_string(t));
    GgufFile file(path);
    size_t quantized = 0;
    for (const GgufTensor& tensor : file.tensors()) {
      INFO(tensor.name);
      const int64_t row = tensor.ne[0], n = tensor.n_elements();
      std::vector<float> values(static_cast<size_t>(n));
      for (int64_t r = 0; r < n / row; ++r)
        dequantize_row(tensor.type, tensor.data + r * row_bytes(tensor.type, row), values.data() + r * row, row);
      uint64_t h = 1469598103934665603ull;  // FNV-1a 64 over the values' bytes
      const auto* bytes = reinterpret_cast<const uint8_t*>(values.data());
      for (size_t i = 0; i < values.size() * sizeof(float); ++i) h = (h ^ bytes[i]) * 1099511628211ull;
      char hex[17];
      std::snprintf(hex, sizeof hex, "%016llx", static_cast<unsigned long long>(h));
      CHECK(want.at(tensor.name).get<std::string>() == hex);
      quantized += tensor.type == t;
    }
    CHECK(quantized == 9);  // every matrix (the norms stay F32)
    Model model(path);
    // Computed as stored at 4 to 6 bits (packed by the engine), converted to Q8_0 otherwise.
    CHECK(model.main_type() == (packed_low_bits(t) != 0 ? t : TensorType::q8_0));
  }
}
