// The gateway actor: the bridge between the HTTP side (actors/gateway.*, on its I/O thread) and
// a replica. One per node. The HTTP side hands it a GatewayJob (one HTTP request: n
// GenerateRequests, one per choice); it gives each a gateway-unique id, sends (generate_atom,
// request) to the replica, and passes every event of the stream that comes back (TokenChunk,
// Finished, ErrorReply) to the job, which forwards it to the I/O thread. It learns each
// request actor from its first token event, so that a job cancelled by the HTTP side (its
// client went away) can be cancelled at the replica: the sequence leaves the batch at the next
// iteration and its KV blocks are freed.
//
// Every request ends exactly once towards its job: with the replica's Finished or ErrorReply,
// or with `unavailable` when its request actor or the replica goes down, or when nothing was
// heard of it for idle_timeout (a lost message must not hang an HTTP client forever).
//
// Messages in:  (gw_start_atom, GatewayJobPtr) and (gw_cancel_atom, job key) from the HTTP side;
//               (health_atom, ReplicaStatsCallback): asks the replica for its stats, calls back
//               with them, or with nothing when it did not answer within the timeout (/health,
//               /metrics);
//               (event_atom, WireMessage) from request actors; down messages; (gw_tick_atom).
// Messages out: (generate_atom, WireMessage) to the replica; (cancel_atom) to request actors.
#pragma once

#include <chrono>
#include <functional>
#include <memory>
#include <optional>
#include <unordered_map>
#include <vector>

#include <caf/all.hpp>

#include "actors/interfaces.hpp"

namespace celer {

using gw_start_atom = caf::atom_constant<caf::atom("gwstart")>;
using gw_cancel_atom = caf::atom_constant<caf::atom("gwcancel")>;
using gw_tick_atom = caf::atom_constant<caf::atom("gwtick")>;
using health_atom = caf::atom_constant<caf::atom("health")>;

// One HTTP request's generations, seen from the actor.
class GatewayJob {
 public:
  virtual ~GatewayJob() = default;
  // Called on the actor's thread for each event of choice `choice` (TokenChunk, Finished or
  // ErrorReply; the last two end that choice). Must only hand the event over, never block.
  virtual void deliver(size_t choice, Message event) = 0;

  uint64_t key = 0;                       // unique per job; names it in gw_cancel_atom
  std::vector<GenerateRequest> requests;  // one per choice; the actor sets their ids
};
using GatewayJobPtr = std::shared_ptr<GatewayJob>;
using ReplicaStatsCallback = std::shared_ptr<std::function<void(std::optional<ReplicaStats>)>>;

// Local to its process: the HTTP side's jobs and callbacks are pointers.
using GatewayActor = StreamSink::extend<caf::reacts_to<gw_start_atom, GatewayJobPtr>,
                                        caf::reacts_to<gw_cancel_atom, uint64_t>,
                                        caf::reacts_to<gw_tick_atom>,  // itself: look for idle requests
                                        caf::reacts_to<health_atom, ReplicaStatsCallback>>;

struct GatewayActorOptions {
  std::chrono::milliseconds idle_timeout{std::chrono::minutes(10)};  // as the client library
  std::chrono::milliseconds health_timeout{std::chrono::seconds(2)};
  std::chrono::milliseconds tick{std::chrono::seconds(5)};           // how often idle requests are looked for
};

struct GatewayActorState {
  GatewayActorState() = default;  // not an aggregate: CAF would build it from the actor pointer
  struct Pending {
    GatewayJobPtr job;
    size_t choice = 0;
    RequestActor request;  // known from its first token
    bool cancel_requested = false;
    std::chrono::steady_clock::time_point last_heard;
  };
  ServerActor replica;
  GatewayActorOptions options;
  bool replica_down = false;
  RequestId next_id = 1;
  std::unordered_map<RequestId, Pending> pending;
  std::unordered_map<uint64_t, std::vector<RequestId>> jobs;  // job key -> its live request ids
  uint64_t malformed = 0;
  static inline const char* name = "celer.gateway";
};

GatewayActor::behavior_type gateway_actor(GatewayActor::stateful_pointer<GatewayActorState> self, ServerActor replica,
                                          GatewayActorOptions options);

}  // namespace celer

CAF_ALLOW_UNSAFE_MESSAGE_TYPE(celer::GatewayJobPtr)
CAF_ALLOW_UNSAFE_MESSAGE_TYPE(celer::ReplicaStatsCallback)
