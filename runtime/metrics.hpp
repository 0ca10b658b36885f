// What a serving node reports on /metrics, in Prometheus' text exposition format (version 0.0.4):
// the front end's own counts and latency histograms, measured where the client sees them, next
// to the replica's state (ReplicaStats: queues, batch, KV blocks, caches, restarts).
//
// ServingMetrics is shared by the threads that observe requests (the HTTP gateway's I/O thread,
// its actor); every method takes one short lock. Histograms use fixed cumulative buckets, so an
// observation is a few comparisons and no allocation.
#pragma once

#include <array>
#include <cstdint>
#include <map>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "runtime/protocol.hpp"

namespace celer {

class Histogram {
 public:
  explicit Histogram(std::vector<double> upper_bounds);  // ascending; +Inf is implicit
  void observe(double value);
  // Appends the `name`_bucket{le="..."}, `name`_sum and `name`_count lines.
  void render(std::string& out, const std::string& name) const;
  uint64_t count() const { return count_; }
  double sum() const { return sum_; }

 private:
  std::vector<double> bounds_;
  std::vector<uint64_t> counts_;  // per bucket, not cumulative; the last is +Inf
  uint64_t count_ = 0;
  double sum_ = 0;
};

// What a guarded port (actors/transport.hpp) accepted and refused, for
// celer_transport_connections_total and celer_transport_refused_total{reason=...}.
struct TransportStats {
  uint64_t accepted = 0;      // connections that presented a valid preamble
  uint64_t bad_preamble = 0;  // not celer (or another version): closed before any BASP byte
  uint64_t bad_token = 0;     // a celer peer with the wrong token
  uint64_t malformed = 0;     // a BASP header out of place or with fields its kind forbids
  uint64_t oversized = 0;     // a message over max_message_bytes
  uint64_t over_budget = 0;   // a large message while max_buffered_bytes were taken
  uint64_t tls_refused = 0;   // a TLS handshake that failed (no or a foreign certificate, not TLS)
  bool tls = false;           // the port speaks mutual TLS
  uint64_t max_message_bytes = 0;
  uint64_t max_buffered_bytes = 0;
  uint64_t buffered_bytes = 0;  // large payloads being received now
  // Frames that wire-layer faults (`celer chaos`, docs/chaos.md) acted on.
  uint64_t chaos_dropped = 0, chaos_delayed = 0, chaos_duplicated = 0, chaos_corrupted = 0;
  // Messages this process refused to read (malformed, corrupted, out of range: schema/codec.hpp).
  uint64_t refused_messages = 0;
};

// How a request ended, as counted by celer_requests_total{outcome=...}.
enum class RequestOutcome : uint8_t { finished_stop, finished_length, cancelled, error };

class ServingMetrics {
 public:
  ServingMetrics();

  // Requests as the replica sees them (an HTTP request with n choices is n of them).
  void request_started();
  // An ended request: its outcome (and, for an error, its kind).
  void request_ended(RequestOutcome outcome, std::optional<ErrorKind> error = std::nullopt);
  // The HTTP side: every response by status (a stream counts as its 200), streams open now,
  // clients that left before their answer was complete.
  void http_response(int status);
  void stream_opened();
  void stream_closed();
  void client_disconnected();
  void observe_ttft(double seconds);
  void observe_itl(double seconds);
  void observe_e2e(double seconds);
  void observe_stages(const StageTimes& t);  // queue wait and prefill time on the replica
  uint64_t active() const;                    // requests started and not yet ended

  // The whole exposition; `replica` is absent when the replica did not answer (then
  // celer_replica_up is 0 and its gauges are left out).
  // `transport`, when given, adds the client port's guard counters.
  std::string render(const std::optional<ReplicaStats>& replica,
                     const std::optional<TransportStats>& transport = std::nullopt) const;

 private:
  mutable std::mutex mu_;
  uint64_t active_ = 0;
  std::array<uint64_t, 4> outcomes_{};
  std::map<ErrorKind, uint64_t> errors_;
  std::map<int, uint64_t> http_responses_;
  uint64_t streams_ = 0;
  uint64_t disconnects_ = 0;
  Histogram ttft_, itl_, e2e_, queue_wait_, prefill_;
};

}  // namespace celer
