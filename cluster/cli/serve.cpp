// celer serve: a one-process cluster (scheduler, request and shard actors of one replica on
// CPU) that accepts client-library connections on a TCP port through CAF's middleman, and, when
// the config has an `http:` section or --http-port is given, OpenAI-compatible HTTP requests
// through the gateway (actors/gateway.hpp, docs/http.md).
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string>
#include <thread>

#include <caf/all.hpp>
#include <caf/io/all.hpp>

#include "actors/gateway.hpp"
#include "actors/failure.hpp"
#include "actors/replica.hpp"
#include "actors/transport.hpp"
#include "actors/wire.hpp"
#include "cluster/cli/commands.hpp"
#include "cluster/cli/stop_signals.hpp"
#include "runtime/error.hpp"

namespace celer::cli {
namespace {

struct ServeArgs {
  std::string config;
  std::string model;
  std::string host;
  int port = -1;
  std::string http_host;
  int http_port = -1;
  int64_t http_request_timeout_ms = 0;  // 0: the config's
  int64_t http_idle_timeout_ms = 0;
  std::string stage_log;
  bool print_config = false;
};

// How long a stop (a signal, or a failure being cleaned up) may take before the process exits
// regardless.
constexpr auto kStopGrace = std::chrono::seconds(10);

// The checks a start can make before it loads or allocates anything.
void check_startable(const ClusterConfig& config, const ServeArgs& a) {
  if (config.model.empty())
    throw Error(ErrorCode::invalid_argument,
                (a.config.empty() ? std::string("no model to serve") : a.config + ": no model to serve") +
                    ": name a GGUF file with `model: FILE.gguf` in the config or with --model FILE.gguf");
  if (!is_loopback_host(config.listen.host) && config.listen.token.empty())
    throw Error(ErrorCode::invalid_argument,
                "listen.host " + config.listen.host +
                    " reaches beyond this machine: set listen.token (or CELER_TOKEN) so that only clients that know it "
                    "connect");
  if (config.http && !config.http->stage_log.empty()) {
    std::FILE* f = std::fopen(config.http->stage_log.c_str(), "a");
    if (!f)
      throw Error(ErrorCode::io, "http.stage_log: cannot open " + config.http->stage_log + " for appending: " +
                                     std::strerror(errno));
    std::fclose(f);
  }
}

// The running node: its actor system, replica, client port and gateway. Stopping it (on a
// signal, on a failure, or when the replica goes down) ends every stream with an error its
// client sees, then takes everything down, so the actor system's destructor has nothing left
// to wait for.
struct Node {
  caf::actor_system& sys;
  SupervisorActor replica;
  std::unique_ptr<Transport> transport;
  uint16_t port = 0;
  std::unique_ptr<Gateway> gateway;

