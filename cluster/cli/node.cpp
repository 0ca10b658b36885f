// celer node --config cluster.yaml --name NAME: one node of a cluster (docs/cluster.md). It
// publishes its node actor on the node's port behind the transport guard (the cluster secret),
// connects to the nodes it needs (the router's, and those holding the caches and shards of the
// replicas it schedules), runs the router if the config puts it here, starts the replicas whose
// scheduler is here, and an HTTP gateway if the node has an `http:` section.
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <set>
#include <string>
#include <thread>

#include <caf/all.hpp>
#include <caf/io/all.hpp>

#include "actors/failure.hpp"
#include "actors/gateway.hpp"
#include "actors/node_actor.hpp"
#include "actors/replica.hpp"
#include "actors/transport.hpp"
#include "actors/wire.hpp"
#include "cluster/cli/commands.hpp"
#include "cluster/cli/node_plan.hpp"
#include "cluster/cli/peer_links.hpp"
#include "cluster/cli/replica_rejoin.hpp"
#include "cluster/cli/stop_signals.hpp"
#include "cluster/router_actor.hpp"
#include "runtime/error.hpp"

namespace celer::cli {
namespace {

struct NodeArgs {
  std::string config;
  std::string name;
};

constexpr auto kStopGrace = std::chrono::seconds(10);

struct RunningNode {
  caf::actor_system& sys;
  std::unique_ptr<Transport> transport;
  std::unique_ptr<PeerDialer> dialer;  // the connections this node opens, kept up
  std::shared_ptr<ReplicaRestarter> restarter;  // once the node is up
  NodeActor node;
  uint16_t port = 0;
  RouterActor router;   // when it runs here
  RouterActor standby;  // when the standby router runs here
  std::vector<SupervisorActor> replicas;
  std::unique_ptr<Gateway> gateway;

  // (Null where a restart failed; the restarter must be stopped.)
  void forget_failed_replicas() {
    replicas.erase(std::remove(replicas.begin(), replicas.end(), SupervisorActor{}), replicas.end());
  }

