// The /metrics exposition: histogram buckets are cumulative, every line is well formed, and the
// replica's figures appear under their names.
#include <catch2/catch.hpp>

#include <regex>
#include <sstream>

#include "runtime/metrics.hpp"

using namespace celer;

namespace {

// The value of the first sample line that starts with `series` followed by a space.
double sample(const std::string& text, const std::string& series) {
  std::istringstream in(text);
  std::string line;
  while (std::getline(in, line))
    if (line.rfind(series + " ", 0) == 0) return std::stod(line.substr(series.size() + 1));
  FAIL("no sample " << series);
  return 0;
}

}  // namespace

TEST_CASE("a histogram counts each observation in its bucket and every bucket above", "[metrics]") {
  Histogram h({0.1, 1, 10});
  for (double v : {0.05, 0.1, 0.5, 5.0, 50.0}) h.observe(v);
  std::string out;
  h.render(out, "x");
  CHECK(sample(out, "x_bucket{le=\"0.1\"}") == 2);  // le is inclusive
  CHECK(sample(out, "x_bucket{le=\"1\"}") == 3);
  CHECK(sample(out, "x_bucket{le=\"10\"}") == 4);
  CHECK(sample(out, "x_bucket{le=\"+Inf\"}") == 5);
  CHECK(sample(out, "x_count") == 5);
  CHECK(sample(out, "x_sum") == Approx(55.65));
}

TEST_CASE("the exposition is valid Prometheus text with the replica's figures", "[metrics]") {
  ServingMetrics m;
  m.request_started();
  m.request_started();
  m.request_ended(RequestOutcome::finished_length);
  m.request_ended(RequestOutcome::error, ErrorKind::rate_limited);
  m.http_response(400);
  m.http_response(200);
  m.http_response(200);
  m.stream_opened();
  m.stream_opened();
  m.stream_closed();
  m.client_disconnected();
  m.observe_ttft(0.2);
  m.observe_itl(0.01);
  m.observe_e2e(1.5);
  m.observe_stages(StageTimes{1, 1'000'000, 1'250'000, 1'750'000, 0, 0, 0});

  const std::string down = m.render(std::nullopt);
  CHECK(sample(down, "celer_replica_up") == 0);
  CHECK(down.find("celer_kv_blocks") == std::string::npos);

  ReplicaStats r;
  r.waiting[0] = 1;
  r.waiting[2] = 4;
  r.running = 7;
  r.kv_blocks_used = 30;
  r.kv_blocks_free = 98;
  r.prefix_queries = 200;
  r.prefix_hits = 50;
  r.response_cache_hits = 3;
  r.shard_restarts = 2;
  r.scheduler_restarts = 1;
  r.cache_restarts = 3;
  const std::string text = m.render(r);
  const std::regex comment(R"(# (HELP|TYPE) celer_[a-z0-9_]+ .+)");
  const std::regex line(R"(celer_[a-z0-9_]+(\{[a-z_]+="[^"]*"\})? -?[0-9.e+-]+)");
  std::istringstream in(text);
  std::string l;
  int samples = 0;
  while (std::getline(in, l)) {
    INFO(l);
    if (l[0] == '#') {
      CHECK(std::regex_match(l, comment));
    } else {
      CHECK(std::regex_match(l, line));
      ++samples;
    }
  }
  CHECK(samples > 60);
  CHECK(sample(text, "celer_requests_total{outcome=\"length\"}") == 1);
  CHECK(sample(text, "celer_requests_total{outcome=\"error\"}") == 1);
  CHECK(sample(text, "celer_request_errors_total{kind=\"rate_limited\"}") == 1);
  CHECK(sample(text, "celer_http_responses_total{code=\"400\"}") == 1);
  CHECK(sample(text, "celer_http_responses_total{code=\"200\"}") == 2);
  CHECK(sample(text, "celer_http_streams_active") == 1);
  CHECK(sample(text, "celer_client_disconnects_total") == 1);
  CHECK(sample(text, "celer_requests_active") == 0);
  CHECK(sample(text, "celer_time_to_first_token_seconds_bucket{le=\"0.25\"}") == 1);
  CHECK(sample(text, "celer_time_to_first_token_seconds_bucket{le=\"0.15\"}") == 0);
  CHECK(sample(text, "celer_queue_wait_seconds_sum") == Approx(0.25));
  CHECK(sample(text, "celer_prefill_seconds_sum") == Approx(0.5));
  CHECK(sample(text, "celer_replica_up") == 1);
  CHECK(sample(text, "celer_queue_depth{priority=\"interactive\"}") == 1);
  CHECK(sample(text, "celer_queue_depth{priority=\"batch\"}") == 4);
  CHECK(sample(text, "celer_running_sequences") == 7);
  CHECK(sample(text, "celer_kv_blocks{state=\"used\"}") == 30);
  CHECK(sample(text, "celer_kv_blocks{state=\"free\"}") == 98);
  CHECK(sample(text, "celer_prefix_cache_hit_ratio") == Approx(0.25));
  CHECK(sample(text, "celer_response_cache_hits_total") == 3);
  CHECK(sample(text, "celer_actor_restarts_total{actor=\"shard\"}") == 2);
  CHECK(sample(text, "celer_actor_restarts_total{actor=\"scheduler\"}") == 1);
  CHECK(sample(text, "celer_actor_restarts_total{actor=\"cache\"}") == 3);
}

TEST_CASE("the client port's guard counters appear when given", "[metrics]") {
  ServingMetrics m;
  CHECK(m.render(std::nullopt).find("celer_transport") == std::string::npos);
  TransportStats t;
  t.accepted = 7;
  t.bad_preamble = 1;
  t.bad_token = 2;
  t.malformed = 3;
  t.oversized = 4;
  t.over_budget = 5;
  t.max_message_bytes = 8 << 20;
  t.max_buffered_bytes = 64 << 20;
  t.buffered_bytes = 1024;
  const std::string text = m.render(std::nullopt, t);
  for (const char* line : {"celer_transport_connections_total 7\n", "celer_transport_refused_total{reason=\"bad_preamble\"} 1\n",
                           "celer_transport_refused_total{reason=\"bad_token\"} 2\n",
                           "celer_transport_refused_total{reason=\"malformed\"} 3\n",
                           "celer_transport_refused_total{reason=\"oversized\"} 4\n",
                           "celer_transport_refused_total{reason=\"over_budget\"} 5\n",
                           "celer_transport_max_message_bytes 8388608\n", "celer_transport_max_buffered_bytes 67108864\n",
                           "celer_transport_buffered_bytes 1024\n"})
    CHECK(text.find(line) != std::string::npos);
  CHECK(text.find("# TYPE celer_transport_refused_total counter") != std::string::npos);
  CHECK(m.active() == 0);
  m.request_started();
  CHECK(m.active() == 1);
}
