#include "cluster/router_actor.hpp"

#include <algorithm>
#include <memory>
#include <optional>

#include <nlohmann/json.hpp>

#include "actors/wire.hpp"

namespace celer {
namespace {

using Self = RouterActor::stateful_base<RouterState>;

int64_t now_ms(Self* self) {
  return std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::steady_clock::now() - self->state.start).count();
}

// The table index of a replica the config lists (added on first mention), or -1.
int32_t replica_index(Self* self, const std::string& name) {
  auto& st = self->state;
  if (auto it = st.index.find(name); it != st.index.end()) return it->second;
  if (std::find(st.setup.replicas.begin(), st.setup.replicas.end(), name) == st.setup.replicas.end()) return -1;
  const int32_t i = st.table->add(name);
  st.index[name] = i;
  st.supervisors.resize(static_cast<size_t>(i) + 1);
  st.reports.resize(static_cast<size_t>(i) + 1);
  return i;
}

// Whether the message being handled comes from the node the config places `role` of `replica`
// on (its scheduler, or its cache): the CAF node that said hello under that node's name.
bool from_placed(Self* self, const std::string& role, const std::string& replica) {
  auto& st = self->state;
  const caf::strong_actor_ptr& sender = self->current_sender();
  if (sender) {
    for (const RouterSetup::Placement& p : st.setup.actors) {
      if (p.role != role || p.replica != replica) continue;
      auto it = st.bound.find(p.node);
      if (it != st.bound.end() && it->second == sender->node()) return true;
    }
  }
  ++st.refused_peers;
  return false;
}

// A report on a replica from where the config places `role` of it.
std::optional<ReplicaReport> read_report(Self* self, const WireMessage& wm, const std::string& role) {
  DecodeResult d = decode(wm);
  if (!d.message || !std::holds_alternative<ReplicaReport>(*d.message)) {
    ++self->state.malformed;
    return std::nullopt;
  }
  if (!from_placed(self, role, std::get<ReplicaReport>(*d.message).replica)) return std::nullopt;
  return std::move(std::get<ReplicaReport>(*d.message));
}

std::string status_json(Self* self) {
  auto& st = self->state;
  const int64_t now = now_ms(self);
  nlohmann::json j;
  j["policy"] = st.setup.policy_name;
  j["routed"] = st.routed;
  j["unroutable"] = st.unroutable;
  j["malformed_messages"] = st.malformed;
  j["refused_peers"] = st.refused_peers;
  j["nodes"] = nlohmann::json::array();
  for (const std::string& name : st.setup.nodes) {
    auto it = st.nodes.find(name);
    const bool known = it != st.nodes.end();
    const bool up = known && it->second.up && now - it->second.last_seen_ms <= st.setup.node_timeout.count();
    nlohmann::json n{{"name", name}, {"up", up}};
    n["last_heartbeat_ms_ago"] = known && it->second.last_seen_ms >= 0 ? nlohmann::json(now - it->second.last_seen_ms) : nlohmann::json();
    j["nodes"].push_back(n);
  }
  j["actors"] = nlohmann::json::array();
  for (const RouterSetup::Placement& p : st.setup.actors) {
    nlohmann::json a{{"role", p.role}, {"replica", p.replica}, {"node", p.node}};
    if (p.rank >= 0) a["rank"] = p.rank;
    j["actors"].push_back(a);
  }
  j["replicas"] = nlohmann::json::array();
  for (const std::string& name : st.setup.replicas) {
    auto it = st.index.find(name);
    nlohmann::json r{{"name", name}, {"up", false}};
    if (it != st.index.end()) {
      const int32_t i = it->second;
      const RouterState::Seen& seen = st.reports[i];
      const ReplicaReport& rep = seen.report;
      r["up"] = st.table->up(i);
      r["draining"] = rep.draining;
      r["waiting"] = rep.waiting;
      r["running"] = rep.running;
      r["outstanding_tokens"] = rep.outstanding_tokens;
      r["kv_blocks_used"] = rep.kv_blocks_used;
      r["kv_blocks_free"] = rep.kv_blocks_free;
      r["prefix_queries"] = rep.prefix_queries;
      r["prefix_hits"] = rep.prefix_hits;
      r["prefix_hit_rate"] = rep.prefix_queries ? static_cast<double>(rep.prefix_hits) / static_cast<double>(rep.prefix_queries) : 0.0;
      r["tokens_generated"] = rep.tokens_generated;
      r["tokens_per_second"] = seen.tokens_per_second;
      r["cached_blocks"] = seen.cached_blocks;
      r["routed"] = seen.routed;
      r["restarts"] = {{"scheduler", rep.scheduler_restarts},
                       {"shard", rep.shard_restarts},
                       {"cache", rep.cache_restarts},
                       {"hung_shards", rep.hung_shards}};
    }
    j["replicas"].push_back(r);
  }
  return j.dump();
}

// Carries out a wire fault (the chaos handler) at `nodes[i..]` in turn, each once the one
// before has answered; delivers the first refusal or failure, else what node `named` did.
void fault_in_turn(Self* self, caf::typed_response_promise<WireMessage> rp, const WireMessage& wm,
                   std::shared_ptr<const std::vector<std::pair<std::string, NodeActor>>> nodes, size_t i,
                   const std::string& named, std::optional<WireMessage> done) {
  const std::string name = (*nodes)[i].first;
  self->request((*nodes)[i].second, std::chrono::seconds(5), chaos_atom::value, wm)
      .then(
          [=](const WireMessage& reply) mutable {
            DecodeResult r = decode(reply);
            if (!r.message || !std::holds_alternative<ChaosReply>(*r.message)) {
              rp.deliver(reply);
              return;
            }
            if (name == named || !done) done = reply;
            if (i + 1 < nodes->size()) fault_in_turn(self, rp, wm, nodes, i + 1, named, done);
            else rp.deliver(*done);
          },
          [=](caf::error& e) mutable {
            rp.deliver(encode(ErrorReply{0, ErrorKind::unavailable, "chaos: node " + name + " did not answer: " + to_string(e)}));
          });
}

}  // namespace

