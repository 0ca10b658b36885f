// A pool of KV block ids with a free list and reference counts, for callers that drive the
// engine directly (`generate()`, `celer bench-model`, the engine tests): blocks are handed out
// lowest id first and a block returns to the free list when its last reference is dropped. A
// serving replica's blocks are the cache actor's KvBlockManager instead (prefix index, LRU
// eviction, copy-on-write), which a single sequence without sharing does not need.
#pragma once

#include <cstdint>
#include <vector>

namespace celer {

class BlockPool {
 public:
  explicit BlockPool(int32_t n_blocks);

  int32_t n_blocks() const { return static_cast<int32_t>(refs_.size()); }
  int32_t n_free() const { return static_cast<int32_t>(free_.size()); }
  // Appends n fresh blocks (refcount 1) to `table`; returns false and changes nothing when fewer
  // than n are free.
  bool allocate(int32_t n, std::vector<int32_t>& table);
  void retain(int32_t block);
  void release(int32_t block);
  void release_all(std::vector<int32_t>& table);  // releases and clears
  int32_t refcount(int32_t block) const { return refs_[block]; }

 private:
  std::vector<int32_t> refs_;
  std::vector<int32_t> free_;  // a stack: the most recently freed block is reused first (still warm in cache)
};

}  // namespace celer
