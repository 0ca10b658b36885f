#include "actors/node_actor.hpp"

#include <signal.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <thread>

#include <nlohmann/json.hpp>

#include "actors/cache_actor.hpp"
#include "actors/failure.hpp"
#include "actors/request_actor.hpp"
#include "actors/shard_actor.hpp"
#include "actors/wire.hpp"
#include "runtime/chaos_plan.hpp"
#include "runtime/engine.hpp"
#include "runtime/error.hpp"
#include "runtime/kv_block_manager.hpp"
#include "runtime/kv_cache.hpp"
#include "runtime/memory_info.hpp"

namespace celer {
namespace {

using Self = NodeActor::stateful_base<NodeState>;

// Shards and caches one node builds at most: far more than a config places on one node (a
// replica's rank and cache each), few enough that a peer asking again and again runs out first.
constexpr size_t kMaxChildren = 256;

void send_error(Self* self, const StreamSink& client, RequestId id, ErrorKind kind, const std::string& message) {
  if (client) self->send(client, event_atom::value, encode(ErrorReply{id, kind, message}));
}

// Keeps a child built here, so that it stops with the node; forgotten when it ends.
template <class Handle>
void adopt(Self* self, const Handle& child) {
  self->state.children->push_back(caf::actor_cast<caf::actor>(child));
  self->monitor(child);
}

// The router in use (null before join_atom, or once the router and its standby are both gone).
RouterActor router_of(Self* self) {
  auto& st = self->state;
  return st.router < st.setup.routers.size() ? st.setup.routers[st.router] : RouterActor{};
}

// Stops or kills this node's own process, as `celer chaos` asks (docs/chaos.md), a moment after
// the reply has gone out. A stopped process cannot continue itself: a child continues it
// after duration_ms (it only sleeps and signals, which is safe after fork in a threaded
// process).
void signal_self(int sig, uint32_t duration_ms) {
  std::thread([sig, duration_ms] {
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
    const pid_t me = getpid();
    if (sig == SIGSTOP) {
      const pid_t child = fork();
      if (child == 0) {
        timespec t{static_cast<time_t>(duration_ms / 1000), static_cast<long>(duration_ms % 1000) * 1'000'000L};
        while (nanosleep(&t, &t) != 0) {
        }
        kill(me, SIGCONT);
        _exit(0);
      }
      if (child < 0) return;  // no child to continue it: not stopped
      kill(me, SIGSTOP);
      waitpid(child, nullptr, 0);  // continued: the child has exited
      return;
    }
    kill(me, sig);
  }).detach();
}

caf::result<WireMessage> chaos_fault(Self* self, const WireMessage& wm) {
  auto& st = self->state;
  auto refuse = [&](const std::string& why) {
    ++st.chaos_refused;
    return encode(ErrorReply{0, ErrorKind::invalid_request, "chaos: " + why});
  };
  if (!st.setup.chaos)
    return refuse("this cluster was not started with `chaos: enabled` in its config; faults are refused");
  DecodeResult d = decode(wm);
  if (!d.message || !std::holds_alternative<ChaosFault>(*d.message))
    return refuse("not a ChaosFault: " + (d.message ? std::string(message_name(*d.message)) : d.error));
  const ChaosFault& f = std::get<ChaosFault>(*d.message);
  const auto sender = caf::actor_cast<caf::actor_addr>(self->current_sender());
  const bool from_router = std::any_of(st.setup.routers.begin(), st.setup.routers.end(),
                                       [&](const RouterActor& r) { return r.address() == sender; });
  if (!from_router) {
    // A client's: the router knows where its target is.
    const RouterActor router = router_of(self);
    if (!router) return refuse("no router is up to pass it to");
    auto rp = self->make_response_promise<WireMessage>();
    self->request(router, std::chrono::seconds(10), chaos_atom::value, wm)
        .then([=](const WireMessage& reply) mutable { rp.deliver(reply); }, [=](caf::error& e) mutable { rp.deliver(std::move(e)); });
    return rp;
  }
  if (f.on_wire()) {
    const std::string& me = st.setup.name;
    if (f.on_link() && f.node != me && f.peer != me) return refuse("this is node " + me + ", not " + f.node + " or " + f.peer);
    if (!st.setup.inject_link_fault) return refuse("node " + me + " has no transport to inject wire faults into");
    static constexpr LinkFault::Kind kKinds[] = {LinkFault::Kind::drop, LinkFault::Kind::delay, LinkFault::Kind::duplicate,
                                                 LinkFault::Kind::corrupt, LinkFault::Kind::partition};
    LinkFault lf;
    lf.kind = kKinds[static_cast<int>(f.kind) - static_cast<int>(ChaosFault::Kind::drop)];
    lf.probability = f.on_link() ? f.probability : 1.0;
    lf.delay = std::chrono::milliseconds(f.delay_ms);
    lf.until = std::chrono::steady_clock::now() + std::chrono::milliseconds(f.duration_ms);
    // A link's fault acts on what this end receives from the other end; a partition, at the
    // node cut off, on what it receives from every node, and elsewhere on what comes from it.
    const std::string from = f.on_link() ? (f.node == me ? f.peer : f.node) : (f.node == me ? kEveryPeer : f.node);
    st.setup.inject_link_fault(from, lf);
    const std::string what = f.on_link() ? std::string(chaos::kind_name(f.kind)) + " on the link " + f.node + "-" + f.peer
                                         : "partition of node " + f.node;
    return encode(ChaosReply{me, static_cast<int32_t>(getpid()), what + " for " + std::to_string(f.duration_ms) + " ms"});
  }
  if (f.kind != ChaosFault::Kind::sigkill && f.kind != ChaosFault::Kind::sigstop)
    return refuse("a node carries out signals to its process and wire faults; actor faults go to their replica");
  if (f.node != st.setup.name) return refuse("this is node " + st.setup.name + ", not " + f.node);
  const bool stop = f.kind == ChaosFault::Kind::sigstop;
  signal_self(stop ? SIGSTOP : SIGKILL, f.duration_ms);
  return encode(ChaosReply{st.setup.name, static_cast<int32_t>(getpid()),
                           stop ? "stopped the process of node " + st.setup.name + " for " + std::to_string(f.duration_ms) + " ms"
                                : "killed the process of node " + st.setup.name});
}

// Asks the router for a replica and hands it the request as if `request` (the request actor
// here) had sent it: the replica's scheduler then streams to the request actor. `avoid`: the
// replica that just lost the request, tried only when no other is up.
void route(Self* self, const RequestActor& request, std::shared_ptr<GenerateRequest> req, const std::string& avoid,
           bool fresh, SchedulerActor dead = {}, int attempt = 0) {
  RouteQuery q;
  q.session_id = req->session_id;
  q.prompt_tokens = static_cast<int32_t>(req->prompt_tokens.size());
  q.max_tokens = req->max_tokens;
  q.block_hashes = prefix_block_hashes(req->prompt_tokens);
  if (!avoid.empty()) q.exclude.push_back(avoid);
  auto fail = [=](const std::string& why) {
    ++self->state.route_failures;
    self->send(request, event_atom::value, encode(ErrorReply{req->id, ErrorKind::unavailable, why}));
  };
  const RouterActor router = router_of(self);
  if (!router) {
    fail("no router is up");
    return;
  }
  self->request(router, kRouteTimeout, route_atom::value, encode(q))
      .then(
          [=](const SupervisorActor& replica, const std::string& name) {
            ++self->state.routed;
            // (A request actor that ended meanwhile is not remembered: its down message came.)
            if (self->state.requests.count(request.address())) self->state.serving[request.address()] = name;
            // A first routing enters the replica as a new request (the response cache is asked);
            // a re-routing resumes (the prompt now holds the tokens already sent).
            if (fresh) caf::send_as(request, replica, enter_atom::value, encode(*req));
            else caf::send_as(request, replica, resume_atom::value, encode(*req), dead);  // (a supervisor holds it while it restarts that one)
            // The request actor watches that replica until its scheduler takes the request.
            self->send(request, enter_atom::value, caf::actor_cast<caf::actor>(replica));
          },
          [=](const caf::error& e) {
            if (router != router_of(self)) {  // the router went down meanwhile: ask its standby
              route(self, request, req, avoid, fresh, dead, attempt);
              return;
            }
            if (!avoid.empty()) {
              route(self, request, req, "", fresh, dead, attempt);
              return;
            }
            // No answer from a router that is up: the query or its answer may have been lost on
            // the way (the router answers at once, with a replica or with why there is none).
            if (e == caf::sec::request_timeout && attempt < kRouteAttempts - 1) {
              route(self, request, req, avoid, fresh, dead, attempt + 1);
              return;
            }
            fail("no replica took the request: " + failure_text(self->system(), e));
          });
}

}  // namespace

NodeActor::behavior_type node_actor(Self* self, NodeSetup setup) {
  self->state.setup = std::move(setup);
  count_unexpected(self, self->state.malformed);
  self->set_down_handler([=](const caf::down_msg& dm) {
    auto& st = self->state;
    // The router in use went down: its standby (which heard every report too) takes over,
    // unless it went down first.
    for (const RouterActor& r : st.setup.routers)
      if (r.address() == dm.source) st.down_routers.insert(dm.source);
    while (st.router < st.setup.routers.size() && st.down_routers.count(st.setup.routers[st.router].address())) ++st.router;
    self->state.serving.erase(dm.source);
    st.caches.erase(std::remove_if(st.caches.begin(), st.caches.end(), [&](const CacheActor& c) { return c.address() == dm.source; }),
                    st.caches.end());
    self->state.requests.erase(dm.source);
    auto& children = *self->state.children;
    children.erase(std::remove_if(children.begin(), children.end(), [&](const caf::actor& c) { return c.address() == dm.source; }),
                   children.end());
  });
  self->attach_functor([children = self->state.children](const caf::error&) {
    for (const caf::actor& c : *children) caf::anon_send_exit(c, caf::exit_reason::user_shutdown);
  });
  return {
      [=](spawn_atom, const WireMessage& wm) -> caf::result<ShardActor> {
        auto& st = self->state;
        DecodeResult d = decode(wm);
        if (!d.message || !std::holds_alternative<ShardSpec>(*d.message)) {
          ++st.malformed;
          return caf::make_error(caf::sec::invalid_argument,
                                 "node " + st.setup.name + ": not a ShardSpec: " + (d.message ? message_name(*d.message) : d.error));
        }
        const ShardSpec& spec = std::get<ShardSpec>(*d.message);
        if (spec.device != "cpu")
          return caf::make_error(caf::sec::invalid_argument,
                                 "node " + st.setup.name + ": device " + spec.device + " is not supported by this build");
        if (spec.model_path != st.setup.model_path)
          return caf::make_error(caf::sec::invalid_argument, "node " + st.setup.name + " serves " + st.setup.model_path +
                                                                 ", not " + spec.model_path);
        if (!st.setup.model)
          return caf::make_error(caf::sec::invalid_argument, "node " + st.setup.name +
                                                                 " holds no weights: the config places no shard on it");
        // Whoever holds the cluster secret may ask: a spec this node cannot hold, or more
        // children than any config places on one node, is refused before anything is allocated.
        if (st.children->size() >= kMaxChildren)
          return caf::make_error(caf::sec::invalid_argument,
                                 "node " + st.setup.name + " already runs " + std::to_string(st.children->size()) + " shards and caches");
        const ModelConfig& m = st.setup.model->config();
        const TensorType kv = spec.kv_type >= 0 ? static_cast<TensorType>(spec.kv_type) : default_kv_type(*st.setup.model);
        const double kv_bytes = static_cast<double>(spec.n_kv_blocks) *
                                static_cast<double>(KvCache::block_bytes(m.n_layer, std::max(1, m.n_head_kv / std::max(1, spec.size)),
                                                                         m.head_dim, kv));
        // Counted with the KV caches of shards still being built (promised, not yet in
        // MemAvailable), so shards that fit one by one but not together are not all admitted.
        auto promise = std::make_shared<MemoryPromise>();
        MemoryInfo mem;
        uint64_t building = 0;
        const auto want = static_cast<uint64_t>(std::min(kv_bytes, 1.8e19));
        if (!promise_memory(want, mem, building, *promise))
          return caf::make_error(caf::sec::invalid_argument,
                                 "node " + st.setup.name + ": a shard with " + std::to_string(spec.n_kv_blocks) + " KV blocks needs " +
                                     format_bytes(want) + "; " + format_bytes(mem.available) + " are available" +
                                     (building > 0 ? ", of which " + format_bytes(building) + " are promised to shards being built"
                                                   : std::string()));
        // The shard builds its engine in its own thread: a large model's packing does not hold
        // up this actor, and a failure (std::bad_alloc) is the shard's exit reason.
        // It works for the scheduler that asks for it.
        auto shard = self->spawn<caf::detached>(shard_actor, st.setup.model, engine_options(spec, st.setup.shard_threads),
                                                std::shared_ptr<LocalAllReduceGroup>{},
                                                caf::actor_cast<caf::actor_addr>(self->current_sender()), promise);
        adopt(self, shard);
        return shard;
      },
      [=](spawn_atom, cache_atom, int32_t kv_blocks, bool prefix_caching, int32_t response_entries, int64_t ttl_ms,
          const std::string& replica) -> caf::result<CacheActor> {
        auto& st = self->state;
        if (st.children->size() >= kMaxChildren)
          return caf::make_error(caf::sec::invalid_argument,
                                 "node " + st.setup.name + " already runs " + std::to_string(st.children->size()) + " shards and caches");
        if (kv_blocks < 1 || kv_blocks > wire_limits::kMaxKvBlocks || response_entries < 0 || ttl_ms < 0)
          return caf::make_error(caf::sec::invalid_argument, "node " + st.setup.name + ": a cache of " +
                                                                 std::to_string(kv_blocks) + " blocks cannot be built");
        CacheSetup cs;
        cs.kv_blocks = kv_blocks;
        cs.prefix_caching = prefix_caching;
        cs.response_cache_entries = static_cast<size_t>(response_entries);
        cs.response_cache_ttl_ms = ttl_ms;
        cs.routers.assign(st.setup.routers.begin(), st.setup.routers.end());
        cs.replica = replica;
        auto cache = self->spawn(cache_actor, cs);
        adopt(self, cache);
        st.caches.push_back(cache);
        return cache;
      },
      [=](generate_atom, const WireMessage& wm) {
        auto& st = self->state;
        auto client = caf::actor_cast<StreamSink>(self->current_sender());
        DecodeResult d = decode(wm);
        if (!d.message || !std::holds_alternative<GenerateRequest>(*d.message)) {
          ++st.malformed;
          send_error(self, client, 0, ErrorKind::invalid_request,
                     d.message ? std::string("expected a GenerateRequest, got ") + message_name(*d.message) : d.error);
          return;
        }
        auto req = std::make_shared<GenerateRequest>(std::move(std::get<GenerateRequest>(*d.message)));
        if (st.draining) {
          ++st.route_failures;
          send_error(self, client, req->id, ErrorKind::unavailable,
                     "node " + st.setup.name + " is draining: send new requests to another node");
          return;
        }
        if (!router_of(self)) {
          ++st.route_failures;
          send_error(self, client, req->id, ErrorKind::unavailable, "node " + st.setup.name + " has no router yet");
          return;
        }
        // Tokenized here, once: the router hashes the tokens, and the scheduler's loop never
        // stalls on a long prompt.
        if (req->prompt_tokens.empty()) {
          const Tokenizer& tok = st.setup.card->tokenizer();
          try {
            req->prompt_tokens = tokenize_prompt(tok, *req, st.setup.conversations.get());
          } catch (const Error& e) {
            send_error(self, client, req->id, ErrorKind::invalid_request, e.what());
            return;
          }
        }
        // The request actor lives here, on the client's node: it outlives the replica that
        // serves it, and resumes the request elsewhere if that replica's node dies.
        const RequestId client_id = req->id;
        auto request = self->spawn(request_actor, client, SchedulerActor{}, caf::actor_cast<ResumeSink>(self), client_id, *req,
                                   st.setup.card, st.setup.conversations, unix_us());
        self->monitor(request);
        st.requests.insert(request.address());
        route(self, request, std::move(req), "", true);
      },
      [=](resume_atom, const WireMessage& wm, const SchedulerActor& dead) {
        // A request actor of this node whose scheduler died: the rest of its request goes to
        // another replica if there is one, else to the same one (its supervisor may be
        // restarting the scheduler).
        auto& st = self->state;
        auto request = caf::actor_cast<RequestActor>(self->current_sender());
        DecodeResult d = decode(wm);
        if (!request || !st.requests.count(request.address()) || !d.message ||
            !std::holds_alternative<GenerateRequest>(*d.message)) {
          ++st.malformed;
          return;
        }
        if (!dead) ++st.rerouted_after_loss;
        auto it = st.serving.find(request.address());
        const std::string previous = it != st.serving.end() ? it->second : "";
        route(self, request, std::make_shared<GenerateRequest>(std::move(std::get<GenerateRequest>(*d.message))), previous,
              false, dead);
      },
      [=](info_atom) -> WireMessage {
        const auto& st = self->state;
        return encode(ModelInfo{st.setup.card->name(), st.setup.card->tokenizer().n_vocab(), st.setup.max_context});
      },
      [=](stats_atom) -> caf::result<WireMessage> {
        // A replica's figures, as the router would route to it: what the gateway's /health asks.
        if (!router_of(self)) return caf::make_error(caf::sec::request_receiver_down, "no router");
        auto rp = self->make_response_promise<WireMessage>();
        self->request(router_of(self), kRouteTimeout, stats_atom::value)
            .then(
                [=](const SupervisorActor& replica) mutable {
                  self->request(replica, kRouteTimeout, stats_atom::value)
                      .then([=](const WireMessage& stats) mutable { rp.deliver(stats); },
                            [=](caf::error& e) mutable { rp.deliver(std::move(e)); });
                },
                [=](caf::error& e) mutable { rp.deliver(std::move(e)); });
        return rp;
      },
      [=](status_atom) -> caf::result<WireMessage> {
        if (!router_of(self)) return caf::make_error(caf::sec::request_receiver_down, "no router");
        auto rp = self->make_response_promise<WireMessage>();
        self->request(router_of(self), kRouteTimeout, status_atom::value)
            .then(
                [=](const WireMessage& status) mutable {
                  // The router's view, and what this node (the one asked) refused.
                  DecodeResult d = decode(status);
                  if (!d.message || !std::holds_alternative<ClusterStatus>(*d.message)) {
                    rp.deliver(status);
                    return;
                  }
                  nlohmann::json j = nlohmann::json::parse(std::get<ClusterStatus>(*d.message).json, nullptr, false);
                  if (j.is_discarded()) {
                    rp.deliver(status);
                    return;
                  }
                  const NodeState& st = self->state;
                  j["entry"] = {{"node", st.setup.name},
                                {"chaos", st.setup.chaos},
                                {"chaos_refused", st.chaos_refused},
                                {"malformed_messages", st.malformed},
                                {"rerouted_after_loss", st.rerouted_after_loss}};
                  if (st.setup.transport_stats) {
                    const TransportStats t = st.setup.transport_stats();
                    j["entry"]["refused_messages"] = t.refused_messages;
                    j["entry"]["chaos_frames"] = {{"dropped", t.chaos_dropped},
                                                  {"delayed", t.chaos_delayed},
                                                  {"duplicated", t.chaos_duplicated},
                                                  {"corrupted", t.chaos_corrupted}};
                  }
                  rp.deliver(encode(ClusterStatus{j.dump()}));
                },
                [=](caf::error& e) mutable { rp.deliver(std::move(e)); });
        return rp;
      },
      [=](chaos_atom, const WireMessage& wm) -> caf::result<WireMessage> { return chaos_fault(self, wm); },
      [=](join_atom, const std::vector<RouterActor>& routers) {
        if (!sent_from_this_node(self)) return;  // which routers a node uses is its own process's business
        auto& st = self->state;
        const bool first = st.setup.routers.empty();
        st.setup.routers = routers;
        st.router = 0;
        for (const RouterActor& r : routers) self->monitor(r);
        const std::vector<ReportSink> sinks(routers.begin(), routers.end());
        for (const CacheActor& c : st.caches) self->send(c, router_atom::value, sinks);
        if (first) self->send(self, hello_atom::value);
      },
      [=](hello_atom) {
        // The routers' view of this node: up while they keep hearing this. (One timer chain:
        // only this actor's own messages keep it going.)
        if (caf::actor_cast<caf::actor_addr>(self->current_sender()) != self->address()) return;
        auto& st = self->state;
        for (const RouterActor& r : st.setup.routers) self->send(r, hello_atom::value, st.setup.name);
        self->delayed_send(self, st.setup.heartbeat_interval, hello_atom::value);
      },
      [=](router_atom) { return self->state.setup.local_router; },
      [=](peer_atom, const std::string& name) {
        // Only another node's actor introduces itself (its own process sends as it).
        const caf::strong_actor_ptr& sender = self->current_sender();
        if (!sender || sender->node() == self->node() || !self->state.setup.on_peer) {
          ++self->state.malformed;
          return;
        }
        self->state.setup.on_peer(name, sender);
      },
      [=](drain_atom) -> caf::result<int32_t> {
        if (!sent_from_this_node(self)) return caf::make_error(caf::sec::unexpected_message);
        auto& st = self->state;
        st.draining = true;
        return static_cast<int32_t>(st.serving.size());
      },
      [=](drain_atom, const std::string& node) {
        auto& st = self->state;
        auto rp = self->make_response_promise<bool>();
        if (node == st.setup.name) {
          if (st.setup.on_drain) st.setup.on_drain();
          rp.deliver(true);
        } else if (!router_of(self)) {
          rp.deliver(caf::make_error(caf::sec::request_receiver_down, "no router"));
        } else {
          self->request(router_of(self), kRouteTimeout, drain_atom::value, node)
              .then([=](bool ok) mutable { rp.deliver(ok); }, [=](caf::error& e) mutable { rp.deliver(std::move(e)); });
        }
        return rp;
      },
  };
}

}  // namespace celer
