#include "runtime/quantize.hpp"

#include <cstdio>
#include <vector>

#include "kernels/quants.hpp"
#include "runtime/error.hpp"
#include "runtime/gguf.hpp"
#include "runtime/gguf_writer.hpp"

namespace celer {
namespace {

struct PresetInfo {
  QuantizePreset preset;
  const char* name;
  TensorType base;
  uint32_t file_type;  // general.file_type as llama.cpp numbers it (llama_ftype)
};

constexpr PresetInfo kPresets[] = {
    {QuantizePreset::f16, "f16", TensorType::f16, 1},         {QuantizePreset::bf16, "bf16", TensorType::bf16, 32},
    {QuantizePreset::q8_0, "q8_0", TensorType::q8_0, 7},      {QuantizePreset::q4_0, "q4_0", TensorType::q4_0, 2},
    {QuantizePreset::q4_1, "q4_1", TensorType::q4_1, 3},      {QuantizePreset::q5_0, "q5_0", TensorType::q5_0, 8},
    {QuantizePreset::q5_1, "q5_1", TensorType::q5_1, 9},      {QuantizePreset::q6_k, "q6_k", TensorType::q6_k, 18},
    {QuantizePreset::q4_k_s, "q4_k_s", TensorType::q4_k, 14}, {QuantizePreset::q4_k_m, "q4_k_m", TensorType::q4_k, 15},
    {QuantizePreset::q5_k_s, "q5_k_s", TensorType::q5_k, 16}, {QuantizePreset::q5_k_m, "q5_k_m", TensorType::q5_k, 17},
};

const PresetInfo& info(QuantizePreset p) {
  for (const PresetInfo& i : kPresets)
    if (i.preset == p) return i;
  return kPresets[0];
}

// The layers that get more bits under the _M presets: the first and last eighth, and every
// third layer between.
bool more_bits(int layer, int n_layer) {
  return layer < n_layer / 8 || layer >= 7 * n_layer / 8 || (layer - n_layer / 8) % 3 == 2;
}

bool ends_with(const std::string& s, const char* tail) {
  const std::string t(tail);
  return s.size() >= t.size() && s.compare(s.size() - t.size(), t.size(), t) == 0;
}

// The block format that takes a row length a K-quant cannot.
TensorType fallback(TensorType t, int64_t row_length) {
  TensorType f = t;
  if (t == TensorType::q4_k) f = TensorType::q5_0;
  else if (t == TensorType::q5_k) f = TensorType::q5_1;
  else if (t == TensorType::q6_k) f = TensorType::q8_0;
  return row_length % block_elems(f) == 0 ? f : TensorType::f16;
}

int layer_of(const std::string& name) {
  int layer = -1;
  if (std::sscanf(name.c_str(), "blk.%d.", &layer) != 1) return -1;
  return layer;
}

}  // namespace

std::optional<QuantizePreset> quantize_preset_from_name(const std::string& name) {
  for (const PresetInfo& i : kPresets)
    if (name == i.name) return i.preset;
  return std::nullopt;
}

const char* quantize_preset_names() {
  return "f16, bf16, q8_0, q4_0, q4_1, q5_0, q5_1, q6_k, q4_k_s, q4_k_m, q5_k_s, q5_k_m";
}

TensorType preset_tensor_type(QuantizePreset preset, const std::string& name, int64_t row_length, int layer, int n_layer,
                              bool has_output) {
  const TensorType base = info(preset).base;
  TensorType t = base;
  if (name == "output.weight" || (!has_output && name == "token_embd.weight")) {
    // The output projection decides every token: it keeps 6 bits under the 4- and 5-bit presets.
    if (!is_compute_type(base)) t = row_length % kQK == 0 ? TensorType::q6_k : TensorType::q8_0;
  } else if (ends_with(name, "attn_v.weight") || ends_with(name, "ffn_down.weight")) {
    const bool v = ends_with(name, "attn_v.weight");
    switch (preset) {
      case QuantizePreset::q4_k_m:
      case QuantizePreset::q5_k_m:
        if (layer >= 0 && more_bits(layer, n_layer)) t = TensorType::q6_k;
        break;
      case QuantizePreset::q4_k_s:
        if (layer >= 0 && (v ? layer < 4 : layer < n_layer / 8)) t = TensorType::q5_k;
        break;
      default: break;
    }
  } else if (ends_with(name, "attn_qkv.weight")) {
    // GLM's fused QKV (which holds V) takes one type more under the _M presets.
    if (preset == QuantizePreset::q4_k_m) t = TensorType::q5_k;
    else if (preset == QuantizePreset::q5_k_m) t = TensorType::q6_k;
  }
  return row_length % block_elems(t) == 0 ? t : fallback(t, row_length);
}

void quantize_file(const std::string& in, const std::string& out, QuantizePreset preset,
                   const std::function<void(size_t, size_t)>& progress) {
  const GgufFile file(in);
  GgufWriter w(static_cast<uint32_t>(file.alignment()));
  for (const auto& [key, value] : file.metadata()) w.set(key, value);
  w.set_u32("general.file_type", info(preset).file_type);
  const std::string arch = file.get_string("general.architecture", "");
  const int n_layer = static_cast<int>(file.get_int(arch + ".block_count", 0));
  const bool has_output = file.find_tensor("output.weight") != nullptr;

  const auto& tensors = file.tensors();
  std::vector<float> row;
  for (size_t i = 0; i < tensors.size(); ++i) {
    const GgufTensor& t = tensors[i];
    const int64_t row_length = t.ne[0];
    const int64_t rows = t.n_elements() / row_length;
    const TensorType target = t.n_dims >= 2 ? preset_tensor_type(preset, t.name, row_length, layer_of(t.name), n_layer, has_output)
                                            : TensorType::f32;
    std::vector<int64_t> ne(t.ne, t.ne + t.n_dims);
    std::vector<uint8_t> bytes(static_cast<size_t>(row_bytes(target, row_length) * rows));
    row.resize(static_cast<size_t>(row_length));
    for (int64_t r = 0; r < rows; ++r) {
      dequantize_row(t.type, t.data + r * row_bytes(t.type, row_length), row.data(), row_length);
      quantize_row(target, row.data(), bytes.data() + r * row_bytes(target, row_length), row_length);
    }
    w.add_tensor(t.name, target, std::move(ne), std::move(bytes));
    if (progress) progress(i + 1, tensors.size());
  }
  w.write(out);
}

}  // namespace celer
