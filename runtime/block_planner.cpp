#include "runtime/block_planner.hpp"

#include <algorithm>
#include <string>

#include "runtime/error.hpp"

namespace celer {
namespace {

// Holds its blocks and has one token to compute: a stream waiting for its next token.
bool is_decoding(const BlockCandidate& c) { return c.started && c.running && c.n_tokens - c.n_computed == 1; }

}  // namespace

BlockPlan BlockPlanner::plan(const BlockPlanRequest& r) {
  auto bad = [](const std::string& what) { throw Error(ErrorCode::invalid_argument, "block plan: " + what); };
  if (r.reset) {
    for (const auto& [id, tokens] : tokens_) blocks_.release(id);
    tokens_.clear();
    blocks_.forget_cached();
  }
  for (const BlockCommit& c : r.commits) {
    std::vector<TokenId>& known = tokens_[c.id];
    known.insert(known.end(), c.new_tokens.begin(), c.new_tokens.end());
    if (!blocks_.has(c.id)) continue;  // preempted or reset since: nothing to keep
    if (c.n_computed > static_cast<int32_t>(known.size()))
      bad("sequence " + std::to_string(c.id) + " commits " + std::to_string(c.n_computed) + " positions of " +
          std::to_string(known.size()) + " known tokens");
    blocks_.commit(c.id, known, c.n_computed);
  }
  for (RequestId id : r.ended) {
    blocks_.release(id);
    tokens_.erase(id);
  }

  // Candidates' new tokens first, and the checks that make the walk below safe.
  std::vector<BlockCandidate> cands = r.candidates;
  for (BlockCandidate& c : cands) {
    std::vector<TokenId>& known = tokens_[c.id];
    known.insert(known.end(), c.new_tokens.begin(), c.new_tokens.end());
    if (static_cast<int32_t>(known.size()) != c.n_tokens)
      bad("sequence " + std::to_string(c.id) + " has " + std::to_string(c.n_tokens) + " tokens but " +
          std::to_string(known.size()) + " were sent");
    if (c.started != blocks_.has(c.id))
      bad("sequence " + std::to_string(c.id) + (c.started ? " is said to hold blocks but holds none" : " already holds blocks"));
  }

  BlockPlan plan;
  plan.plan_id = r.plan_id;
  std::vector<bool> chosen(cands.size(), false), preempted(cands.size(), false);
  std::vector<std::pair<RequestId, BlockCopy>> copies;  // partial-block copies of sequences started now
  auto preempt = [&](size_t k) {
    blocks_.release(cands[k].id);
    cands[k].started = false;
    cands[k].n_computed = 0;
    preempted[k] = true;
    plan.preempted.push_back(cands[k].id);
  };
  int32_t budget = r.max_batch_tokens;
  int32_t n_chosen = 0;
  // A chunk of prefill leaves one token of the budget to each decoding sequence after it, so
  // that no stream skips a step behind a long prompt.
  std::vector<int32_t> decoding_after(cands.size() + 1, 0);
  for (size_t k = cands.size(); k-- > 0;)
    decoding_after[k] = decoding_after[k + 1] + (is_decoding(cands[k]) ? 1 : 0);
  for (size_t k = 0; k < cands.size(); ++k) {
    BlockCandidate& s = cands[k];
    if (preempted[k]) continue;
    if (n_chosen == r.max_batch_size || budget == 0) break;
    const bool decoding = is_decoding(s);
    if (tokens_to_run(2, decoding, budget, decoding_after[k + 1]) == 0) continue;  // the budget is the later streams'
    if (!s.started) {
      std::vector<BlockCopy> mine;
      s.n_computed = blocks_.begin(s.id, tokens_.at(s.id), &mine);
      for (const BlockCopy& c : mine) copies.push_back({s.id, c});
      s.started = true;
    }
    const int32_t n = tokens_to_run(s.n_tokens - s.n_computed, decoding, budget, decoding_after[k + 1]);
    bool fits = blocks_.reserve(s.id, s.n_computed + n);
    for (size_t v = cands.size(); !fits && v-- > k + 1;) {
      const BlockCandidate& victim = cands[v];
      if (!victim.running || !victim.started || chosen[v] || preempted[v]) continue;
      if (!s.running && victim.priority <= s.priority) continue;
      preempt(v);
      fits = blocks_.reserve(s.id, s.n_computed + n);
    }
    if (!fits) {
      const bool was_running = s.running;
      preempt(k);  // a running one recomputes later; a waiting one gives back its prefix blocks
      if (!was_running) break;
      continue;
    }
    s.running = true;
    chosen[k] = true;
    ++n_chosen;
    budget -= n;
    PlannedSequence& p = plan.chosen.emplace_back();
    p.id = s.id;
    p.n_computed = s.n_computed;
    p.n_new = n;
    const auto& table = blocks_.table(s.id);
    p.block_table.assign(table.begin(), table.begin() + (s.n_computed + n + kKvBlock - 1) / kKvBlock);
  }
  // Copies for sequences that run now; one preempted after its begin() gave the destination back.
  for (const auto& [id, c] : copies)
    if (std::any_of(plan.chosen.begin(), plan.chosen.end(), [&](const PlannedSequence& p) { return p.id == id; }))
      plan.copies.push_back(c);
  plan.kv_blocks_used = blocks_.n_used();
  plan.kv_blocks_free = blocks_.n_free();
  plan.prefix_queries = blocks_.queried_tokens();
  plan.prefix_hits = blocks_.hit_tokens();
  return plan;
}

}  // namespace celer
