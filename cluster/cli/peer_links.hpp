// How the nodes of a cluster connect to each other. Of two nodes that talk, only the one listed
// first in nodes: opens the connection, and introduces itself over it: under CAF 0.17, two nodes
// that dial each other at once end up with one of the two connections closed, and the proxies
// made over it die with it while both nodes are alive (a launch then failed at random with "the
// router on node a did not start"). The dialing node keeps its connections up: one that is lost
// (the peer restarted, or its heartbeats stopped) is dialed again, and the peer told again who
// dials it, for as long as the node runs.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "actors/interfaces.hpp"
#include "actors/transport.hpp"
#include "runtime/config.hpp"

namespace celer::cli {

// Told (on some thread that must not block) that the node of a name has a new actor: it
// restarted, or its connection was lost and made again (the old handles are dead either way).
using PeerChanged = std::function<void(const std::string& name, const NodeActor& node)>;

// The nodes that dialed this one, as their node actors introduced themselves (NodeSetup::on_peer).
// Only the names that the config has dial this node are taken; any other is ignored (a holder
// of the secret could still pose as one of those: the secret is what admits a node).
class PeerIntroductions {
 public:
  explicit PeerIntroductions(std::vector<std::string> expected) : expected_(std::move(expected)) {}
  // From now on, each introduction is also told to `changed` (set once the node is up: the
  // introductions before are those it waits for).
  void on_change(PeerChanged changed);
  // On an actor thread. A later introduction of the same name replaces the earlier: the peer
  // dialed again after its connection was lost, or it restarted.
  void introduced(const std::string& name, const caf::strong_actor_ptr& node);
  // Waits until `name` has introduced itself or `until` passes (then null).
  NodeActor wait_for(const std::string& name, std::chrono::steady_clock::time_point until);

 private:
  std::mutex mutex_;
  std::condition_variable changed_;
  const std::vector<std::string> expected_;
  std::map<std::string, NodeActor> nodes_;
  PeerChanged changed_to_;
};

// The connections this node opens, each kept up by a thread of its own until stop().
class PeerDialer {
 public:
  PeerDialer(Transport& transport, NodeActor self, std::string my_name, std::chrono::milliseconds redial_interval);
  ~PeerDialer();
  PeerDialer(const PeerDialer&) = delete;
  PeerDialer& operator=(const PeerDialer&) = delete;

  // Connects to `peer`, retrying while it is not up yet (nodes start in any order) until
  // `until`, introduces this node over the connection and keeps it up from now on. Throws
  // Error(unavailable) naming the peer and the last reason it did not answer.
  NodeActor dial(const NodeConfig& peer, std::chrono::steady_clock::time_point until);
  // Each connection made again is told to `changed` (on the dialer's thread).
  void on_change(PeerChanged changed);
  void stop();

 private:
  struct Link {
    NodeConfig peer;
    std::shared_ptr<std::atomic<bool>> lost;
  };
  // Connects once and introduces this node; watches the connection. Throws Error on failure.
  NodeActor connect(const Link& link);
  void keep_up();

  Transport& transport_;
  NodeActor self_;
  std::string my_name_;
  std::chrono::milliseconds redial_interval_;
  std::mutex mutex_;
  std::condition_variable wake_;
  bool stopping_ = false;
  std::vector<Link> links_;
  PeerChanged changed_;
  std::thread keeper_;
};

}  // namespace celer::cli
