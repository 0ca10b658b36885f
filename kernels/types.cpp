#include "kernels/types.hpp"

#include <initializer_list>

namespace celer {

const char* to_string(TensorType type) {
  switch (type) {
    case TensorType::f32: return "f32";
    case TensorType::f16: return "f16";
    case TensorType::q4_0: return "q4_0";
    case TensorType::q4_1: return "q4_1";
    case TensorType::q5_0: return "q5_0";
    case TensorType::q5_1: return "q5_1";
    case TensorType::q8_0: return "q8_0";
    case TensorType::q2_k: return "q2_k";
    case TensorType::q3_k: return "q3_k";
    case TensorType::q4_k: return "q4_k";
    case TensorType::q5_k: return "q5_k";
    case TensorType::q6_k: return "q6_k";
    case TensorType::bf16: return "bf16";
  }
  return "?";
}

bool tensor_type_from_string(const char* name, TensorType* out) {
  for (TensorType t : {TensorType::f32, TensorType::f16, TensorType::q8_0, TensorType::bf16, TensorType::q4_0, TensorType::q4_1,
                       TensorType::q5_0, TensorType::q5_1, TensorType::q4_k, TensorType::q5_k, TensorType::q6_k}) {
    if (std::strcmp(name, to_string(t)) == 0) {
      *out = t;
      return true;
    }
  }
  return false;
}

int64_t block_elems(TensorType type) {
  switch (type) {
    case TensorType::f32:
    case TensorType::f16:
    case TensorType::bf16: return 1;
    case TensorType::q4_0:
    case TensorType::q4_1:
    case TensorType::q5_0:
    case TensorType::q5_1:
    case TensorType::q8_0: return 32;
    case TensorType::q2_k:
    case TensorType::q3_k:
    case TensorType::q4_k:
    case TensorType::q5_k:
    case TensorType::q6_k: return kQK;
  }
  return 1;
}

int64_t block_bytes(TensorType type) {
  switch (type) {
    case TensorType::f32: return 4;
    case TensorType::f16:
    case TensorType::bf16: return 2;
    case TensorType::q4_0: return sizeof(BlockQ4_0);
    case TensorType::q4_1: return sizeof(BlockQ4_1);
    case TensorType::q5_0: return sizeof(BlockQ5_0);
    case TensorType::q5_1: return sizeof(BlockQ5_1);
    case TensorType::q8_0: return sizeof(BlockQ8_0);
    case TensorType::q2_k: return sizeof(BlockQ2_K);
    case TensorType::q3_k: return sizeof(BlockQ3_K);
    case TensorType::q4_k: return sizeof(BlockQ4_K);
    case TensorType::q5_k: return sizeof(BlockQ5_K);
    case TensorType::q6_k: return sizeof(BlockQ6_K);
  }
  return 0;
}

}  // namespace celer
