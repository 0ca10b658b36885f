// celer bench's pure half: datasets (shapes, determinism, shared prefixes, multi-turn prompts),
// the Poisson arrival schedule, and the metrics math against hand-computed values.
#include "runtime/workload.hpp"

#include <algorithm>
#include <catch2/catch.hpp>
#include <cmath>
#include <limits>
#include <set>

#include "runtime/chaos_plan.hpp"
#include "runtime/error.hpp"

using namespace celer;
using namespace celer::workload;

namespace {

bool in_vocab(const std::vector<TokenId>& t, int32_t vocab) {
  return std::all_of(t.begin(), t.end(), [&](TokenId id) { return id >= kFirstTokenId && id < vocab; });
}

bool starts_with(const std::vector<TokenId>& a, const std::vector<TokenId>& prefix) {
  return a.size() >= prefix.size() && std::equal(prefix.begin(), prefix.end(), a.begin());
}

RequestRecord done(double send, std::vector<double> token_times, double end, int32_t prompt, int32_t cached) {
  RequestRecord r;
  r.ok = true;
  r.send_s = send;
  r.token_times_s = std::move(token_times);
  r.end_s = end;
  r.prompt_tokens = prompt;
  r.completion_tokens = static_cast<int32_t>(r.token_times_s.size());
  r.cached_tokens = cached;
  return r;
}

}  // namespace

TEST_CASE("dataset names round-trip and unknown ones are refused", "[workload]") {
  for (DatasetKind k : {DatasetKind::random, DatasetKind::shared_prefix, DatasetKind::multi_turn})
    CHECK(parse_dataset(to_string(k)) == k);
  CHECK_FALSE(parse_dataset("sharegpt").has_value());
  CHECK_FALSE(parse_dataset("").has_value());
}

TEST_CASE("random dataset: shape, vocabulary range, determinism", "[workload]") {
  DatasetOptions o;
  o.num_prompts = 20;
  o.random_input_len = 33;
  o.random_output_len = 7;
  o.vocab_size = 50;
  o.seed = 42;
  const Dataset d = make_dataset(o);
  REQUIRE(d.jobs.size() == 20);
  CHECK(d.num_requests() == 20);
  std::set<std::vector<TokenId>> distinct;
  std::set<TokenId> seen;
  for (const Job& j : d.jobs) {
    REQUIRE(j.requests.size() == 1);
    const BenchRequest& r = j.requests[0];
    CHECK(r.prompt.size() == 33);
    CHECK(r.output_len == 7);
    CHECK(in_vocab(r.prompt, 50));
    distinct.insert(r.prompt);
    seen.insert(r.prompt.begin(), r.prompt.end());
  }
  CHECK(distinct.size() == 20);
  // 660 draws from 47 ids: every id, both ends of the range included, shows up.
  CHECK(seen.size() == 47);

  const Dataset again = make_dataset(o);
  for (size_t i = 0; i < d.jobs.size(); ++i) CHECK(again.jobs[i].requests[0].prompt == d.jobs[i].requests[0].prompt);
  o.seed = 43;
  const Dataset other = make_dataset(o);
  CHECK(other.jobs[0].requests[0].prompt != d.jobs[0].requests[0].prompt);

  // Another dataset of the same seed does not start with the same tokens (no accidental
  // prefix-cache hits between runs against one server).
  o.seed = 42;
  o.kind = DatasetKind::multi_turn;
  o.turn_input_len = 33;
  const Dataset turns = make_dataset(o);
  CHECK(turns.jobs[0].requests[0].prompt != d.jobs[0].requests[0].prompt);
}

