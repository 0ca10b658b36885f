#include "actors/scheduler_actor.hpp"

#include "actors/cache_actor.hpp"
#include "actors/failure.hpp"
#include "actors/request_actor.hpp"
#include "actors/shard_actor.hpp"
#include "actors/wire.hpp"
#include "runtime/error.hpp"

namespace celer {
namespace {

using Self = SchedulerActor::stateful_base<SchedulerActorState>;

const char* const kShuttingDown = "the server is shutting down";

// How often the router hears this replica's load: often enough that a burst of requests spreads
// by the figures (the router also counts what it sent since), rarely enough to cost nothing.
constexpr auto kBusyReportInterval = std::chrono::milliseconds(20);
constexpr auto kIdleReportInterval = std::chrono::milliseconds(500);

int64_t now_ms(Self* self) {
  return std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::steady_clock::now() - self->state.start).count();
}

// Deadlines arrive as Unix milliseconds; the scheduler keeps time from the actor's start.
int64_t to_local_ms(Self* self, int64_t unix_ms) {
  if (unix_ms == 0) return 0;
  return std::max<int64_t>(1, now_ms(self) + (unix_ms - unix_us() / 1000));
}

void send_report(Self* self);

void dispatch(Self* self, const std::vector<SchedulerEvent>& events) {
  auto& st = self->state;
  for (const SchedulerEvent& e : events) {
    auto it = st.requests.find(e.id);
    if (it == st.requests.end()) continue;
    switch (e.kind) {
      case SchedulerEvent::Kind::token: {
        ++st.tokens_generated;
        if (st.cacheable.count(e.id)) st.produced[e.id].push_back(e.token);
        TokenChunk chunk{e.id, e.index, {e.token}, {}, {}};
        if (e.has_logprob) chunk.logprobs.push_back(e.logprob);
        self->send(it->second, event_atom::value, encode(chunk));
        break;
      }
      case SchedulerEvent::Kind::finished:
        if (auto c = st.cacheable.find(e.id); c != st.cacheable.end()) {
          // (The response cache keeps complete answers only: a cancelled one is dropped there.)
          if (st.cache_up)
            self->send(st.cache, store_atom::value,
                       encode(CachedResponse{std::move(c->second), true, std::move(st.produced[e.id]), e.finished.reason}));
          st.cacheable.erase(c);
        }
        st.produced.erase(e.id);
        self->send(it->second, event_atom::value, encode(e.finished));
        st.requests.erase(it);
        break;
      case SchedulerEvent::Kind::error:
        st.cacheable.erase(e.id);
        st.produced.erase(e.id);
        self->send(it->second, event_atom::value, encode(e.error));
        st.requests.erase(it);
        break;
    }
  }
  // The replica has just gone idle: the router hears it now, not at the next idle report (up to
  // 500 ms away), which would leave it counting the finished requests as load.
  const bool ended_some = std::any_of(events.begin(), events.end(),
                                      [](const SchedulerEvent& e) { return e.kind != SchedulerEvent::Kind::token; });
  if (ended_some && st.scheduler->idle()) send_report(self);
}

void run_step(Self* self);
bool count_restart(Self* self, std::vector<std::chrono::steady_clock::time_point>& restarts, uint64_t& total,
                   const char* what, const std::string& why);

// A fault its supervisor passes on (docs/chaos.md): the cache or a shard rank of this replica is
// killed, hung or slowed. Only in a cluster with `chaos: enabled`, only from the supervisor.
WireMessage inject_fault(Self* self, const WireMessage& wm) {
  auto& st = self->state;
  auto refuse = [&](const std::string& why) {
    ++st.malformed;
    return encode(ErrorReply{0, ErrorKind::invalid_request, "chaos: " + why});
  };
  if (!st.setup.chaos) return refuse("this cluster was not started with `chaos: enabled`");
  if (caf::actor_cast<caf::actor_addr>(self->current_sender()) != st.supervisor.address())
    return refuse("a fault from an actor that is not this replica's supervisor");
  DecodeResult d = decode(wm);
  if (!d.message || !std::holds_alternative<ChaosFault>(*d.message)) return refuse("not a ChaosFault");
  const ChaosFault& f = std::get<ChaosFault>(*d.message);
  const std::string replica = "replica " + st.setup.name;
  if (f.role == "cache") {
    if (f.kind != ChaosFault::Kind::kill) return refuse("a cache can only be killed");
    if (!st.cache_up) return refuse("the cache of " + replica + " is not up");
    caf::anon_send_exit(st.cache, caf::exit_reason::kill);
    return encode(ChaosReply{"", 0, "killed the cache of " + replica});
  }
  if (f.role != "shard") return refuse("no role '" + f.role + "' (cache or shard here; the supervisor kills the scheduler)");
  if (f.rank < 0 || static_cast<size_t>(f.rank) >= st.ranks.size())
    return refuse(replica + " has no shard rank " + std::to_string(f.rank) + " (tensor parallel " + std::to_string(st.ranks.size()) + ")");
  if (!st.shard_up) return refuse("the shards of " + replica + " are being rebuilt");
  const ShardActor& rank = st.ranks[static_cast<size_t>(f.rank)];
  const std::string what = "shard rank " + std::to_string(f.rank) + " of " + replica;
  switch (f.kind) {
    case ChaosFault::Kind::kill:
      caf::anon_send_exit(rank, caf::exit_reason::kill);
      return encode(ChaosReply{"", 0, "killed " + what});
    case ChaosFault::Kind::hang:
      self->send(rank, chaos_atom::value, true, f.duration_ms, uint32_t{0});
      return encode(ChaosReply{"", 0, "hung " + what + " for " + std::to_string(f.duration_ms) + " ms"});
    case ChaosFault::Kind::slow:
      self->send(rank, chaos_atom::value, false, f.duration_ms, f.delay_ms);
      return encode(ChaosReply{"", 0, "slowed " + what + " by " + std::to_string(f.delay_ms) + " ms a step for " +
                                          std::to_string(f.duration_ms) + " ms"});
    default: return refuse("a shard can be killed, hung or slowed; a node's process is signalled by its node");
  }
}

// Sends the step to the shard group and applies its result.
void send_step(Self* self, std::shared_ptr<Step> step) {
  auto& st = self->state;
  st.step_in_flight = true;
  const WireMessage wire = encode(*step);
  // Ranks other than 0 only answer that they are done; a failing rank shows up as a down message.
  for (size_t r = 1; r < st.ranks.size(); ++r)
    self->request(st.ranks[r], st.setup.step_timeout, step_atom::value, wire).then([](const WireMessage&) {}, [](const caf::error&) {});
  self->request(st.shard, st.setup.step_timeout, step_atom::value, wire)
      .then(
          [=](const WireMessage& reply) {
            auto& s = self->state;
            s.step_in_flight = false;
            DecodeResult d = decode(reply);
            std::vector<SchedulerEvent> ev;
            if (d.message && std::holds_alternative<StepResult>(*d.message) &&
                std::get<StepResult>(*d.message).step_id == step->step_id) {
              s.step_failures = 0;
              const StepResult& result = std::get<StepResult>(*d.message);
              ++s.steps;
              s.step_us += result.step_us;
              s.allreduce_us += result.allreduce_us;
              s.allreduce_calls += result.allreduce_calls;
              s.scheduler->update(*step, result, ev);
            } else {
              // The shard refused the step or answered garbage: its KV can no longer be trusted.
              ++s.malformed;
              ++s.step_failures;
              s.scheduler->reset_kv();
            }
            dispatch(self, ev);
            run_step(self);
          },
          [=](const caf::error& e) {
            // The shard died with the step (its down message restarts it), could not be
            // reached, or hung past the step timeout (supervision.hang_timeout; it is stopped, and so replaced): either way
            // its KV is gone.
            auto& s = self->state;
            s.step_in_flight = false;
            if (e == caf::sec::request_timeout && s.shard_up) {
              // Hung: alive, but not answering. Treated as dead now rather than when it wakes
              // (a kill is only read by an actor that reads its mailbox): the group is stopped
              // and a new one built, and its down message, when it comes, is for a group gone.
              s.shard_up = false;
              ++s.hung_shards;
              for (const ShardActor& r : s.ranks) caf::anon_send_exit(r, caf::exit_reason::kill);
              s.scheduler->reset_kv();
              if (count_restart(self, s.restarts, s.total_restarts, "model shard",
                                "a step took longer than supervision.hang_timeout (" +
                                    std::to_string(s.setup.step_timeout.count()) + " ms)"))
                self->delayed_send(self, s.setup.restart_backoff, shard_atom::value, true);
              return;
            }
            if (s.shard_up) ++s.step_failures;
            s.scheduler->reset_kv();
            self->delayed_send(self, std::chrono::milliseconds(10), kick_atom::value);
          });
}

// One iteration: the block request to the cache, its plan back into the scheduler, the step to
// the shards. At most one plan or step is in flight; a kick that arrives meanwhile is kept.
void run_step(Self* self) {
  auto& st = self->state;
  if (st.step_in_flight || st.plan_in_flight || !st.shard_up || !st.cache_up) {
    st.kick_pending = true;
    return;
  }
  st.kick_pending = false;
  std::vector<SchedulerEvent> events;
  if (st.step_failures > st.setup.max_step_failures) {
    st.scheduler->fail_all(ErrorKind::internal, "the model shard failed " + std::to_string(st.step_failures) +
                                                    " steps in a row", events);
    st.step_failures = 0;
  }
  auto prepared = st.scheduler->prepare(now_ms(self), events);
  dispatch(self, events);
  if (auto* local = std::get_if<BlockPlan>(&prepared)) {
    // Every sequence of the step fits in the blocks it holds: no need to ask the cache.
    auto step = std::make_shared<Step>(st.scheduler->apply(*local));
    if (!step->sequences.empty()) send_step(self, std::move(step));
    return;
  }
  BlockPlanRequest& request = std::get<BlockPlanRequest>(prepared);
  if (!Scheduler::needs_plan(request)) return;
  const uint64_t plan_id = request.plan_id;
  const uint64_t epoch = st.scheduler->kv_epoch();
  st.plan_in_flight = true;
  self->request(st.cache, std::chrono::seconds(10), plan_atom::value, encode(request))
      .then(
          [=](const WireMessage& reply) {
            auto& s = self->state;
            s.plan_in_flight = false;
            if (s.scheduler->kv_epoch() != epoch) {
              // The KV was reset (a shard or the cache died) while the plan was on its way: its
              // tables name blocks that are gone. The next request starts over.
              run_step(self);
              return;
            }
            DecodeResult d = decode(reply);
            if (!d.message || !std::holds_alternative<BlockPlan>(*d.message) ||
                std::get<BlockPlan>(*d.message).plan_id != plan_id) {
              // The cache refused the request or answered garbage: start the KV over.
              ++s.malformed;
              s.scheduler->reset_kv();
              self->delayed_send(self, std::chrono::milliseconds(10), kick_atom::value);
              return;
            }
            const BlockPlan& plan = std::get<BlockPlan>(*d.message);
            s.kv_blocks_used = plan.kv_blocks_used;
            s.kv_blocks_free = plan.kv_blocks_free;
            s.prefix_queries = plan.prefix_queries;
            s.prefix_hits = plan.prefix_hits;
            std::shared_ptr<Step> step;
            try {
              step = std::make_shared<Step>(s.scheduler->apply(plan));
            } catch (const Error&) {
              ++s.malformed;
              s.scheduler->reset_kv();
              self->delayed_send(self, std::chrono::milliseconds(10), kick_atom::value);
              return;
            }
            if (!step->sequences.empty()) send_step(self, std::move(step));
            else if (s.kick_pending) run_step(self);
          },
          [=](const caf::error&) {
            // The cache died (its down message restarts it) or did not answer: its block table
            // is gone or unknown.
            auto& s = self->state;
            s.plan_in_flight = false;
            s.scheduler->reset_kv();
            self->delayed_send(self, std::chrono::milliseconds(10), kick_atom::value);
          });
}

void cache_up(Self* self, CacheActor cache) {
  auto& st = self->state;
  st.cache = std::move(cache);
  *st.cache_for_exit = st.cache;
  st.cache_up = true;
  st.kv_blocks_used = 0;
  st.kv_blocks_free = st.setup.kv_blocks;
  self->monitor(st.cache);
  run_step(self);
}

bool count_restart(Self* self, std::vector<std::chrono::steady_clock::time_point>& restarts, uint64_t& total,
                   const char* what, const std::string& why);

// The cache could not be built: counted like a dead one, and built again after the backoff.
void cache_failed(Self* self, uint64_t generation, const std::string& why) {
  auto& s = self->state;
  if (generation != s.cache_generation) return;
  s.cache_build_pending = false;
  if (count_restart(self, s.cache_restarts, s.total_cache_restarts, "cache", why))
    self->delayed_send(self, s.setup.restart_backoff, cache_atom::value, true);
}

// Spawns the replica's cache here, or asks its node to (the answer may come after the node has
// loaded; until then the replica waits).
void spawn_cache(Self* self) {
  auto& st = self->state;
  CacheSetup cs;
  cs.kv_blocks = st.setup.kv_blocks;
  cs.prefix_caching = st.setup.prefix_caching;
  cs.response_cache_entries = st.setup.response_cache_entries;
  cs.response_cache_ttl_ms = st.setup.response_cache_ttl_ms;
  cs.routers.assign(st.setup.routers.begin(), st.setup.routers.end());
  cs.replica = st.setup.name;
  const uint64_t generation = ++st.cache_generation;
  st.cache_up = false;
  if (!st.setup.cache_node) {
    cache_up(self, self->spawn(cache_actor, cs));
    return;
  }
  if (st.nodes_down.count(st.setup.cache_node.address())) return cache_failed(self, generation, "its node is down");
  st.cache_build_pending = true;
  self->request(st.setup.cache_node, kShardSpawnTimeout, spawn_atom::value, cache_atom::value, cs.kv_blocks,
                cs.prefix_caching, static_cast<int32_t>(cs.response_cache_entries), cs.response_cache_ttl_ms,
                st.setup.name)
      .then(
          [=](const CacheActor& cache) {
            if (generation != self->state.cache_generation) {
              caf::anon_send_exit(cache, caf::exit_reason::user_shutdown);
              return;
            }
            self->state.cache_build_pending = false;
            cache_up(self, cache);
          },
          [=](const caf::error& e) { cache_failed(self, generation, "its node did not build it: " + failure_text(self->system(), e)); });
}

// Counts a dead child's restart (in the window and in all). When it has died more than
// max_restarts times within the window, restarting it again would only fail again: the
// requests fail, the supervisor is told why, and this scheduler stops (the supervisor then
// takes the replica down rather than restart it). False then: no respawn.
bool count_restart(Self* self, std::vector<std::chrono::steady_clock::time_point>& restarts, uint64_t& total,
                   const char* what, const std::string& why) {
  auto& s = self->state;
  const auto now = std::chrono::steady_clock::now();
  restarts.erase(std::remove_if(restarts.begin(), restarts.end(), [&](auto t) { return now - t > s.setup.restart_window; }),
                 restarts.end());
  if (static_cast<int>(restarts.size()) >= s.setup.max_restarts) {
    const std::string reason = std::string("the ") + what + " failed " + std::to_string(restarts.size() + 1) +
                               " times within " + std::to_string(s.setup.restart_window.count()) +
                               " ms (supervision.max_restarts " + std::to_string(s.setup.max_restarts) + "): " + why;
    // In a cluster the request actors live on their clients' nodes: they see this scheduler go
    // and resume their requests on another replica, so they are not failed here. Alone, a
    // replica fails them with the reason.
    if (s.setup.routers.empty()) {
      std::vector<SchedulerEvent> ev;
      s.scheduler->fail_all(ErrorKind::unavailable, reason, ev);
      dispatch(self, ev);
    }
    if (s.supervisor) self->send(s.supervisor, failed_atom::value, reason);
    self->quit(caf::make_error(caf::sec::runtime_error, reason));
    return false;
  }
  restarts.push_back(now);
  ++total;
  return true;
}

// The replica's shard group is complete and connected: steps may run.
void group_up(Self* self, uint64_t generation) {
  auto& st = self->state;
  if (generation != st.shard_generation) return;
  st.shard_build_pending = false;
  st.shard = st.ranks[0];
  st.shard_up = true;
  run_step(self);
}

// A rank could not be built or connected: the group is given up like a dead one.
void group_failed(Self* self, uint64_t generation, const std::string& why) {
  auto& st = self->state;
  if (generation != st.shard_generation) return;
  ++st.shard_generation;  // answers still on their way are for a group that is gone
  st.shard_build_pending = false;
  for (const ShardActor& r : st.ranks)
    if (r) caf::anon_send_exit(r, caf::exit_reason::kill);
  st.shard_up = false;
  st.scheduler->reset_kv();
  if (count_restart(self, st.restarts, st.total_restarts, "model shard", why))
    self->delayed_send(self, st.setup.restart_backoff, shard_atom::value, true);
}

// Connects a network group: every rank learns every rank's all-reduce endpoint.
void connect_group(Self* self, uint64_t generation) {
  auto& st = self->state;
  const size_t tp = st.ranks.size();
  auto endpoints = std::make_shared<std::vector<EndpointActor>>(tp);
  auto answered = std::make_shared<size_t>(0);
  for (size_t r = 0; r < tp; ++r)
    self->request(st.ranks[r], std::chrono::seconds(30), collective_atom::value)
        .then(
            [=](const EndpointActor& endpoint) {
              if (generation != self->state.shard_generation) return;
              if (!endpoint) return group_failed(self, generation, "rank " + std::to_string(r) + " has no all-reduce endpoint");
              (*endpoints)[r] = endpoint;
              if (++*answered < tp) return;
              auto connected = std::make_shared<size_t>(0);
              for (size_t q = 0; q < tp; ++q)
                self->request(self->state.ranks[q], std::chrono::seconds(30), peers_atom::value, *endpoints)
                    .then(
                        [=](bool ok) {
                          if (!ok) return group_failed(self, generation, "rank " + std::to_string(q) + " refused its peers");
                          if (++*connected == tp) group_up(self, generation);
                        },
                        [=](const caf::error& e) {
                          group_failed(self, generation, "rank " + std::to_string(q) + ": " + failure_text(self->system(), e));
                        });
            },
            [=](const caf::error& e) {
              group_failed(self, generation, "rank " + std::to_string(r) + ": " + failure_text(self->system(), e));
            });
}

// Spawns the replica's shards: one, or the tp_size ranks of a tensor-parallel group. In one
// process the ranks share one in-process all-reduce; placed on nodes (setup.shard_nodes), each
// node builds its rank from a ShardSpec and the ranks sum over the network. The ranks fail
// together: when one goes down the scheduler stops the others (whose all-reduce was aborted)
// and respawns the group.
void spawn_shard(Self* self) {
  auto& st = self->state;
  const int tp = std::max(1, st.setup.engine.tp_size);
  const uint64_t generation = ++st.shard_generation;
  st.shard_up = false;
  st.ranks.assign(static_cast<size_t>(tp), ShardActor{});
  if (st.setup.shard_nodes.empty()) {
    auto group = tp > 1 ? std::make_shared<LocalAllReduceGroup>(tp) : nullptr;
    for (int r = 0; r < tp; ++r) {
      EngineOptions eo = st.setup.engine;
      eo.tp_rank = r;
      eo.tp_size = tp;
      st.ranks[r] = self->spawn<caf::detached>(shard_actor, std::shared_ptr<const Model>(st.setup.model), eo, group,
                                               self->address(), std::shared_ptr<MemoryPromise>{});
      self->monitor(st.ranks[r]);
    }
    *st.shard_for_exit = st.ranks;
    group_up(self, generation);
    return;
  }
  // A message to a node whose connection is gone is dropped without an answer: a build asked of
  // it would wait out kShardSpawnTimeout.
  for (int r = 0; r < tp; ++r)
    if (st.nodes_down.count(st.setup.shard_nodes[r].address()))
      return group_failed(self, generation, "the node of rank " + std::to_string(r) + " is down");
  auto built = std::make_shared<int>(0);
  st.shard_build_pending = true;
  for (int r = 0; r < tp; ++r) {
    const EngineOptions& e = st.setup.engine;
    ShardSpec spec;
    spec.replica = st.setup.name;
    spec.model_path = st.setup.model_path;
    spec.rank = r;
    spec.size = tp;
    spec.threads = 0;  // the node's own thread count
    spec.max_context = e.max_context;
    spec.max_batch_tokens = e.max_batch_tokens;
    spec.max_seqs = e.max_seqs;
    spec.n_kv_blocks = e.n_kv_blocks;
    spec.q8_activations = static_cast<uint8_t>(e.q8);
    spec.kv_type = e.kv_type ? static_cast<int32_t>(*e.kv_type) : -1;
    self->request(st.setup.shard_nodes[r], kShardSpawnTimeout, spawn_atom::value, encode(spec))
        .then(
            [=](const ShardActor& shard) {
              auto& s = self->state;
              if (generation != s.shard_generation) {
                caf::anon_send_exit(shard, caf::exit_reason::kill);
                return;
              }
              s.ranks[r] = shard;
              *s.shard_for_exit = s.ranks;
              self->monitor(shard);
              if (++*built < tp) return;
              if (tp == 1) group_up(self, generation);
              else connect_group(self, generation);
            },
            [=](const caf::error& e) {
              group_failed(self, generation,
                           "its node did not build rank " + std::to_string(r) + ": " + failure_text(self->system(), e));
            });
  }
}

// Admits a tokenized request (or tells its request actor why not) and starts an iteration.
// `cacheable`: its answer goes to the response cache when it finishes.
void admit(Self* self, GenerateRequest req, const RequestActor& request, bool cacheable) {
  auto& s = self->state;
  if (s.stopping) {  // its response-cache lookup was on its way when the stop came
    self->send(request, event_atom::value, encode(ErrorReply{req.id, ErrorKind::unavailable, kShuttingDown}));
    return;
  }
  if (auto rejected = s.scheduler->admit(req, now_ms(self))) {
    self->send(request, event_atom::value, encode(*rejected));
    return;
  }
  s.requests[req.id] = request;
  self->monitor(request);  // a request actor that ends (its client or its node gone) cancels
  if (cacheable) s.cacheable[req.id] = std::move(req);
  run_step(self);
}

// A new request: replayed from the response cache when it holds the same request's answer, else
// admitted. `request` is the request actor that streams it.
void look_up_then_admit(Self* self, GenerateRequest req, const RequestActor& request) {
  auto& s = self->state;
  // A repeated identical request: replay the stored answer as its token stream.
  // Stored answers hold tokens only: a request for logprobs always runs.
  const bool cacheable = s.setup.response_cache_entries && req.logprobs < 0;
  if (!cacheable || !s.cache_up) {
    admit(self, std::move(req), request, false);
    return;
  }
  // Asked once per request, before admission: a hit is replayed without touching the model.
  const CachedResponse query{req, false, {}, FinishReason::stop};
  s.looking_up[req.id] = std::nullopt;
  // A cancel (or stop) that came while the lookup was on its way ends the request here.
  auto cancelled = [=](const GenerateRequest& r) {
    auto it = self->state.looking_up.find(r.id);
    const std::optional<FinishReason> reason = it != self->state.looking_up.end() ? it->second : std::nullopt;
    self->state.looking_up.erase(r.id);
    if (!reason) return false;
    const auto n_prompt = static_cast<int32_t>(r.prompt_tokens.size());
    self->send(request, event_atom::value, encode(Finished{r.id, *reason, n_prompt, 0, 0, {}}));
    return true;
  };
  self->request(s.cache, std::chrono::seconds(5), lookup_atom::value, encode(query))
      .then(
          [=](const WireMessage& reply) mutable {
            if (cancelled(req)) return;
            DecodeResult d = decode(reply);
            const CachedResponse* answer = d.message ? std::get_if<CachedResponse>(&*d.message) : nullptr;
            if (!answer || !answer->found) {
              admit(self, std::move(req), request, true);
              return;
            }
            ++self->state.response_cache_hits;
            for (size_t i = 0; i < answer->tokens.size(); ++i)
              self->send(request, event_atom::value,
                         encode(TokenChunk{req.id, static_cast<int32_t>(i), {answer->tokens[i]}, {}, {}}));
            const auto n_prompt = static_cast<int32_t>(req.prompt_tokens.size());
            self->send(request, event_atom::value,
                       encode(Finished{req.id, answer->reason, n_prompt, static_cast<int32_t>(answer->tokens.size()),
                                       n_prompt, {}}));
          },
          [=](const caf::error&) mutable {
            if (!cancelled(req)) admit(self, std::move(req), request, false);
          });
}

// A request whose request actor lives elsewhere (the sender): `entering`, one a cluster's router
// sent here with nothing generated yet, which is new here as a client's request is (the
// replica's default deadline applies, the response cache is asked); else one resumed after its
// scheduler died, its prompt now holding the tokens already sent.
std::optional<ErrorReply> check_prompt(const Tokenizer& tok, const GenerateRequest& req);

void take_over(Self* self, const WireMessage& wm, bool entering) {
  auto& s = self->state;
  auto request = caf::actor_cast<RequestActor>(self->current_sender());
  DecodeResult d = decode(wm);
  if (!request || !d.message || !std::holds_alternative<GenerateRequest>(*d.message)) {
    ++s.malformed;
    return;
  }
  GenerateRequest req = std::move(std::get<GenerateRequest>(*d.message));
  req.id = s.next_id++;
  if (s.stopping) {
    self->send(request, event_atom::value, encode(ErrorReply{req.id, ErrorKind::unavailable, kShuttingDown}));
    return;
  }
  const int64_t now = now_ms(self);
  req.deadline_ms = req.deadline_ms != 0                            ? to_local_ms(self, req.deadline_ms)
                    : entering && s.setup.default_deadline_ms > 0 ? now + s.setup.default_deadline_ms
                                                                   : 0;
  if (!req.priority_given) req.priority = s.setup.default_priority;
  if (auto bad = check_prompt(s.setup.model->tokenizer(), req)) {
    self->send(request, event_atom::value, encode(*bad));
    return;
  }
  // The request actor learns its scheduler and id first: its cancel then reaches here.
  self->send(request, resume_atom::value, caf::actor_cast<SchedulerActor>(self), req.id);
  if (entering) {
    look_up_then_admit(self, std::move(req), request);
    return;
  }
  if (std::optional<ErrorReply> refused = s.scheduler->admit(req, now)) {
    refused->id = req.id;
    self->send(request, event_atom::value, encode(*refused));
    return;
  }
  s.requests[req.id] = request;
  self->monitor(request);  // a request actor that ends (its client or its node gone) cancels
  run_step(self);
}

// Tells the router this replica's load (and whether it takes new requests).
void send_report(Self* self) {
  auto& s = self->state;
  if (s.setup.routers.empty()) return;
  ReplicaReport r;
  r.replica = s.setup.name;
  r.waiting = s.scheduler->n_waiting();
  r.running = s.scheduler->n_running();
  r.outstanding_tokens = s.scheduler->outstanding_tokens();
  r.kv_blocks_used = s.kv_blocks_used;
  r.kv_blocks_free = s.kv_blocks_free;
  r.prefix_queries = s.prefix_queries;
  r.prefix_hits = s.prefix_hits;
  r.tokens_generated = s.tokens_generated;
  r.draining = s.stopping || s.draining;
  r.scheduler_restarts = s.setup.scheduler_restarts;
  r.shard_restarts = s.total_restarts;
  r.cache_restarts = s.total_cache_restarts;
  r.hung_shards = s.hung_shards;
  const WireMessage wire = encode(r);
  for (const RouterActor& router : s.setup.routers) self->send(router, report_atom::value, wire);
}

// Checks a request's prompt against the vocabulary; the error to send back, if any.
std::optional<ErrorReply> check_prompt(const Tokenizer& tok, const GenerateRequest& req) {
  for (TokenId t : req.prompt_tokens)
    if (t < 0 || t >= tok.n_vocab())
      return ErrorReply{req.id, ErrorKind::invalid_request, "prompt token " + std::to_string(t) + " is outside the vocabulary"};
  return std::nullopt;
}

}  // namespace

