// GGUF v3 writer: metadata of every value type and tensors in F32, F16, BF16 and Q8_0.
// Used by `celer make-model` and by tests that build small or deliberately broken files.
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "runtime/gguf.hpp"

namespace celer {

class GgufWriter {
 public:
  explicit GgufWriter(uint32_t alignment = 32) : alignment_(alignment) {}

  void set(const std::string& key, GgufValue value);
  void set_u32(const std::string& key, uint32_t v);
  void set_f32(const std::string& key, float v);
  void set_bool(const std::string& key, bool v);
  void set_string(const std::string& key, const std::string& v);

  // Adds a tensor whose bytes are already in `type`'s layout. ne[0] is the contiguous dimension.
  void add_tensor(const std::string& name, TensorType type, std::vector<int64_t> ne, std::vector<uint8_t> bytes);

  // Writes the file; throws Error(io) when the file cannot be written.
  void write(const std::string& path) const;

 private:
  struct Tensor {
    std::string name;
    TensorType type;
    std::vector<int64_t> ne;
    std::vector<uint8_t> bytes;
  };
  uint32_t alignment_;
  std::vector<std::pair<std::string, GgufValue>> kv_;
  std::vector<Tensor> tensors_;
};

// Encodes f32 values into a tensor type's bytes (kernels/quants.hpp quantize_row).
std::vector<uint8_t> encode_tensor(TensorType type, const float* values, int64_t n);

}  // namespace celer
