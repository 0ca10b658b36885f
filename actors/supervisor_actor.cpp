#include "actors/supervisor_actor.hpp"

#include <algorithm>

#include "actors/failure.hpp"
#include "actors/wire.hpp"

namespace celer {
namespace {

using Self = SupervisorActor::stateful_base<SupervisorState>;

void pass_on(const SchedulerActor& scheduler, const StreamSink& sender, SupervisorState::Kind kind, WireMessage wm) {
  switch (kind) {
    case SupervisorState::Kind::generate: caf::send_as(sender, scheduler, generate_atom::value, std::move(wm)); break;
    case SupervisorState::Kind::resume: caf::send_as(sender, scheduler, resume_atom::value, std::move(wm)); break;
    case SupervisorState::Kind::enter: caf::send_as(sender, scheduler, enter_atom::value, std::move(wm)); break;
  }
}

void spawn_scheduler(Self* self) {
  auto& st = self->state;
  st.setup.scheduler_restarts = st.total_restarts;
  st.scheduler = self->spawn(scheduler_actor, st.setup, caf::actor_cast<SupervisorActor>(self));
  *st.scheduler_for_exit = st.scheduler;
  st.up = true;
  self->monitor(st.scheduler);
  for (auto& p : st.pending) pass_on(st.scheduler, p.sender, p.kind, std::move(p.message));
  st.pending.clear();
}

// Forwards to the scheduler as if from the original sender, or keeps it for the next one.
void forward(Self* self, SupervisorState::Kind kind, const WireMessage& wm) {
  auto& st = self->state;
  auto sender = caf::actor_cast<StreamSink>(self->current_sender());
  if (!st.up) {
    st.pending.push_back({sender, kind, wm});
    return;
  }
  pass_on(st.scheduler, sender, kind, wm);
}

// Fails what waited for a scheduler that will not come: a client's request gets its error, a
// request actor's resume too (it then ends its stream with it).
void fail_pending(Self* self, const std::string& why) {
  for (auto& p : self->state.pending) {
    DecodeResult d = decode(p.message);
    const GenerateRequest* req = d.message ? std::get_if<GenerateRequest>(&*d.message) : nullptr;
    self->send(p.sender, event_atom::value, encode(ErrorReply{req ? req->id : 0, ErrorKind::unavailable, why}));
  }
  self->state.pending.clear();
}

}  // namespace

SupervisorActor::behavior_type supervisor_actor(Self* self, ReplicaSetup setup) {
  self->state.setup = std::move(setup);
  spawn_scheduler(self);
  self->set_down_handler([=](const caf::down_msg& dm) {
    auto& st = self->state;
    if (dm.source != st.scheduler.address()) return;
    st.up = false;
    if (st.stopping) return;
    if (!st.given_up.empty()) {
      // The scheduler gave up on a child that kept failing: a new scheduler would only fail the
      // same way, so the replica goes down with the reason (celer serve reports it and exits).
      self->quit(caf::make_error(caf::sec::runtime_error, st.given_up));
      return;
    }
    const auto now = std::chrono::steady_clock::now();
    st.restarts.erase(std::remove_if(st.restarts.begin(), st.restarts.end(),
                                     [&](auto t) { return now - t > st.setup.restart_window; }),
                      st.restarts.end());
    if (static_cast<int>(st.restarts.size()) >= st.setup.max_restarts) {
      // Clients see the replica go down.
      self->quit(caf::make_error(caf::sec::runtime_error, "the scheduler failed " + std::to_string(st.restarts.size() + 1) +
                                                              " times within the restart window: " +
                                                              failure_text(self->system(), dm.reason)));
      return;
    }
    st.restarts.push_back(now);
    ++st.total_restarts;
    self->delayed_send(self, st.setup.restart_backoff, sched_atom::value, true);
  });
  // The scheduler (and through it the shards) stops with the supervisor.
  self->attach_functor([scheduler = self->state.scheduler_for_exit](const caf::error&) {
    if (*scheduler) caf::anon_send_exit(*scheduler, caf::exit_reason::user_shutdown);
  });
  return {
      [=](generate_atom, const WireMessage& wm) { forward(self, SupervisorState::Kind::generate, wm); },
      // A request routed here by a cluster's router, from its request actor on the client's node.
      [=](enter_atom, const WireMessage& wm) { forward(self, SupervisorState::Kind::enter, wm); },
      [=](resume_atom, const WireMessage& wm, const SchedulerActor& dead) {
        // A request actor saw the scheduler die before this supervisor did: hold its request
        // for the successor (the down message is on its way and starts the restart).
        if (dead == self->state.scheduler) self->state.up = false;
        forward(self, SupervisorState::Kind::resume, wm);
      },
      [=](failed_atom, const std::string& why) {
        if (caf::actor_cast<caf::actor_addr>(self->current_sender()) == self->state.scheduler.address()) self->state.given_up = why;
      },
      [=](stop_atom) {
        // Shutting down: the scheduler fails what runs; no scheduler is restarted from here on.
        auto& st = self->state;
        auto rp = self->make_response_promise<bool>();
        if (!sent_from_this_node(self)) {
          rp.deliver(caf::make_error(caf::sec::unexpected_message));
          return rp;
        }
        st.stopping = true;
        fail_pending(self, "the server is shutting down");
        if (!st.up) {
          rp.deliver(true);
          return rp;
        }
        self->request(st.scheduler, std::chrono::seconds(2), stop_atom::value)
            .then([=](bool) mutable { rp.deliver(true); }, [=](caf::error&) mutable { rp.deliver(true); });
        return rp;
      },
      [=](sched_atom, bool respawn) {
        const bool from_self = caf::actor_cast<caf::actor_addr>(self->current_sender()) == self->address();
        if (respawn && from_self && !self->state.up && !self->state.stopping) spawn_scheduler(self);
      },
      [=](sched_atom) { return self->state.scheduler; },
      [=](stats_atom) {
        // The scheduler's figures plus this supervisor's restart count.
        auto rp = self->make_response_promise<WireMessage>();
        if (!self->state.up) {
          rp.deliver(caf::make_error(caf::sec::request_receiver_down));
          return rp;
        }
        self->request(self->state.scheduler, std::chrono::seconds(5), stats_atom::value)
            .then(
                [=](const WireMessage& wm) mutable {
                  DecodeResult d = decode(wm);
                  if (!d.message || !std::holds_alternative<ReplicaStats>(*d.message)) {
                    rp.deliver(caf::make_error(caf::sec::unexpected_response));
                    return;
                  }
                  ReplicaStats stats = std::get<ReplicaStats>(*d.message);
                  stats.scheduler_restarts = self->state.total_restarts;
                  rp.deliver(encode(stats));
                },
                [=](caf::error& err) mutable { rp.deliver(std::move(err)); });
        return rp;
      },
      [=](chaos_atom, const WireMessage& wm) -> caf::result<WireMessage> {
        // A fault to inject (docs/chaos.md), from the router: the scheduler is killed here (this
        // supervisor restarts it as after any crash); its cache and shards by the scheduler.
        auto& st = self->state;
        auto refuse = [](const std::string& why) { return encode(ErrorReply{0, ErrorKind::invalid_request, "chaos: " + why}); };
        if (!st.setup.chaos) return refuse("this cluster was not started with `chaos: enabled`");
        DecodeResult d = decode(wm);
        if (!d.message || !std::holds_alternative<ChaosFault>(*d.message)) return refuse("not a ChaosFault");
        const ChaosFault& f = std::get<ChaosFault>(*d.message);
        if (!st.up) return refuse("the scheduler of replica " + st.setup.name + " is restarting");
        if (f.role == "scheduler") {
          if (f.kind != ChaosFault::Kind::kill) return refuse("a scheduler can only be killed");
          caf::anon_send_exit(st.scheduler, caf::exit_reason::kill);
          return encode(ChaosReply{"", 0, "killed the scheduler of replica " + st.setup.name});
        }
        // Asked rather than delegated: the scheduler takes faults from its supervisor only.
        auto rp = self->make_response_promise<WireMessage>();
        self->request(st.scheduler, std::chrono::seconds(5), chaos_atom::value, wm)
            .then([=](const WireMessage& reply) mutable { rp.deliver(reply); }, [=](caf::error& e) mutable { rp.deliver(std::move(e)); });
        return rp;
      },
      [=](shard_atom) { return self->delegate(self->state.scheduler, shard_atom::value); },
      [=](info_atom) { return self->delegate(self->state.scheduler, info_atom::value); },
      [=](drain_atom) { return self->delegate(self->state.scheduler, drain_atom::value); },
      [=](cache_atom) { return self->delegate(self->state.scheduler, cache_atom::value); },
  };
}

}  // namespace celer
