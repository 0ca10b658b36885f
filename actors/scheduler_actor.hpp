// The scheduler actor of a replica: admits requests, spawns a request actor for each, and runs
// the iteration loop: the block request to the cache actor, its plan into a Step, the Step to
// the shard, its StepResult back into the scheduler, the resulting tokens and ends out to the
// request actors. The policy lives in runtime/scheduler.hpp; this file only moves messages.
//
// Loop (one plan or step in flight at most):
//
//   idle --(generate | cancel | result)--> prepare() --> plan request to cache --> apply(plan)
//        --> empty step: idle | step to shard --> result: update() --> next iteration
//
// The scheduler supervises its cache and its shard (one-for-one): it spawns them, monitors them,
// and respawns one that dies, after restart_backoff (a child that dies max_restarts times within
// restart_window fails the requests in flight). A lost shard loses the replica's KV and a lost
// cache its block tables: either way every running sequence is re-queued and recomputes
// (Scheduler::reset_kv) with the same tokens; requests only fail when steps fail again and
// again (max_step_failures) or a child keeps dying.
//
// Messages: (generate_atom, WireMessage{GenerateRequest}) from a client (the sender gets the
//           stream); (cancel_atom, id, reason) from a request actor; (stats_atom) -> WireMessage{ReplicaStats};
//           (shard_atom) / (cache_atom) -> the current shard / cache actor (for tests and fault injection);
//           (resume_atom, WireMessage{GenerateRequest}) from a request actor whose scheduler died:
//           the rest of its request (prompt + tokens sent), taken over by this scheduler.
#pragma once

#include <chrono>
#include <memory>
#include <unordered_map>
#include <unordered_set>

#include <caf/all.hpp>

#include "actors/interfaces.hpp"
#include "runtime/conversation_memory.hpp"
#include "runtime/engine.hpp"
#include "runtime/kv_block_manager.hpp"
#include "runtime/model.hpp"
#include "runtime/response_cache.hpp"
#include "runtime/scheduler.hpp"

namespace celer {

struct ReplicaSetup {
  std::shared_ptr<const Model> model;
  EngineOptions engine;               // the shard's engine
  SchedulerConfig scheduler;
  int32_t kv_blocks = 0;
  bool prefix_caching = true;
  size_t response_cache_entries = 0;  // 0: off
  int64_t response_cache_ttl_ms = 60000;
  int64_t default_deadline_ms = 0;    // applied to requests without a deadline; 0: none
  Priority default_priority = Priority::normal;  // priorities.default: for requests that give none
  // The ids of recent text prompts and answers, for the requests this scheduler tokenizes (a
  // single process); null: none. In a cluster the client's node tokenizes (NodeSetup).
  std::shared_ptr<ConversationMemory> conversations;
  int max_step_failures = 3;          // consecutive failed steps before the running requests fail
  int max_restarts = 5;               // shard restarts allowed within restart_window
  std::chrono::milliseconds restart_window{60000};
  std::chrono::milliseconds restart_backoff{100};
  std::chrono::milliseconds step_timeout{120'000};  // supervision.hang_timeout: a longer step's shard counts as hung
  bool chaos = false;                 // `chaos: enabled`: faults to inject are taken (docs/chaos.md)
  uint64_t scheduler_restarts = 0;    // set by the supervisor: schedulers of this replica restarted before this one
  // In a cluster (docs/cluster.md): the replica's name, the GGUF file as its nodes see it, the
  // node actors (actors/node_actor.hpp) that build its cache and each shard rank there (null /
  // empty: spawned in this process, as a one-process server does), and the router it reports
  // its load to (null: none).
  std::string name = "r0";
  std::string model_path;
  NodeActor cache_node;
  std::vector<NodeActor> shard_nodes;  // [tp] or empty
  std::vector<RouterActor> routers;      // the router, then its standby (if any)
};

// How long a node may take to build a shard (load and pack its slice of the weights).
constexpr auto kShardSpawnTimeout = std::chrono::minutes(10);

struct SchedulerActorState {
  ReplicaSetup setup;
  std::unique_ptr<Scheduler> scheduler;
  SupervisorActor supervisor;
  CacheActor cache;                // the replica's block table, prefix and response caches
  bool cache_up = false;
  std::shared_ptr<CacheActor> cache_for_exit = std::make_shared<CacheActor>();  // stopped with the scheduler
  std::vector<std::chrono::steady_clock::time_point> cache_restarts;  // within the window
  uint64_t total_cache_restarts = 0;
  // The cache's figures as of its last plan (for stats).
  int32_t kv_blocks_used = 0;
  int32_t kv_blocks_free = 0;
  uint64_t prefix_queries = 0;
  uint64_t prefix_hits = 0;
  uint64_t response_cache_hits = 0;
  ShardActor shard;                // rank 0: runs the step and samples
  std::vector<ShardActor> ranks;   // every rank of the tensor-parallel group (rank 0 first)
  bool shard_up = false;
  // A node was asked to build a shard rank / the cache and has not answered yet: if that node
  // goes down meanwhile, the build fails then, not at kShardSpawnTimeout.
  bool shard_build_pending = false;
  bool cache_build_pending = false;
  std::unordered_set<caf::actor_addr> nodes_down;  // of shard_nodes and cache_node, seen going down
  uint64_t shard_generation = 0;   // counts groups spawned: answers for an older group are dropped
  uint64_t cache_generation = 0;
  uint64_t tokens_generated = 0;
  uint64_t steps = 0, step_us = 0, allreduce_us = 0, allreduce_calls = 0;  // rank 0's step times (ReplicaStats)
  bool report_scheduled = false;
  std::shared_ptr<std::vector<ShardActor>> shard_for_exit = std::make_shared<std::vector<ShardActor>>();  // stopped with the scheduler
  std::unordered_map<RequestId, RequestActor> requests;
  std::unordered_map<RequestId, GenerateRequest> cacheable;  // requests whose answer goes to the response cache
  std::unordered_map<RequestId, std::vector<TokenId>> produced;
  // Requests whose response-cache lookup is on its way, and whether a cancel came meanwhile.
  std::unordered_map<RequestId, std::optional<FinishReason>> looking_up;
  bool step_in_flight = false;
  bool plan_in_flight = false;     // a BlockPlanRequest awaits the cache's answer
  bool kick_pending = false;       // something changed while a plan or step was in flight
  int step_failures = 0;
  std::vector<std::chrono::steady_clock::time_point> restarts;  // within the window
  uint64_t total_restarts = 0;
  uint64_t hung_shards = 0;  // steps past supervision.hang_timeout, each replacing its group
  RequestId next_id = 1;
  uint64_t malformed = 0;
  bool stopping = false;  // after stop_atom: requests are refused
  bool draining = false;  // after drain_atom: the router sends nothing new; what runs finishes
  std::chrono::steady_clock::time_point start = std::chrono::steady_clock::now();
  static inline const char* name = "celer.scheduler";
};

// `supervisor` (may be null) is told to request actors, which ask it to resume their requests
// when this scheduler dies.
SchedulerActor::behavior_type scheduler_actor(SchedulerActor::stateful_pointer<SchedulerActorState> self, ReplicaSetup setup,
                                             SupervisorActor supervisor);

}  // namespace celer
