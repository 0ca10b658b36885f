#include "runtime/metrics.hpp"

#include <cinttypes>
#include <cstdio>

namespace celer {
namespace {

// Latency buckets in seconds: 1 ms to 1 minute, roughly x2.5 apart (the range from an ITL on a
// GPU to a long prompt's TTFT on a CPU).
std::vector<double> latency_buckets() {
  return {0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 0.75, 1, 2.5, 5, 10, 30, 60};
}

void append(std::string& out, const char* fmt, auto... args) {
  char line[256];
  const int n = std::snprintf(line, sizeof line, fmt, args...);
  if (n > 0) out.append(line, std::min<size_t>(static_cast<size_t>(n), sizeof line - 1));
}

void header(std::string& out, const char* name, const char* type, const char* help) {
  append(out, "# HELP %s %s\n# TYPE %s %s\n", name, help, name, type);
}

// A counter of two outcomes, e.g. all steps and those over the objective.
void counter_by_outcome(std::string& out, const char* name, const char* help, const char* first, uint64_t a,
                        const char* second, uint64_t b) {
  header(out, name, "counter", help);
  append(out, "%s{outcome=\"%s\"} %" PRIu64 "\n%s{outcome=\"%s\"} %" PRIu64 "\n", name, first, a, name, second, b);
}

const char* outcome_label(int i) {
  static constexpr const char* kLabels[] = {"stop", "length", "cancelled", "error"};
  return kLabels[i];
}

}  // namespace

Histogram::Histogram(std::vector<double> upper_bounds)
    : bounds_(std::move(upper_bounds)), counts_(bounds_.size() + 1, 0) {}

void Histogram::observe(double value) {
  size_t i = 0;
  while (i < bounds_.size() && value > bounds_[i]) ++i;
  ++counts_[i];
  ++count_;
  sum_ += value;
}

void Histogram::render(std::string& out, const std::string& name) const {
  uint64_t cumulative = 0;
  for (size_t i = 0; i < bounds_.size(); ++i) {
    cumulative += counts_[i];
    append(out, "%s_bucket{le=\"%g\"} %" PRIu64 "\n", name.c_str(), bounds_[i], cumulative);
  }
  append(out, "%s_bucket{le=\"+Inf\"} %" PRIu64 "\n", name.c_str(), count_);
  append(out, "%s_sum %.6f\n%s_count %" PRIu64 "\n", name.c_str(), sum_, name.c_str(), count_);
}

ServingMetrics::ServingMetrics()
    : ttft_(latency_buckets()),
      itl_(latency_buckets()),
      e2e_(latency_buckets()),
      queue_wait_(latency_buckets()),
      prefill_(latency_buckets()) {}

void ServingMetrics::request_started() {
  std::lock_guard lock(mu_);
  ++active_;
}

void ServingMetrics::request_ended(RequestOutcome outcome, std::optional<ErrorKind> error) {
  std::lock_guard lock(mu_);
  if (active_ > 0) --active_;
  ++outcomes_[static_cast<size_t>(outcome)];
  if (error) ++errors_[*error];
}

void ServingMetrics::http_response(int status) {
  std::lock_guard lock(mu_);
  ++http_responses_[status];
}

void ServingMetrics::stream_opened() {
  std::lock_guard lock(mu_);
  ++streams_;
}

void ServingMetrics::stream_closed() {
  std::lock_guard lock(mu_);
  if (streams_ > 0) --streams_;
}

void ServingMetrics::client_disconnected() {
  std::lock_guard lock(mu_);
  ++disconnects_;
}

void ServingMetrics::observe_ttft(double seconds) {
  std::lock_guard lock(mu_);
  ttft_.observe(seconds);
}

void ServingMetrics::observe_itl(double seconds) {
  std::lock_guard lock(mu_);
  itl_.observe(seconds);
}

void ServingMetrics::observe_e2e(double seconds) {
  std::lock_guard lock(mu_);
  e2e_.observe(seconds);
}

void ServingMetrics::observe_stages(const StageTimes& t) {
  std::lock_guard lock(mu_);
  if (t.queued_us > 0 && t.admitted_us >= t.queued_us) queue_wait_.observe((t.admitted_us - t.queued_us) * 1e-6);
  if (t.admitted_us > 0 && t.prefill_done_us >= t.admitted_us) prefill_.observe((t.prefill_done_us - t.admitted_us) * 1e-6);
}

uint64_t ServingMetrics::active() const {
  std::lock_guard lock(mu_);
  return active_;
}

std::string ServingMetrics::render(const std::optional<ReplicaStats>& replica,
                                  const std::optional<TransportStats>& transport) const {
  std::string out;
  out.reserve(8192);
  {
    std::lock_guard lock(mu_);
    header(out, "celer_requests_total", "counter", "Requests that ended, by outcome (finish reason, or error).");
    for (int i = 0; i < 4; ++i) append(out, "celer_requests_total{outcome=\"%s\"} %" PRIu64 "\n", outcome_label(i), outcomes_[i]);
    header(out, "celer_request_errors_total", "counter", "Requests that ended with an error, by kind.");
    for (const auto& [kind, n] : errors_) append(out, "celer_request_errors_total{kind=\"%s\"} %" PRIu64 "\n", to_string(kind), n);
    header(out, "celer_http_responses_total", "counter", "HTTP responses by status code (a stream counts as its 200).");
    for (const auto& [status, n] : http_responses_) append(out, "celer_http_responses_total{code=\"%d\"} %" PRIu64 "\n", status, n);
    header(out, "celer_http_streams_active", "gauge", "SSE streams open now.");
    append(out, "celer_http_streams_active %" PRIu64 "\n", streams_);
    header(out, "celer_client_disconnects_total", "counter", "Requests cancelled because their client left before the end.");
    append(out, "celer_client_disconnects_total %" PRIu64 "\n", disconnects_);
    header(out, "celer_requests_active", "gauge", "Requests being served now.");
    append(out, "celer_requests_active %" PRIu64 "\n", active_);
    header(out, "celer_time_to_first_token_seconds", "histogram", "Time from receiving a request to sending its first token.");
    ttft_.render(out, "celer_time_to_first_token_seconds");
    header(out, "celer_inter_token_latency_seconds", "histogram", "Time between consecutive tokens sent to a client.");
    itl_.render(out, "celer_inter_token_latency_seconds");
    header(out, "celer_e2e_request_latency_seconds", "histogram", "Time from receiving a request to its end.");
    e2e_.render(out, "celer_e2e_request_latency_seconds");
    header(out, "celer_queue_wait_seconds", "histogram", "Time a request waited in the scheduler's queue before it first ran.");
    queue_wait_.render(out, "celer_queue_wait_seconds");
    header(out, "celer_prefill_seconds", "histogram", "Time from first running to the end of the prompt's prefill.");
    prefill_.render(out, "celer_prefill_seconds");
  }
  if (transport) {
    const TransportStats& t = *transport;
    header(out, "celer_transport_connections_total", "counter",
           "Client-port connections that presented a valid preamble (token and version).");
    append(out, "celer_transport_connections_total %" PRIu64 "\n", t.accepted);
    header(out, "celer_transport_refused_total", "counter",
           "Client-port connections closed by the transport guard, by reason.");
    append(out, "celer_transport_refused_total{reason=\"bad_preamble\"} %" PRIu64 "\n", t.bad_preamble);
    append(out, "celer_transport_refused_total{reason=\"bad_token\"} %" PRIu64 "\n", t.bad_token);
    append(out, "celer_transport_refused_total{reason=\"malformed\"} %" PRIu64 "\n", t.malformed);
    append(out, "celer_transport_refused_total{reason=\"oversized\"} %" PRIu64 "\n", t.oversized);
    append(out, "celer_transport_refused_total{reason=\"over_budget\"} %" PRIu64 "\n", t.over_budget);
    append(out, "celer_transport_refused_total{reason=\"tls\"} %" PRIu64 "\n", t.tls_refused);
    header(out, "celer_messages_refused_total", "counter",
           "Messages this process refused to read: malformed, corrupted on their way, or out of range.");
    append(out, "celer_messages_refused_total %" PRIu64 "\n", t.refused_messages);
    header(out, "celer_transport_chaos_frames_total", "counter",
           "Frames received that a wire-layer fault (celer chaos) dropped, delayed, duplicated or corrupted.");
    append(out, "celer_transport_chaos_frames_total{action=\"dropped\"} %" PRIu64 "\n", t.chaos_dropped);
    append(out, "celer_transport_chaos_frames_total{action=\"delayed\"} %" PRIu64 "\n", t.chaos_delayed);
    append(out, "celer_transport_chaos_frames_total{action=\"duplicated\"} %" PRIu64 "\n", t.chaos_duplicated);
    append(out, "celer_transport_chaos_frames_total{action=\"corrupted\"} %" PRIu64 "\n", t.chaos_corrupted);
    header(out, "celer_transport_tls", "gauge", "1 when the port speaks mutual TLS.");
    append(out, "celer_transport_tls %d\n", t.tls ? 1 : 0);
    header(out, "celer_transport_buffered_bytes", "gauge", "Bytes held now for large messages being received.");
    append(out, "celer_transport_buffered_bytes %" PRIu64 "\n", t.buffered_bytes);
    header(out, "celer_transport_max_message_bytes", "gauge", "The largest message a connection may send.");
    append(out, "celer_transport_max_message_bytes %" PRIu64 "\n", t.max_message_bytes);
    header(out, "celer_transport_max_buffered_bytes", "gauge", "The bound on bytes held for large messages at once.");
    append(out, "celer_transport_max_buffered_bytes %" PRIu64 "\n", t.max_buffered_bytes);
  }
  header(out, "celer_replica_up", "gauge", "1 when the replica answered this scrape.");
  append(out, "celer_replica_up %d\n", replica ? 1 : 0);
  if (!replica) return out;
  const ReplicaStats& r = *replica;
  header(out, "celer_queue_depth", "gauge", "Requests waiting in the scheduler's queue, by priority class.");
  static constexpr const char* kClasses[] = {"interactive", "normal", "batch"};
  for (int c = 0; c < kPriorityClasses; ++c) append(out, "celer_queue_depth{priority=\"%s\"} %d\n", kClasses[c], r.waiting[c]);
  header(out, "celer_running_sequences", "gauge", "Sequences in the running batch.");
  append(out, "celer_running_sequences %d\n", r.running);
  header(out, "celer_kv_blocks", "gauge", "KV-cache blocks by state (used: held by sequences; free: unheld, cached prefixes included).");
  append(out, "celer_kv_blocks{state=\"used\"} %d\nceler_kv_blocks{state=\"free\"} %d\n", r.kv_blocks_used, r.kv_blocks_free);
  header(out, "celer_prefix_cache_queried_tokens_total", "counter", "Prompt tokens looked up in the prefix cache.");
  append(out, "celer_prefix_cache_queried_tokens_total %" PRIu64 "\n", r.prefix_queries);
  header(out, "celer_prefix_cache_hit_tokens_total", "counter", "Prompt tokens served from the prefix cache.");
  append(out, "celer_prefix_cache_hit_tokens_total %" PRIu64 "\n", r.prefix_hits);
  header(out, "celer_prefix_cache_hit_ratio", "gauge", "Share of looked-up prompt tokens served from the prefix cache.");
  append(out, "celer_prefix_cache_hit_ratio %.6f\n", r.prefix_queries ? static_cast<double>(r.prefix_hits) / r.prefix_queries : 0.0);
  header(out, "celer_response_cache_hits_total", "counter", "Requests answered from the response cache.");
  append(out, "celer_response_cache_hits_total %" PRIu64 "\n", r.response_cache_hits);
  header(out, "celer_preemptions_total", "counter", "Sequences preempted (recomputed later) to free KV blocks.");
  append(out, "celer_preemptions_total %" PRIu64 "\n", r.preemptions);
  header(out, "celer_malformed_messages_total", "counter", "Malformed messages the replica refused.");
  append(out, "celer_malformed_messages_total %" PRIu64 "\n", r.malformed_messages);
  header(out, "celer_actor_restarts_total", "counter", "Actors restarted by their supervisor, by kind.");
  append(out, "celer_actor_restarts_total{actor=\"scheduler\"} %" PRIu64 "\nceler_actor_restarts_total{actor=\"shard\"} %" PRIu64 "\n",
         r.scheduler_restarts, r.shard_restarts);
  append(out, "celer_actor_restarts_total{actor=\"cache\"} %" PRIu64 "\n", r.cache_restarts);
  header(out, "celer_hung_shards_total", "counter", "Shard groups replaced because a step took longer than supervision.hang_timeout.");
  append(out, "celer_hung_shards_total %" PRIu64 "\n", r.hung_shards);
  header(out, "celer_steps_total", "counter", "Forward steps the replica ran.");
  append(out, "celer_steps_total %" PRIu64 "\n", r.steps);
  header(out, "celer_step_seconds_total", "counter", "Time rank 0 spent running forward steps.");
  append(out, "celer_step_seconds_total %.6f\n", static_cast<double>(r.step_us) / 1e6);
  header(out, "celer_allreduce_seconds_total", "counter",
         "Of that, time inside tensor-parallel all-reduces (the exchange and the wait for the other ranks).");
  append(out, "celer_allreduce_seconds_total %.6f\n", static_cast<double>(r.allreduce_us) / 1e6);
  header(out, "celer_allreduce_calls_total", "counter", "Tensor-parallel all-reduces rank 0 took part in.");
  append(out, "celer_allreduce_calls_total %" PRIu64 "\n", r.allreduce_calls);
  // Latency objectives (slo:): goodput and the share of steps and tokens over the ITL objective.
  counter_by_outcome(out, "celer_slo_requests_total",
                     "Finished requests, and those that met their TTFT and ITL objectives (goodput, as DistServe counts it).",
                     "finished", r.slo_finished, "met", r.slo_met);
  header(out, "celer_slo_refused_total", "counter", "Requests refused at admission because they could not meet their TTFT objective.");
  append(out, "celer_slo_refused_total %" PRIu64 "\n", r.slo_refused);
  header(out, "celer_ttft_missed_total", "counter", "First tokens later than their TTFT objective.");
  append(out, "celer_ttft_missed_total %" PRIu64 "\n", r.ttft_missed);
  counter_by_outcome(out, "celer_itl_tokens_total",
                     "Output tokens after the first under an ITL objective, and those that came later than it after the token before.",
                     "all", r.itl_tokens, "over", r.itl_tokens_over);
  counter_by_outcome(out, "celer_itl_steps_total",
                     "Steps with a stream under an ITL objective, and those in which one of them waited longer.", "all", r.itl_steps,
                     "over", r.itl_steps_over);
  header(out, "celer_itl_objective_seconds", "gauge", "The tightest ITL objective of the streams running (0: none).");
  append(out, "celer_itl_objective_seconds %.6f\n", static_cast<double>(r.itl_objective_us) / 1e6);
  header(out, "celer_step_budget_tokens", "gauge", "The token budget of the last step.");
  append(out, "celer_step_budget_tokens %d\n", r.step_budget);
  return out;
}

}  // namespace celer
