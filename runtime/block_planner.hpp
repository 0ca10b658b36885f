// The cache actor's core: it owns the replica's KV block bookkeeping (a KvBlockManager, with the
// prefix cache) and the tokens of every sequence it has been told about, and answers the
// scheduler's one request per step (BlockPlanRequest, runtime/protocol.hpp) with a BlockPlan.
//
// A plan walks the candidates in the scheduler's order, under the step's token budget and
// sequence limit: a sequence that starts is matched against the prefix cache, then each
// reserves the blocks for its next tokens. When blocks run out, running sequences later in the
// order (lower classes first, from the end) are preempted, their blocks taken back; a waiting
// sequence only takes from strictly lower classes. A running sequence that still does not fit is
// preempted itself; a waiting one stops the walk (FCFS: nobody behind it jumps ahead).
//
// The scheduler keeps the sequences' state (queues, counts, sampling); the planner keeps the
// blocks. They meet only through these messages, so the two can live in different actors (and
// on different threads) with nothing shared.
#pragma once

#include <algorithm>
#include <cstdint>
#include <unordered_map>
#include <vector>

#include "runtime/kv_block_manager.hpp"
#include "runtime/protocol.hpp"

namespace celer {

// The walk's share of the step's token budget, the same in BlockPlanner::plan and in the
// scheduler's local plans: a decoding sequence (one token left) takes its token; a longer one
// (a prompt) at most what the budget leaves after one token for each decoding sequence after
// it in the walk, so that no stream skips a step behind a long prompt. 0: it waits a step.
inline int32_t tokens_to_run(int32_t left, bool decoding, int32_t budget, int32_t decoding_after) {
  if (decoding) return budget > 0 ? 1 : 0;
  return std::max(0, std::min(left, budget - decoding_after));
}

class BlockPlanner {
 public:
  explicit BlockPlanner(KvBlockManager& blocks) : blocks_(blocks) {}

  // Applies the request's reset, commits and ended sequences, then plans the step. Throws
  // Error(invalid_argument) on a request that contradicts what the planner knows (a commit or
  // candidate whose tokens it was never sent); the caller answers that with an error.
  BlockPlan plan(const BlockPlanRequest& request);

  const KvBlockManager& blocks() const { return blocks_; }

 private:
  KvBlockManager& blocks_;
  std::unordered_map<RequestId, std::vector<TokenId>> tokens_;  // per sequence: every token sent
};

}  // namespace celer