TEST_CASE("shared-prefix dataset: groups share exactly their system prompt", "[workload]") {
  DatasetOptions o;
  o.kind = DatasetKind::shared_prefix;
  o.num_prompts = 12;
  o.prefix_groups = 3;
  o.prefix_len = 40;
  o.suffix_len = 9;
  o.output_len = 5;
  o.vocab_size = 512;
  o.seed = 7;
  const Dataset d = make_dataset(o);
  REQUIRE(d.jobs.size() == 12);
  std::vector<std::vector<TokenId>> prefix(3);
  std::set<std::vector<TokenId>> suffixes;
  for (size_t i = 0; i < d.jobs.size(); ++i) {
    const BenchRequest& r = d.jobs[i].requests[0];
    REQUIRE(r.prompt.size() == 49);
    CHECK(r.output_len == 5);
    CHECK(r.group == static_cast<int32_t>(i % 3));
    CHECK(in_vocab(r.prompt, 512));
    const std::vector<TokenId> p(r.prompt.begin(), r.prompt.begin() + 40);
    auto& g = prefix[static_cast<size_t>(r.group)];
    if (g.empty()) g = p;
    CHECK(p == g);  // within a group: the same first P tokens
    suffixes.insert(std::vector<TokenId>(r.prompt.begin() + 40, r.prompt.end()));
  }
  CHECK(suffixes.size() == 12);  // every request adds its own tokens
  // Across groups the prefixes differ from the very first token (no shared KV block at all).
  CHECK(prefix[0][0] != prefix[1][0]);
  CHECK(prefix[0][0] != prefix[2][0]);
  CHECK(prefix[1][0] != prefix[2][0]);

  SECTION("even with as many groups as usable ids") {
    o.vocab_size = 8;
    o.prefix_groups = 5;
    o.num_prompts = 5;
    const Dataset tiny = make_dataset(o);
    std::set<TokenId> firsts;
    for (const Job& j : tiny.jobs) firsts.insert(j.requests[0].prompt[0]);
    CHECK(firsts.size() == 5);
    o.prefix_groups = 6;
    CHECK_THROWS_AS(make_dataset(o), Error);
  }
}

TEST_CASE("multi-turn dataset: sessions of sequential turns", "[workload]") {
  DatasetOptions o;
  o.kind = DatasetKind::multi_turn;
  o.num_prompts = 1;  // ignored: sessions * turns requests
  o.sessions = 3;
  o.turns = 4;
  o.turn_input_len = 6;
  o.output_len = 3;
  o.vocab_size = 100;
  const Dataset d = make_dataset(o);
  REQUIRE(d.jobs.size() == 3);
  CHECK(d.num_requests() == 12);
  for (size_t s = 0; s < 3; ++s) {
    REQUIRE(d.jobs[s].requests.size() == 4);
    for (size_t t = 0; t < 4; ++t) {
      const BenchRequest& r = d.jobs[s].requests[t];
      CHECK(r.session == static_cast<int32_t>(s));
      CHECK(r.turn == static_cast<int32_t>(t));
      CHECK(r.prompt.size() == 6);
      CHECK(r.output_len == 3);
      CHECK(in_vocab(r.prompt, 100));
    }
  }

  // Turn k's prompt = turn k-1's prompt + its outputs + turn k's user tokens.
  Conversation c;
  std::vector<TokenId> previous;
  for (size_t t = 0; t < 4; ++t) {
    const std::vector<TokenId>& user = d.jobs[1].requests[t].prompt;
    const std::vector<TokenId> prompt = c.next_prompt(user);
    const std::vector<TokenId> output = {static_cast<TokenId>(10 + t), 11, 12};
    if (t == 0) {
      CHECK(prompt == user);
    } else {
      std::vector<TokenId> expected = previous;
      expected.insert(expected.end(), {static_cast<TokenId>(10 + t - 1), 11, 12});
      CHECK(starts_with(prompt, expected));
      CHECK(prompt.size() == expected.size() + 6);
      CHECK(std::equal(user.begin(), user.end(), prompt.end() - 6));
    }
    c.add_turn(prompt, output);
    previous = prompt;
  }
  CHECK(c.history().size() == 4 * 6 + 4 * 3);
}

TEST_CASE("dataset options are validated with the flag's name", "[workload]") {
  auto message = [](DatasetOptions o) {
    try {
      make_dataset(o);
    } catch (const Error& e) {
      CHECK(e.code() == ErrorCode::invalid_argument);
      return std::string(e.what());
    }
    return std::string("no error");
  };
  DatasetOptions o;
  o.num_prompts = 0;
  CHECK_THAT(message(o), Catch::Contains("--num-prompts"));
  o = {};
  o.vocab_size = 3;
  CHECK_THAT(message(o), Catch::Contains("--vocab-size"));
  o = {};
  o.random_output_len = 0;
  CHECK_THAT(message(o), Catch::Contains("--random-output-len"));
  o = {};
  o.kind = DatasetKind::shared_prefix;
  o.prefix_len = 0;
  CHECK_THAT(message(o), Catch::Contains("--prefix-len"));
  o = {};
  o.kind = DatasetKind::multi_turn;
  o.turns = 0;
  CHECK_THAT(message(o), Catch::Contains("--turns"));
  o.turns = 2;
  o.num_prompts = 0;  // not used by multi-turn
  CHECK(message(o) == "no error");
}

