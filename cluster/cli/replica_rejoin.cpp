#include "cluster/cli/replica_rejoin.hpp"

#include <algorithm>
#include <cstdio>

#include "actors/replica.hpp"
#include "actors/wire.hpp"
#include "runtime/error.hpp"

namespace celer::cli {

RouterActor ask_router(caf::actor_system& sys, const NodeActor& node, std::chrono::steady_clock::time_point until) {
  caf::scoped_actor self{sys};
  RouterActor found;
  while (true) {
    self->request(node, std::chrono::seconds(2), router_atom::value)
        .receive([&](const RouterActor& r) { found = r; }, [](const caf::error&) {});
    if (found || std::chrono::steady_clock::now() >= until) return found;
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
}

SupervisorActor ReplicaStarter::start(const ReplicaPlan& rp, const std::map<std::string, NodeActor>& peers) const {
  ReplicaSetup setup = replica_setup(rp.config, model);
  setup.name = rp.name;
  // The scheduler's node measures its objective where it holds the weights; a replica whose
  // scheduler runs apart from them keeps the fixed budget unless slo.itl is written.
  if (auto picked = pick_missing_itl(rp.config, setup))
    std::printf("celer: node %s: replica %s: slo: no itl objective written; picked on this machine: %s\n", node_name.c_str(),
                rp.name.c_str(), picked->describe().c_str());
  setup.model_path = model_path;
  setup.routers = routers;
  if (rp.cache_node != node_name) setup.cache_node = peers.at(rp.cache_node);
  if (!rp.all_local) {
    for (const std::string& n : rp.shard_nodes) setup.shard_nodes.push_back(peers.at(n));
  }
  SupervisorActor replica = spawn_replica(sys, setup);
  const auto fail = [&](const std::string& why) {
    caf::anon_send_exit(replica, caf::exit_reason::user_shutdown);
    throw Error(ErrorCode::unavailable, "node " + node_name + ": replica " + rp.name + why);
  };
  try {
    wait_until_ready(sys, replica, std::chrono::minutes(10));
  } catch (const Error& e) {
    fail(std::string(": ") + e.what());
  }
  // A router accepts joins from the nodes that have said hello (the node actor says it as
  // soon as it knows the routers): until it has heard, it refuses, and this asks again.
  caf::scoped_actor self{sys};
  std::string problem;
  for (const RouterActor& router : routers) {
    const auto give_up = std::chrono::steady_clock::now() + join_timeout;
    for (bool joined = false; !joined;) {
      problem.clear();
      self->request(router, std::chrono::seconds(10), join_atom::value, rp.name, replica)
          .receive(
              [&](bool known) {
                joined = true;
                if (!known) problem = "the router's config has no replica " + rp.name;
              },
              [&](const caf::error& e) { problem = sys.render(e); });
      if (joined || std::chrono::steady_clock::now() >= give_up) break;
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
    if (!problem.empty()) fail(" could not join the router: " + problem);
  }
  return replica;
}

void ReplicaRestarter::run() {
  std::unique_lock<std::mutex> lock(mutex_);
  while (true) {
    wake_.wait(lock, [&] { return stopping_ || !events_.empty(); });
    if (stopping_) return;
    const auto [name, node] = events_.front();
    events_.pop_front();
    lock.unlock();
    peers_[name] = node;
    const bool router_back = name == router_node_ || (!standby_node_.empty() && name == standby_node_);
    if (router_back) take_router(name, node);
    for (size_t i = 0; i < plans_.size(); ++i) {
      if (!router_back && !builds_on(plans_[i], name)) continue;
      std::printf("celer: node %s: node %s is back; restarting replica %s\n", starter_.node_name.c_str(), name.c_str(),
                  plans_[i].name.c_str());
      std::fflush(stdout);
      // Its request actors resume what it was running on another replica, or on its successor.
      if (replicas_[i]) caf::anon_send_exit(replicas_[i], caf::exit_reason::kill);
      try {
        replicas_[i] = starter_.start(plans_[i], peers_);
        std::printf("celer: node %s: replica %s ready again\n", starter_.node_name.c_str(), plans_[i].name.c_str());
      } catch (const Error& e) {
        replicas_[i] = nullptr;
        std::fprintf(stderr, "error: %s\n", e.what());
      }
      std::fflush(stdout);
    }
    lock.lock();
  }
}

void ReplicaRestarter::take_router(const std::string& name, const NodeActor& node) {
  const RouterActor found = ask_router(starter_.sys, node, std::chrono::steady_clock::now() + starter_.join_timeout);
  if (!found) {
    std::fprintf(stderr, "error: node %s: node %s is back without a router\n", starter_.node_name.c_str(), name.c_str());
    return;
  }
  starter_.routers[name == router_node_ ? 0 : 1] = found;
  caf::scoped_actor{starter_.sys}->send(self_, join_atom::value, starter_.routers);  // from this process: what the node actor takes
  std::printf("celer: node %s: the router on node %s is back\n", starter_.node_name.c_str(), name.c_str());
  std::fflush(stdout);
}

}  // namespace celer::cli
