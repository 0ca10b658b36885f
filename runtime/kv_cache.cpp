#include "runtime/kv_cache.hpp"

#include <cstring>

#include "runtime/error.hpp"

namespace celer {

KvCache::KvCache(int n_layer, int n_kv_heads, int head_dim, int32_t n_blocks, TensorType type)
    : n_blocks_(n_blocks), type_(type) {
  if (type != TensorType::f32 && type != TensorType::f16 && type != TensorType::q8_0)
    throw Error(ErrorCode::unsupported, std::string("a KV cache of ") + to_string(type) + " (f32, f16 or q8_0)");
  if (type == TensorType::q8_0 && head_dim % kQ8Block != 0)
    throw Error(ErrorCode::unsupported, "a q8_0 KV cache needs a head size that is a multiple of 32, not " +
                                            std::to_string(head_dim));
  const size_t values = static_cast<size_t>(n_blocks) * n_kv_heads * kKvBlock * head_dim;  // per tensor
  const size_t elem = static_cast<size_t>(kv_element_bytes(type));
  storage_.assign(values * elem * 2 * n_layer, 0);
  if (type == TensorType::q8_0) scales_.assign(values / kQ8Block * 2 * n_layer, 0.0f);
  layers_.resize(n_layer);
  for (int i = 0; i < n_layer; ++i) {
    KvLayerView& l = layers_[i];
    l.k = storage_.data() + values * elem * (2 * i);
    l.v = storage_.data() + values * elem * (2 * i + 1);
    l.n_kv_heads = n_kv_heads;
    l.head_dim = head_dim;
    l.type = type;
    if (type == TensorType::q8_0) {
      l.k_scales = scales_.data() + values / kQ8Block * (2 * i);
      l.v_scales = scales_.data() + values / kQ8Block * (2 * i + 1);
    }
  }
}

void KvCache::copy_block(int32_t src, int32_t dst) {
  for (const KvLayerView& l : layers_) {
    // One block, all heads.
    const size_t n = static_cast<size_t>(l.n_kv_heads) * kKvBlock * l.head_dim;
    std::memcpy(l.k_block(dst, 0), l.k_block(src, 0), n * l.element_bytes());
    std::memcpy(l.v_block(dst, 0), l.v_block(src, 0), n * l.element_bytes());
    if (type_ != TensorType::q8_0) continue;
    std::memcpy(l.k_block_scales(dst, 0), l.k_block_scales(src, 0), n / kQ8Block * sizeof(float));
    std::memcpy(l.v_block_scales(dst, 0), l.v_block_scales(src, 0), n / kQ8Block * sizeof(float));
  }
}

}  // namespace celer
