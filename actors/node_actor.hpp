// The node actor: one per cluster node (`celer node`), published on the node's port, the actor
// that clients, gateways and the other nodes talk to there (docs/cluster.md).
//
// - It is the per-node factory: a scheduler anywhere asks it to build a shard rank from a
//   ShardSpec, or a cache, on this node, with the weights of its own copy of the file. A node the
//   config places no shard on holds only the model's card (metadata and tokenizer) and refuses
//   to build shards.
// - It is the cluster's entry: a client's request is tokenized here (never on a scheduler's
//   loop) and gets its request actor here, on the client's node; the router is asked once (one
//   RouteQuery) and the replica it picks takes the request from the request actor, so tokens
//   flow from the replica to the request actor and on to the client, never through the router.
//   When the replica's scheduler dies (its node with it), the request actor resumes the rest
//   of the request (prompt + tokens sent) through this actor on another replica, dropping any
//   token it already sent: the client sees each token once, in order.
// - It answers what clients ask of a server: the model (info), a replica's stats (for the
//   gateway's /health), and the cluster's status (from the router).
//
// Messages: (spawn_atom, WireMessage{ShardSpec}) -> shard actor
//           (spawn_atom, cache_atom, kv_blocks, prefix_caching, response_entries, ttl_ms, replica) -> cache actor
//           (generate_atom, WireMessage{GenerateRequest}) from a client: a request actor here, routed
//           (resume_atom, WireMessage{GenerateRequest}, dead scheduler) from such a request actor: routed again
//           (info_atom) -> WireMessage{ModelInfo}; (stats_atom) -> WireMessage{ReplicaStats}
//           (status_atom) -> WireMessage{ClusterStatus}
//           (join_atom, [router, standby]) from the node: the routers to use from now on; when
//           the first goes down, the standby takes its place (clients never see the switch)
//           (router_atom) -> the router or standby that runs on this node (null: none)
//           (peer_atom, name) from the node actor of a node that dialed this one: its process
//           learns that node's actor (NodeSetup::on_peer)
//           (drain_atom, node name) from `celer drain`: that node (this one, or another through
//           the router) drains and leaves -> bool
//           (drain_atom) from its own process: refuse new requests from now on -> the number of
//           this node's requests still in flight
//           (chaos_atom, WireMessage{ChaosFault}) -> WireMessage{ChaosReply | ErrorReply}: from a
//           client, passed to the router; from the router, a signal to this node's process
//           (docs/chaos.md). Refused and counted unless the config says `chaos: enabled`
#pragma once

#include <chrono>
#include <functional>
#include <memory>
#include <string>
#include <unordered_map>
#include <unordered_set>
#include <vector>

#include <caf/all.hpp>

#include "actors/interfaces.hpp"
#include "actors/transport.hpp"
#include "runtime/conversation_memory.hpp"
#include "runtime/model.hpp"
#include "runtime/model_card.hpp"

namespace celer {

struct NodeSetup {
  std::string name;
  std::string model_path;
  std::shared_ptr<const ModelCard> card;  // tokenizes requests, decodes their streams
  std::shared_ptr<const Model> model;     // the weights, for shards; null where none is placed
  std::shared_ptr<ConversationMemory> conversations;  // the ids of recent text prompts and answers; may be null
  int32_t max_context = 0;   // the serving context (ModelInfo)
  int shard_threads = 1;     // compute threads of each shard built here unless its spec says
  // The router and its standby (if any), set with join_atom once they are known; requests go to
  // the first that is up.
  std::vector<RouterActor> routers;
  RouterActor local_router;   // the router (or standby) running on this node, for router_atom
  std::chrono::milliseconds heartbeat_interval{500};  // how often the router hears from this node
  bool chaos = false;  // `chaos: enabled`: faults to inject are taken (docs/chaos.md)
  // Injects a wire-layer fault on what this node receives from node `peer` (kEveryPeer: from
  // every node): the process's transport (actors/transport.hpp). Null: wire faults are refused.
  std::function<void(const std::string& peer, const LinkFault& fault)> inject_link_fault;
  // The process's transport counters, for status (null: none shown).
  std::function<TransportStats()> transport_stats;
  // Called (on an actor thread) when a `celer drain` names this node: the process drains and
  // leaves as on SIGTERM.
  std::function<void()> on_drain;
  // Called (on an actor thread) with a node's name and actor when that node has dialed this one
  // and introduced itself: only one node of each pair dials (cluster/cli/peer_links.hpp).
  std::function<void(const std::string&, const caf::strong_actor_ptr&)> on_peer;
};

struct NodeState {
  NodeSetup setup;
  // Shards and caches built here (of either role): stopped with the node (shared with its exit
  // handler).
  std::shared_ptr<std::vector<caf::actor>> children = std::make_shared<std::vector<caf::actor>>();
  std::vector<CacheActor> caches;  // the caches among them, told the routers when they change
  std::unordered_set<caf::actor_addr> down_routers;  // routers seen going down: never switched to
  // The request actors this node spawned (until they end), and the replica serving each (what
  // a resume avoids). Only they may ask to be routed again.
  std::unordered_set<caf::actor_addr> requests;
  std::unordered_map<caf::actor_addr, std::string> serving;
  size_t router = 0;      // index in setup.routers of the one in use
  bool draining = false;  // new client requests are refused
  uint64_t routed = 0;
  uint64_t route_failures = 0;
  uint64_t malformed = 0;
  uint64_t chaos_refused = 0;  // faults to inject refused (no `chaos: enabled`, or malformed)
  // Requests of this node routed again with no scheduler dead: a message of theirs was lost on
  // the way (no takeover in time, a gap in the stream, a quiet stream whose scheduler sent more).
  uint64_t rerouted_after_loss = 0;
  static inline const char* name = "celer.node";
};

NodeActor::behavior_type node_actor(NodeActor::stateful_pointer<NodeState> self, NodeSetup setup);

// How long the entry waits for the router's answer before it tells the client no replica took
// the request.
constexpr auto kRouteTimeout = std::chrono::seconds(5);
constexpr int kRouteAttempts = 3;  // queries a request makes of a router that does not answer

}  // namespace celer
