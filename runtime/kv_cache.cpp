#include "runtime/kv_cache.hpp"

#include <cstring>

#include "runtime/error.hpp"

namespace celer {

KvCache::KvCache(int n_layer, int n_kv_heads, int head_dim, int32_t n_blocks, TensorType type)
    : n_blocks_(n_blocks), type_(type) {
  if (type != TensorType::f32 && type != TensorType::f16)
    throw Error(ErrorCode::unsupported, std::string("a KV cache of ") + to_string(type) + " (f32 or f16)");
  const size_t elem = type == TensorType::f16 ? 2 : 4;
  const size_t per_tensor = static_cast<size_t>(n_blocks) * n_kv_heads * kKvBlock * head_dim * elem;
  storage_.assign(per_tensor * 2 * n_layer, 0);
  layers_.resize(n_layer);
  for (int i = 0; i < n_layer; ++i) {
    KvLayerView& l = layers_[i];
    l.k = storage_.data() + per_tensor * (2 * i);
    l.v = storage_.data() + per_tensor * (2 * i + 1);
    l.n_kv_heads = n_kv_heads;
    l.head_dim = head_dim;
    l.type = type;
  }
}

void KvCache::copy_block(int32_t src, int32_t dst) {
  for (const KvLayerView& l : layers_) {
    // One block, all heads.
    const size_t n = static_cast<size_t>(l.n_kv_heads) * kKvBlock * l.head_dim * l.element_bytes();
    std::memcpy(l.k_block(dst, 0), l.k_block(src, 0), n);
    std::memcpy(l.v_block(dst, 0), l.v_block(src, 0), n);
  }
}

}  // namespace celer
