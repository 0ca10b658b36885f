// What actors send each other: atoms naming the operation and a WireMessage (a Cap'n Proto
// buffer, schema/codec.hpp) carrying the content. Registering WireMessage with CAF makes it
// travel between nodes through the middleman as one block of words.
#pragma once

#include <caf/all.hpp>

#include "schema/codec.hpp"

namespace celer {

using generate_atom = caf::atom_constant<caf::atom("generate")>;  // client -> scheduler: GenerateRequest
using event_atom = caf::atom_constant<caf::atom("event")>;        // scheduler -> request -> client: chunks, ends
using cancel_atom = caf::atom_constant<caf::atom("cancel")>;      // client -> request -> scheduler
using step_atom = caf::atom_constant<caf::atom("step")>;          // scheduler -> shard: Step, reply StepResult
using kick_atom = caf::atom_constant<caf::atom("kick")>;          // scheduler -> itself: build the next step
using stats_atom = caf::atom_constant<caf::atom("stats")>;        // anyone -> scheduler: ReplicaStats
using resume_atom = caf::atom_constant<caf::atom("resume")>;      // request <-> scheduler after a scheduler restart
using enter_atom = caf::atom_constant<caf::atom("enter")>;        // node (as the request actor) -> supervisor -> scheduler: a routed request
using sched_atom = caf::atom_constant<caf::atom("sched")>;        // anyone -> supervisor: the current scheduler; (this node) restart it
using shard_atom = caf::atom_constant<caf::atom("shard")>;        // anyone -> scheduler: the current shard actor
using cache_atom = caf::atom_constant<caf::atom("cache")>;        // anyone -> scheduler: the current cache actor
using stop_atom = caf::atom_constant<caf::atom("stop")>;          // this node -> supervisor -> scheduler: shut down, fail what runs
using failed_atom = caf::atom_constant<caf::atom("failed")>;      // scheduler -> supervisor: a child spent its restarts; why
using plan_atom = caf::atom_constant<caf::atom("plan")>;          // scheduler -> cache: BlockPlanRequest, reply BlockPlan
using lookup_atom = caf::atom_constant<caf::atom("lookup")>;      // scheduler -> cache: response-cache lookup
using store_atom = caf::atom_constant<caf::atom("store")>;        // scheduler -> cache: response-cache insert
using collective_atom = caf::atom_constant<caf::atom("collective")>;  // scheduler -> shard: its all-reduce endpoint
using spawn_atom = caf::atom_constant<caf::atom("spawn")>;        // scheduler -> node: build a shard or cache here
using route_atom = caf::atom_constant<caf::atom("route")>;        // node -> router: RouteQuery, reply the replica
using report_atom = caf::atom_constant<caf::atom("report")>;      // scheduler -> router: ReplicaReport
using join_atom = caf::atom_constant<caf::atom("join")>;          // replica -> router: (name, supervisor); node -> node: hello
using hello_atom = caf::atom_constant<caf::atom("hello")>;        // node actor -> router, every heartbeat interval: (name)
using router_atom = caf::atom_constant<caf::atom("router")>;      // anyone -> node: the router it uses
using info_atom = caf::atom_constant<caf::atom("info")>;          // client -> node or replica: ModelInfo
using status_atom = caf::atom_constant<caf::atom("status")>;      // client -> node -> router: ClusterStatus
using reduce_atom = caf::atom_constant<caf::atom("reduce")>;      // rank -> peer rank's endpoint: ReducePart
using peers_atom = caf::atom_constant<caf::atom("peers")>;        // scheduler -> shard: every rank's endpoint
using peer_atom = caf::atom_constant<caf::atom("peer")>;          // node -> node it dialed: (its name)
using chaos_atom = caf::atom_constant<caf::atom("chaos")>;        // client -> node -> router -> target: ChaosFault (docs/chaos.md)
using drain_atom = caf::atom_constant<caf::atom("drain")>;        // client -> node: stop taking requests, then leave
using progress_atom = caf::atom_constant<caf::atom("progress")>;  // request -> scheduler: how far its stream is

// Whether the message being handled came from an actor on this node. The operations that stop or
// restart a replica's actors are its own business: a client (or any peer that reaches a
// published actor) may ask for tokens and figures, never for those.
inline bool sent_from_this_node(caf::local_actor* self) {
  const caf::strong_actor_ptr& sender = self->current_sender();
  return sender && sender->node() == self->node();
}

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, WireMessage& x) {
  return f(caf::meta::type_name("celer.WireMessage"), x.words, x.check);
}

// One tensor-parallel rank's partial sum of one all-reduce call (actors/collective.hpp): the
// one message that is not a Cap'n Proto structure, because it is a bare float array that CAF
// copies as one block of bytes.
struct ReducePart {
  uint64_t call = 0;  // 1, 2, ...: the sender's sum() count since the group was connected
  int32_t rank = 0;
  std::vector<uint8_t> bytes;  // n floats in the machine's byte order
  uint64_t check = 0;          // wire_checksum of bytes (see WireMessage)
};

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, ReducePart& x) {
  return f(caf::meta::type_name("celer.ReducePart"), x.call, x.rank, x.bytes, x.check);
}

}  // namespace celer