TEST_CASE("arrival schedule: Poisson process of the requested rate", "[workload]") {
  const size_t n = 200000;
  const double rate = 8.0;
  const std::vector<double> t = arrival_times(n, rate, 1);
  REQUIRE(t.size() == n);
  CHECK(t[0] == 0);  // the first request goes out at once
  CHECK(std::is_sorted(t.begin(), t.end()));
  // Mean gap 1/R, and exponential: the standard deviation equals the mean.
  std::vector<double> gaps;
  for (size_t i = 1; i < n; ++i) gaps.push_back(t[i] - t[i - 1]);
  double mean = 0, var = 0;
  for (double g : gaps) mean += g;
  mean /= static_cast<double>(gaps.size());
  for (double g : gaps) var += (g - mean) * (g - mean);
  var /= static_cast<double>(gaps.size() - 1);
  CHECK(mean == Approx(1 / rate).epsilon(0.01));
  CHECK(std::sqrt(var) == Approx(1 / rate).epsilon(0.02));
  // P(gap > 1/R) = e^-1.
  const auto longer = std::count_if(gaps.begin(), gaps.end(), [&](double g) { return g > 1 / rate; });
  CHECK(static_cast<double>(longer) / static_cast<double>(gaps.size()) == Approx(std::exp(-1.0)).epsilon(0.01));

  CHECK(arrival_times(100, rate, 1) == std::vector<double>(t.begin(), t.begin() + 100));  // same seed
  CHECK(arrival_times(100, rate, 2) != std::vector<double>(t.begin(), t.begin() + 100));

  const double inf = std::numeric_limits<double>::infinity();
  CHECK(arrival_times(5, inf, 1) == std::vector<double>(5, 0.0));
  CHECK(arrival_times(0, rate, 1).empty());
  CHECK(arrival_times(1, rate, 1) == std::vector<double>{0.0});
  CHECK_THROWS_AS(arrival_times(5, 0.0, 1), Error);
  CHECK_THROWS_AS(arrival_times(5, -1.0, 1), Error);
  CHECK_THROWS_AS(arrival_times(5, std::nan(""), 1), Error);
}

TEST_CASE("percentile interpolates linearly like numpy", "[workload]") {
  const std::vector<double> v = {15, 20, 35, 40, 50};  // order does not matter
  CHECK(percentile(v, 0) == 15);
  CHECK(percentile(v, 100) == 50);
  CHECK(percentile(v, 50) == 35);
  CHECK(percentile(v, 40) == Approx(29));    // rank 1.6: 20 + 0.6 * 15
  CHECK(percentile(v, 90) == Approx(46));    // rank 3.6: 40 + 0.6 * 10
  CHECK(percentile(v, 99) == Approx(49.6));  // rank 3.96
  CHECK(percentile({4, 1, 3, 2}, 50) == Approx(2.5));
  CHECK(percentile({3, 1, 2}, 25) == Approx(1.5));
  CHECK(percentile({7}, 90) == 7);
  CHECK(percentile({}, 50) == 0);

  const Distribution d = distribution_ms({0.004, 0.001, 0.003, 0.002});
  CHECK(d.count == 4);
  CHECK(d.mean == Approx(2.5));
  CHECK(d.p50 == Approx(2.5));
  CHECK(d.p90 == Approx(3.7));   // rank 2.7
  CHECK(d.p99 == Approx(3.97));  // rank 2.97
}

