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
  // type: the element type, f32 or f16 (KvLayerView); anything else throws Error.
  KvCache(int n_layer, int n_kv_heads, int head_dim, int32_t n_blocks, TensorType type = TensorType::f32);

  int32_t n_blocks() const { return n_blocks_; }
  TensorType type() const { return type_; }
  const KvLayerView& layer(int i) const { return layers_[i]; }
  uint64_t bytes() const { return storage_.size(); }
  void copy_block(int32_t src, int32_t dst);  // every layer's K and V
  // Bytes one block takes across all layers, K and V: what a memory budget divides by.
  static uint64_t block_bytes(int n_layer, int n_kv_heads, int head_dim, TensorType type) {
    return 2ull * n_layer * n_kv_heads * head_dim * kKvBlock * (type == TensorType::f16 ? 2 : 4);
  }

 private:
  int32_t n_blocks_;
  TensorType type_;
  AlignedVector<uint8_t> storage_;  // [n_layer][K|V][n_blocks ...] in KvLayerView's layouts
  std::vector<KvLayerView> layers_;
};

}  // namespace celer
