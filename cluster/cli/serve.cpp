// celer serve: a one-process cluster (scheduler, request and shard actors of one replica on
// CPU) that accepts client-library connections on a TCP port through CAF's middleman, and, when
// the config has an `http:` section or --http-port is given, OpenAI-compatible HTTP requests
// through the gateway (actors/gateway.hpp, docs/http.md).
#include <csignal>
#include <cstdio>
#include <string>

#include <caf/all.hpp>
#include <caf/io/all.hpp>

#include "actors/gateway.hpp"
#include "actors/replica.hpp"
#include "actors/wire.hpp"
#include "cluster/cli/commands.hpp"
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

int run_serve(const ServeArgs& a) {
  ClusterConfig config = a.config.empty() ? parse_config("{}", "defaults") : load_config(a.config);
  if (!a.model.empty()) config.model = a.model;
  if (config.model.empty()) config.model = CELER_DEFAULT_MODEL;
  if (!a.host.empty()) config.listen.host = a.host;
  if (a.port >= 0) config.listen.port = static_cast<uint16_t>(a.port);
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
    std::fputs(to_yaml(config).c_str(), stdout);
    return 0;
  }

  // Block the stop signals in every thread (CAF's threads inherit the mask) and wait for them here.
  sigset_t stop;
  sigemptyset(&stop);
  sigaddset(&stop, SIGINT);
  sigaddset(&stop, SIGTERM);
  pthread_sigmask(SIG_BLOCK, &stop, nullptr);

  auto model = std::make_shared<Model>(config.model);
  const ReplicaSetup setup = replica_setup(config, model);
  caf::actor_system_config cfg;
  cfg.load<caf::io::middleman>();
  configure_serving_node(cfg);
  caf::actor_system sys{cfg};
  caf::actor replica = spawn_replica(sys, setup);
  wait_until_ready(sys, replica, std::chrono::minutes(10));
  auto port = sys.middleman().publish(replica, config.listen.port, config.listen.host.c_str(), true);
  if (!port) {
    caf::anon_send_exit(replica, caf::exit_reason::user_shutdown);
    throw Error(ErrorCode::io, "cannot listen on " + config.listen.host + ":" + std::to_string(config.listen.port) +
                                   ": " + sys.render(port.error()));
  }
  std::printf("celer: serving %s (%s) on %s:%u: %d KV blocks, batch %d sequences / %d tokens, context %d\n",
              model->name().c_str(), config.model.c_str(), config.listen.host.c_str(), static_cast<unsigned>(*port),
              setup.kv_blocks, setup.scheduler.max_batch_size, setup.scheduler.max_batch_tokens, setup.scheduler.max_context);
  std::fflush(stdout);

  std::unique_ptr<Gateway> gateway;
  if (config.http) {
    GatewayOptions go;
    go.http.host = config.http->host;
    go.http.port = config.http->port;
    go.http.request_timeout = config.http->request_timeout;
    go.http.idle_timeout = config.http->idle_timeout;
    go.stage_log = config.http->stage_log;
    gateway = std::make_unique<Gateway>(sys, replica, model, config.model, setup.scheduler.max_context, go);
    uint16_t http_port = 0;
    try {
      http_port = gateway->start();
    } catch (...) {
      static_cast<void>(sys.middleman().unpublish(replica, *port));
      caf::anon_send_exit(replica, caf::exit_reason::user_shutdown);
      throw;
    }
    std::printf("celer: http on %s:%u (model id '%s')\n", config.http->host.c_str(), static_cast<unsigned>(http_port),
                gateway->model_id().c_str());
    std::fflush(stdout);
  }

  int sig = 0;
  sigwait(&stop, &sig);
  std::printf("celer: stopping (%s)\n", sig == SIGINT ? "SIGINT" : "SIGTERM");
  if (gateway) gateway->stop();  // no new requests; the I/O thread is joined
  static_cast<void>(sys.middleman().unpublish(replica, *port));
  caf::anon_send_exit(replica, caf::exit_reason::user_shutdown);
  return 0;
}

}  // namespace

Command add_serve(CLI::App& app) {
  auto a = std::make_shared<ServeArgs>();
  CLI::App* c = app.add_subcommand("serve", "Serve a model: one-process cluster listening for client connections");
  c->add_option("--config", a->config, "Deployment config (YAML)");
  c->add_option("--model,-m", a->model, "GGUF model file (overrides the config's model)");
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
  c->add_flag("--print-config", a->print_config, "Print the effective config as YAML and exit");
  return [a] { return run_serve(*a); };
}

}  // namespace celer::cli
