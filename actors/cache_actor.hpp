// The cache actor of a replica: the owner of its KV block table (free list, reference counts,
// copy-on-write), its prefix cache and its response cache. The scheduler talks to it once per
// step (a BlockPlanRequest: what happened, and which sequences want to run; the answer is the
// BlockPlan with their block tables) and once per request for the response cache. The policy is
// runtime/block_planner.hpp and runtime/response_cache.hpp; this file only moves messages.
//
// Messages: (plan_atom, WireMessage{BlockPlanRequest}) -> WireMessage{BlockPlan | ErrorReply}
//           (lookup_atom, WireMessage{CachedResponse}) -> WireMessage{CachedResponse}: found or not
//           (store_atom, WireMessage{CachedResponse}): remember an answer
// Out, in a cluster: (report_atom, cache_atom, WireMessage{ReplicaReport}) to the router, with the
//           hashes of the cached blocks (only `replica`, `blocks_changed` and `cached_blocks` set)
// Anything malformed or contradictory is answered with an ErrorReply (or dropped, for a store)
// and counted; the scheduler then resets the replica's KV, as after a lost shard.
//
// The scheduler spawns it and restarts it when it dies: a new cache starts with every block
// free and no cached prefix or response, and the scheduler re-queues its sequences to recompute.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include <caf/all.hpp>

#include "actors/interfaces.hpp"
#include "runtime/block_planner.hpp"
#include "runtime/kv_block_manager.hpp"
#include "runtime/response_cache.hpp"

namespace celer {

struct CacheSetup {
  int32_t kv_blocks = 0;
  bool prefix_caching = true;
  size_t response_cache_entries = 0;  // 0: off
  int64_t response_cache_ttl_ms = 60000;
  // In a cluster: the routers (the router and its standby) that learn which prefixes this
  // replica caches, and the replica's name there.
  std::vector<ReportSink> routers;
  std::string replica;
};

// The router hears of a changed prefix index at most this often (the hashes of every cached
// block, a few KiB for a few hundred blocks).
constexpr auto kPrefixReportInterval = std::chrono::milliseconds(50);

struct CacheState {
  std::unique_ptr<KvBlockManager> blocks;
  std::unique_ptr<BlockPlanner> planner;
  std::unique_ptr<ResponseCache> responses;
  uint64_t malformed = 0;
  uint64_t reported_version = ~uint64_t{0};  // the prefix index version the router last heard (none yet)
  bool report_scheduled = false;
  std::vector<ReportSink> routers;  // CacheSetup::routers, or what its node learned since
  std::chrono::steady_clock::time_point start = std::chrono::steady_clock::now();
  static inline const char* name = "celer.cache";
};

CacheActor::behavior_type cache_actor(CacheActor::stateful_pointer<CacheState> self, CacheSetup setup);

}  // namespace celer
