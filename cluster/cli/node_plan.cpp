#include "cluster/cli/node_plan.hpp"

#include <algorithm>
#include <cstdlib>
#include <set>
#include <thread>

#include "actors/transport.hpp"
#include "runtime/error.hpp"

namespace celer::cli {

const NodeConfig* find_node(const ClusterConfig& config, const std::string& name) {
  for (const NodeConfig& n : config.nodes)
    if (n.name == name) return &n;
  return nullptr;
}

namespace {

// The nodes `name` sends to: the router's and its standby's; for a replica scheduled here, the
// nodes of its cache and shards; for a rank held here, its scheduler's and its peer ranks' (the
// all-reduce).
std::set<std::string> wanted_peers(const ClusterConfig& config, const std::string& name) {
  std::set<std::string> peers;
  peers.insert(config.router.node.empty() ? config.nodes.front().name : config.router.node);
  if (!config.router.standby.empty()) peers.insert(config.router.standby);
  for (const ReplicaConfig& r : config.replicas) {
    bool rank_here = false;
    for (const ShardConfig& s : r.shards) rank_here = rank_here || s.node == name;
    if (r.scheduler != name && !rank_here) continue;
    if (r.scheduler == name) peers.insert(r.cache);
    peers.insert(r.scheduler);
    for (const ShardConfig& s : r.shards) peers.insert(s.node);
  }
  peers.erase(name);
  return peers;
}

}  // namespace

NodePlan plan_node(const ClusterConfig& config, const std::string& path, const std::string& name) {
  if (!config.is_cluster())
    throw Error(ErrorCode::invalid_argument,
                path + ": no nodes: section: a cluster config lists its nodes and replicas (celer serve runs a one-process config)");
  if (config.model.empty()) throw Error(ErrorCode::invalid_argument, path + ": no model to serve: name a GGUF file with `model:`");
  NodePlan plan;
  plan.me = find_node(config, name);
  if (!plan.me) {
    std::string names;
    for (const NodeConfig& n : config.nodes) names += (names.empty() ? "" : ", ") + n.name;
    throw Error(ErrorCode::invalid_argument, path + ": no node named '" + name + "' (nodes: " + names + ")");
  }
  plan.secret = config.cluster.secret;
  if (plan.secret.empty())
    if (const char* env = std::getenv("CELER_CLUSTER_SECRET")) plan.secret = env;
  plan.tls = tls_from_environment(config.cluster.tls);

  plan.router_node = config.router.node.empty() ? config.nodes.front().name : config.router.node;
  plan.runs_router = plan.router_node == name;
  plan.standby_node = config.router.standby;
  plan.runs_standby = !plan.standby_node.empty() && plan.standby_node == name;

  // Who talks to whom is symmetric for the connection (either end may send on it), so a node
  // dials or awaits every node that names it as well as those it names.
  const std::set<std::string> mine = wanted_peers(config, name);
  const size_t me_at = static_cast<size_t>(plan.me - config.nodes.data());
  for (size_t i = 0; i < config.nodes.size(); ++i) {
    const std::string& other = config.nodes[i].name;
    if (i == me_at || (!mine.count(other) && !wanted_peers(config, other).count(name))) continue;
    (i > me_at ? plan.dials : plan.dialed_by).push_back(other);
  }

  int ranks_here = 0;
  for (const ReplicaConfig& r : config.replicas) {
    std::vector<std::string> shard_nodes;
    for (const ShardConfig& s : r.shards) shard_nodes.push_back(s.node);
    ranks_here += static_cast<int>(std::count(shard_nodes.begin(), shard_nodes.end(), name));
    if (r.scheduler != name) continue;
    ReplicaPlan rp;
    rp.name = r.name;
    rp.config = config;
    rp.config.nodes.clear();
    rp.config.replicas.clear();
    rp.config.tensor_parallel_size = static_cast<int32_t>(r.shards.size());
    rp.cache_node = r.cache;
    rp.shard_nodes = shard_nodes;
    rp.all_local = std::all_of(shard_nodes.begin(), shard_nodes.end(), [&](const std::string& n) { return n == name; });
    plan.replicas.push_back(std::move(rp));
  }
  const int cores = std::max(1, static_cast<int>(std::thread::hardware_concurrency()));
  plan.shard_threads = plan.me->threads > 0 ? plan.me->threads : std::max(1, cores / std::max(1, ranks_here));
  for (ReplicaPlan& rp : plan.replicas) rp.config.threads = plan.shard_threads;
  return plan;
}

void check_against_model(const ClusterConfig& config, const ModelCard& model) {
  const ModelConfig& m = model.config();
  for (const ReplicaConfig& r : config.replicas) {
    const int tp = static_cast<int>(r.shards.size());
    auto refuse = [&](const char* what, int n) {
      throw Error(ErrorCode::invalid_argument, config_location(r) + ": replicas: " + r.name + ": shards: " +
                                                   std::to_string(tp) + " tensor-parallel ranks do not divide the model's " +
                                                   std::to_string(n) + " " + what);
    };
    if (m.n_head % tp != 0) refuse("attention heads", m.n_head);
    if (m.n_head_kv % tp != 0) refuse("KV heads", m.n_head_kv);
    if (m.n_ff % tp != 0) refuse("FFN rows", m.n_ff);
  }
}

namespace {

// The policies the router tries in turn for the config's `routing.policy`.
std::vector<RoutePolicy> route_chain(RoutingPolicy p) {
  switch (p) {
    case RoutingPolicy::standard: return {RoutePolicy::session, RoutePolicy::prefix, RoutePolicy::least_loaded};
    case RoutingPolicy::session: return {RoutePolicy::session, RoutePolicy::least_loaded};
    case RoutingPolicy::prefix: return {RoutePolicy::prefix, RoutePolicy::least_loaded};
    case RoutingPolicy::least_loaded: return {RoutePolicy::least_loaded};
    case RoutingPolicy::least_connections: return {RoutePolicy::least_connections};
    case RoutingPolicy::round_robin: return {RoutePolicy::round_robin};
  }
  return {RoutePolicy::least_loaded};
}

}  // namespace

RouterSetup router_setup(const ClusterConfig& config) {
  RouterSetup s;
  s.routing.prefix_load_guard = config.routing.prefix_load_guard;
  s.policy_name = routing_policy_name(config.routing.policy);
  s.routing.chain = route_chain(config.routing.policy);
  s.node_timeout = config.cluster.node_timeout;
  s.chaos = config.chaos;
  for (const NodeConfig& n : config.nodes) s.nodes.push_back(n.name);
  const std::string router_node = config.router.node.empty() ? config.nodes.front().name : config.router.node;
  s.actors.push_back({"router", "", -1, router_node});
  if (!config.router.standby.empty()) s.actors.push_back({"router-standby", "", -1, config.router.standby});
  for (const NodeConfig& n : config.nodes)
    if (n.http) s.actors.push_back({"gateway", "", -1, n.name});
  for (const ReplicaConfig& r : config.replicas) {
    s.replicas.push_back(r.name);
    s.actors.push_back({"scheduler", r.name, -1, r.scheduler});
    s.actors.push_back({"cache", r.name, -1, r.cache});
    for (size_t k = 0; k < r.shards.size(); ++k) s.actors.push_back({"shard", r.name, static_cast<int32_t>(k), r.shards[k].node});
  }
  return s;
}

}  // namespace celer::cli
