#include "runtime/kv_cache.hpp"

#include <algorithm>

namespace celer {

KvCache::KvCache(int n_layer, int n_kv_heads, int head_dim, int32_t n_blocks) : n_blocks_(n_blocks) {
  const size_t per_tensor = static_cast<size_t>(n_blocks) * n_kv_heads * kKvBlock * head_dim;
  storage_.assign(per_tensor * 2 * n_layer, 0.0f);
  layers_.resize(n_layer);
  for (int i = 0; i < n_layer; ++i) {
    KvLayerView& l = layers_[i];
    l.k = storage_.data() + per_tensor * (2 * i);
    l.v = storage_.data() + per_tensor * (2 * i + 1);
    l.n_kv_heads = n_kv_heads;
    l.head_dim = head_dim;
  }
}

void KvCache::copy_block(int32_t src, int32_t dst) {
  for (const KvLayerView& l : layers_) {
    const int64_t n = static_cast<int64_t>(l.n_kv_heads) * kKvBlock * l.head_dim;  // one block, all heads
    std::copy_n(l.k + l.block_offset(src, 0), n, l.k + l.block_offset(dst, 0));
    std::copy_n(l.v + l.block_offset(src, 0), n, l.v + l.block_offset(dst, 0));
  }
}

}  // namespace celer
