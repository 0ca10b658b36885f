#include "actors/gateway_actor.hpp"

namespace celer {
namespace {

using State = GatewayActorState;
using Self = GatewayActor::stateful_pointer<State>;

RequestId event_id(const Message& m) {
  if (auto* c = std::get_if<TokenChunk>(&m)) return c->id;
  if (auto* f = std::get_if<Finished>(&m)) return f->id;
  if (auto* e = std::get_if<ErrorReply>(&m)) return e->id;
  return 0;
}

void forget_in_job(State& s, uint64_t key, RequestId id) {
  auto it = s.jobs.find(key);
  if (it == s.jobs.end()) return;
  std::erase(it->second, id);
  if (it->second.empty()) s.jobs.erase(it);
}

// Ends request `id` towards its job with `event` (its last) and forgets it.
void end_request(Self self, RequestId id, Message event) {
  auto& s = self->state;
  auto it = s.pending.find(id);
  if (it == s.pending.end()) return;
  State::Pending p = std::move(it->second);
  s.pending.erase(it);
  forget_in_job(s, p.job->key, id);
  if (p.request) self->demonitor(p.request.address());
  p.job->deliver(p.choice, std::move(event));
}

void fail_request(Self self, RequestId id, const std::string& why) {
  end_request(self, id, ErrorReply{id, ErrorKind::unavailable, why});
}

void start_job(Self self, const GatewayJobPtr& job) {
  auto& s = self->state;
  if (s.replica_down) {
    for (size_t i = 0; i < job->requests.size(); ++i)
      job->deliver(i, ErrorReply{0, ErrorKind::unavailable, "the replica is down"});
    return;
  }
  auto& ids = s.jobs[job->key];
  const auto now = std::chrono::steady_clock::now();
  for (size_t i = 0; i < job->requests.size(); ++i) {
    GenerateRequest& r = job->requests[i];
    r.id = s.next_id++;
    s.pending[r.id] = State::Pending{job, i, {}, false, now};
    ids.push_back(r.id);
    self->send(s.replica, generate_atom::value, encode(r));
  }
}

void on_event(Self self, const WireMessage& wm) {
  auto& s = self->state;
  DecodeResult d = decode(wm);
  if (!d.message) {
    ++s.malformed;  // no id to route it by: the request ends by its actor's down message or idle
    return;
  }
  const RequestId id = event_id(*d.message);
  auto it = s.pending.find(id);
  if (it == s.pending.end()) return;  // late: the request already ended
  State::Pending& p = it->second;
  p.last_heard = std::chrono::steady_clock::now();
  if (std::holds_alternative<TokenChunk>(*d.message)) {
    // Token events come from the request's own actor (rejections may come from elsewhere).
    if (!p.request) {
      p.request = caf::actor_cast<RequestActor>(self->current_sender());
      if (p.request) {
        self->monitor(p.request);
        if (p.cancel_requested) self->send(p.request, cancel_atom::value);
      }
    }
    if (std::get<TokenChunk>(*d.message).is_introduction()) return;
    p.job->deliver(p.choice, std::move(*d.message));
    return;
  }
  end_request(self, id, std::move(*d.message));
}

void cancel_job(Self self, uint64_t key) {
  auto& s = self->state;
  auto it = s.jobs.find(key);
  if (it == s.jobs.end()) return;
  for (RequestId id : it->second) {
    auto p = s.pending.find(id);
    if (p == s.pending.end() || p->second.cancel_requested) continue;
    p->second.cancel_requested = true;
    // Not known yet: cancelled as soon as its first token names it.
    if (p->second.request) self->send(p->second.request, cancel_atom::value);
  }
}

void on_down(Self self, const caf::down_msg& dm) {
  auto& s = self->state;
  std::vector<RequestId> lost;
  if (dm.source == s.replica) {
    s.replica_down = true;
    for (const auto& [id, p] : s.pending) lost.push_back(id);
    for (RequestId id : lost) fail_request(self, id, "the replica stopped");
    return;
  }
  for (const auto& [id, p] : s.pending)
    if (p.request && p.request.address() == dm.source) lost.push_back(id);
  for (RequestId id : lost) fail_request(self, id, "the request's actor stopped before it finished");
}

void sweep_idle(Self self) {
  auto& s = self->state;
  const auto now = std::chrono::steady_clock::now();
  std::vector<RequestId> idle;
  for (const auto& [id, p] : s.pending)
    if (now - p.last_heard > s.options.idle_timeout) idle.push_back(id);
  for (RequestId id : idle) {
    if (auto& p = s.pending[id]; p.request) self->send(p.request, cancel_atom::value);
    fail_request(self, id, "no answer from the replica for " + std::to_string(s.options.idle_timeout.count() / 1000) + " s");
  }
}

}  // namespace

GatewayActor::behavior_type gateway_actor(Self self, ServerActor replica, GatewayActorOptions options) {
  self->state.replica = replica;
  self->state.options = options;
  self->monitor(replica);
  self->set_down_handler([=](caf::down_msg& dm) { on_down(self, dm); });
  self->delayed_send(self, options.tick, gw_tick_atom::value);
  return {
      [=](gw_start_atom, const GatewayJobPtr& job) { start_job(self, job); },
      [=](gw_cancel_atom, uint64_t key) { cancel_job(self, key); },
      [=](event_atom, const WireMessage& wm) { on_event(self, wm); },
      [=](gw_tick_atom) {
        sweep_idle(self);
        self->delayed_send(self, self->state.options.tick, gw_tick_atom::value);
      },
      [=](health_atom, const ReplicaStatsCallback& cb) {
        if (self->state.replica_down) return (*cb)(std::nullopt);
        self->request(self->state.replica, self->state.options.health_timeout, stats_atom::value)
            .then(
                [cb](const WireMessage& wm) {
                  DecodeResult d = decode(wm);
                  if (d.message && std::holds_alternative<ReplicaStats>(*d.message)) (*cb)(std::get<ReplicaStats>(*d.message));
                  else (*cb)(std::nullopt);
                },
                [cb](caf::error&) { (*cb)(std::nullopt); });
      },
  };
}

}  // namespace celer