TEST_CASE("summary: latencies, throughput, hit rate, failures, per-turn TTFT", "[workload]") {
  std::vector<RequestRecord> r;
  // Sent at 0: first token at 0.1, a chunk of two at 0.3, one more at 0.4, ended at 0.5.
  r.push_back(done(0.0, {0.1, 0.3, 0.3, 0.4}, 0.5, 100, 0));
  // Sent at 1: a single token at 1.2, ended at 1.25.
  r.push_back(done(1.0, {1.2}, 1.25, 60, 40));
  RequestRecord failed;
  failed.error = "queue_full";
  r.push_back(failed);
  failed.error = "session_aborted";
  r.push_back(failed);
  r.push_back(failed);

  const Summary s = summarize(r, 2.0);
  CHECK(s.completed == 2);
  CHECK(s.failed == 3);
  CHECK(s.failures == std::map<std::string, size_t>{{"queue_full", 1}, {"session_aborted", 2}});
  CHECK(s.prompt_tokens == 160);
  CHECK(s.completion_tokens == 5);
  CHECK(s.cached_tokens == 40);
  CHECK(s.request_throughput == Approx(1.0));
  CHECK(s.output_throughput == Approx(2.5));
  CHECK(s.total_token_throughput == Approx(82.5));
  CHECK(s.prefix_cache_hit_rate == Approx(0.25));
  CHECK(s.ttft.count == 2);
  CHECK(s.ttft.mean == Approx(150));  // 100 and 200 ms
  CHECK(s.ttft.p90 == Approx(190));
  // TPOT only for requests with more than one token: (500 - 100) / 3.
  CHECK(s.tpot.count == 1);
  CHECK(s.tpot.mean == Approx(400.0 / 3));
  // ITL: 200, 0 (the second token of the chunk), 100 ms.
  CHECK(s.itl.count == 3);
  CHECK(s.itl.mean == Approx(100));
  CHECK(s.itl.p50 == Approx(100));
  CHECK(s.itl.p99 == Approx(198));  // rank 1.98 between 100 and 200
  CHECK(s.e2el.mean == Approx(375));
  CHECK(s.mean_ttft_ms_by_turn.empty());
  CHECK(s.good_requests == 0);  // no objectives, no goodput

  SECTION("goodput: the requests that met every objective, per second; the ITL gaps over its objective") {
    // Request 1: TTFT 100 ms, TPOT 133 ms, E2EL 500 ms; request 2: TTFT 200 ms, E2EL 250 ms.
    CHECK(summarize(r, 2.0, parse_goodput({"ttft:150"})).good_requests == 1);
    CHECK(summarize(r, 2.0, parse_goodput({"ttft:250"})).goodput == Approx(1.0));
    CHECK(summarize(r, 2.0, parse_goodput({"ttft:250", "tpot:100"})).good_requests == 1);  // request 2 has no TPOT
    CHECK(summarize(r, 2.0, parse_goodput({"e2el:300"})).good_requests == 1);
    const Summary g = summarize(r, 2.0, parse_goodput({"itl:150"}));
    CHECK(g.itl_over_share == Approx(1.0 / 3));  // the 200 ms gap of 200, 0 and 100 ms
    CHECK(g.good_requests == 2);                 // itl counts gaps, not requests
    CHECK_THROWS_WITH(parse_goodput({"ttft"}), Catch::Contains("KEY:MS"));
    CHECK_THROWS_WITH(parse_goodput({"ttft:-1"}), Catch::Contains("'ttft:-1'"));
    CHECK_THROWS_WITH(parse_goodput({"latency:5"}), Catch::Contains("ttft, tpot, e2el, itl"));
  }

  SECTION("multi-turn: mean TTFT per turn index") {
    std::vector<RequestRecord> turns;
    for (int32_t session = 0; session < 2; ++session)
      for (int32_t t = 0; t < 3; ++t) {
        RequestRecord x = done(0, {0.01 * (t + 1) * (session + 1)}, 0.1, 10, 0);
        x.session = session;
        x.turn = t;
        turns.push_back(x);
      }
    turns.back().ok = false;  // session 1's last turn failed: turn 2's mean is session 0's alone
    turns.back().error = "internal";
    const Summary m = summarize(turns, 1.0);
    REQUIRE(m.mean_ttft_ms_by_turn.size() == 3);
    CHECK(m.mean_ttft_ms_by_turn[0] == Approx(15));
    CHECK(m.mean_ttft_ms_by_turn[1] == Approx(30));
    CHECK(m.mean_ttft_ms_by_turn[2] == Approx(30));
  }

  SECTION("latency by stage from the server's stage times") {
    CHECK(s.stages.empty());  // no request reported stage times
    std::vector<RequestRecord> timed = {done(0.0, {0.1}, 0.5, 10, 0), done(0.0, {0.1}, 0.5, 10, 0)};
    // received 1.000 s, queued +1 ms, admitted +11 ms, prefill done +61 ms, first token +62 ms,
    // last token +362 ms, finished +400 ms (in microseconds since the epoch).
    timed[0].times = StageTimes{1'000'000, 1'001'000, 1'011'000, 1'061'000, 1'062'000, 1'362'000, 1'400'000};
    timed[1].times = timed[0].times;
    timed[1].times.admitted_us += 20'000;  // 20 ms more in the queue, 20 ms less of prefill
    const Summary st = summarize(timed, 1.0);
    REQUIRE(st.stages.size() == 6);
    auto stage = [&](const char* name) {
      for (const auto& [n, d] : st.stages)
        if (n == name) return d;
      FAIL("no stage " << name);
      return Distribution{};
    };
    CHECK(stage("queue").mean == Approx(20));
    CHECK(stage("prefill").mean == Approx(40));
    CHECK(stage("first_token").mean == Approx(1));
    CHECK(stage("decode").mean == Approx(300));
    CHECK(stage("server").mean == Approx(400));
    CHECK(stage("outside").mean == Approx(100));  // 500 ms end to end, 400 on the server
  }

  SECTION("nothing completed") {
    const Summary none = summarize({failed}, 1.0);
    CHECK(none.completed == 0);
    CHECK(none.ttft.mean == 0);
    CHECK(none.prefix_cache_hit_rate == 0);
  }
}

