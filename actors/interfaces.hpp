// The typed interface of each actor role: the messages it takes and what it answers, as CAF
// typed_actor handles. The compiler checks every send and request against them, and a client
// connecting to a node's port checks the published interface (Transport::connect<Handle>): a
// process of another version is refused at connect time, not by a stream of unexpected messages.
//
// The content of each message is an atom naming the operation and a WireMessage (a Cap'n Proto
// buffer, actors/wire.hpp); which structure it carries is said beside each role's behavior.
// The roles reference each other (a scheduler hands out its shard, a router its replicas'
// supervisors), so they are declared here in dependency order; where two roles would name each
// other, one of them takes the narrower interface the other actually needs (a cache reports
// to a ReportSink, not to the whole router) or learns its peer from the message's sender (a
// node's hello).
//
// Messages an actor sends itself (timers) are part of its interface too: a typed actor can
// only send what its interface takes. Their handlers ignore anyone else's.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include <caf/all.hpp>

#include "actors/wire.hpp"
#include "runtime/protocol.hpp"  // RequestId

namespace celer {

// Anyone a request actor streams to: clients, gateways, and the request actors themselves
// (which the scheduler streams to). (event_atom, WireMessage{TokenChunk | Finished | ErrorReply})
using StreamSink = caf::typed_actor<caf::reacts_to<event_atom, WireMessage>>;

// One tensor-parallel rank's all-reduce endpoint in a network group (actors/collective.hpp).
using EndpointActor = caf::typed_actor<caf::reacts_to<reduce_atom, ReducePart>,  // a peer's partial sum
                                       caf::reacts_to<peers_atom>>;              // itself: monitor the peers

using ShardActor = caf::typed_actor<caf::replies_to<step_atom, WireMessage>::with<WireMessage>,  // Step -> StepResult
                                    caf::replies_to<collective_atom>::with<EndpointActor>,
                                    caf::replies_to<peers_atom, std::vector<EndpointActor>>::with<bool>,
    caf::reacts_to<chaos_atom, bool, uint32_t, uint32_t>>;  // its scheduler: hang (true) or slow, for ms, by ms a step

// What schedulers and caches tell the router (and its standby).
using ReportSink = caf::typed_actor<caf::reacts_to<report_atom, WireMessage>,               // a scheduler's load
                                    caf::reacts_to<report_atom, cache_atom, WireMessage>>;  // a cache's blocks

using CacheActor = caf::typed_actor<caf::reacts_to<router_atom, std::vector<ReportSink>>,
                                    caf::replies_to<plan_atom, WireMessage>::with<WireMessage>,    // BlockPlanRequest -> BlockPlan
                                    caf::replies_to<lookup_atom, WireMessage>::with<WireMessage>,  // CachedResponse -> CachedResponse
                                    caf::reacts_to<store_atom, WireMessage>,                       // CachedResponse
                                    caf::reacts_to<report_atom>>;                                  // itself: report timer

using SchedulerActor = caf::typed_actor<
    caf::reacts_to<generate_atom, WireMessage>,           // GenerateRequest; the sender gets the stream
    caf::reacts_to<enter_atom, WireMessage>,              // a routed request, from its request actor
    caf::reacts_to<resume_atom, WireMessage>,             // the rest of a request whose scheduler died
    caf::reacts_to<cancel_atom, RequestId, uint8_t>,      // from a request actor
    // A request actor whose stream went quiet: the index after the last token sent for that id
    // (-1: not held here, e.g. it ended and the end was lost on the way).
    caf::replies_to<progress_atom, RequestId>::with<int32_t>,
    caf::reacts_to<kick_atom>,                            // itself: build the next step
    caf::reacts_to<report_atom>,                          // itself: report timer
    caf::replies_to<drain_atom>::with<bool>,              // this node: take nothing new
    caf::replies_to<stop_atom>::with<bool>,               // this node: shut down
    caf::replies_to<info_atom>::with<WireMessage>,        // ModelInfo
    caf::replies_to<stats_atom>::with<WireMessage>,       // ReplicaStats
    caf::replies_to<shard_atom>::with<ShardActor>,        // the current rank 0 (null while down)
    caf::reacts_to<shard_atom, bool>,                     // this node: stop the shard (true: respawn)
    caf::replies_to<cache_atom>::with<CacheActor>,
    caf::reacts_to<cache_atom, bool>,
    caf::replies_to<chaos_atom, WireMessage>::with<WireMessage>>;  // its supervisor: ChaosFault -> ChaosReply

// Who a request actor asks to resume its request when its scheduler died: the replica's
// supervisor (one process) or the request's node (a cluster).
// (resume_atom, WireMessage{GenerateRequest}, the scheduler that died)
using ResumeSink = caf::typed_actor<caf::reacts_to<resume_atom, WireMessage, SchedulerActor>>;

using RequestActor = StreamSink::extend<caf::reacts_to<resume_atom, SchedulerActor, RequestId>,  // a scheduler took it
                                        caf::reacts_to<resume_atom, uint64_t>,                  // itself: takeover timer
                                        caf::reacts_to<progress_atom, uint64_t>,                // itself: stream watchdog
                                        caf::reacts_to<stop_atom>,                              // itself: its deadline passed
                                        caf::reacts_to<cancel_atom>,                            // from its client
                                        caf::reacts_to<enter_atom, caf::actor>>;                // its node: the replica it was handed to

// What a client (the client library, a gateway, `celer bench`) talks to on a port: a node, or
// the replica's supervisor of a one-process `celer serve`.
using ServerActor = caf::typed_actor<caf::reacts_to<generate_atom, WireMessage>,      // GenerateRequest
                                     caf::replies_to<info_atom>::with<WireMessage>,   // ModelInfo
                                     caf::replies_to<stats_atom>::with<WireMessage>>;  // ReplicaStats

using SupervisorActor = ServerActor::extend_with<ResumeSink>::extend<
    caf::reacts_to<enter_atom, WireMessage>,              // a routed request, from its request actor
    caf::reacts_to<failed_atom, std::string>,             // its scheduler: a child spent its restarts
    caf::replies_to<stop_atom>::with<bool>,               // this node: shut down
    caf::replies_to<drain_atom>::with<bool>,
    caf::replies_to<sched_atom>::with<SchedulerActor>,    // the current scheduler
    caf::reacts_to<sched_atom, bool>,                     // this node: stop the scheduler (true: respawn)
    caf::replies_to<shard_atom>::with<ShardActor>,
    caf::replies_to<cache_atom>::with<CacheActor>,
    caf::replies_to<chaos_atom, WireMessage>::with<WireMessage>>;  // the router: ChaosFault -> ChaosReply

using RouterActor = ReportSink::extend<
    caf::replies_to<join_atom, std::string, SupervisorActor>::with<bool>,          // a replica is ready
    caf::reacts_to<hello_atom, std::string>,                                       // a node's heartbeat (the sender)
    caf::replies_to<route_atom, WireMessage>::with<SupervisorActor, std::string>,  // RouteQuery -> replica
    caf::replies_to<status_atom>::with<WireMessage>,                               // ClusterStatus
    caf::replies_to<stats_atom>::with<SupervisorActor>,                            // a replica to ask for stats
    caf::replies_to<drain_atom, std::string>::with<bool>,                          // drain that node
    caf::replies_to<chaos_atom, WireMessage>::with<WireMessage>>;                  // a node: ChaosFault -> ChaosReply

using NodeActor = ServerActor::extend_with<ResumeSink>::extend<
    caf::replies_to<spawn_atom, WireMessage>::with<ShardActor>,  // ShardSpec -> a shard rank built here
    caf::replies_to<spawn_atom, cache_atom, int32_t, bool, int32_t, int64_t, std::string>::with<CacheActor>,
    caf::replies_to<status_atom>::with<WireMessage>,           // ClusterStatus, from the router
    caf::reacts_to<join_atom, std::vector<RouterActor>>,       // this node: the router, then its standby
    caf::reacts_to<hello_atom>,                                // itself: heartbeat timer
    caf::replies_to<router_atom>::with<RouterActor>,           // the router running here (null: none)
    caf::reacts_to<peer_atom, std::string>,                    // a node that dialed this one: its name
    caf::replies_to<drain_atom>::with<int32_t>,                // this node: refuse new requests
    caf::replies_to<drain_atom, std::string>::with<bool>,      // `celer drain`: that node leaves
    caf::replies_to<chaos_atom, WireMessage>::with<WireMessage>>;  // ChaosFault -> ChaosReply (a client, or the router)

// A message that is no part of the actor's interface (a peer holding the secret may send
// anything) is counted in `counter` and answered with unexpected_message: never printed (a peer
// could fill the log with them) and never fatal. `counter` is a member of the actor's state.
template <class Self>
void count_unexpected(Self* self, uint64_t& counter) {
  self->set_default_handler([&counter](caf::scheduled_actor*, caf::message_view&) -> caf::result<caf::message> {
    ++counter;
    return caf::sec::unexpected_message;
  });
}

// Every handle type that travels in messages, registered on every node like the other message
// types (actors/wire.hpp): an unregistered one would not cross the middleman.
inline void add_interface_types(caf::actor_system_config& cfg) {
  cfg.add_message_type<StreamSink>("celer.StreamSink");
  cfg.add_message_type<EndpointActor>("celer.EndpointActor");
  cfg.add_message_type<std::vector<EndpointActor>>("std::vector<celer.EndpointActor>");
  cfg.add_message_type<ShardActor>("celer.ShardActor");
  cfg.add_message_type<ReportSink>("celer.ReportSink");
  cfg.add_message_type<std::vector<ReportSink>>("std::vector<celer.ReportSink>");
  cfg.add_message_type<CacheActor>("celer.CacheActor");
  cfg.add_message_type<SchedulerActor>("celer.SchedulerActor");
  cfg.add_message_type<SupervisorActor>("celer.SupervisorActor");
  cfg.add_message_type<RouterActor>("celer.RouterActor");
  cfg.add_message_type<std::vector<RouterActor>>("std::vector<celer.RouterActor>");
  cfg.add_message_type<NodeActor>("celer.NodeActor");
}

// Every type celer sends, registered on every node (a type missing on one end arrives there as
// an unexpected message).
inline void add_message_types(caf::actor_system_config& cfg) {
  cfg.add_message_type<WireMessage>("celer.WireMessage");
  cfg.add_message_type<ReducePart>("celer.ReducePart");
  add_interface_types(cfg);
}

// A node that runs shards: celer's message types, and CAF's threads kept out of the way of the
// shards' compute threads. The default work-stealing threads poll when idle; on a machine whose
// cores the shards already fill, the sharing policy (threads sleep on one queue) is the quieter
// neighbour. Two threads carry the actors: their work per step is microseconds.
inline void configure_serving_node(caf::actor_system_config& cfg) {
  add_message_types(cfg);
  cfg.set("scheduler.policy", caf::atom("sharing"));
  cfg.set("scheduler.max-threads", 2);
}

}  // namespace celer
