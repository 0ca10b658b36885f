// The router's policy core (cluster/routing.hpp) without actors: which replica each request goes
// to under every policy, with replicas going down, draining, excluded and overloaded.
#include "cluster/routing.hpp"

#include <catch2/catch.hpp>
#include <map>

#include "runtime/error.hpp"
#include "runtime/kv_block_manager.hpp"

using namespace celer;

namespace {

constexpr RoutePolicy kAllPolicies[] = {RoutePolicy::session, RoutePolicy::prefix, RoutePolicy::least_loaded,
                                        RoutePolicy::least_connections, RoutePolicy::round_robin};

// A prompt of `shared_blocks` full blocks common to its group, then `own_blocks` of its own.
std::vector<TokenId> prompt(int group, int shared_blocks, int request = 0, int own_blocks = 0) {
  std::vector<TokenId> t;
  for (int i = 0; i < shared_blocks * kKvBlock; ++i) t.push_back(3 + (group * 131 + i * 7) % 1000);
  for (int i = 0; i < own_blocks * kKvBlock; ++i) t.push_back(3 + (request * 977 + i * 13) % 1000);
  return t;
}

RouteQuery query(const std::vector<TokenId>& tokens, std::string session = "") {
  RouteQuery q;
  q.session_id = std::move(session);
  q.prompt_tokens = static_cast<int32_t>(tokens.size());
  q.max_tokens = 32;
  q.block_hashes = prefix_block_hashes(tokens);
  return q;
}

RouteQuery plain_query(int32_t prompt_tokens = 64, int32_t max_tokens = 36) {
  RouteQuery q;
  q.prompt_tokens = prompt_tokens;
  q.max_tokens = max_tokens;
  return q;
}

ReplicaReport load(int64_t outstanding_tokens, int32_t waiting = 0, int32_t running = 0) {
  ReplicaReport r;
  r.outstanding_tokens = outstanding_tokens;
  r.waiting = waiting;
  r.running = running;
  return r;
}

ReplicaReport cache(std::vector<uint64_t> blocks, int64_t outstanding_tokens = 0) {
  ReplicaReport r = load(outstanding_tokens);
  r.blocks_changed = true;
  r.cached_blocks = std::move(blocks);
  return r;
}

// A table of `n` replicas named r0, r1, ..., all up.
ReplicaTable table(int n, RoutingOptions options = {}) {
  ReplicaTable t(std::move(options));
  for (int i = 0; i < n; ++i) t.set_up(t.add(std::string("r").append(std::to_string(i))), true);
  return t;
}

RoutingOptions chain(std::vector<RoutePolicy> policies) {
  RoutingOptions o;
  o.chain = std::move(policies);
  return o;
}

int32_t pick(ReplicaTable& t, const RouteQuery& q) {
  const std::optional<RouteDecision> d = t.route(q);
  REQUIRE(d);
  return d->replica;
}

}  // namespace

TEST_CASE("policy names round-trip", "[routing]") {
  for (RoutePolicy p : kAllPolicies) CHECK(route_policy_from_string(to_string(p)) == p);
  CHECK(std::string(to_string(RoutePolicy::least_loaded)) == "least-loaded");
  CHECK(std::string(to_string(RoutePolicy::least_connections)) == "least-connections");
  CHECK(std::string(to_string(RoutePolicy::round_robin)) == "round-robin");
  CHECK_FALSE(route_policy_from_string("least_loaded"));
  CHECK_FALSE(route_policy_from_string("default"));
  CHECK_FALSE(route_policy_from_string(""));
}