// ---- celer chaos: the plan, and streams held against their reference ----

namespace {

// The error parse_plan gives for a plan, or "no error".
std::string plan_error(const std::string& yaml) {
  try {
    celer::chaos::parse_plan(yaml, "p.yaml");
  } catch (const celer::Error& e) {
    return std::string(e.what());
  }
  return std::string("no error");
}

}  // namespace

TEST_CASE("chaos plan: faults read in order of `at`, each kind's target checked", "[chaos]") {
  const auto plan = celer::chaos::parse_plan(R"(
faults:
  - {kind: sigstop, node: n2, at: 3s, duration: 2s}
  - {kind: kill, role: shard, replica: r2, rank: 1, at: 500ms}
  - {kind: slow, role: shard, replica: r1, at: 1s, duration: 4s, delay: 20ms}
)",
                                             "plan.yaml");
  REQUIRE(plan.size() == 3);
  CHECK(plan[0].at == std::chrono::milliseconds(500));
  CHECK(plan[0].fault.kind == celer::ChaosFault::Kind::kill);
  CHECK(plan[0].fault.rank == 1);
  CHECK(plan[0].target() == "shard r2/1");
  CHECK(plan[1].fault.delay_ms == 20);
  CHECK(plan[1].fault.duration_ms == 4000);
  CHECK(plan[2].target() == "node n2");
  CHECK(plan[2].fault.duration_ms == 2000);

  const auto error_of = plan_error;
  using Catch::Contains;
  CHECK_THAT(error_of("faults: []"), Contains("at least one fault"));
  CHECK_THAT(error_of("fault: []"), Contains("fault: unknown key"));
  CHECK_THAT(error_of("faults: [{kind: explode, at: 1s}]"), Contains("faults[0]: kind: must be kill"));
  CHECK_THAT(error_of("faults: [{kind: kill, role: shard, replica: r1}]"), Contains("at: when to fire it"));
  CHECK_THAT(error_of("faults: [{kind: hang, role: shard, replica: r1, at: 1s}]"), Contains("hang needs duration"));
  CHECK_THAT(error_of("faults: [{kind: slow, role: shard, replica: r1, at: 1s, duration: 1s}]"), Contains("slow needs delay"));
  CHECK_THAT(error_of("faults: [{kind: sigkill, at: 1s}]"), Contains("sigkill needs node"));
  CHECK_THAT(error_of("faults: [{kind: sigkill, node: n1, replica: r1, at: 1s}]"), Contains("give node, not role or replica"));
  CHECK_THAT(error_of("faults: [{kind: kill, replica: r1, at: 1s}]"), Contains("kill needs role"));
  CHECK_THAT(error_of("faults: [{kind: kill, role: cache, replica: r1, at: soon}]"), Contains("at: must be a duration"));
  CHECK_THAT(error_of("faults: [{kind: kill, role: cache, replica: r1, at: 1s, colour: red}]"),
             Contains("faults[0]: colour: unknown key"));
  CHECK_THAT(error_of("faults: [{kind: kill, role: shard, replica: r1, rank: -2, at: 1s}]"), Contains("rank: must be 0 or more"));
  CHECK_THAT(error_of("faults: [\n"), Contains("p.yaml:"));
}

