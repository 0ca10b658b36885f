// celer's OpenAI-compatible HTTP gateway for one node: the routes (POST /v1/completions and
// /v1/chat/completions, GET /v1/models, /health, /metrics), each request's way from JSON to the
// replica and back as a response or an SSE stream, and counters for /metrics. docs/http.md
// describes the API as clients see it.
//
// Pieces: runtime/openai_api.* (JSON <-> requests, errors, chunks) and runtime/chat_template.*
// are the plain core; actors/http_server.* the HTTP transport (Boost.Beast, one I/O thread);
// actors/gateway_actor.* the CAF actor that talks to the replica. This file joins them: it runs
// on the I/O thread and hands generations to the gateway actor, which hands events back.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>

#include <caf/all.hpp>

#include "actors/gateway_actor.hpp"
#include "actors/http_server.hpp"
#include "runtime/metrics.hpp"
#include "runtime/model_card.hpp"

namespace celer {

struct GatewayOptions {
  HttpServerOptions http;
  GatewayActorOptions actor;
  // When set, one JSON line per finished choice is appended here: its stage times on the
  // replica (StageTimes) and at the gateway (received, first and last token sent, end sent),
  // token counts and finish reason. Written from the I/O thread, one flush per line.
  std::string stage_log;
  // The client port's guard counters, for /metrics (absent: not shown).
  std::function<TransportStats()> transport_stats;
};

class Gateway {
 public:
  // `replica` is the replica's entry actor (its supervisor, or a cluster node's actor); `card` is
  // the served model's metadata and tokenizer (no weights: a gateway only tokenizes);
  // `model_path` is the served file (its stem is accepted as the model's id beside the card's
  // name); `max_context` is the replica's.
  Gateway(caf::actor_system& sys, ServerActor replica, std::shared_ptr<const ModelCard> card, std::string model_path,
          int32_t max_context, GatewayOptions options);
  ~Gateway();  // stop()

  // Spawns the gateway actor and starts serving; returns the bound port. Throws Error(io).
  uint16_t start();
  void stop();

  // What GET /metrics reports besides the replica's state (also readable in-process).
  const ServingMetrics& metrics() const;
  size_t open_connections() const;
  const std::string& model_id() const;  // the id /v1/models advertises

  struct Impl;

 private:
  std::unique_ptr<Impl> impl_;
};

}  // namespace celer