RouterActor::behavior_type router_actor(Self* self, RouterSetup setup) {
  auto& st = self->state;
  st.setup = std::move(setup);
  st.table = std::make_unique<ReplicaTable>(st.setup.routing);
  count_unexpected(self, st.malformed);
  for (const std::string& name : st.setup.replicas) replica_index(self, name);
  self->set_down_handler([=](const caf::down_msg& dm) {
    auto& s = self->state;
    for (size_t i = 0; i < s.supervisors.size(); ++i)
      if (s.supervisors[i] && s.supervisors[i].address() == dm.source) {
        s.table->set_up(static_cast<int32_t>(i), false);
        s.supervisors[i] = SupervisorActor{};
      }
    for (auto& [name, node] : s.nodes)
      if (node.actor && node.actor.address() == dm.source) {
        node.up = false;
        node.actor = NodeActor{};
      }
  });
  return {
      [=](join_atom, const std::string& replica, const SupervisorActor& supervisor) -> caf::result<bool> {
        // A replica's supervisor, from the node the config schedules it on.
        if (!from_placed(self, "scheduler", replica) || !supervisor || supervisor.node() != self->current_sender()->node())
          return caf::make_error(caf::sec::invalid_argument,
                                 "router: a join for replica '" + replica + "' from a node that is not its scheduler's");
        const int32_t i = replica_index(self, replica);
        if (i < 0) {
          ++self->state.malformed;
          return false;
        }
        self->state.supervisors[i] = supervisor;
        self->monitor(supervisor);
        self->state.table->set_up(i, true);
        return true;
      },
      [=](hello_atom, const std::string& node) {
        auto& s = self->state;
        // A node of the config; its node actor sends the hello.
        const auto actor = caf::actor_cast<NodeActor>(self->current_sender());
        if (std::find(s.setup.nodes.begin(), s.setup.nodes.end(), node) == s.setup.nodes.end() || !actor) {
          ++s.refused_peers;
          return;
        }
        // A name belongs to the first CAF node that says hello as it, for as long as that node
        // is up; a node that restarts (a new CAF node) takes its name back once the old one is
        // down.
        auto bound = s.bound.find(node);
        if (bound != s.bound.end() && bound->second != actor.node()) {
          auto n = s.nodes.find(node);
          if (n != s.nodes.end() && n->second.up) {
            ++s.refused_peers;
            return;
          }
        }
        s.bound[node] = actor.node();
        RouterState::Node& n = s.nodes[node];
        if (n.actor != actor) {
          n.actor = actor;
          self->monitor(actor);
        }
        n.up = true;
        n.last_seen_ms = now_ms(self);
      },
      [=](report_atom, const WireMessage& wm) {
        auto r = read_report(self, wm, "scheduler");
        if (!r) return;
        const int32_t i = replica_index(self, r->replica);
        if (i < 0) {
          ++self->state.malformed;
          return;
        }
        auto& s = self->state;
        RouterState::Seen& seen = s.reports[i];
        const int64_t now = now_ms(self);
        if (seen.at_ms >= 0 && now > seen.at_ms && r->tokens_generated >= seen.report.tokens_generated) {
          const double rate = 1000.0 * static_cast<double>(r->tokens_generated - seen.report.tokens_generated) /
                              static_cast<double>(now - seen.at_ms);
          // Smoothed over about a second of reports.
          seen.tokens_per_second = seen.tokens_per_second * 0.9 + rate * 0.1;
        }
        seen.at_ms = now;
        r->blocks_changed = false;  // the cache reports those
        s.table->report(i, *r);
        seen.report = std::move(*r);
      },
      [=](report_atom, cache_atom, const WireMessage& wm) {
        auto r = read_report(self, wm, "cache");
        if (!r) return;
        const int32_t i = replica_index(self, r->replica);
        if (i < 0) {
          ++self->state.malformed;
          return;
        }
        self->state.reports[i].cached_blocks = static_cast<int64_t>(r->cached_blocks.size());
        self->state.table->set_cached_blocks(i, std::move(r->cached_blocks));
      },
      [=](route_atom, const WireMessage& wm) -> caf::result<SupervisorActor, std::string> {
        auto& s = self->state;
        DecodeResult d = decode(wm);
        if (!d.message || !std::holds_alternative<RouteQuery>(*d.message)) {
          ++s.malformed;
          return caf::make_error(caf::sec::invalid_argument, "router: not a RouteQuery");
        }
        const std::optional<RouteDecision> pick = s.table->route(std::get<RouteQuery>(*d.message));
        if (!pick) {
          ++s.unroutable;
          return caf::make_error(caf::sec::request_receiver_down, "no replica is up");
        }
        ++s.routed;
        ++s.reports[pick->replica].routed;
        return {s.supervisors[pick->replica], s.table->name(pick->replica)};
      },
      [=](status_atom) -> WireMessage { return encode(ClusterStatus{status_json(self)}); },
      [=](stats_atom) -> caf::result<SupervisorActor> {
        // A replica that is up, for a gateway's /health: not a request, so not counted or
        // added to any load.
        auto& s = self->state;
        for (size_t i = 0; i < s.supervisors.size(); ++i)
          if (s.supervisors[i] && s.table->up(static_cast<int32_t>(i))) return s.supervisors[i];
        return caf::make_error(caf::sec::request_receiver_down, "no replica is up");
      },
      [=](chaos_atom, const WireMessage& wm) -> caf::result<WireMessage> {
        // A fault to inject (docs/chaos.md), from a node's entry: passed to the node whose
        // process it signals, or to the supervisor of the replica whose actor it hits; the
        // reply names the node where the config puts that actor.
        auto& st = self->state;
        auto refuse = [&](const std::string& why) {
          ++st.malformed;
          return encode(ErrorReply{0, ErrorKind::invalid_request, "chaos: " + why});
        };
        if (!st.setup.chaos) return refuse("this cluster was not started with `chaos: enabled`");
        DecodeResult d = decode(wm);
        if (!d.message || !std::holds_alternative<ChaosFault>(*d.message)) return refuse("not a ChaosFault");
        const ChaosFault f = std::get<ChaosFault>(*d.message);
        auto rp = self->make_response_promise<WireMessage>();
        auto answer = [=](const std::string& node) mutable {
          return [=](const WireMessage& reply) mutable {
            DecodeResult r = decode(reply);
            if (r.message && std::holds_alternative<ChaosReply>(*r.message)) {
              ChaosReply done = std::get<ChaosReply>(*r.message);
              if (done.node.empty()) done.node = node;
              rp.deliver(encode(done));
            } else {
              rp.deliver(reply);
            }
          };
        };
        auto failed = [=](caf::error& e) mutable { rp.deliver(std::move(e)); };
        if (f.on_wire()) {
          // Carried out at both ends of the link, or (a partition) at every node that is up (one
          // that is down is cut off already): each drops, holds or changes what it receives from
          // the other. The nodes it names must be up.
          auto up = [&](const std::string& name) {
            auto it = st.nodes.find(name);
            return it != st.nodes.end() && it->second.actor && it->second.up;
          };
          std::vector<std::string> named{f.node};
          if (f.on_link()) named.push_back(f.peer);
          for (const std::string& name : named)
            if (!up(name)) {
              rp.deliver(refuse("no node named '" + name + "' is up"));
              return rp;
            }
          auto at = std::make_shared<std::vector<std::pair<std::string, NodeActor>>>();
          for (const auto& [name, node] : st.nodes)
            if (f.on_link() ? name == f.node || name == f.peer : up(name)) at->emplace_back(name, node.actor);
          // One node after another, this node's last and (a partition) the node cut off first:
          // each answer must come back before a node that would drop it has the fault.
          std::stable_sort(at->begin(), at->end(), [&](const auto& a, const auto& b) {
            auto rank = [&](const auto& n) { return n.second.node() == self->node() ? 2 : n.first == f.node ? 0 : 1; };
            return rank(a) < rank(b);
          });
          fault_in_turn(self, rp, wm, at, 0, f.node, std::nullopt);
          return rp;
        }
        if (f.kind == ChaosFault::Kind::sigkill || f.kind == ChaosFault::Kind::sigstop) {
          auto it = st.nodes.find(f.node);
          if (it == st.nodes.end() || !it->second.actor || !it->second.up) {
            rp.deliver(refuse("no node named '" + f.node + "' is up"));
            return rp;
          }
          self->request(it->second.actor, std::chrono::seconds(5), chaos_atom::value, wm).then(answer(f.node), failed);
          return rp;
        }
        auto it = st.index.find(f.replica);
        if (it == st.index.end() || !st.supervisors[static_cast<size_t>(it->second)]) {
          rp.deliver(refuse("no replica named '" + f.replica + "' has joined"));
          return rp;
        }
        std::string node;
        for (const RouterSetup::Placement& p : st.setup.actors)
          if (p.replica == f.replica && p.role == f.role && (p.role != "shard" || p.rank == f.rank)) node = p.node;
        self->request(st.supervisors[static_cast<size_t>(it->second)], std::chrono::seconds(5), chaos_atom::value, wm)
            .then(answer(node), failed);
        return rp;
      },
      [=](drain_atom, const std::string& node) {
        // `celer drain` through another node: passed to the named node's actor.
        auto rp = self->make_response_promise<bool>();
        auto it = self->state.nodes.find(node);
        if (it == self->state.nodes.end() || !it->second.actor) {
          rp.deliver(caf::make_error(caf::sec::invalid_argument, "no node named '" + node + "' is up"));
          return rp;
        }
        self->request(it->second.actor, std::chrono::seconds(10), drain_atom::value, node)
            .then([=](bool ok) mutable { rp.deliver(ok); }, [=](caf::error& e) mutable { rp.deliver(std::move(e)); });
        return rp;
      },
  };
}

}  // namespace celer
