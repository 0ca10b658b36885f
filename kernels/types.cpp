#include "kernels/types.hpp"

#include <initializer_list>

namespace celer {

const char* to_string(TensorType type) {
  switch (type) {
    case TensorType::f32: return "f32";
    case TensorType::f16: return "f16";
    case TensorType::q8_0: return "q8_0";
    case TensorType::bf16: return "bf16";
  }
  return "?";
}

bool tensor_type_from_string(const char* name, TensorType* out) {
  for (TensorType t : {TensorType::f32, TensorType::f16, TensorType::q8_0, TensorType::bf16}) {
    if (std::strcmp(name, to_string(t)) == 0) {
      *out = t;
      return true;
    }
  }
  return false;
}

int64_t block_elems(TensorType type) { return type == TensorType::q8_0 ? kQ8Block : 1; }

int64_t block_bytes(TensorType type) {
  switch (type) {
    case TensorType::f32: return 4;
    case TensorType::f16:
    case TensorType::bf16: return 2;
    case TensorType::q8_0: return sizeof(BlockQ8_0);
  }
  return 0;
}

}  // namespace celer
