// The shard actor: owns an engine (the model's weights and KV memory on one device) and runs
// one Step per message. Spawned detached: a forward pass keeps its thread busy for milliseconds
// and must not hold up the actors sharing CAF's scheduler threads.
//
// Messages:  (step_atom, WireMessage{Step}) -> WireMessage{StepResult} or WireMessage{ErrorReply}
// A malformed or refused step gets an ErrorReply (and counts); the shard keeps serving.
#pragma once

#include <memory>

#include <caf/all.hpp>

#include "runtime/engine.hpp"
#include "runtime/step_executor.hpp"
#include "runtime/tensor_parallel.hpp"

namespace celer {

struct ShardState {
  std::unique_ptr<Engine> engine;
  std::unique_ptr<StepExecutor> executor;
  uint64_t steps = 0;
  uint64_t malformed = 0;
  static inline const char* name = "celer.shard";
};

// With options.tp_size > 1 the shard is one rank of a tensor-parallel group whose all-reduce is
// `group` (kept alive by every rank; aborted when a rank exits, so no peer waits forever).
caf::behavior shard_actor(caf::stateful_actor<ShardState>* self, std::shared_ptr<const Model> model,
                          EngineOptions options, std::shared_ptr<LocalAllReduceGroup> group);

}  // namespace celer
