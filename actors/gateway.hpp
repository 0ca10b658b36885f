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
#include "runtime/model.hpp"

namespace celer {

// Counters the gateway keeps (read by the /metrics hook from the I/O thread or any other:
// every field is atomic).
struct GatewayCounters {
  std::atomic<uint64_t> http_requests{0};           // requests read, every route
  std::atomic<uint64_t> responses_by_class[6] = {};  // [status / 100]: 2xx at [2] ...; an SSE stream counts as its 200
  std::atomic<uint64_t> generation_requests{0};     // accepted completions and chat requests
  std::atomic<uint64_t> choices_finished{0};        // choices that ended with stop or length
  std::atomic<uint64_t> choices_failed[7] = {};     // choices that ended with an error, by ErrorKind
  std::atomic<uint64_t> client_disconnects{0};      // requests cancelled because their client left
  std::atomic<int64_t> active_requests{0};          // generation requests in flight
  std::atomic<int64_t> active_streams{0};           // of which SSE streams whose header was sent
};

struct GatewayOptions {
  HttpServerOptions http;
  GatewayActorOptions actor;
  // GET /metrics answers this text (Prometheus text format 0.0.4); empty function: empty body.
  // Called on the I/O thread: it must be quick.
  std::function<std::string()> metrics_text;
};

class Gateway {
 public:
  // `replica` is the replica's entry actor (its supervisor); `model_path` is the served file (its
  // stem is accepted as the model's id beside Model::name()); `max_context` is the replica's.
  Gateway(caf::actor_system& sys, caf::actor replica, std::shared_ptr<const Model> model, std::string model_path,
          int32_t max_context, GatewayOptions options);
  ~Gateway();  // stop()

  // Spawns the gateway actor and starts serving; returns the bound port. Throws Error(io).
  uint16_t start();
  void stop();

  const GatewayCounters& counters() const;
  size_t open_connections() const;
  const std::string& model_id() const;  // the id /v1/models advertises

  struct Impl;

 private:
  std::unique_ptr<Impl> impl_;
};

}  // namespace celer