SchedulerActor::behavior_type scheduler_actor(Self* self, ReplicaSetup setup, SupervisorActor supervisor) {
  exit_with_exception_text(self);
  auto& st = self->state;
  count_unexpected(self, st.malformed);
  st.setup = setup;
  st.supervisor = supervisor;
  auto model = setup.model;
  st.scheduler = std::make_unique<Scheduler>(setup.scheduler,
                                             [model](TokenId t) { return model->tokenizer().is_end_of_generation(t); });
  // The nodes that build this replica's shard ranks and cache: a build they have not answered
  // when they go down fails at once (see the down handler).
  for (const NodeActor& n : st.setup.shard_nodes) self->monitor(n);
  if (st.setup.cache_node) self->monitor(st.setup.cache_node);
  spawn_cache(self);
  spawn_shard(self);
  if (!st.setup.routers.empty()) self->send(self, report_atom::value);
  self->set_down_handler([=](const caf::down_msg& dm) {
    auto& s = self->state;
    // A request actor that ended before its request did (it quits when its client goes, and
    // goes with its node): nobody is listening, so the request stops taking the batch's time.
    for (const auto& [id, request] : s.requests)
      if (request.address() == dm.source) {
        s.scheduler->cancel(id, FinishReason::cancelled);
        run_step(self);
        return;
      }
    if (dm.source == s.cache.address()) {
      // The cache died: the block tables and cached prefixes are gone (the KV memory in the
      // shards is intact but unaddressed). Every sequence recomputes on the new cache.
      s.cache_up = false;
      s.scheduler->reset_kv();
      if (count_restart(self, s.cache_restarts, s.total_cache_restarts, "cache", failure_text(self->system(), dm.reason)))
        self->delayed_send(self, s.setup.restart_backoff, cache_atom::value, true);
      return;
    }
    // A node that builds for this replica went down (its process died, or it was declared down
    // after node_timeout): a build it had not answered never will be. Its running shards and
    // cache send down messages of their own.
    const bool shard_node =
        std::any_of(s.setup.shard_nodes.begin(), s.setup.shard_nodes.end(), [&](const NodeActor& n) { return dm.source == n.address(); });
    const bool cache_node = s.setup.cache_node && dm.source == s.setup.cache_node.address();
    if (shard_node || cache_node) {
      s.nodes_down.insert(dm.source);
      const std::string gone = "node went down (" + failure_text(self->system(), dm.reason) + ")";
      if (shard_node && s.shard_build_pending) group_failed(self, s.shard_generation, "a rank's " + gone);
      if (cache_node && s.cache_build_pending) cache_failed(self, s.cache_generation, "its " + gone);
      return;
    }
    const bool ours = std::any_of(s.ranks.begin(), s.ranks.end(), [&](const ShardActor& r) { return dm.source == r.address(); });
    if (!ours || !s.shard_up) return;  // not a shard, or its group is already being replaced
    s.shard_up = false;
    for (const ShardActor& r : s.ranks) caf::anon_send_exit(r, caf::exit_reason::kill);
    // The shard died: its KV is gone.
    s.scheduler->reset_kv();
    if (count_restart(self, s.restarts, s.total_restarts, "model shard", failure_text(self->system(), dm.reason)))
      self->delayed_send(self, s.setup.restart_backoff, shard_atom::value, true);
  });
  self->attach_functor([ranks = st.shard_for_exit, cache = st.cache_for_exit](const caf::error&) {
    for (const ShardActor& r : *ranks) caf::anon_send_exit(r, caf::exit_reason::user_shutdown);
    if (*cache) caf::anon_send_exit(*cache, caf::exit_reason::user_shutdown);
  });
  return {
      [=](generate_atom, const WireMessage& wm) {
        const int64_t received_us = unix_us();
        auto& s = self->state;
        auto client = caf::actor_cast<StreamSink>(self->current_sender());
        DecodeResult d = decode(wm);
        if (!d.message || !std::holds_alternative<GenerateRequest>(*d.message)) {
          ++s.malformed;
          if (client)
            self->send(client, event_atom::value,
                       encode(ErrorReply{0, ErrorKind::invalid_request,
                                         d.message ? std::string("expected a GenerateRequest, got ") + message_name(*d.message)
                                                   : d.error}));
          return;
        }
        GenerateRequest req = std::move(std::get<GenerateRequest>(*d.message));
        if (s.stopping) {
          if (client) self->send(client, event_atom::value, encode(ErrorReply{req.id, ErrorKind::unavailable, kShuttingDown}));
          return;
        }
        const RequestId client_id = req.id;
        req.id = s.next_id++;
        const Tokenizer& tok = s.setup.model->tokenizer();
        if (req.prompt_tokens.empty())
          req.prompt_tokens = tokenize_prompt(tok, req, s.setup.conversations.get());
        auto request = self->spawn(request_actor, client, caf::actor_cast<SchedulerActor>(self), ResumeSink{s.supervisor}, client_id, req,
                                   s.setup.model->card(), s.setup.conversations, received_us);
        if (auto bad = check_prompt(tok, req)) {
          self->send(request, event_atom::value, encode(*bad));
          return;
        }
        const int64_t now = now_ms(self);
        req.deadline_ms = req.deadline_ms != 0 ? to_local_ms(self, req.deadline_ms)
                          : s.setup.default_deadline_ms > 0 ? now + s.setup.default_deadline_ms
                                                           : 0;
        if (!req.priority_given) req.priority = s.setup.default_priority;
        look_up_then_admit(self, std::move(req), request);
      },
      [=](resume_atom, const WireMessage& wm) { take_over(self, wm, false); },
      [=](enter_atom, const WireMessage& wm) { take_over(self, wm, true); },
      [=](cancel_atom, RequestId id, uint8_t reason) {
        // Only the request's own request actor may end it (ids are sequential: anyone could
        // guess them). A request still being looked up in the response cache has none yet.
        auto owner = self->state.requests.find(id);
        if (owner != self->state.requests.end() &&
            owner->second.address() != caf::actor_cast<caf::actor_addr>(self->current_sender()))
          return;
        const FinishReason why = reason == static_cast<uint8_t>(FinishReason::stop) ? FinishReason::stop : FinishReason::cancelled;
        if (auto it = self->state.looking_up.find(id); it != self->state.looking_up.end()) {
          it->second = why;
          return;
        }
        self->state.scheduler->cancel(id, why);
        run_step(self);
      },
      [=](progress_atom, RequestId id) -> int32_t {
        auto it = self->state.requests.find(id);
        if (it == self->state.requests.end() || it->second.address() != caf::actor_cast<caf::actor_addr>(self->current_sender()))
          return -1;
        // (One being looked up in the response cache, or streamed from it, has none here yet.)
        return self->state.scheduler->generated_tokens(id).value_or(0);
      },
      [=](kick_atom) { run_step(self); },
      [=](report_atom) {
        // The router's view of this replica: often while it works, now and then while idle.
        if (caf::actor_cast<caf::actor_addr>(self->current_sender()) != self->address()) return;  // one timer chain
        send_report(self);
        self->delayed_send(self, self->state.scheduler->idle() ? kIdleReportInterval : kBusyReportInterval,
                           report_atom::value);
      },
      [=](drain_atom) -> caf::result<bool> {
        // Its node is leaving: the router learns at once and routes nothing new here.
        if (!sent_from_this_node(self)) return caf::make_error(caf::sec::unexpected_message);
        auto& s = self->state;
        s.draining = true;
        send_report(self);
        return true;
      },
      [=](info_atom) -> WireMessage {
        const auto& s = self->state;
        return encode(ModelInfo{s.setup.model->name(), s.setup.model->tokenizer().n_vocab(), s.setup.scheduler.max_context});
      },
      [=](stop_atom) -> caf::result<bool> {
        // The server is shutting down: every request ends now with an error its client sees
        // (an SSE error event, the client library's error value), and new ones are refused.
        if (!sent_from_this_node(self)) return caf::make_error(caf::sec::unexpected_message);
        auto& s = self->state;
        s.stopping = true;
        std::vector<SchedulerEvent> ev;
        s.scheduler->fail_all(ErrorKind::unavailable, kShuttingDown, ev);
        dispatch(self, ev);
        return true;
      },
      [=](shard_atom, bool respawn) {
        if (!respawn || caf::actor_cast<caf::actor_addr>(self->current_sender()) != self->address()) return;
        spawn_shard(self);
        run_step(self);
      },
      [=](shard_atom) { return self->state.shard_up ? self->state.shard : ShardActor{}; },
      [=](cache_atom, bool respawn) {
        if (!respawn || caf::actor_cast<caf::actor_addr>(self->current_sender()) != self->address()) return;
        spawn_cache(self);
        run_step(self);
      },
      [=](cache_atom) { return self->state.cache; },
      [=](chaos_atom, const WireMessage& wm) -> WireMessage { return inject_fault(self, wm); },
      [=](stats_atom) -> WireMessage {
        auto& s = self->state;
        ReplicaStats r;
        for (int c = 0; c < kPriorityClasses; ++c) r.waiting[c] = s.scheduler->n_waiting(static_cast<Priority>(c));
        r.running = s.scheduler->n_running();
        r.kv_blocks_used = s.kv_blocks_used;
        r.kv_blocks_free = s.kv_blocks_free;
        r.prefix_queries = s.prefix_queries;
        r.prefix_hits = s.prefix_hits;
        r.response_cache_hits = s.response_cache_hits;
        r.cache_restarts = s.total_cache_restarts;
        r.steps = s.steps;
        r.step_us = s.step_us;
        r.allreduce_us = s.allreduce_us;
        r.allreduce_calls = s.allreduce_calls;
        r.malformed_messages = s.malformed;
        r.preemptions = s.scheduler->n_preemptions();
        const SloCounters& slo = s.scheduler->slo_counters();
        r.slo_finished = slo.finished;
        r.slo_met = slo.met;
        r.slo_refused = slo.refused;
        r.ttft_missed = slo.ttft_missed;
        r.itl_tokens = slo.itl_tokens;
        r.itl_tokens_over = slo.itl_tokens_over;
        r.itl_steps = slo.itl_steps;
        r.itl_steps_over = slo.itl_steps_over;
        r.itl_objective_us = static_cast<uint64_t>(s.scheduler->itl_objective_ms()) * 1000;
        r.step_budget = s.scheduler->step_budget();
        r.hung_shards = s.hung_shards;
        r.shard_restarts = s.total_restarts;
        return encode(r);
      },
  };
}

}  // namespace celer
