// From a deployment config to a running replica: its supervisor, which spawns the scheduler
// (which spawns and supervises its shards), with limits, memory and caches as the config says.
#pragma once

#include <memory>

#include <caf/all.hpp>

#include "actors/scheduler_actor.hpp"
#include "runtime/config.hpp"
#include "runtime/itl_objective.hpp"

namespace celer {

// The model's context capped at 4096 unless max_context says otherwise; KV blocks from
// kv_cache_blocks or kv_cache_memory, never fewer than one full-length sequence needs.
int32_t serving_context(const ClusterConfig& config, const ModelCard& model);

ReplicaSetup replica_setup(const ClusterConfig& config, std::shared_ptr<const Model> model);
// With no ITL objective in config.slo, picks one on this machine for every class of the
// setup's scheduler (runtime/itl_objective.hpp) and returns it; nullopt when one is written.
std::optional<PickedItlObjective> pick_missing_itl(const ClusterConfig& config, ReplicaSetup& setup);
// The process's conversation memory of `config` (conversation_memory:), null when it is off.
std::shared_ptr<ConversationMemory> conversation_memory(const ClusterConfig& config);

SupervisorActor spawn_replica(caf::actor_system& sys, const ReplicaSetup& setup);

// Waits until the replica's shard has built its engine (weights packed, KV memory allocated,
// which takes a moment for a large model), so that a server announces its port only when the
// first request will not pay for that. Throws Error(io) after `timeout`.
void wait_until_ready(caf::actor_system& sys, const SupervisorActor& replica, std::chrono::milliseconds timeout);

}  // namespace celer