TEST_CASE("chaos plan: the wire-layer faults name a link (node and peer) or a node, with a probability and a duration",
          "[chaos]") {
  const auto plan = celer::chaos::parse_plan(R"(
faults:
  - {kind: drop, node: front, peer: n2, probability: 0.1, at: 1s, duration: 2s}
  - {kind: delay, node: n1, peer: n2, probability: 0.5, delay: 100ms, at: 2s, duration: 1s}
  - {kind: duplicate, node: front, peer: n1, probability: 1, at: 3s, duration: 1s}
  - {kind: corrupt, node: front, peer: n2, probability: 0.01, at: 4s, duration: 1s}
  - {kind: partition, node: n2, at: 5s, duration: 4s}
)",
                                             "plan.yaml");
  REQUIRE(plan.size() == 5);
  CHECK(plan[0].fault.kind == celer::ChaosFault::Kind::drop);
  CHECK(plan[0].fault.probability == 0.1);
  CHECK(plan[0].fault.on_link());
  CHECK(plan[0].target() == "link front-n2");
  CHECK(plan[1].fault.delay_ms == 100);
  CHECK(plan[2].fault.kind == celer::ChaosFault::Kind::duplicate);
  CHECK(plan[3].fault.kind == celer::ChaosFault::Kind::corrupt);
  CHECK(plan[4].fault.kind == celer::ChaosFault::Kind::partition);
  CHECK(plan[4].fault.on_wire());
  CHECK_FALSE(plan[4].fault.on_link());
  CHECK(plan[4].target() == "node n2");
  CHECK(plan[4].fault.duration_ms == 4000);

  const auto error_of = plan_error;
  using Catch::Contains;
  CHECK_THAT(error_of("faults: [{kind: drop, node: a, probability: 0.1, at: 1s, duration: 1s}]"), Contains("give node and peer"));
  CHECK_THAT(error_of("faults: [{kind: drop, node: a, peer: a, probability: 0.1, at: 1s, duration: 1s}]"),
             Contains("a link joins two nodes"));
  CHECK_THAT(error_of("faults: [{kind: drop, node: a, peer: b, at: 1s, duration: 1s}]"), Contains("drop needs probability"));
  CHECK_THAT(error_of("faults: [{kind: drop, node: a, peer: b, probability: 0, at: 1s, duration: 1s}]"),
             Contains("probability: must be in (0, 1]"));
  CHECK_THAT(error_of("faults: [{kind: drop, node: a, peer: b, probability: often, at: 1s, duration: 1s}]"),
             Contains("probability: must be a number"));
  CHECK_THAT(error_of("faults: [{kind: corrupt, node: a, peer: b, probability: 0.5, at: 1s}]"), Contains("corrupt needs duration"));
  CHECK_THAT(error_of("faults: [{kind: delay, node: a, peer: b, probability: 0.5, at: 1s, duration: 1s}]"),
             Contains("delay needs delay"));
  CHECK_THAT(error_of("faults: [{kind: partition, node: a, at: 1s}]"), Contains("partition needs duration"));
  CHECK_THAT(error_of("faults: [{kind: partition, node: a, peer: b, at: 1s, duration: 1s}]"), Contains("takes no peer or probability"));
  CHECK_THAT(error_of("faults: [{kind: kill, role: shard, replica: r1, probability: 0.5, at: 1s}]"),
             Contains("takes no peer or probability"));
}

TEST_CASE("chaos: a stream's repeats, skips and changed tokens against its reference", "[chaos]") {
  celer::chaos::StreamTrace t;
  t.add(0, {5, 6, 7});
  t.add(2, {7, 8});  // index 2 again (a resume that re-sent it), then 3
  t.add(5, {10});    // index 4 never came
  CHECK(t.duplicated == 1);
  CHECK(t.skipped == 1);
  CHECK(t.tokens == std::vector<celer::TokenId>{5, 6, 7, 8, -1, 10});
  const auto c = celer::chaos::check_tokens(t, {5, 6, 7, 8, 9, 10});
  CHECK(c.missing == 1);     // index 4
  CHECK(c.duplicated == 1);  // the repeat
  const auto longer = celer::chaos::check_tokens(t, {5, 6, 7});
  CHECK(longer.missing == 0);
  CHECK(longer.duplicated == 1 + 3);  // past the reference's end
  const auto changed = celer::chaos::check_tokens(t, {5, 9, 7, 8, 9, 10, 11});
  CHECK(changed.missing == 3);  // index 1 differs, 4 never came, 6 never sent
  celer::chaos::StreamTrace clean;
  clean.add(0, {1, 2});
  clean.add(2, {3});
  CHECK(celer::chaos::check_tokens(clean, {1, 2, 3}).missing == 0);
  CHECK(celer::chaos::check_tokens(clean, {1, 2, 3}).duplicated == 0);
}
