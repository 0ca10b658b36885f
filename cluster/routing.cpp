#include "cluster/routing.hpp"

#include <algorithm>
#include <utility>

#include "runtime/error.hpp"

namespace celer {

namespace {

constexpr std::array<const char*, kRoutePolicies> kPolicyNames = {"session", "prefix", "least-loaded",
                                                                  "least-connections", "round-robin"};

int64_t request_tokens(const RouteQuery& q) {
  return static_cast<int64_t>(std::max(q.prompt_tokens, 0)) + std::max(q.max_tokens, 0);
}

}  // namespace

const char* to_string(RoutePolicy policy) {
  const auto i = static_cast<size_t>(policy);
  return i < kPolicyNames.size() ? kPolicyNames[i] : "unknown";
}

std::optional<RoutePolicy> route_policy_from_string(std::string_view name) {
  for (size_t i = 0; i < kPolicyNames.size(); ++i)
    if (name == kPolicyNames[i]) return static_cast<RoutePolicy>(i);
  return std::nullopt;
}

ReplicaTable::ReplicaTable(RoutingOptions options) : options_(std::move(options)) {
  options_.min_prefix_blocks = std::max(options_.min_prefix_blocks, int32_t{1});
  options_.max_sessions = std::max(options_.max_sessions, size_t{1});
}

ReplicaTable::Replica& ReplicaTable::at(int32_t replica) {
  return const_cast<Replica&>(std::as_const(*this).at(replica));
}

const ReplicaTable::Replica& ReplicaTable::at(int32_t replica) const {
  if (replica < 0 || static_cast<size_t>(replica) >= replicas_.size())
    throw Error(ErrorCode::invalid_argument, "replica index " + std::to_string(replica) + " out of range (" +
                                                 std::to_string(replicas_.size()) + " replicas)");
  return replicas_[static_cast<size_t>(replica)];
}

int32_t ReplicaTable::add(std::string name) {
  Replica r;
  r.name = std::move(name);
  r.report.replica = r.name;
  replicas_.push_back(std::move(r));
  return static_cast<int32_t>(replicas_.size() - 1);
}

void ReplicaTable::set_up(int32_t replica, bool up) {
  Replica& r = at(replica);
  if (!up && r.up) {
    drop_sessions(replica);
    r.tokens_since_report = 0;
    r.requests_since_report = 0;
  }
  r.up = up;
}

void ReplicaTable::report(int32_t replica, const ReplicaReport& rep) {
  Replica& r = at(replica);
  // Copy the figures but not the block list: it lives sorted in `blocks` (and may be large).
  r.report.replica = rep.replica;
  r.report.waiting = rep.waiting;
  r.report.running = rep.running;
  r.report.outstanding_tokens = rep.outstanding_tokens;
  r.report.kv_blocks_used = rep.kv_blocks_used;
  r.report.kv_blocks_free = rep.kv_blocks_free;
  r.report.prefix_queries = rep.prefix_queries;
  r.report.prefix_hits = rep.prefix_hits;
  r.report.tokens_generated = rep.tokens_generated;
  r.report.draining = rep.draining;
  r.tokens_since_report = 0;
  r.requests_since_report = 0;
  if (rep.blocks_changed) set_cached_blocks(replica, rep.cached_blocks);
}

void ReplicaTable::set_cached_blocks(int32_t replica, std::vector<uint64_t> hashes) {
  Replica& r = at(replica);
  std::sort(hashes.begin(), hashes.end());
  hashes.erase(std::unique(hashes.begin(), hashes.end()), hashes.end());
  r.blocks = std::move(hashes);
}

int64_t ReplicaTable::load_tokens(const Replica& r) const {
  return std::max<int64_t>(0, r.report.outstanding_tokens + r.tokens_since_report);
}

int32_t ReplicaTable::connections(const Replica& r) const {
  return std::max<int32_t>(0, r.report.waiting + r.report.running + r.requests_since_report);
}

int32_t ReplicaTable::prefix_run(const Replica& r, const std::vector<uint64_t>& hashes) const {
  int32_t n = 0;
  for (uint64_t h : hashes) {
    if (!std::binary_search(r.blocks.begin(), r.blocks.end(), h)) break;
    ++n;
  }
  return n;
}

std::vector<int32_t> ReplicaTable::candidates(const RouteQuery& q) const {
  std::vector<int32_t> c;
  for (size_t i = 0; i < replicas_.size(); ++i) {
    const Replica& r = replicas_[i];
    if (!r.up || r.report.draining) continue;
    if (std::find(q.exclude.begin(), q.exclude.end(), r.name) != q.exclude.end()) continue;
    c.push_back(static_cast<int32_t>(i));
  }
  return c;
}

std::optional<int32_t> ReplicaTable::by_session(const RouteQuery& q, const std::vector<int32_t>& c, double over) const {
  const std::optional<int32_t> pinned = session_replica(q.session_id);
  if (!pinned || std::find(c.begin(), c.end(), *pinned) == c.end()) return std::nullopt;
  if (static_cast<double>(load_tokens(replicas_[*pinned])) > over) return std::nullopt;
  return pinned;
}

std::optional<int32_t> ReplicaTable::by_prefix(const RouteQuery& q, const std::vector<int32_t>& c, double over) const {
  std::optional<int32_t> best;
  int32_t best_run = 0;
  int64_t best_load = 0;
  for (int32_t i : c) {
    const Replica& r = replicas_[i];
    const int64_t load = load_tokens(r);
    if (static_cast<double>(load) > over) continue;
    const int32_t run = prefix_run(r, q.block_hashes);
    if (run < options_.min_prefix_blocks) continue;
    // Longer match first, then lower load; equal on both: the lower index (seen first).
    if (!best || run > best_run || (run == best_run && load < best_load)) {
      best = i;
      best_run = run;
      best_load = load;
    }
  }
  return best;
}

int32_t ReplicaTable::by_least_loaded(const std::vector<int32_t>& c) const {
  int32_t best = c.front();
  for (int32_t i : c)
    if (load_tokens(replicas_[i]) < load_tokens(replicas_[best])) best = i;
  return best;
}

int32_t ReplicaTable::by_least_connections(const std::vector<int32_t>& c) const {
  int32_t best = c.front();
  for (int32_t i : c)
    if (connections(replicas_[i]) < connections(replicas_[best])) best = i;
  return best;
}

int32_t ReplicaTable::by_round_robin(const std::vector<int32_t>& c) const {
  // c is in index order: the first candidate after the last pick, wrapping around.
  for (int32_t i : c)
    if (i > last_pick_) return i;
  return c.front();
}

std::optional<RouteDecision> ReplicaTable::route(const RouteQuery& q) {
  const std::vector<int32_t> c = candidates(q);
  if (c.empty()) return std::nullopt;

  int64_t total_load = 0;
  for (int32_t i : c) total_load += load_tokens(replicas_[i]);
  const double mean_load = static_cast<double>(total_load) / static_cast<double>(c.size());
  const double over = options_.prefix_load_guard * mean_load + static_cast<double>(request_tokens(q));

  std::optional<RouteDecision> d;
  for (RoutePolicy p : options_.chain) {
    std::optional<int32_t> pick;
    switch (p) {
      case RoutePolicy::session:
        pick = by_session(q, c, over);
        break;
      case RoutePolicy::prefix:
        pick = by_prefix(q, c, over);
        break;
      case RoutePolicy::least_loaded:
        pick = by_least_loaded(c);
        break;
      case RoutePolicy::least_connections:
        pick = by_least_connections(c);
        break;
      case RoutePolicy::round_robin:
        pick = by_round_robin(c);
        break;
    }
    if (pick) {
      d = RouteDecision{*pick, p, 0};
      break;
    }
  }
  if (!d) d = RouteDecision{by_least_loaded(c), RoutePolicy::least_loaded, 0};

  Replica& r = replicas_[d->replica];
  d->prefix_blocks = prefix_run(r, q.block_hashes);
  r.tokens_since_report += request_tokens(q);
  r.requests_since_report += 1;
  r.routed += 1;
  r.routed_by[static_cast<size_t>(d->by)] += 1;
  last_pick_ = d->replica;
  if (!q.session_id.empty()) pin_session(q.session_id, d->replica);
  return d;
}

void ReplicaTable::finished(int32_t replica, int64_t tokens) {
  Replica& r = at(replica);
  r.tokens_since_report -= std::max<int64_t>(tokens, 0);
  r.requests_since_report -= 1;
}

const std::string& ReplicaTable::name(int32_t replica) const {
  return at(replica).name;
}
bool ReplicaTable::up(int32_t replica) const {
  return at(replica).up;
}
bool ReplicaTable::draining(int32_t replica) const {
  return at(replica).report.draining;
}

std::optional<int32_t> ReplicaTable::session_replica(const std::string& session_id) const {
  if (session_id.empty()) return std::nullopt;
  auto it = sessions_.find(session_id);
  if (it == sessions_.end()) return std::nullopt;
  return it->second->second;
}

void ReplicaTable::pin_session(const std::string& session_id, int32_t replica) {
  if (auto it = sessions_.find(session_id); it != sessions_.end()) {
    replicas_[it->second->second].sessions -= 1;
    it->second->second = replica;
    session_order_.splice(session_order_.end(), session_order_, it->second);
  } else {
    if (sessions_.size() >= options_.max_sessions) {
      const auto& [oldest, held_by] = session_order_.front();
      replicas_[held_by].sessions -= 1;
      sessions_.erase(oldest);
      session_order_.pop_front();
    }
    session_order_.emplace_back(session_id, replica);
    sessions_.emplace(session_id, std::prev(session_order_.end()));
  }
  replicas_[replica].sessions += 1;
}

void ReplicaTable::drop_sessions(int32_t replica) {
  // O(sessions), but only when a replica goes down.
  for (auto it = session_order_.begin(); it != session_order_.end();) {
    if (it->second == replica) {
      sessions_.erase(it->first);
      it = session_order_.erase(it);
    } else {
      ++it;
    }
  }
  replicas_[replica].sessions = 0;
}

ReplicaFigures ReplicaTable::figures(int32_t replica) const {
  const Replica& r = at(replica);
  ReplicaFigures f;
  f.report = r.report;
  f.cached_blocks = static_cast<int64_t>(r.blocks.size());
  f.tokens_since_report = r.tokens_since_report;
  f.requests_since_report = r.requests_since_report;
  f.load_tokens = load_tokens(r);
  f.connections = connections(r);
  f.sessions = r.sessions;
  f.routed = r.routed;
  f.routed_by = r.routed_by;
  return f;
}

}  // namespace celer
