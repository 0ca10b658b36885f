#include "cluster/cli/peer_links.hpp"

#include <algorithm>

#include "actors/wire.hpp"
#include "runtime/error.hpp"

namespace celer::cli {

void PeerIntroductions::introduced(const std::string& name, const caf::strong_actor_ptr& node) {
  if (std::find(expected_.begin(), expected_.end(), name) == expected_.end()) return;
  const auto actor = caf::actor_cast<NodeActor>(node);
  PeerChanged changed;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    nodes_[name] = actor;
    changed = changed_to_;
  }
  changed_.notify_all();
  if (changed) changed(name, actor);
}

void PeerIntroductions::on_change(PeerChanged changed) {
  std::lock_guard<std::mutex> lock(mutex_);
  changed_to_ = std::move(changed);
}

NodeActor PeerIntroductions::wait_for(const std::string& name, std::chrono::steady_clock::time_point until) {
  std::unique_lock<std::mutex> lock(mutex_);
  changed_.wait_until(lock, until, [&] { return nodes_.count(name) > 0; });
  auto it = nodes_.find(name);
  return it == nodes_.end() ? NodeActor{} : it->second;
}

PeerDialer::PeerDialer(Transport& transport, NodeActor self, std::string my_name, std::chrono::milliseconds redial_interval)
    : transport_(transport), self_(std::move(self)), my_name_(std::move(my_name)), redial_interval_(redial_interval) {}

PeerDialer::~PeerDialer() { stop(); }

NodeActor PeerDialer::connect(const Link& link) {
  NodeActor node = transport_.connect<NodeActor>(link.peer.host, link.peer.port, std::chrono::seconds(2), link.peer.name);
  link.lost->store(false);
  // The proxy dies with its connection (the peer's process ended, or CAF's heartbeats stopped
  // coming): then the keeper dials again.
  caf::actor_cast<caf::strong_actor_ptr>(node)->get()->attach_functor([lost = link.lost](const caf::error&) { lost->store(true); });
  caf::send_as(self_, node, peer_atom::value, my_name_);
  return node;
}

NodeActor PeerDialer::dial(const NodeConfig& peer, std::chrono::steady_clock::time_point until) {
  Link link{peer, std::make_shared<std::atomic<bool>>(true)};
  std::string last;
  NodeActor node;
  while (!node) {
    try {
      node = connect(link);
    } catch (const Error& e) {
      last = e.what();
      if (std::chrono::steady_clock::now() >= until)
        throw Error(ErrorCode::unavailable, "node " + my_name_ + ": node " + peer.name + " at " + peer.host + ":" +
                                                std::to_string(peer.port) + " did not answer: " + last);
      std::this_thread::sleep_for(std::chrono::milliseconds(200));
    }
  }
  std::lock_guard<std::mutex> lock(mutex_);
  links_.push_back(std::move(link));
  if (!keeper_.joinable() && !stopping_) keeper_ = std::thread([this] { keep_up(); });
  return node;
}

void PeerDialer::keep_up() {
  std::unique_lock<std::mutex> lock(mutex_);
  while (!stopping_) {
    wake_.wait_for(lock, redial_interval_, [&] { return stopping_; });
    if (stopping_) break;
    const std::vector<Link> links = links_;
    const PeerChanged changed = changed_;
    lock.unlock();
    for (const Link& link : links) {
      if (!link.lost->load()) continue;
      try {
        const NodeActor node = connect(link);
        if (changed) changed(link.peer.name, node);
      } catch (const Error&) {
        // Not back yet: tried again next interval.
      }
    }
    lock.lock();
  }
}

void PeerDialer::on_change(PeerChanged changed) {
  std::lock_guard<std::mutex> lock(mutex_);
  changed_ = std::move(changed);
}

void PeerDialer::stop() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stopping_ = true;
  }
  wake_.notify_all();
  if (keeper_.joinable()) keeper_.join();
}

}  // namespace celer::cli