TEST_CASE("no replica that can take the request: nullopt", "[routing]") {
  ReplicaTable empty{RoutingOptions{}};
  CHECK_FALSE(empty.route(plain_query()));

  ReplicaTable t{RoutingOptions{}};
  t.add("a");
  t.add("b");
  CHECK_FALSE(t.route(plain_query()));  // replicas start down
  t.set_up(0, true);
  CHECK(pick(t, plain_query()) == 0);

  RouteQuery excluded = plain_query();
  excluded.exclude = {"a"};
  CHECK_FALSE(t.route(excluded));  // b is down, a excluded

  ReplicaReport draining = load(0);
  draining.draining = true;
  t.report(0, draining);
  CHECK(t.draining(0));
  CHECK_FALSE(t.route(plain_query()));
  CHECK(t.figures(0).routed == 1);  // the refusals recorded nothing
}

TEST_CASE("round-robin alternates over the up replicas and skips a down one", "[routing]") {
  ReplicaTable t = table(3, chain({RoutePolicy::round_robin}));
  std::vector<int32_t> picks;
  for (int i = 0; i < 6; ++i) picks.push_back(pick(t, plain_query()));
  CHECK(picks == std::vector<int32_t>{0, 1, 2, 0, 1, 2});

  t.set_up(1, false);
  picks.clear();
  for (int i = 0; i < 4; ++i) picks.push_back(pick(t, plain_query()));
  CHECK(picks == std::vector<int32_t>{0, 2, 0, 2});

  t.set_up(1, true);
  picks.clear();
  for (int i = 0; i < 3; ++i) picks.push_back(pick(t, plain_query()));
  CHECK(picks == std::vector<int32_t>{0, 1, 2});  // after r2, the last picked: r1 is back in turn
  CHECK(t.figures(0).routed_by[static_cast<size_t>(RoutePolicy::round_robin)] == 5);
}

TEST_CASE("a down replica receives nothing under every policy", "[routing]") {
  const std::vector<TokenId> tokens = prompt(1, 4);
  std::vector<std::vector<RoutePolicy>> chains;
  for (RoutePolicy p : kAllPolicies) chains.push_back({p});
  chains.push_back(RoutingOptions{}.chain);
  for (const auto& c : chains) {
    INFO("chain starting with " << to_string(c.front()) << ", " << c.size() << " long");
    ReplicaTable t = table(3, chain(c));
    // r1 is the most attractive replica in every way: idle, caching the prompt, the session's.
    t.report(0, load(500, 4, 4));
    t.report(1, cache(prefix_block_hashes(tokens)));
    t.report(2, load(500, 4, 4));
    RouteQuery q = query(tokens, "s");
    for (int i = 0; i < 3 && t.session_replica("s") != 1; ++i) pick(t, q);  // round-robin: in turn
    REQUIRE(t.session_replica("s") == 1);
    t.set_up(1, false);
    CHECK_FALSE(t.session_replica("s"));
    CHECK(t.figures(1).sessions == 0);
    for (int i = 0; i < 50; ++i)
      CHECK(pick(t, i % 2 ? q : query(prompt(2, 2, i, 1), std::string("s").append(std::to_string(i)))) != 1);
  }
}

TEST_CASE("prefix: the requests of a shared-prefix group land on the replica caching it", "[routing]") {
  ReplicaTable t = table(3, chain({RoutePolicy::prefix, RoutePolicy::least_loaded}));
  // Replicas under steady load, so that these few requests do not trip the load guard.
  t.report(0, load(1000));
  t.report(1, cache(prefix_block_hashes(prompt(1, 8)), 1000));
  t.report(2, cache(prefix_block_hashes(prompt(2, 8)), 1000));
  for (int i = 0; i < 10; ++i) {
    const std::optional<RouteDecision> d1 = t.route(query(prompt(1, 8, i, 2)));
    REQUIRE(d1);
    CHECK(d1->replica == 1);
    CHECK(d1->by == RoutePolicy::prefix);
    CHECK(d1->prefix_blocks == 8);
    const std::optional<RouteDecision> d2 = t.route(query(prompt(2, 8, i, 2)));
    REQUIRE(d2);
    CHECK(d2->replica == 2);
    CHECK(d2->prefix_blocks == 8);
  }
  // A prompt no replica caches falls through to least-loaded: r0 carries no estimate yet.
  const std::optional<RouteDecision> d = t.route(query(prompt(3, 8)));
  REQUIRE(d);
  CHECK(d->replica == 0);
  CHECK(d->by == RoutePolicy::least_loaded);
  CHECK(d->prefix_blocks == 0);
}

