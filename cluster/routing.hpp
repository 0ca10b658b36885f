// The router's policy core: which replica a request goes to. Plain synchronous C++ (no CAF, no
// I/O): cluster/router_actor.cpp feeds it the replicas' reports and asks it for each request.
//
// - Policies are tried in the order of RoutingOptions::chain. `session` and `prefix` may not
//   decide (no known session, no cached prefix, or the replica is overloaded) and fall through;
//   `least_loaded`, `least_connections` and `round_robin` always decide when any replica can take
//   the request. A chain that ends without a decision falls back to least_loaded, so route()
//   returns nullopt only when no replica is up, not draining and not excluded.
// - Reports arrive every heartbeat, but a burst of requests arrives between two of them. Each
//   routed request's tokens (prompt + max tokens) and one connection are added to its replica's
//   "routed since report" estimate, which the next report resets: without it every request of a
//   burst would see the same figures and land on the same replica.
// - Prefix matching compares the prompt's block hash chain (prefix_block_hashes in
//   runtime/kv_block_manager.hpp) with each replica's cached blocks: equal hash at position i
//   means equal prefix up to block i, so the run of leading hashes a replica holds is the number
//   of blocks its prefix cache would attach (counted until the first miss, as the cache does).
// - The load guard keeps one hot prefix (or one busy session) from piling every request on one
//   replica: a replica whose load exceeds prefix_load_guard times the mean load, plus one
//   request's tokens, is skipped by `session` and `prefix` and the request falls through.
#pragma once

#include <array>
#include <cstdint>
#include <list>
#include <optional>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "runtime/protocol.hpp"

namespace celer {

enum class RoutePolicy : uint8_t { session, prefix, least_loaded, least_connections, round_robin };
inline constexpr size_t kRoutePolicies = 5;

// "session", "prefix", "least-loaded", "least-connections", "round-robin".
const char* to_string(RoutePolicy policy);
std::optional<RoutePolicy> route_policy_from_string(std::string_view name);

struct RoutingOptions {
  // Tried in order; a policy that cannot decide falls through to the next.
  std::vector<RoutePolicy> chain = {RoutePolicy::session, RoutePolicy::prefix, RoutePolicy::least_loaded};
  // `session` and `prefix` skip a replica whose outstanding tokens exceed this many times the mean
  // of the replicas that could take the request, plus the request's own tokens (so that idle
  // replicas, all at zero, never count as overloaded).
  double prefix_load_guard = 1.5;
  // Fewer matching leading blocks than this (and never fewer than 1): `prefix` does not decide.
  int32_t min_prefix_blocks = 1;
  // Sessions remembered; beyond this the least recently routed one is forgotten (its next request
  // falls through to the next policy and is pinned again). 1<<16 entries is a few MiB.
  size_t max_sessions = size_t{1} << 16;
};

struct RouteDecision {
  int32_t replica = -1;
  RoutePolicy by = RoutePolicy::least_loaded;  // the policy that decided
  int32_t prefix_blocks = 0;                   // leading prompt blocks the chosen replica caches
};

// What status shows for one replica.
struct ReplicaFigures {
  ReplicaReport report;             // the last one, without its cached_blocks
  int64_t cached_blocks = 0;        // size of the cached-block set
  int64_t tokens_since_report = 0;  // the estimate: routed minus finished since the report
  int32_t requests_since_report = 0;
  int64_t load_tokens = 0;                           // what least_loaded compares
  int32_t connections = 0;                           // what least_connections compares
  size_t sessions = 0;                               // sessions pinned to it
  uint64_t routed = 0;                               // requests routed to it, ever
  std::array<uint64_t, kRoutePolicies> routed_by{};  // of those, by deciding policy (index: RoutePolicy)
};

class ReplicaTable {
 public:
  explicit ReplicaTable(RoutingOptions options);

  // Returns the new replica's index (0, 1, ...). It starts down.
  int32_t add(std::string name);
  // A replica that goes down receives nothing and its sessions are forgotten (their next request
  // is pinned anew); its "routed since report" estimate is dropped with the requests it held.
  void set_up(int32_t replica, bool up);
  // Replaces the load figures and resets the estimate; replaces the cached-block set only when
  // r.blocks_changed (a report that does not carry the set keeps the old one).
  void report(int32_t replica, const ReplicaReport& r);
  // Replaces the cached-block set alone (the cache actor reports it apart from the scheduler).
  void set_cached_blocks(int32_t replica, std::vector<uint64_t> hashes);

  // Picks a replica, or nullopt when none is up, not draining and not excluded by name. Records
  // the decision: the session (if any) is pinned to the chosen replica, and the request's tokens
  // and one connection are added to the replica's estimate until its next report.
  std::optional<RouteDecision> route(const RouteQuery& q);
  // Optional hint that a request routed to `replica` ended: lowers the estimate by `tokens` (the
  // prompt + max tokens it was routed with) and one connection before the next report does.
  void finished(int32_t replica, int64_t tokens);

  size_t size() const { return replicas_.size(); }
  const std::string& name(int32_t replica) const;
  bool up(int32_t replica) const;
  bool draining(int32_t replica) const;
  size_t sessions() const { return sessions_.size(); }
  // The replica a session is pinned to, or nullopt (does not refresh its recency).
  std::optional<int32_t> session_replica(const std::string& session_id) const;
  ReplicaFigures figures(int32_t replica) const;
  const RoutingOptions& options() const { return options_; }

 private:
  struct Replica {
    std::string name;
    bool up = false;
    ReplicaReport report;  // cached_blocks moved out into `blocks`
    // Sorted, unique. A sorted vector rather than an unordered_set: the set is replaced whole on
    // every cache report (moving the reported vector in and sorting it allocates nothing, where a
    // hash set allocates a node per block), it takes 8 bytes per block, and a lookup is a binary
    // search of ~17 steps for 100k blocks, done only until the prompt's first miss.
    std::vector<uint64_t> blocks;
    // Signed deltas since the last report: finished() may subtract a request the report already
    // counted (that is right: it has left); load and connections clamp their sums at zero.
    int64_t tokens_since_report = 0;
    int32_t requests_since_report = 0;
    size_t sessions = 0;
    uint64_t routed = 0;
    std::array<uint64_t, kRoutePolicies> routed_by{};
  };
  // Least recently routed at the front.
  using SessionList = std::list<std::pair<std::string, int32_t>>;

  Replica& at(int32_t replica);
  const Replica& at(int32_t replica) const;
  int64_t load_tokens(const Replica& r) const;
  int32_t connections(const Replica& r) const;
  int32_t prefix_run(const Replica& r, const std::vector<uint64_t>& hashes) const;
  // The replicas route() may pick for `q`, by index.
  std::vector<int32_t> candidates(const RouteQuery& q) const;
  // Each policy returns nullopt when it does not decide; `over` is the load-guard threshold.
  std::optional<int32_t> by_session(const RouteQuery& q, const std::vector<int32_t>& c, double over) const;
  std::optional<int32_t> by_prefix(const RouteQuery& q, const std::vector<int32_t>& c, double over) const;
  int32_t by_least_loaded(const std::vector<int32_t>& c) const;
  int32_t by_least_connections(const std::vector<int32_t>& c) const;
  int32_t by_round_robin(const std::vector<int32_t>& c) const;
  void pin_session(const std::string& session_id, int32_t replica);
  void drop_sessions(int32_t replica);

  RoutingOptions options_;
  std::vector<Replica> replicas_;
  SessionList session_order_;
  std::unordered_map<std::string, SessionList::iterator> sessions_;
  int32_t last_pick_ = -1;  // round_robin starts after it
};

}  // namespace celer
