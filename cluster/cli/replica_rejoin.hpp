// How a node starts the replicas it schedules, and restarts them when a node they build on (or
// the router's node) comes back (docs/cluster.md, "Membership and failures").
#pragma once

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include <caf/all.hpp>

#include "actors/interfaces.hpp"
#include "cluster/cli/node_plan.hpp"
#include "runtime/model.hpp"

namespace celer::cli {

// The router (or standby) that runs on `node`, asked until it answers (a node starts it first
// thing) or `until` passes: then null.
RouterActor ask_router(caf::actor_system& sys, const NodeActor& node, std::chrono::steady_clock::time_point until);

// Starts a replica scheduled on this node: at start-up, and again when a node it builds on
// comes back.
struct ReplicaStarter {
  caf::actor_system& sys;
  std::string node_name;
  std::string model_path;
  std::shared_ptr<const Model> model;
  std::vector<RouterActor> routers;
  std::chrono::milliseconds join_timeout;  // after the replica is ready: how long the routers may refuse its join

  // Spawns the replica with the peers' current node actors, waits until its shards are built
  // (up to 10 minutes: a large model's packing) and joins it to every router. Throws Error
  // naming the replica; the replica is stopped then.
  SupervisorActor start(const ReplicaPlan& rp, const std::map<std::string, NodeActor>& peers) const;
};

// Follows the nodes that come back (restarted, or their connection lost and made again): the
// handles to their actors are dead. When it is the router's (or the standby's) node, this node
// takes the new router from it and every replica here joins it again (restarted: a scheduler
// reports to the routers it was made with); otherwise the replicas here whose shards or cache
// that node holds are restarted with its new node actor (a scheduler builds only on the node
// actors it was given). One thread, fed by the dialer and the introductions (threads that must
// not wait); `replicas` is the node's, by plan index.
class ReplicaRestarter {
 public:
  ReplicaRestarter(ReplicaStarter starter, const NodePlan& plan, NodeActor self, std::vector<SupervisorActor>& replicas,
                   std::map<std::string, NodeActor> peers)
      : starter_(std::move(starter)),
        plans_(plan.replicas),
        router_node_(plan.router_node),
        standby_node_(plan.standby_node),
        self_(std::move(self)),
        replicas_(replicas),
        peers_(std::move(peers)) {
    thread_ = std::thread([this] { run(); });
  }
  ~ReplicaRestarter() { stop(); }
  ReplicaRestarter(const ReplicaRestarter&) = delete;
  ReplicaRestarter& operator=(const ReplicaRestarter&) = delete;

  void changed(const std::string& name, const NodeActor& node) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      events_.emplace_back(name, node);
    }
    wake_.notify_one();
  }
  // Waits for a restart under way (at most its readiness wait) and ends the thread.
  void stop() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stopping_ = true;
    }
    wake_.notify_one();
    if (thread_.joinable()) thread_.join();
  }

 private:
  static bool builds_on(const ReplicaPlan& rp, const std::string& node) {
    return rp.cache_node == node || (!rp.all_local && std::count(rp.shard_nodes.begin(), rp.shard_nodes.end(), node) > 0);
  }

  void run();
  // The router that runs on `node` (a restarted node starts it before it dials anyone), asked
  // until it answers or the join timeout passes; the node actor here then uses it.
  void take_router(const std::string& name, const NodeActor& node);

  ReplicaStarter starter_;  // its routers follow the router's node
  const std::vector<ReplicaPlan> plans_;
  const std::string router_node_, standby_node_;
  const NodeActor self_;
  std::vector<SupervisorActor>& replicas_;
  std::map<std::string, NodeActor> peers_;
  std::mutex mutex_;
  std::condition_variable wake_;
  std::deque<std::pair<std::string, NodeActor>> events_;
  bool stopping_ = false;
  std::thread thread_;
};

}  // namespace celer::cli
