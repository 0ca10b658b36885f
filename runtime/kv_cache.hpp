// The KV memory of one model replica (or one tensor-parallel shard): for every layer, K and V for
// n_blocks blocks of kKvBlock positions. Which block belongs to which sequence is not known
// here: the caller passes block tables (BlockPool hands the ids out).
#pragma once

#include <cstdint>
#include <vector>

#include "kernels/aligned.hpp"
#include "kernels/attention.hpp"

namespace celer {

class KvCache {
 public:
  // type: the element type, f32, f16 or q8_0 (KvLayerView); anything else, or q8_0 with a head
  // size that is not a multiple of 32, throws Error.
  KvCache(int n_layer, int n_kv_heads, int head_dim, int32_t n_blocks, TensorType type = TensorType::f32);

  int32_t n_blocks() const { return n_blocks_; }
  TensorType type() const { return type_; }
  const KvLayerView& layer(int i) const { return layers_[i]; }
  uint64_t bytes() const { return storage_.size() + scales_.size() * sizeof(float); }
  void copy_block(int32_t src, int32_t dst);  // every layer's K and V
  // Bytes one block takes across all layers, K and V: what a memory budget divides by.
  static uint64_t block_bytes(int n_layer, int n_kv_heads, int head_dim, TensorType type) {
    const uint64_t values = 2ull * n_layer * n_kv_heads * head_dim * kKvBlock;
    const uint64_t scales = type == TensorType::q8_0 ? values / kQ8Block * sizeof(float) : 0;  // a scale per 32
    return values * kv_element_bytes(type) + scales;
  }

 private:
  int32_t n_blocks_;
  TensorType type_;
  AlignedVector<uint8_t> storage_;  // [n_layer][K|V][n_blocks ...] in KvLayerView's layouts
  AlignedVector<float> scales_;     // q8_0: [n_layer][K|V][n_blocks ...] scales
  std::vector<KvLayerView> layers_;
};

}  // namespace celer