  void stop() {
    if (transport && port) transport->unpublish(replica, port);  // no new client connections
    port = 0;
    if (replica) {
      // The replica fails its requests ("the server is shutting down"): SSE streams get an
      // error event and their end, client-library streams an error value.
      caf::scoped_actor self{sys};
      self->request(replica, std::chrono::seconds(3), stop_atom::value).receive([](bool) {}, [](const caf::error&) {});
    }
    if (gateway) {
      const auto until = std::chrono::steady_clock::now() + std::chrono::seconds(3);
      while (gateway->metrics().active() > 0 && std::chrono::steady_clock::now() < until)
        std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
    // The error replies to client-library streams leave through the middleman's sockets.
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
    if (gateway) gateway->stop();
    gateway.reset();
    if (replica) caf::anon_send_exit(replica, caf::exit_reason::user_shutdown);
    replica = nullptr;
  }
};

int serve(const ClusterConfig& config, StopSignals& signals) {
  auto model = std::make_shared<Model>(config.model);
  ReplicaSetup setup = replica_setup(config, model);  // refuses a KV cache that cannot fit
  setup.conversations = conversation_memory(config);
  if (auto picked = pick_missing_itl(config, setup))
    std::printf("celer: slo: no itl objective written; picked on this machine: %s\n", picked->describe().c_str());
  caf::actor_system_config cfg;
  cfg.load<caf::io::middleman>();
  configure_serving_node(cfg);
  caf::actor_system sys{cfg};
  Node node{sys, spawn_replica(sys, setup)};

  // Why the replica went down, if it does (a child that kept failing, its restarts spent).
  auto down = std::make_shared<std::pair<std::mutex, std::string>>();
  node.replica->attach_functor([down, &sys, &signals](const caf::error& reason) {
    {
      std::lock_guard lock(down->first);
      down->second = reason ? failure_text(sys, reason) : "it stopped";
    }
    signals.wake();
  });
  auto went_down = [&] {
    std::lock_guard lock(down->first);
    return down->second;
  };

  try {
    try {
      wait_until_ready(sys, node.replica, std::chrono::minutes(10));
    } catch (const Error& e) {
      // The replica's own reason says more than the unanswered request.
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
      if (const std::string why = went_down(); !why.empty())
        throw Error(ErrorCode::io, "the replica did not start: " + why);
      throw;
    }
    TransportLimits limits;
    limits.token = config.listen.token;
    limits.max_message_bytes = config.listen.max_message_bytes;
    limits.max_buffered_bytes = config.listen.max_buffered_bytes;
    node.transport = std::make_unique<Transport>(sys, limits);
    try {
      node.port = node.transport->publish(node.replica, config.listen.host, config.listen.port);
    } catch (const Error& e) {
      throw Error(ErrorCode::io, std::string("listen: ") + e.what());
    }
    std::printf("celer: serving %s (%s) on %s:%u: %d KV blocks, batch %d sequences / %d tokens, context %d\n",
                model->name().c_str(), config.model.c_str(), config.listen.host.c_str(), static_cast<unsigned>(node.port),
                setup.kv_blocks, setup.scheduler.max_batch_size, setup.scheduler.max_batch_tokens, setup.scheduler.max_context);
    std::fflush(stdout);

    if (config.http) {
      GatewayOptions go;
      go.http.host = config.http->host;
      go.http.port = config.http->port;
      go.http.request_timeout = config.http->request_timeout;
      go.http.idle_timeout = config.http->idle_timeout;
      go.stage_log = config.http->stage_log;
      Transport* transport = node.transport.get();
      go.transport_stats = [transport] { return transport->stats(); };
      node.gateway = std::make_unique<Gateway>(sys, node.replica, model->card(), config.model, setup.scheduler.max_context, go);
      const uint16_t http_port = node.gateway->start();
      std::printf("celer: http on %s:%u (model id '%s')\n", config.http->host.c_str(), static_cast<unsigned>(http_port),
                  node.gateway->model_id().c_str());
      std::fflush(stdout);
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    signals.exit_within("a failed start");
    node.stop();
    return 1;
  }

  signals.serving();
  const int sig = signals.wait();
  if (sig != 0) {
    std::printf("celer: stopping (%s)\n", signal_name(sig));
    std::fflush(stdout);
    node.stop();
    return 0;
  }
  std::fprintf(stderr, "error: the replica went down: %s\n", went_down().c_str());
  signals.exit_within("the replica went down");
  node.stop();
  return 1;
}

int run_serve(const ServeArgs& a) {
  ClusterConfig config = a.config.empty() ? parse_config("{}", "defaults") : load_config(a.config);
  if (!a.model.empty()) config.model = a.model;
  if (!a.host.empty()) config.listen.host = a.host;
  if (a.port >= 0) config.listen.port = static_cast<uint16_t>(a.port);
  if (config.listen.token.empty())
    if (const char* env = std::getenv("CELER_TOKEN")) config.listen.token = env;
  if (a.http_port >= 0 || !a.http_host.empty()) {
    HttpConfig& http = config.http ? *config.http : config.http.emplace();
    if (a.http_port >= 0) http.port = static_cast<uint16_t>(a.http_port);
    if (!a.http_host.empty()) http.host = a.http_host;
  }
  if (config.http) {
    if (a.http_request_timeout_ms > 0) config.http->request_timeout = std::chrono::milliseconds(a.http_request_timeout_ms);
    if (a.http_idle_timeout_ms > 0) config.http->idle_timeout = std::chrono::milliseconds(a.http_idle_timeout_ms);
    if (!a.stage_log.empty()) config.http->stage_log = a.stage_log;
  }
  if (a.print_config) {
    // Secrets are not printed: the output goes to terminals, logs and bug reports.
    ClusterConfig shown = config;
    if (!shown.listen.token.empty()) shown.listen.token = "(redacted)";
    if (!shown.cluster.secret.empty()) shown.cluster.secret = "(redacted)";
    std::fputs(to_yaml(shown).c_str(), stdout);
    if (!config.slo.itl_written() && !config.model.empty()) {
      // What `celer serve` would pick: measured here, with the model it would serve.
      // A model or KV cache that cannot be used is `celer serve`'s to refuse: the config is printed.
      try {
        auto model = std::make_shared<Model>(config.model);
        ReplicaSetup setup = replica_setup(config, model);
        if (auto picked = pick_missing_itl(config, setup))
          std::printf("# slo.itl is not written: celer serve picks it at start-up; on this machine %s\n", picked->describe().c_str());
      } catch (const Error& e) {
        std::printf("# slo.itl is not written: celer serve picks it at start-up; it cannot be measured here: %s\n", e.what());
      }
    }
    return 0;
  }
  check_startable(config, a);
  // Before any thread: every thread started later inherits the blocked stop signals.
  StopSignals signals(kStopGrace);
  return serve(config, signals);
}

}  // namespace

Command add_serve(CLI::App& app) {
  auto a = std::make_shared<ServeArgs>();
  CLI::App* c = app.add_subcommand("serve", "Serve a model: one-process cluster listening for client connections");
  c->add_option("--config", a->config, "Deployment config (YAML)");
  c->add_option("--model,-m", a->model, "GGUF model file (overrides the config's model; one of the two is required)");
  c->add_option("--host", a->host, "Listen address (overrides listen.host)");
  c->add_option("--port", a->port, "Listen port, 0 for any (overrides listen.port)")->check(CLI::Range(0, 65535));
  c->add_option("--http-host", a->http_host, "HTTP gateway address (overrides http.host; turns the gateway on)");
  c->add_option("--http-port", a->http_port, "HTTP gateway port, 0 for any (overrides http.port; turns the gateway on)")
      ->check(CLI::Range(0, 65535));
  c->add_option("--http-request-timeout", a->http_request_timeout_ms,
                "Milliseconds a begun HTTP request has to arrive whole (slow clients are closed; overrides http.request_timeout)")
      ->check(CLI::Range(int64_t{1}, int64_t{3'600'000}));
  c->add_option("--http-idle-timeout", a->http_idle_timeout_ms,
                "Milliseconds an idle keep-alive HTTP connection is kept (overrides http.idle_timeout)")
      ->check(CLI::Range(int64_t{1}, int64_t{86'400'000}));
  c->add_option("--stage-log", a->stage_log,
                "Append each finished HTTP request's stage times as a JSON line to this file (overrides http.stage_log)");
  c->add_flag("--print-config", a->print_config, "Print the effective config as YAML (secrets redacted) and exit");
  return [a] { return run_serve(*a); };
}

}  // namespace celer::cli
