#include "runtime/kv_block_manager.hpp"

#include <algorithm>
#include <string>

#include "runtime/error.hpp"

namespace celer {

KvBlockManager::KvBlockManager(int32_t n_blocks, bool prefix_caching)
    : prefix_caching_(prefix_caching),
      blocks_(n_blocks),
      block_tokens_(static_cast<size_t>(n_blocks) * kKvBlock),
      block_parent_(n_blocks) {
  if (n_blocks < 1) throw Error(ErrorCode::invalid_argument, "the KV cache needs at least one block");
  for (int32_t b = 0; b < n_blocks; ++b) push_free(b);
}

uint64_t prefix_block_hash(uint64_t parent, std::span<const TokenId> tokens) {
  // FNV-1a over the parent hash and the tokens, then a splitmix finalizer to spread the bits.
  uint64_t h = 0xcbf29ce484222325ull ^ parent;
  for (TokenId t : tokens) {
    h ^= static_cast<uint32_t>(t);
    h *= 0x100000001b3ull;
  }
  h = (h ^ (h >> 30)) * 0xbf58476d1ce4e5b9ull;
  h = (h ^ (h >> 27)) * 0x94d049bb133111ebull;
  return h ^ (h >> 31);
}

int32_t KvBlockManager::lookup(uint64_t hash, uint64_t parent, std::span<const TokenId> tokens) const {
  auto it = index_.find(hash);
  if (it == index_.end()) return -1;
  const int32_t b = it->second;
  if (block_parent_[b] != parent) return -1;
  if (!std::equal(tokens.begin(), tokens.end(), block_tokens_.begin() + static_cast<size_t>(b) * kKvBlock)) return -1;
  return b;
}

void KvBlockManager::push_free(int32_t b) {
  Block& blk = blocks_[b];
  blk.prev = free_tail_;
  blk.next = -1;
  if (free_tail_ >= 0) blocks_[free_tail_].next = b;
  else free_head_ = b;
  free_tail_ = b;
  blk.in_free = true;
  ++free_count_;
}

void KvBlockManager::unlink_free(int32_t b) {
  Block& blk = blocks_[b];
  if (blk.prev >= 0) blocks_[blk.prev].next = blk.next;
  else free_head_ = blk.next;
  if (blk.next >= 0) blocks_[blk.next].prev = blk.prev;
  else free_tail_ = blk.prev;
  blk.prev = blk.next = -1;
  blk.in_free = false;
  --free_count_;
}

int32_t KvBlockManager::take_free() {
  const int32_t b = free_head_;
  if (b < 0) return -1;
  unlink_free(b);
  Block& blk = blocks_[b];
  if (blk.indexed) {  // evict: a later prompt can no longer reuse it
    index_.erase(blk.hash);
    blk.indexed = false;
    ++evictions_;
    ++index_version_;
  }
  if (blk.partial > 0) {
    auto it = partial_index_.find(blk.partial_parent);
    if (it != partial_index_.end() && it->second == b) partial_index_.erase(it);
    blk.partial = 0;
  }
  blk.refs = 1;
  return b;
}

void KvBlockManager::unref(int32_t b) {
  if (--blocks_[b].refs == 0) push_free(b);
}

KvBlockManager::Sequence& KvBlockManager::seq(RequestId id) {
  auto it = seqs_.find(id);
  if (it == seqs_.end()) throw Error(ErrorCode::invalid_argument, "unknown sequence " + std::to_string(id));
  return it->second;
}

const std::vector<int32_t>& KvBlockManager::table(RequestId id) const {
  auto it = seqs_.find(id);
  if (it == seqs_.end()) throw Error(ErrorCode::invalid_argument, "unknown sequence " + std::to_string(id));
  return it->second.table;
}

int32_t KvBlockManager::begin(RequestId id, std::span<const TokenId> tokens, std::vector<BlockCopy>* copies) {
  if (seqs_.count(id)) throw Error(ErrorCode::invalid_argument, "sequence " + std::to_string(id) + " already exists");
  Sequence& s = seqs_[id];
  if (!prefix_caching_) return 0;
  queried_ += tokens.size();
  // Leave the last token to compute: a fully cached prompt still needs its last logits.
  const size_t usable = tokens.empty() ? 0 : (tokens.size() - 1) / kKvBlock;
  uint64_t parent = 0;
  for (size_t i = 0; i < usable; ++i) {
    const auto blk_tokens = tokens.subspan(i * kKvBlock, kKvBlock);
    const uint64_t h = prefix_block_hash(parent, blk_tokens);
    const int32_t b = lookup(h, parent, blk_tokens);
    if (b < 0) break;
    if (blocks_[b].in_free) unlink_free(b);
    ++blocks_[b].refs;
    s.table.push_back(b);
    parent = h;
  }
  s.n_committed_blocks = static_cast<int32_t>(s.table.size());
  s.last_hash = parent;
  int32_t covered = s.n_committed_blocks * kKvBlock;
  // A partial block continuing this chain, whose tokens start the rest of the prompt (again
  // leaving at least one token to compute): copy its KV into a fresh block of our own.
  auto p = copies ? partial_index_.find(parent) : partial_index_.end();
  if (p != partial_index_.end()) {
    const int32_t b = p->second;
    const int32_t m = blocks_[b].partial;
    const auto rest = tokens.subspan(static_cast<size_t>(covered));
    if (m < static_cast<int32_t>(rest.size()) &&
        std::equal(rest.begin(), rest.begin() + m, block_tokens_.begin() + static_cast<size_t>(b) * kKvBlock)) {
      ++blocks_[b].refs;  // pinned while a block is taken, so it cannot be the one evicted
      if (blocks_[b].in_free) unlink_free(b);
      const int32_t fresh = take_free();
      unref(b);
      if (fresh >= 0) {
        s.table.push_back(fresh);
        copies->push_back({b, fresh});
        covered += m;
      }
    }
  }
  // Only the full blocks hold valid KV yet: the copy is made before the next forward pass, and
  // commit() then counts its positions.
  s.n_computed = s.n_committed_blocks * kKvBlock;
  hits_ += covered;
  return covered;
}

bool KvBlockManager::reserve(RequestId id, int32_t n_positions) {
  Sequence& s = seq(id);
  const int32_t need = (n_positions + kKvBlock - 1) / kKvBlock - static_cast<int32_t>(s.table.size());
  if (need <= 0) return true;
  if (need > free_count_) return false;
  for (int32_t i = 0; i < need; ++i) s.table.push_back(take_free());
  return true;
}

void KvBlockManager::commit(RequestId id, std::span<const TokenId> tokens, int32_t n_computed) {
  Sequence& s = seq(id);
  if (!prefix_caching_) return;
  const int32_t full = std::min<int32_t>(n_computed / kKvBlock, static_cast<int32_t>(s.table.size()));
  for (int32_t i = s.n_committed_blocks; i < full; ++i) {
    const auto blk_tokens = tokens.subspan(static_cast<size_t>(i) * kKvBlock, kKvBlock);
    const uint64_t h = prefix_block_hash(s.last_hash, blk_tokens);
    const int32_t b = s.table[i];
    // A block with these contents may already be indexed (computed by a concurrent sequence):
    // keep the first one indexed; this one is freed as usual when its sequence ends.
    if (!blocks_[b].indexed && !index_.count(h)) {
      index_[h] = b;
      ++index_version_;
      blocks_[b].indexed = true;
      blocks_[b].hash = h;
      block_parent_[b] = s.last_hash;
      std::copy(blk_tokens.begin(), blk_tokens.end(), block_tokens_.begin() + static_cast<size_t>(b) * kKvBlock);
    }
    s.last_hash = h;
    s.n_committed_blocks = i + 1;
  }
  s.n_computed = std::max(s.n_computed, n_computed);
  // Remember the tokens of the partial last block, to leave it findable when the sequence ends.
  const int32_t tail = s.n_computed % kKvBlock;
  const int32_t last = s.n_computed / kKvBlock;
  if (tail > 0 && last < static_cast<int32_t>(s.table.size()) && last == s.n_committed_blocks) {
    const int32_t b = s.table[last];
    std::copy(tokens.begin() + static_cast<size_t>(last) * kKvBlock, tokens.begin() + s.n_computed,
              block_tokens_.begin() + static_cast<size_t>(b) * kKvBlock);
  }
}

void KvBlockManager::release(RequestId id) {
  auto it = seqs_.find(id);
  if (it == seqs_.end()) return;
  // Leave the partial last block findable (it joins the free queue like the rest, evictable).
  const Sequence& s = it->second;
  const int32_t tail = s.n_computed % kKvBlock;
  const int32_t last = s.n_computed / kKvBlock;
  if (prefix_caching_ && tail > 0 && last < static_cast<int32_t>(s.table.size()) && last == s.n_committed_blocks) {
    const int32_t b = s.table[last];
    if (blocks_[b].refs == 1 && !blocks_[b].indexed) {
      if (auto old = partial_index_.find(s.last_hash); old != partial_index_.end()) blocks_[old->second].partial = 0;
      partial_index_[s.last_hash] = b;
      blocks_[b].partial = tail;
      blocks_[b].partial_parent = s.last_hash;
    }
  }
  // Tail first: the blocks of a sequence's end are the least likely to be shared, so they are
  // the first to be evicted.
  const std::vector<int32_t>& t = it->second.table;
  for (auto b = t.rbegin(); b != t.rend(); ++b) unref(*b);
  seqs_.erase(it);
}

void KvBlockManager::forget_cached() {
  if (!seqs_.empty()) throw Error(ErrorCode::invalid_argument, "forget_cached with live sequences");
  for (Block& b : blocks_) {
    b.indexed = false;
    b.partial = 0;
  }
  index_.clear();
  partial_index_.clear();
  ++index_version_;
}

std::vector<uint64_t> KvBlockManager::cached_block_hashes() const {
  std::vector<uint64_t> hashes;
  hashes.reserve(index_.size());
  for (const auto& [hash, block] : index_) hashes.push_back(hash);
  return hashes;
}

std::vector<uint64_t> prefix_block_hashes(std::span<const TokenId> tokens) {
  std::vector<uint64_t> hashes;
  hashes.reserve(tokens.size() / kKvBlock);
  uint64_t parent = 0;
  for (size_t i = 0; i + kKvBlock <= tokens.size(); i += kKvBlock) {
    parent = prefix_block_hash(parent, tokens.subspan(i, kKvBlock));
    hashes.push_back(parent);
  }
  return hashes;
}

void KvBlockManager::fork(RequestId src, RequestId dst) {
  if (seqs_.count(dst)) throw Error(ErrorCode::invalid_argument, "sequence " + std::to_string(dst) + " already exists");
  Sequence copy = seq(src);
  for (int32_t b : copy.table) ++blocks_[b].refs;
  seqs_[dst] = std::move(copy);
}

std::optional<BlockCopy> KvBlockManager::prepare_append(RequestId id, int32_t pos) {
  Sequence& s = seq(id);
  const int32_t i = pos / kKvBlock;
  if (i >= static_cast<int32_t>(s.table.size())) return std::nullopt;  // a fresh block comes from reserve()
  const int32_t old = s.table[i];
  if (blocks_[old].refs <= 1) return std::nullopt;
  const int32_t fresh = take_free();
  if (fresh < 0) throw Error(ErrorCode::out_of_memory, "no free KV block for copy-on-write");
  unref(old);
  s.table[i] = fresh;
  return BlockCopy{old, fresh};
}

bool KvBlockManager::check_invariants() const {
  std::vector<int32_t> uses(blocks_.size(), 0);
  for (const auto& [id, s] : seqs_)
    for (int32_t b : s.table) ++uses[b];
  int32_t free_seen = 0;
  for (int32_t b = free_head_; b >= 0; b = blocks_[b].next) {
    if (blocks_[b].refs != 0 || !blocks_[b].in_free) return false;
    ++free_seen;
  }
  if (free_seen != free_count_) return false;
  for (size_t b = 0; b < blocks_.size(); ++b) {
    if (blocks_[b].refs != uses[b]) return false;
    if ((blocks_[b].refs == 0) != blocks_[b].in_free) return false;
  }
  for (const auto& [h, b] : index_)
    if (!blocks_[b].indexed || blocks_[b].hash != h) return false;
  for (const auto& [h, b] : partial_index_)
    if (blocks_[b].partial <= 0 || blocks_[b].partial_parent != h) return false;
  return true;
}

}  // namespace celer
