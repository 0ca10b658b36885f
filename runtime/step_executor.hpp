// Runs a scheduler Step on an engine: block copies, one forward pass over every sequence, and a
// sample for each sequence that asks for one. What a replica's rank-0 shard does per iteration.
#pragma once

#include <vector>

#include "runtime/engine.hpp"
#include "runtime/protocol.hpp"
#include "runtime/sampler.hpp"

namespace celer {

class StepExecutor {
 public:
  explicit StepExecutor(Engine& engine);
  // Throws Error for a step the engine refuses (see Engine::forward); nothing is sampled then.
  StepResult run(const Step& step);

 private:
  Engine& engine_;
  Sampler sampler_;
  std::vector<SequenceInput> inputs_;
  std::vector<float> logits_;  // [max_seqs, n_vocab]
};

}  // namespace celer