TEST_CASE("prefix: the longest leading match wins, ties go to the lower load", "[routing]") {
  const std::vector<uint64_t> h = prefix_block_hashes(prompt(1, 4));
  REQUIRE(h.size() == 4);
  ReplicaTable t = table(4, chain({RoutePolicy::prefix}));
  t.report(0, cache({h[0], h[1]}, 0));
  t.report(1, cache({h[0], h[1], h[2], h[3]}, 300));  // busier but holds the most
  t.report(2, cache({h[0], h[2], h[3]}, 0));          // a gap: only one leading block counts
  t.report(3, cache({h[3], h[2], h[1], h[0]}, 400));  // order of the report does not matter
  RouteQuery q = query(prompt(1, 4));
  q.max_tokens = 500;  // a large request, so the guard leaves r3 a candidate
  const std::optional<RouteDecision> d = t.route(q);
  REQUIRE(d);
  CHECK(d->replica == 1);  // r1 and r3 match 4; r1 is less loaded
  CHECK(d->prefix_blocks == 4);

  // Without r1 and r3: r0 matches 2, r2 only 1.
  RouteQuery q2 = query(prompt(1, 4));
  q2.exclude = {"r1", "r3"};
  const std::optional<RouteDecision> d2 = t.route(q2);
  REQUIRE(d2);
  CHECK(d2->replica == 0);
  CHECK(d2->prefix_blocks == 2);

  // A prompt that diverges after two blocks matches two on r1 as on r0: the lower load wins.
  std::vector<TokenId> diverging = prompt(1, 2);
  const std::vector<TokenId> tail = prompt(9, 2);
  diverging.insert(diverging.end(), tail.begin(), tail.end());
  t.report(0, cache({h[0], h[1]}, 200));
  RouteQuery q3 = query(diverging);
  q3.exclude = {"r2", "r3"};
  const std::optional<RouteDecision> d3 = t.route(q3);
  REQUIRE(d3);
  CHECK(d3->replica == 0);  // 200 (r0) < 300 + r1's estimate
  CHECK(d3->prefix_blocks == 2);
}

TEST_CASE("prefix: fewer matching blocks than min_prefix_blocks does not decide", "[routing]") {
  RoutingOptions o;
  o.min_prefix_blocks = 3;
  ReplicaTable t = table(2, o);
  const std::vector<uint64_t> h = prefix_block_hashes(prompt(1, 4));
  t.report(0, load(10));
  t.report(1, cache({h[0], h[1]}, 20));
  std::optional<RouteDecision> d = t.route(query(prompt(1, 4)));
  REQUIRE(d);
  CHECK(d->replica == 0);
  CHECK(d->by == RoutePolicy::least_loaded);

  t.report(1, cache({h[0], h[1], h[2]}, 20));
  d = t.route(query(prompt(1, 4)));
  REQUIRE(d);
  CHECK(d->replica == 1);
  CHECK(d->by == RoutePolicy::prefix);
  CHECK(d->prefix_blocks == 3);
}

TEST_CASE("prefix: the load guard moves a hot prefix off an overloaded replica", "[routing]") {
  const std::vector<TokenId> hot = prompt(1, 4);
  ReplicaTable t = table(2);
  t.report(0, cache(prefix_block_hashes(hot), 10000));
  t.report(1, load(100));
  std::optional<RouteDecision> d = t.route(query(hot));
  REQUIRE(d);
  CHECK(d->replica == 1);
  CHECK(d->by == RoutePolicy::least_loaded);

  // Within the guard the cache wins despite the higher load.
  t.report(0, cache(prefix_block_hashes(hot), 300));
  t.report(1, load(100));
  d = t.route(query(hot));
  REQUIRE(d);
  CHECK(d->replica == 0);
  CHECK(d->by == RoutePolicy::prefix);

  // A burst of the hot prefix between reports: the estimate trips the guard and the overflow
  // spills over, the cache still taking most.
  t.report(0, cache(prefix_block_hashes(hot), 0));
  t.report(1, load(0));
  std::map<int32_t, int> counts;
  for (int i = 0; i < 20; ++i) ++counts[pick(t, query(hot))];
  CHECK(counts[0] > counts[1]);
  CHECK(counts[1] >= 4);
}

