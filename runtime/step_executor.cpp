#include "runtime/step_executor.hpp"

#include <algorithm>
#include <chrono>

namespace celer {

StepExecutor::StepExecutor(Engine& engine)
    : engine_(engine),
      sampler_(engine.model().config().n_vocab),
      logits_(static_cast<size_t>(engine.options().max_seqs) * engine.model().config().n_vocab) {
  inputs_.reserve(engine.options().max_seqs);
}

StepResult StepExecutor::run(const Step& step) {
  StepResult result;
  result.step_id = step.step_id;
  if (step.sequences.empty()) return result;
  const auto start = std::chrono::steady_clock::now();
  const AllReduce* all_reduce = engine_.options().tp_size > 1 ? engine_.options().all_reduce : nullptr;
  const AllReduce::Times before = all_reduce ? all_reduce->times() : AllReduce::Times{};
  for (const BlockCopy& c : step.copies) engine_.copy_block(c.src, c.dst);
  inputs_.clear();
  for (const StepSequence& s : step.sequences) inputs_.push_back({s.tokens, s.n_past, s.block_table, s.sample});
  // A tensor-parallel rank other than 0 computes its share (its all-reduces feed rank 0); rank 0
  // alone produces logits and samples.
  if (engine_.options().tp_rank != 0) {
    engine_.forward(inputs_, nullptr);
    return result;
  }
  engine_.forward(inputs_, logits_.data());
  const int32_t n_vocab = engine_.model().config().n_vocab;
  size_t row = 0;
  for (const StepSequence& s : step.sequences) {
    if (!s.sample) continue;
    const std::span<const float> logits(logits_.data() + row++ * n_vocab, static_cast<size_t>(n_vocab));
    const uint64_t position = static_cast<uint64_t>(s.n_past) + s.tokens.size();
    SampledToken& t = result.tokens.emplace_back();
    t.id = s.id;
    t.token = sampler_.sample(s.sampling, logits, s.recent, position);
    if (s.logprobs >= 0) {
      t.has_logprob = true;
      sampler_.logprobs(logits, t.token, s.logprobs, t.logprob);
    }
  }
  result.step_us = static_cast<uint64_t>(
      std::chrono::duration_cast<std::chrono::microseconds>(std::chrono::steady_clock::now() - start).count());
  if (all_reduce) {
    const AllReduce::Times after = all_reduce->times();
    result.allreduce_us = std::min(result.step_us, (after.ns - before.ns) / 1000);
    result.allreduce_calls = static_cast<uint32_t>(after.calls - before.calls);
  }
  return result;
}

}  // namespace celer
