// The replica's supervisor: the actor clients talk to. It spawns the scheduler (which spawns
// and supervises its shards), forwards requests to it, and when the scheduler dies respawns it
// (up to max_restarts within restart_window, after restart_backoff). Request actors whose
// scheduler died send their continuation here; it is delivered to the new scheduler as if sent
// by the request actor itself, and buffered while the scheduler restarts.
//
// Messages: (generate_atom, WireMessage) -> the scheduler, sender kept; (resume_atom,
//           WireMessage, dead scheduler) from a request actor -> the next scheduler, sender kept; (stats_atom), (shard_atom) and (cache_atom) -> answered by the scheduler; (sched_atom) -> the
//           current scheduler (for tests and fault injection).
#pragma once

#include <chrono>
#include <memory>
#include <string>
#include <vector>

#include <caf/all.hpp>

#include "actors/scheduler_actor.hpp"
#include "schema/codec.hpp"

namespace celer {

struct SupervisorState {
  ReplicaSetup setup;
  SchedulerActor scheduler;
  bool up = false;
  std::vector<std::chrono::steady_clock::time_point> restarts;
  uint64_t total_restarts = 0;
  bool stopping = false;  // after stop_atom: nothing is restarted
  std::string given_up;   // why the scheduler gave up on a child (failed_atom), if it did
  // Messages that arrived while the scheduler was restarting: (original sender, atom, content).
  enum class Kind { generate, resume, enter };  // which message it came as
  struct Pending {
    StreamSink sender;  // a client, or a request actor
    Kind kind;
    WireMessage message;
  };
  std::vector<Pending> pending;
  std::shared_ptr<SchedulerActor> scheduler_for_exit = std::make_shared<SchedulerActor>();  // stopped with the supervisor
  static inline const char* name = "celer.supervisor";
};

SupervisorActor::behavior_type supervisor_actor(SupervisorActor::stateful_pointer<SupervisorState> self, ReplicaSetup setup);

}  // namespace celer
