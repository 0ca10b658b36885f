// The router: one per cluster (on the node the config names), the owner of the replica table.
// The policy is cluster/routing.hpp; this actor only moves messages (docs/cluster.md).
//
// Messages in:  (join_atom, replica name, supervisor) when a replica is ready; it is monitored,
//               and a replica that goes down (its process, its node) receives nothing more
//               (hello_atom, node name) from each node actor, every heartbeat interval
//               (report_atom, WireMessage{ReplicaReport}) from schedulers: load
//               (report_atom, cache_atom, WireMessage{ReplicaReport}) from caches: cached blocks
//               (route_atom, WireMessage{RouteQuery}) -> (supervisor, replica name), or an error
//               when no replica can take the request
//               (status_atom) -> WireMessage{ClusterStatus}
#pragma once

#include <algorithm>
#include <chrono>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include <caf/all.hpp>

#include "actors/interfaces.hpp"
#include "cluster/routing.hpp"

namespace celer {

struct RouterSetup {
  RoutingOptions routing;
  std::string policy_name = "default";  // as the config wrote it, for status
  std::vector<std::string> replicas;    // every replica the config lists, in order
  std::vector<std::string> nodes;       // every node the config lists
  struct Placement {  // where the config puts each actor, for status
    std::string role;  // scheduler, cache, shard, router, gateway
    std::string replica;
    int32_t rank = -1;
    std::string node;
  };
  std::vector<Placement> actors;
  std::chrono::milliseconds node_timeout{2000};
  bool chaos = false;  // `chaos: enabled`: faults to inject are passed on to their targets (docs/chaos.md)
};

struct RouterState {
  RouterSetup setup;
  std::unique_ptr<ReplicaTable> table;
  std::map<std::string, int32_t> index;  // replica name -> table index
  std::vector<SupervisorActor> supervisors;  // by table index
  struct Seen {  // what the router last heard from a replica
    ReplicaReport report;
    int64_t at_ms = -1;
    double tokens_per_second = 0;
    int64_t cached_blocks = 0;
    uint64_t routed = 0;
  };
  std::vector<Seen> reports;             // by table index
  struct Node {
    NodeActor actor;
    int64_t last_seen_ms = -1;  // -1: never heard from
    bool up = false;
  };
  std::map<std::string, Node> nodes;
  // The CAF node that said hello under each node name of the config, learned from the hellos:
  // a replica's join and reports are taken only from the node the config places it on. A client
  // (which holds the secret too) may route and ask for status.
  std::map<std::string, caf::node_id> bound;
  uint64_t refused_peers = 0;  // hellos refused; joins and reports from the wrong node
  uint64_t routed = 0;
  uint64_t unroutable = 0;
  uint64_t malformed = 0;
  std::chrono::steady_clock::time_point start = std::chrono::steady_clock::now();
  static inline const char* name = "celer.router";
};

RouterActor::behavior_type router_actor(RouterActor::stateful_pointer<RouterState> self, RouterSetup setup);

}  // namespace celer
