#include "runtime/block_pool.hpp"

#include <string>

#include "runtime/error.hpp"

namespace celer {

BlockPool::BlockPool(int32_t n_blocks) : refs_(n_blocks, 0) {
  free_.reserve(n_blocks);
  for (int32_t b = n_blocks - 1; b >= 0; --b) free_.push_back(b);
}

bool BlockPool::allocate(int32_t n, std::vector<int32_t>& table) {
  if (n > n_free()) return false;
  for (int32_t i = 0; i < n; ++i) {
    const int32_t b = free_.back();
    free_.pop_back();
    refs_[b] = 1;
    table.push_back(b);
  }
  return true;
}

void BlockPool::retain(int32_t block) {
  if (block < 0 || block >= n_blocks() || refs_[block] == 0)
    throw Error(ErrorCode::invalid_argument, "retain of a free or unknown KV block " + std::to_string(block));
  ++refs_[block];
}

void BlockPool::release(int32_t block) {
  if (block < 0 || block >= n_blocks() || refs_[block] == 0)
    throw Error(ErrorCode::invalid_argument, "release of a free or unknown KV block " + std::to_string(block));
  if (--refs_[block] == 0) free_.push_back(block);
}

void BlockPool::release_all(std::vector<int32_t>& table) {
  for (int32_t b : table) release(b);
  table.clear();
}

}  // namespace celer