  // Leaves the cluster without losing a request: the router hears that this node's replicas
  // take nothing new and this node refuses new requests; the requests running here finish,
  // up to `timeout`; past it, the replicas stop and the request actors elsewhere that they
  // served resume their requests on another replica.
  void drain(std::chrono::milliseconds timeout) {
    forget_failed_replicas();
    caf::scoped_actor self{sys};
    for (const SupervisorActor& r : replicas)
      self->request(r, std::chrono::seconds(3), drain_atom::value).receive([](bool) {}, [](const caf::error&) {});
    const auto until = std::chrono::steady_clock::now() + timeout;
    while (true) {
      int64_t busy = 0;
      if (node)
        self->request(node, std::chrono::seconds(3), drain_atom::value)
            .receive([&](int32_t n) { busy += n; }, [](const caf::error&) {});
      for (const SupervisorActor& r : replicas)
        self->request(r, std::chrono::seconds(3), stats_atom::value)
            .receive(
                [&](const WireMessage& wm) {
                  DecodeResult d = decode(wm);
                  if (!d.message || !std::holds_alternative<ReplicaStats>(*d.message)) return;
                  const ReplicaStats& st = std::get<ReplicaStats>(*d.message);
                  busy += st.running;
                  for (int32_t w : st.waiting) busy += w;
                },
                [](const caf::error&) {});
      if (busy == 0 || std::chrono::steady_clock::now() >= until) break;
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
    // What still runs moves: a replica that goes away makes its request actors resume elsewhere.
    for (const SupervisorActor& r : replicas) caf::anon_send_exit(r, caf::exit_reason::kill);
    replicas.clear();
  }

  void stop() {
    if (restarter) restarter->stop();
    if (dialer) dialer->stop();
    if (transport && port) transport->unpublish(node, port);
    port = 0;
    forget_failed_replicas();
    caf::scoped_actor self{sys};
    for (const SupervisorActor& r : replicas)
      self->request(r, std::chrono::seconds(3), stop_atom::value).receive([](bool) {}, [](const caf::error&) {});
    if (gateway) {
      const auto until = std::chrono::steady_clock::now() + std::chrono::seconds(3);
      while (gateway->metrics().active() > 0 && std::chrono::steady_clock::now() < until)
        std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
    if (gateway) gateway->stop();
    gateway.reset();
    for (const SupervisorActor& r : replicas) caf::anon_send_exit(r, caf::exit_reason::user_shutdown);
    replicas.clear();
    if (node) caf::anon_send_exit(node, caf::exit_reason::user_shutdown);
    if (router) caf::anon_send_exit(router, caf::exit_reason::user_shutdown);
    if (standby) caf::anon_send_exit(standby, caf::exit_reason::user_shutdown);
    node = nullptr;
    router = standby = nullptr;
  }
};

int run(const ClusterConfig& config, const NodePlan& plan, StopSignals& signals) {
  const NodeConfig& me = *plan.me;
  // The weights only where a shard runs or a replica is scheduled (its scheduler sizes the KV
  // cache from them); elsewhere (the router's node, a gateway's) the card is all that is read.
  bool holds_shard = !plan.replicas.empty();
  for (const ReplicaConfig& r : config.replicas)
    for (const ShardConfig& s : r.shards) holds_shard = holds_shard || s.node == me.name;
  std::shared_ptr<const Model> model = holds_shard ? std::make_shared<Model>(config.model) : nullptr;
  std::shared_ptr<const ModelCard> card = model ? model->card() : std::make_shared<ModelCard>(config.model);
  check_against_model(config, *card);

  caf::actor_system_config cfg;
  cfg.load<caf::io::middleman>();
  configure_tls(cfg, plan.tls);
  configure_serving_node(cfg);
  // CAF's heartbeats are what notice a peer that is alive but silent (SIGSTOP): without them a
  // hung node is never declared down.
  cfg.set("middleman.heartbeat-interval", caf::timespan{config.cluster.heartbeat_interval});
  cfg.set("middleman.connection-timeout", caf::timespan{config.cluster.node_timeout});
  caf::actor_system sys{cfg};
  RunningNode running{sys};

  try {
    TransportLimits limits;
    limits.token = plan.secret;
    limits.node_name = me.name;
    limits.tls = plan.tls;
    limits.max_message_bytes = config.listen.max_message_bytes;
    limits.max_buffered_bytes = config.listen.max_buffered_bytes;
    running.transport = std::make_unique<Transport>(sys, limits);

    // The router and its standby, if they run here: both hear every report, so the standby
    // can take over at once.
    if (plan.runs_router) running.router = sys.spawn(router_actor, router_setup(config));
    if (plan.runs_standby) running.standby = sys.spawn(router_actor, router_setup(config));

    NodeSetup ns;
    ns.local_router = plan.runs_router ? running.router : running.standby;
    ns.name = me.name;
    ns.model_path = config.model;
    ns.card = card;
    ns.model = model;
    ns.conversations = conversation_memory(config);
    ns.max_context = serving_context(config, *card);
    ns.shard_threads = plan.shard_threads;
    ns.heartbeat_interval = config.cluster.heartbeat_interval;
    ns.chaos = config.chaos;
    Transport* transport = running.transport.get();
    ns.inject_link_fault = [transport](const std::string& peer, const LinkFault& fault) { transport->inject(peer, fault); };
    ns.transport_stats = [transport] { return transport->stats(); };
    ns.on_drain = [&signals] { signals.wake(); };
    auto introductions = std::make_shared<PeerIntroductions>(plan.dialed_by);
    ns.on_peer = [introductions](const std::string& name, const caf::strong_actor_ptr& node) {
      introductions->introduced(name, node);
    };
    running.node = sys.spawn(node_actor, ns);
    try {
      running.port = running.transport->publish(running.node, me.host, me.port);
    } catch (const Error& e) {
      throw Error(ErrorCode::io, "node " + me.name + ": " + e.what());
    }

    const auto until = std::chrono::steady_clock::now() + config.cluster.connect_timeout;
    std::map<std::string, NodeActor> peers;
    peers[me.name] = running.node;
    running.dialer = std::make_unique<PeerDialer>(*running.transport, running.node, me.name, config.cluster.heartbeat_interval);
    for (const std::string& name : plan.dials) peers[name] = running.dialer->dial(*find_node(config, name), until);
    for (const std::string& name : plan.dialed_by) {
      peers[name] = introductions->wait_for(name, until);
      if (!peers[name])
        throw Error(ErrorCode::unavailable, "node " + me.name + ": node " + name + " did not connect to it (" + name +
                                                " is listed before " + me.name + " in nodes:, so it dials " + me.name + ")");
    }

    // The routers: here, or asked of their nodes until those have started them.
    auto router_on = [&](const std::string& node_name) {
      const RouterActor found = ask_router(sys, peers.at(node_name), until);
      if (!found) throw Error(ErrorCode::unavailable, "node " + me.name + ": the router on node " + node_name + " did not start");
      return found;
    };
    std::vector<RouterActor> routers{plan.runs_router ? running.router : router_on(plan.router_node)};
    if (!plan.standby_node.empty()) routers.push_back(plan.runs_standby ? running.standby : router_on(plan.standby_node));
    caf::scoped_actor{sys}->send(running.node, join_atom::value, routers);  // from this process: what the node actor takes

    // The replicas scheduled here.
    ReplicaStarter starter{sys, me.name, config.model, model, routers, config.cluster.connect_timeout};
    for (const ReplicaPlan& rp : plan.replicas) running.replicas.push_back(starter.start(rp, peers));
    // From now on a node that comes back (restarted, or connected again) restarts the replicas
    // here that build on it, or that report to the router on it.
    running.restarter = std::make_shared<ReplicaRestarter>(starter, plan, running.node, running.replicas, peers);
    auto restarter = running.restarter;
    running.dialer->on_change([restarter](const std::string& name, const NodeActor& node) { restarter->changed(name, node); });
    introductions->on_change([restarter](const std::string& name, const NodeActor& node) { restarter->changed(name, node); });

    if (me.http) {
      GatewayOptions go;
      go.http.host = me.http->host;
      go.http.port = me.http->port;
      go.http.request_timeout = me.http->request_timeout;
      go.http.idle_timeout = me.http->idle_timeout;
      go.stage_log = me.http->stage_log;
      go.transport_stats = [transport] { return transport->stats(); };
      running.gateway = std::make_unique<Gateway>(sys, running.node, card, config.model, serving_context(config, *card), go);
      const uint16_t http_port = running.gateway->start();
      std::printf("celer: node %s: http on %s:%u (model id '%s')\n", me.name.c_str(), me.http->host.c_str(),
                  static_cast<unsigned>(http_port), running.gateway->model_id().c_str());
    }
    std::string roles;
    if (plan.runs_router) roles += " router";
    if (plan.runs_standby) roles += " router-standby";
    for (const ReplicaPlan& rp : plan.replicas) roles += " scheduler:" + rp.name;
    std::printf("celer: node %s ready on %s:%u (%s%s)\n", me.name.c_str(), me.host.c_str(), static_cast<unsigned>(running.port),
                card->name().c_str(), roles.c_str());
    std::fflush(stdout);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    signals.exit_within("a failed start");
    running.stop();
    return 1;
  }

  signals.serving();
  const int sig = signals.wait();
  std::printf("celer: node %s draining (%s)\n", me.name.c_str(), sig ? signal_name(sig) : "celer drain");
  std::fflush(stdout);
  running.restarter->stop();  // (no replica is restarted while they drain)
  running.drain(config.cluster.drain_timeout);
  std::printf("celer: node %s leaving\n", me.name.c_str());
  std::fflush(stdout);
  running.stop();
  return 0;
}

int run_node(const NodeArgs& a) {
  ClusterConfig config = load_config(a.config);
  const NodePlan plan = plan_node(config, a.config, a.name);
  // A stop drains first: the grace covers the drain.
  StopSignals signals(config.cluster.drain_timeout + kStopGrace);
  return run(config, plan, signals);
}

}  // namespace

Command add_node(CLI::App& app) {
  auto a = std::make_shared<NodeArgs>();
  CLI::App* c = app.add_subcommand("node", "Run one node of a cluster (the way to run across machines)");
  c->add_option("--config", a->config, "Cluster config (YAML) with nodes: and replicas:")->required();
  c->add_option("--name", a->name, "This node's name in the config's nodes:")->required();
  return [a] { return run_node(*a); };
}

}  // namespace celer::cli
