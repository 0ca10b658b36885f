// The paged KV cache's bookkeeping for one replica: which blocks each sequence holds, which full
// blocks are remembered for reuse by later prompts with the same prefix, and which are free.
//
// - Blocks hold kKvBlock positions. A block is free (in the free queue), or referenced by one or
//   more sequences. Reference counts let sequences share blocks: prefix-cache hits and forks.
// - The prefix cache indexes full, computed blocks by a hash chain: hash(block i) covers the
//   parent's hash and the block's 16 tokens, so equal hashes mean equal prefixes (the tokens are
//   kept and compared too: a 64-bit collision can never hand a sequence someone else's KV).
// - A block whose last reference goes stays indexed but joins the free queue; the queue's order
//   is eviction order (least recently released first, a sequence's tail before its head), and
//   allocation takes from its front, dropping the block from the index then.
// - A sequence that ends also leaves its partly filled last block findable (by its parent's hash
//   and its tokens): a later prompt that continues it (the next turn of a conversation) gets a
//   fresh block with a copy of that KV instead of computing those positions again.
// - Copy-on-write: a forked sequence shares its parent's partly filled last block; before either
//   writes into it, prepare_append() gives it a private copy and says which copy to make.
// (vLLM v1's block pool and KV cache manager follow the same plan.)
#pragma once

#include <cstdint>
#include <optional>
#include <span>
#include <unordered_map>
#include <vector>

#include "kernels/attention.hpp"
#include "runtime/protocol.hpp"

namespace celer {

// The prefix cache's hash of a full block: it covers the parent block's hash (0 for the first
// block) and the block's kKvBlock tokens, so one value names the whole prefix up to it. The
// router hashes prompts the same way to find the replica that caches the longest prefix.
uint64_t prefix_block_hash(uint64_t parent, std::span<const TokenId> tokens);

// The hashes of the full blocks of `tokens`, in order (tokens.size() / kKvBlock of them).
std::vector<uint64_t> prefix_block_hashes(std::span<const TokenId> tokens);

class KvBlockManager {
 public:
  KvBlockManager(int32_t n_blocks, bool prefix_caching);

  int32_t n_blocks() const { return static_cast<int32_t>(blocks_.size()); }
  // Blocks that an allocation can take now: free ones, including cached ones it would evict.
  int32_t n_free() const { return free_count_; }
  int32_t n_used() const { return n_blocks() - free_count_; }
  bool has(RequestId seq) const { return seqs_.count(seq) != 0; }

  // Starts a sequence (it must not exist) and attaches the longest run of its leading full
  // blocks found in the prefix cache, taking a reference on each, then a copy of a cached
  // partial block that continues them (the copy to make before the next forward pass is added
  // to `copies`). At least one token is always left to compute (its logits are needed).
  // Returns the number of tokens covered.
  int32_t begin(RequestId seq, std::span<const TokenId> tokens, std::vector<BlockCopy>* copies = nullptr);

  // Grows the sequence's table to cover n_positions positions. All or nothing: returns false and
  // changes nothing when too few blocks are free.
  bool reserve(RequestId seq, int32_t n_positions);

  // Records that positions [0, n_computed) of the sequence now hold the KV of tokens[0, n_computed):
  // its full blocks enter the prefix index.
  void commit(RequestId seq, std::span<const TokenId> tokens, int32_t n_computed);

  // Ends the sequence: drops its references. Committed full blocks stay cached until evicted.
  void release(RequestId seq);

  // The hash of every full block in the prefix index, in no particular order.
  std::vector<uint64_t> cached_block_hashes() const;
  // Changes whenever a block enters or leaves the prefix index.
  uint64_t index_version() const { return index_version_; }

  // Forgets every cached block (their KV memory was lost with a shard). Only valid while no
  // sequence holds blocks.
  void forget_cached();

  // dst (new) shares every block of src.
  void fork(RequestId src, RequestId dst);
  // Before the sequence writes position `pos`: if the block holding it is shared, the sequence
  // gets a fresh block instead and the returned copy (src -> dst) must be done first.
  // Returns nullopt when no copy is needed; throws Error(out_of_memory) when none is free.
  std::optional<BlockCopy> prepare_append(RequestId seq, int32_t pos);

  const std::vector<int32_t>& table(RequestId seq) const;
  int32_t refcount(int32_t block) const { return blocks_[block].refs; }

  // Prefix-cache statistics: prompt tokens looked up and how many were found.
  uint64_t queried_tokens() const { return queried_; }
  uint64_t hit_tokens() const { return hits_; }
  uint64_t evictions() const { return evictions_; }

  // Invariant check for tests: reference counts equal the tables' uses, the free queue holds
  // exactly the unreferenced blocks, the index only names full committed blocks.
  bool check_invariants() const;

 private:
  struct Block {
    int32_t refs = 0;
    bool indexed = false;
    uint64_t hash = 0;
    int32_t prev = -1, next = -1;  // free queue links
    bool in_free = false;
    int32_t partial = 0;           // > 0: a findable partial block holding this many positions
    uint64_t partial_parent = 0;   // the hash of the chain it continues (its key)
  };
  struct Sequence {
    std::vector<int32_t> table;
    int32_t n_committed_blocks = 0;  // leading full blocks already in the index (or reused from it)
    uint64_t last_hash = 0;          // hash of the last committed block (the chain's parent)
    int32_t n_computed = 0;          // positions whose KV is computed (from commit)
  };

  int32_t lookup(uint64_t hash, uint64_t parent, std::span<const TokenId> tokens) const;
  int32_t take_free();  // front of the free queue, evicted from the index; -1 if none
  void push_free(int32_t block);
  void unlink_free(int32_t block);
  void unref(int32_t block);
  Sequence& seq(RequestId id);

  bool prefix_caching_;
  std::vector<Block> blocks_;
  std::vector<TokenId> block_tokens_;     // [n_blocks, kKvBlock]: the tokens of indexed blocks
  std::vector<uint64_t> block_parent_;    // the parent hash of indexed blocks
  std::unordered_map<uint64_t, int32_t> index_;
  std::unordered_map<uint64_t, int32_t> partial_index_;  // parent hash -> partial block
  std::unordered_map<RequestId, Sequence> seqs_;
  int32_t free_head_ = -1, free_tail_ = -1, free_count_ = 0;
  uint64_t queried_ = 0, hits_ = 0, evictions_ = 0;
  uint64_t index_version_ = 0;
};

}  // namespace celer
