// The shard actor: owns an engine (the model's weights and KV memory on one device) and runs
// one Step per message. Spawned detached: a forward pass keeps its thread busy for milliseconds
// and must not hold up the actors sharing CAF's scheduler threads.
//
// Messages:  (step_atom, WireMessage{Step}) -> WireMessage{StepResult} or WireMessage{ErrorReply}
//            (collective_atom) -> its all-reduce endpoint (a network group's rank)
//            (peers_atom, [endpoint per rank]): connects a network group; sent before the first step
//            (chaos_atom, hang, duration_ms, delay_ms) from its scheduler, in a cluster with
//            `chaos: enabled` (docs/chaos.md): hang stops answering for duration_ms (the thread
//            sleeps: alive, not answering); otherwise every step for duration_ms takes delay_ms more
// A malformed or refused step gets an ErrorReply (and counts); the shard keeps serving. A broken
// all-reduce (a peer gone or silent) ends the shard with the reason: its scheduler rebuilds
// the group.
#pragma once

#include <memory>

#include <caf/all.hpp>

#include "actors/interfaces.hpp"
#include "runtime/engine.hpp"
#include "runtime/step_executor.hpp"
#include "runtime/tensor_parallel.hpp"
#include "schema/codec.hpp"

namespace celer {

class NetworkAllReduce;
class MemoryPromise;

struct ShardState {
  std::shared_ptr<NetworkAllReduce> network;  // a network group's rank; null otherwise
  std::unique_ptr<Engine> engine;
  std::unique_ptr<StepExecutor> executor;
  uint64_t steps = 0;
  uint64_t malformed = 0;
  caf::actor_addr owner;  // the scheduler it works for
  // An injected slowness (chaos_atom): each step until slow_until sleeps slow_ms after it runs.
  std::chrono::steady_clock::time_point slow_until{};
  uint32_t slow_ms = 0;
  static inline const char* name = "celer.shard";
};

// With options.tp_size > 1 the shard is one rank of a tensor-parallel group whose all-reduce is
// `group` (kept alive by every rank; aborted when a rank exits, so no peer waits forever), or,
// with no group, a network group (actors/collective.hpp) that peers_atom connects. `owner` is
// the scheduler the shard works for: steps and peers are taken from it alone.
// `memory`, when given, is the promise of the KV cache's bytes that admitted this shard
// (runtime/memory_info.hpp): released once the engine holds them, or has failed to.
ShardActor::behavior_type shard_actor(ShardActor::stateful_pointer<ShardState> self, std::shared_ptr<const Model> model,
                          EngineOptions options, std::shared_ptr<LocalAllReduceGroup> group, caf::actor_addr owner,
                          std::shared_ptr<MemoryPromise> memory);

// The engine options a ShardSpec describes (threads: the spec's, else `default_threads`).
EngineOptions engine_options(const ShardSpec& spec, int default_threads);

}  // namespace celer