TEST_CASE("session: sticks, falls through when its replica goes down, and re-pins", "[routing]") {
  ReplicaTable t = table(2);
  std::optional<RouteDecision> d = t.route(plain_query());
  REQUIRE(d);
  const int32_t first = d->replica;  // the session's first request goes to the least loaded
  d = t.route(query(prompt(1, 1), "chat"));
  REQUIRE(d);
  const int32_t home = d->replica;
  CHECK(home != first);
  CHECK(t.session_replica("chat") == home);
  CHECK(t.figures(home).sessions == 1);

  // More loaded than the other (within the guard): the session still goes home.
  t.report(home, load(400));
  t.report(1 - home, load(100));
  for (int i = 0; i < 3; ++i) {
    d = t.route(query(prompt(1, 2), "chat"));
    REQUIRE(d);
    CHECK(d->replica == home);
    CHECK(d->by == RoutePolicy::session);
  }

  // Home goes down: the next turn falls through and the session is pinned where it went.
  t.set_up(home, false);
  d = t.route(query(prompt(1, 3), "chat"));
  REQUIRE(d);
  CHECK(d->replica == 1 - home);
  CHECK(d->by != RoutePolicy::session);
  CHECK(t.session_replica("chat") == 1 - home);
  t.set_up(home, true);
  t.report(home, load(0));
  d = t.route(query(prompt(1, 4), "chat"));
  REQUIRE(d);
  CHECK(d->replica == 1 - home);  // the new home, though the old one is idle now
  CHECK(d->by == RoutePolicy::session);

  // Draining or overloaded home: falls through too.
  ReplicaReport draining = load(0);
  draining.draining = true;
  t.report(1 - home, draining);
  d = t.route(query(prompt(1, 4), "chat"));
  REQUIRE(d);
  CHECK(d->replica == home);
  t.report(1 - home, load(0));
  t.report(home, load(100000));
  d = t.route(query(prompt(1, 4), "chat"));
  REQUIRE(d);
  CHECK(d->replica == 1 - home);
  CHECK(d->by == RoutePolicy::least_loaded);
}

TEST_CASE("session: the map is bounded, the least recently routed session forgotten", "[routing]") {
  RoutingOptions o;
  o.max_sessions = 2;
  ReplicaTable t = table(2, o);
  pick(t, query(prompt(1, 1), "s1"));
  pick(t, query(prompt(1, 1), "s2"));
  pick(t, query(prompt(1, 1), "s1"));  // s1 is now the more recent
  pick(t, query(prompt(1, 1), "s3"));
  CHECK(t.sessions() == 2);
  CHECK(t.session_replica("s1"));
  CHECK_FALSE(t.session_replica("s2"));
  CHECK(t.session_replica("s3"));
  CHECK(t.figures(0).sessions + t.figures(1).sessions == 2);
}

