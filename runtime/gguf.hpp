// GGUF reader (versions 2 and 3): the header, every metadata value type, tensor infos and the
// aligned data section, read through a read-only mmap. Every read is bounds-checked; any
// inconsistency throws Error(invalid_file or unsupported) naming the file and the problem.
// Format: https://github.com/ggml-org/ggml/blob/master/docs/gguf.md
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <variant>
#include <vector>

#include "kernels/types.hpp"

namespace celer {

enum class GgufType : uint32_t {
  u8 = 0, i8 = 1, u16 = 2, i16 = 3, u32 = 4, i32 = 5, f32 = 6, boolean = 7,
  string = 8, array = 9, u64 = 10, i64 = 11, f64 = 12,
};
const char* to_string(GgufType type);

// One scalar; the alternative's index is the GgufType (with `array` skipped).
using GgufScalar = std::variant<uint8_t, int8_t, uint16_t, int16_t, uint32_t, int32_t, float, bool,
                                std::string, uint64_t, int64_t, double>;
GgufType scalar_type(const GgufScalar& v);

struct GgufValue {
  GgufType type = GgufType::u32;
  GgufScalar scalar;                 // when type != array
  GgufType elem_type = GgufType::u32;  // when type == array
  std::vector<GgufScalar> array;     // when type == array (nested arrays are not used by models)
};

struct GgufTensor {
  std::string name;
  TensorType type = TensorType::f32;
  int64_t ne[4] = {1, 1, 1, 1};  // ne[0] is the contiguous dimension, as in ggml
  int n_dims = 0;
  uint64_t offset = 0;  // from the start of the data section
  const uint8_t* data = nullptr;
  uint64_t n_bytes = 0;
  int64_t n_elements() const { return ne[0] * ne[1] * ne[2] * ne[3]; }
};

class GgufFile {
 public:
  explicit GgufFile(const std::string& path);  // maps and parses; throws Error
  ~GgufFile();
  GgufFile(const GgufFile&) = delete;
  GgufFile& operator=(const GgufFile&) = delete;

  const std::string& path() const { return path_; }
  uint32_t version() const { return version_; }
  uint64_t alignment() const { return alignment_; }

  // Metadata, in file order.
  const std::vector<std::pair<std::string, GgufValue>>& metadata() const { return kv_; }
  const GgufValue* find(const std::string& key) const;
  bool has(const std::string& key) const { return find(key) != nullptr; }
  // Typed getters: throw Error naming the key when it is missing or of an incompatible type.
  // Integers of any width convert to each other when the value fits.
  std::string get_string(const std::string& key) const;
  int64_t get_int(const std::string& key) const;
  double get_float(const std::string& key) const;
  bool get_bool(const std::string& key) const;
  const GgufValue& get_array(const std::string& key, GgufType elem_type) const;
  // Same, with a default for a missing key (a present key of the wrong type still throws).
  std::string get_string(const std::string& key, const std::string& dflt) const;
  int64_t get_int(const std::string& key, int64_t dflt) const;
  double get_float(const std::string& key, double dflt) const;
  bool get_bool(const std::string& key, bool dflt) const;

  const std::vector<GgufTensor>& tensors() const { return tensors_; }
  const GgufTensor* find_tensor(const std::string& name) const;

 private:
  void parse();
  [[noreturn]] void fail(const std::string& what) const;

  std::string path_;
  const uint8_t* map_ = nullptr;
  uint64_t size_ = 0;
  uint32_t version_ = 0;
  uint64_t alignment_ = 32;
  std::vector<std::pair<std::string, GgufValue>> kv_;
  std::map<std::string, size_t> kv_index_;
  std::vector<GgufTensor> tensors_;
  std::map<std::string, size_t> tensor_index_;
};

}  // namespace celer