TEST_CASE("least-connections and least-loaded pick the right replica", "[routing]") {
  SECTION("least-connections") {
    ReplicaTable t = table(4, chain({RoutePolicy::least_connections}));
    t.report(0, load(0, 3, 2));     // 5 requests
    t.report(1, load(9000, 1, 1));  // 2: the tokens do not matter
    t.report(2, load(0, 2, 0));     // 2
    t.report(3, load(0, 0, 0));
    t.set_up(3, false);                  // idle but down
    CHECK(pick(t, plain_query()) == 1);  // tie with r2: the lower index
    CHECK(pick(t, plain_query()) == 2);  // r1 holds 3 now
    CHECK(pick(t, plain_query()) == 1);
    CHECK(t.figures(1).connections == 4);
  }
  SECTION("least-loaded") {
    ReplicaTable t = table(3, chain({RoutePolicy::least_loaded}));
    t.report(0, load(500));
    t.report(1, load(100, 50, 50));  // many requests, few tokens
    t.report(2, load(300));
    CHECK(pick(t, plain_query(100, 50)) == 1);  // r1: 250 now
    CHECK(pick(t, plain_query(100, 50)) == 1);  // 250 < 300
    CHECK(pick(t, plain_query(100, 50)) == 2);  // 400 > 300
    CHECK(t.figures(1).load_tokens == 400);
    CHECK(t.figures(1).tokens_since_report == 300);
    // The next report replaces the estimate.
    t.report(1, load(50));
    CHECK(t.figures(1).load_tokens == 50);
    CHECK(t.figures(1).requests_since_report == 0);
  }
}

TEST_CASE("the between-report estimate spreads a burst over idle replicas", "[routing]") {
  for (const auto& c : {RoutingOptions{}.chain, std::vector<RoutePolicy>{RoutePolicy::least_loaded},
                        std::vector<RoutePolicy>{RoutePolicy::least_connections}}) {
    INFO("chain starting with " << to_string(c.front()));
    ReplicaTable t = table(2, chain(c));
    t.report(0, load(0));
    t.report(1, load(0));
    std::map<int32_t, int> counts;
    for (int i = 0; i < 10; ++i) ++counts[pick(t, plain_query())];
    CHECK(counts[0] == 5);
    CHECK(counts[1] == 5);
  }
}

TEST_CASE("finished lowers the estimate before the next report", "[routing]") {
  ReplicaTable t = table(2);
  CHECK(pick(t, plain_query(64, 36)) == 0);
  t.finished(0, 100);
  CHECK(t.figures(0).load_tokens == 0);
  CHECK(t.figures(0).connections == 0);
  CHECK(pick(t, plain_query(64, 36)) == 0);  // idle again: the lower index
  // A request the report already counted may finish too: the load never goes below zero.
  t.report(0, load(100, 0, 1));
  t.finished(0, 100);
  t.finished(0, 100);
  CHECK(t.figures(0).load_tokens == 0);
  CHECK(t.figures(0).connections == 0);
}

TEST_CASE("excluded replicas are never picked", "[routing]") {
  for (RoutePolicy p : kAllPolicies) {
    INFO(to_string(p));
    ReplicaTable t = table(3, chain({p}));
    const std::vector<TokenId> tokens = prompt(1, 2);
    t.report(0, cache(prefix_block_hashes(tokens)));  // r0 the best by every measure
    t.report(1, load(50, 1, 1));
    t.report(2, load(50, 1, 1));
    pick(t, query(tokens, "s"));  // pin s (to r0, except under round-robin: any)
    RouteQuery q = query(tokens, "s");
    q.exclude = {"r0", "nonexistent"};
    for (int i = 0; i < 10; ++i) CHECK(pick(t, q) != 0);
    q.exclude = {"r0", "r1", "r2"};
    CHECK_FALSE(t.route(q));
  }
}

TEST_CASE("a report without its block set keeps the old one", "[routing]") {
  ReplicaTable t = table(1);
  const std::vector<uint64_t> h = prefix_block_hashes(prompt(1, 3));
  t.report(0, cache(h));
  CHECK(t.figures(0).cached_blocks == 3);
  ReplicaReport r = load(10);
  r.cached_blocks = {1, 2};  // ignored: blocks_changed is false
  t.report(0, r);
  CHECK(t.figures(0).cached_blocks == 3);
  CHECK(t.figures(0).report.outstanding_tokens == 10);
  t.set_cached_blocks(0, {h[0], h[0]});
  CHECK(t.figures(0).cached_blocks == 1);
  CHECK_THROWS_AS(t.report(1, r), Error);
}
