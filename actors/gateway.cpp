#include "actors/gateway.hpp"

#include <algorithm>
#include <chrono>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <random>

#include "runtime/chat_template.hpp"
#include "runtime/error.hpp"
#include "runtime/openai_api.hpp"

namespace celer {

using openai::ApiError;
using openai::Endpoint;

namespace {

constexpr const char* kJson = "application/json";

int64_t unix_seconds() {
  return unix_us() / 1'000'000;
}

// "cmpl-" / "chatcmpl-" and 24 hex digits.
std::string response_id(Endpoint e, std::mt19937_64& rng) {
  static const char* hex = "0123456789abcdef";
  std::string id = e == Endpoint::chat ? "chatcmpl-" : "cmpl-";
  for (int i = 0; i < 24; ++i) id += hex[rng() & 15];
  return id;
}

}  // namespace

struct Gateway::Impl {
  caf::actor_system& sys;
  ServerActor replica;
  std::shared_ptr<const ModelCard> card;
  int32_t max_context;
  GatewayOptions options;
  std::vector<std::string> model_ids;  // accepted in "model"; [0] is advertised
  ChatFormat chat_format = ChatFormat::fallback;
  int64_t created = unix_seconds();
  ServingMetrics metrics;
  std::ofstream stage_log;  // I/O thread only; open when options.stage_log is set
  GatewayActor actor;
  std::unique_ptr<HttpServer> server;
  std::function<void(std::function<void()>)> post;  // to the I/O thread; safe after stop
  uint64_t next_job = 1;                            // I/O thread only
  std::mt19937_64 rng{std::random_device{}()};      // I/O thread only: seeds, response ids

  Impl(caf::actor_system& s, ServerActor r, std::shared_ptr<const ModelCard> m, int32_t ctx, GatewayOptions o)
      : sys(s), replica(std::move(r)), card(std::move(m)), max_context(ctx), options(std::move(o)) {}

  void reply(HttpExchange& ex, int status, const std::string& type, std::string body) {
    metrics.http_response(status);
    ex.respond(status, type, std::move(body));
  }
  void reply_error(HttpExchange& ex, const ApiError& e) { reply(ex, e.status, kJson, openai::error_body(e)); }

  void handle(HttpRequest req, const std::shared_ptr<HttpExchange>& ex);
  void generate(Endpoint endpoint, const std::string& body, const std::shared_ptr<HttpExchange>& ex);
  std::variant<std::vector<GenerateRequest>, ApiError> build_requests(const openai::ApiRequest& r);
  void health(const std::shared_ptr<HttpExchange>& ex);
  void metrics_page(const std::shared_ptr<HttpExchange>& ex);
};

namespace {

// One HTTP generation request on the I/O side: collects the events of its n choices and writes
// them as one response or as SSE chunks. The actor calls deliver() on its thread; everything
// else runs on the I/O thread.
//
// Streams send their header only with the first event, so an error that comes before any
// token (a rejection at admission) is still answered with its HTTP status and error JSON.
class OpenAIJob final : public GatewayJob, public std::enable_shared_from_this<OpenAIJob> {
 public:
  OpenAIJob(Gateway::Impl* gw, std::shared_ptr<HttpExchange> ex, openai::ResponseMeta meta, const openai::ApiRequest& r)
      : gw_(gw), post_(gw->post), exchange_(std::move(ex)), meta_(std::move(meta)), stream_(r.stream),
        include_usage_(r.include_usage), logprobs_(r.logprobs), token_ids_(r.return_token_ids),
        stage_times_(r.return_stage_times) {}

  void begin(size_t n) {
    choices_.resize(n);
    std::weak_ptr<OpenAIJob> weak = shared_from_this();
    exchange_->on_gone([weak] {
      if (auto job = weak.lock()) job->client_gone();
    });
    for (size_t i = 0; i < n; ++i) gw_->metrics.request_started();
  }

  void deliver(size_t choice, Message event) override {
    post_([self = shared_from_this(), choice, event = std::move(event)]() mutable { self->on_event(choice, std::move(event)); });
  }

 private:
  struct ChoiceState {
    openai::Choice c;
    bool ended = false;
    bool role_sent = false;
    int64_t text_offset = 0;
    std::chrono::steady_clock::time_point last_token;  // when its latest token was written
    int64_t first_sent_us = 0, last_sent_us = 0;        // for the stage log
  };

  // A choice ends once in the metrics: finished, failed or cancelled.
  void end_choice(ChoiceState& cs, RequestOutcome outcome, std::optional<ErrorKind> kind = std::nullopt) {
    if (cs.ended) return;
    cs.ended = true;
    gw_->metrics.request_ended(outcome, kind);
  }

  double since_start() const { return std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count(); }

  void on_event(size_t i, Message event) {
    if (done_ || i >= choices_.size()) return;
    if (auto* chunk = std::get_if<TokenChunk>(&event)) return on_chunk(choices_[i], static_cast<int>(i), *chunk);
    if (auto* fin = std::get_if<Finished>(&event)) return on_finished(choices_[i], static_cast<int>(i), *fin);
    if (auto* err = std::get_if<ErrorReply>(&event)) {
      end_choice(choices_[i], RequestOutcome::error, err->kind);
      ApiError e = openai::error_from(err->kind, err->message);
      if (err->kind == ErrorKind::prompt_too_long) e.param = meta_.endpoint == Endpoint::chat ? "messages" : "prompt";
      fail(e);
    }
  }

  std::vector<openai::LogprobEntry> entries(const TokenChunk& chunk) const {
    std::vector<openai::LogprobEntry> out;
    if (logprobs_ < 0) return out;
    const Tokenizer& tok = gw_->card->tokenizer();
    auto piece = [&](TokenId id) {
      try {
        return tok.token_to_piece(id);
      } catch (const Error&) {
        return std::string();
      }
    };
    for (const TokenLogprob& lp : chunk.logprobs) {
      openai::LogprobEntry e{piece(lp.token), lp.logprob, {}};
      for (size_t k = 0; k < lp.top_tokens.size() && k < lp.top_logprobs.size(); ++k)
        e.top.emplace_back(piece(lp.top_tokens[k]), lp.top_logprobs[k]);
      out.push_back(std::move(e));
    }
    return out;
  }

  void on_chunk(ChoiceState& cs, int index, const TokenChunk& chunk) {
    // Latency as the client sees it: the first token's time from the request's arrival, then
    // the gaps between tokens (a chunk of k tokens: one gap, then k - 1 zero gaps).
    if (!chunk.tokens.empty()) {
      const auto now = std::chrono::steady_clock::now();
      for (size_t k = 0; k < chunk.tokens.size(); ++k) {
        if (cs.first_sent_us == 0 && k == 0) gw_->metrics.observe_ttft(std::chrono::duration<double>(now - start_).count());
        else gw_->metrics.observe_itl(k == 0 ? std::chrono::duration<double>(now - cs.last_token).count() : 0.0);
      }
      cs.last_token = now;
      cs.last_sent_us = unix_us();
      if (cs.first_sent_us == 0) cs.first_sent_us = cs.last_sent_us;
    }
    auto lps = entries(chunk);
    cs.c.text += chunk.text;
    cs.c.with_logprobs = logprobs_ >= 0;
    if (!stream_) {
      cs.c.logprobs.insert(cs.c.logprobs.end(), lps.begin(), lps.end());
      if (token_ids_) {
        if (!cs.c.token_ids) cs.c.token_ids.emplace();
        cs.c.token_ids->insert(cs.c.token_ids->end(), chunk.tokens.begin(), chunk.tokens.end());
      }
      return;
    }
    open_stream(cs, index);
    // Half a UTF-8 character waits for the next token, unless the client counts token ids.
    if (chunk.text.empty() && lps.empty() && !(token_ids_ && !chunk.tokens.empty())) return;
    exchange_->write(openai::sse_content_chunk(meta_, index, chunk.text, logprobs_ >= 0, lps, cs.text_offset,
                                               token_ids_ ? &chunk.tokens : nullptr));
    cs.text_offset += static_cast<int64_t>(chunk.text.size());
  }

  void on_finished(ChoiceState& cs, int index, const Finished& fin) {
    end_choice(cs, fin.reason == FinishReason::stop     ? RequestOutcome::finished_stop
                   : fin.reason == FinishReason::length ? RequestOutcome::finished_length
                                                        : RequestOutcome::cancelled);
    gw_->metrics.observe_e2e(since_start());
    gw_->metrics.observe_stages(fin.times);
    cs.c.reason = fin.reason;
    if (stage_times_) cs.c.times = fin.times;
    if (token_ids_ && !cs.c.token_ids) cs.c.token_ids.emplace();
    log_stages(cs, index, fin);
    // The prompt is the same for every choice: counted once, from the first choice to end.
    if (!usage_set_) {
      usage_.prompt_tokens = fin.prompt_tokens;
      usage_.cached_tokens = fin.cached_tokens;
      usage_set_ = true;
    }
    usage_.completion_tokens += fin.completion_tokens;
    if (stream_) {
      open_stream(cs, index);
      exchange_->write(openai::sse_finish_chunk(meta_, index, fin.reason, stage_times_ ? &fin.times : nullptr));
    }
    if (++n_ended_ == choices_.size()) complete();
  }

  // The SSE header with the first event; chat's role chunk before a choice's first content.
  void open_stream(ChoiceState& cs, int index) {
    if (!headers_sent_) {
      headers_sent_ = true;
      gw_->metrics.http_response(200);
      gw_->metrics.stream_opened();
      exchange_->start_stream(200, "text/event-stream");
    }
    if (meta_.endpoint == Endpoint::chat && !cs.role_sent) {
      cs.role_sent = true;
      exchange_->write(openai::sse_role_chunk(meta_, index));
    }
  }

  void complete() {
    if (stream_) {
      if (include_usage_) exchange_->write(openai::sse_usage_chunk(meta_, usage_));
      exchange_->write(openai::sse_done_event());
      exchange_->end();
    } else {
      std::vector<openai::Choice> out;
      for (auto& cs : choices_) out.push_back(std::move(cs.c));
      gw_->reply(*exchange_, 200, kJson, openai::response_body(meta_, out, usage_));
    }
    close();
  }

  // One JSON line per finished choice in the stage log: the replica's stage times and the
  // gateway's own (received, first and last token written, end written).
  void log_stages(const ChoiceState& cs, int index, const Finished& fin) {
    if (!gw_->stage_log.is_open()) return;
    nlohmann::json line = {{"id", meta_.id},
                           {"choice", index},
                           {"gateway_received_us", received_us_},
                           {"first_sent_us", cs.first_sent_us},
                           {"last_sent_us", cs.last_sent_us},
                           {"sent_us", unix_us()},
                           {"prompt_tokens", fin.prompt_tokens},
                           {"completion_tokens", fin.completion_tokens},
                           {"cached_tokens", fin.cached_tokens},
                           {"finish_reason", openai::finish_reason_name(fin.reason)}};
    for (const auto& [name, field] : kStageTimeFields) line[name] = fin.times.*field;
    gw_->stage_log << line.dump() << '\n' << std::flush;
  }

  // One choice failed: the request fails (the other choices are cancelled).
  void fail(const ApiError& e) {
    for (ChoiceState& cs : choices_) end_choice(cs, RequestOutcome::cancelled);
    if (n_ended_ + 1 < choices_.size()) caf::anon_send(gw_->actor, gw_cancel_atom::value, key);
    if (!headers_sent_) {
      gw_->reply_error(*exchange_, e);
    } else {
      exchange_->write(openai::sse_error_event(e));
      exchange_->write(openai::sse_done_event());
      exchange_->end();
    }
    close();
  }

  void client_gone() {
    if (done_) return;
    gw_->metrics.client_disconnected();
    for (ChoiceState& cs : choices_) end_choice(cs, RequestOutcome::cancelled);
    caf::anon_send(gw_->actor, gw_cancel_atom::value, key);
    close();
  }

  void close() {
    if (done_) return;
    done_ = true;
    if (headers_sent_) gw_->metrics.stream_closed();
    exchange_.reset();  // its session may go; later events are dropped
  }

  Gateway::Impl* gw_;  // used on the I/O thread only, which stops before the gateway goes
  std::function<void(std::function<void()>)> post_;
  std::shared_ptr<HttpExchange> exchange_;
  openai::ResponseMeta meta_;
  bool stream_;
  bool include_usage_;
  int32_t logprobs_;
  bool token_ids_;
  bool stage_times_;
  std::vector<ChoiceState> choices_;
  size_t n_ended_ = 0;
  openai::Usage usage_;
  bool usage_set_ = false;
  bool headers_sent_ = false;
  bool done_ = false;
  std::chrono::steady_clock::time_point start_ = std::chrono::steady_clock::now();  // the request's arrival
  int64_t received_us_ = unix_us();
};

bool contains(const std::vector<std::string>& v, const std::string& s) {
  return std::find(v.begin(), v.end(), s) != v.end();
}

}  // namespace

void Gateway::Impl::handle(HttpRequest req, const std::shared_ptr<HttpExchange>& ex) {
  auto only = [&](const char* method) {
    if (req.method == method) return true;
    reply_error(*ex, ApiError{405, "method " + req.method + " is not allowed on " + req.path + " (use " + method + ")",
                              "invalid_request_error", "", "method_not_allowed"});
    return false;
  };
  if (req.path == "/v1/completions") {
    if (only("POST")) generate(Endpoint::completions, req.body, ex);
  } else if (req.path == "/v1/chat/completions") {
    if (only("POST")) generate(Endpoint::chat, req.body, ex);
  } else if (req.path == "/v1/models") {
    if (only("GET")) reply(*ex, 200, kJson, openai::models_body({model_ids[0]}, created, max_context));
  } else if (req.path.rfind("/v1/models/", 0) == 0) {
    if (!only("GET")) return;
    if (contains(model_ids, req.path.substr(11)))
      reply(*ex, 200, kJson, openai::models_body({model_ids[0]}, created, max_context));
    else
      reply_error(*ex, ApiError{404, "the model '" + req.path.substr(11) + "' does not exist", "invalid_request_error",
                                "model", "model_not_found"});
  } else if (req.path == "/health") {
    if (only("GET")) health(ex);
  } else if (req.path == "/metrics") {
    if (only("GET")) metrics_page(ex);
  } else {
    reply_error(*ex, ApiError{404, "no route " + req.method + " " + req.path, "invalid_request_error", "", "not_found"});
  }
}

void Gateway::Impl::health(const std::shared_ptr<HttpExchange>& ex) {
  auto cb = std::make_shared<std::function<void(std::optional<ReplicaStats>)>>(
      [this, post = post, ex](std::optional<ReplicaStats> stats) {
        const bool ok = stats.has_value();
        post([this, ex, ok] {
          reply(*ex, ok ? 200 : 503, kJson, ok ? R"({"status":"ok"})" : R"({"status":"unavailable"})");
        });
      });
  caf::anon_send(actor, health_atom::value, ReplicaStatsCallback(cb));
}

// The exposition is rendered once the replica's stats are in (or known to be missing): the
// I/O thread never waits for them.
void Gateway::Impl::metrics_page(const std::shared_ptr<HttpExchange>& ex) {
  auto cb = std::make_shared<std::function<void(std::optional<ReplicaStats>)>>(
      [this, post = post, ex](std::optional<ReplicaStats> stats) {
        post([this, ex, stats] {
          std::optional<TransportStats> transport;
          if (options.transport_stats) transport = options.transport_stats();
          reply(*ex, 200, "text/plain; version=0.0.4; charset=utf-8", metrics.render(stats, transport));
        });
      });
  caf::anon_send(actor, health_atom::value, ReplicaStatsCallback(cb));
}

// From a validated API request to the n GenerateRequests of its choices.
std::variant<std::vector<GenerateRequest>, ApiError> Gateway::Impl::build_requests(const openai::ApiRequest& r) {
  GenerateRequest g = r.generate;
  const Tokenizer& tok = card->tokenizer();
  if (r.endpoint == Endpoint::chat) {
    // The template's special tokens are written out in the text: parse_special makes them
    // tokens. The replica tokenizes it, off this I/O thread.
    g.prompt_text = render_chat(chat_format, r.messages);
    g.add_bos = true;
    g.parse_special = true;
    for (auto& s : chat_stop_strings(chat_format))
      if (!contains(g.stop, s) && g.stop.size() < wire_limits::kMaxStopStrings) g.stop.push_back(s);
  } else if (r.prompt_is_tokens) {
    for (TokenId t : r.prompt_tokens)
      if (t < 0 || t >= tok.n_vocab())
        return ApiError{400, "prompt token " + std::to_string(t) + " is outside the vocabulary (" + std::to_string(tok.n_vocab()) + ")",
                        "invalid_request_error", "prompt", ""};
    g.prompt_tokens = r.prompt_tokens;
  } else {
    g.prompt_text = r.prompt_text;  // the replica tokenizes it
  }
  if (g.max_tokens <= 0) g.max_tokens = openai::default_max_tokens(r.endpoint);
  // The replica's decoder is the judge of every field and size: ask it here, so a request it
  // would refuse without an id to answer gets a 400 now instead of no answer.
  try {
    DecodeResult d = decode(encode(g));
    if (!d.message) return openai::invalid_request("the request is out of bounds: " + d.error);
  } catch (const Error& e) {
    return openai::invalid_request(std::string("the request is out of bounds: ") + e.what());
  }
  std::vector<GenerateRequest> out(static_cast<size_t>(r.n), g);
  for (int i = 0; i < r.n; ++i)
    out[static_cast<size_t>(i)].sampling.seed = r.seed_given ? g.sampling.seed + static_cast<uint64_t>(i) : rng();
  return out;
}

void Gateway::Impl::generate(Endpoint endpoint, const std::string& body, const std::shared_ptr<HttpExchange>& ex) {
  auto parsed = openai::parse_request(endpoint, body);
  if (auto* e = std::get_if<ApiError>(&parsed)) return reply_error(*ex, *e);
  const openai::ApiRequest& r = std::get<openai::ApiRequest>(parsed);
  if (!r.model.empty() && !contains(model_ids, r.model))
    return reply_error(*ex, ApiError{404, "the model '" + r.model + "' does not exist; this server serves '" + model_ids[0] + "'",
                                     "invalid_request_error", "model", "model_not_found"});
  auto built = build_requests(r);
  if (auto* e = std::get_if<ApiError>(&built)) return reply_error(*ex, *e);
  auto job = std::make_shared<OpenAIJob>(this, ex, openai::ResponseMeta{endpoint, response_id(endpoint, rng), unix_seconds(), model_ids[0]}, r);
  job->key = next_job++;
  job->requests = std::move(std::get<std::vector<GenerateRequest>>(built));
  job->begin(job->requests.size());
  caf::anon_send(actor, gw_start_atom::value, GatewayJobPtr(job));
}

Gateway::Gateway(caf::actor_system& sys, ServerActor replica, std::shared_ptr<const ModelCard> card, std::string model_path,
                 int32_t max_context, GatewayOptions options)
    : impl_(std::make_unique<Impl>(sys, std::move(replica), std::move(card), max_context, std::move(options))) {
  Impl& g = *impl_;
  // The id clients name: general.name when the file has one, else the file's stem. Both, and
  // the path itself, are accepted.
  const std::string stem = std::filesystem::path(model_path).stem().string();
  const std::string& name = g.card->name();
  g.model_ids.push_back(name.empty() || name == model_path ? stem : name);
  for (const std::string& id : {stem, name, model_path})
    if (!id.empty() && !contains(g.model_ids, id)) g.model_ids.push_back(id);
  g.chat_format = detect_chat_format(g.card->chat_template());
  if (!g.options.stage_log.empty()) {
    g.stage_log.open(g.options.stage_log, std::ios::app);
    if (!g.stage_log) throw Error(ErrorCode::io, "cannot open the stage log " + g.options.stage_log);
  }
}

Gateway::~Gateway() { stop(); }

uint16_t Gateway::start() {
  Impl& g = *impl_;
  g.actor = g.sys.spawn(gateway_actor, g.replica, g.options.actor);
  g.server = std::make_unique<HttpServer>(
      g.options.http, [&g](HttpRequest req, std::shared_ptr<HttpExchange> ex) { g.handle(std::move(req), ex); },
      [&g](int status, const std::string& message) {
        g.metrics.http_response(status);
        const char* code = status == 413 ? "request_too_large" : status == 431 ? "header_too_large" : "invalid_http";
        return std::make_pair(std::string(kJson), openai::error_body(ApiError{status, message, "invalid_request_error", "", code}));
      });
  g.post = g.server->poster();
  try {
    return g.server->start();
  } catch (...) {
    caf::anon_send_exit(g.actor, caf::exit_reason::user_shutdown);
    throw;
  }
}

void Gateway::stop() {
  Impl& g = *impl_;
  if (g.server) g.server->stop();
  if (g.actor) caf::anon_send_exit(g.actor, caf::exit_reason::user_shutdown);
  g.actor = GatewayActor{};
}

const ServingMetrics& Gateway::metrics() const { return impl_->metrics; }
size_t Gateway::open_connections() const { return impl_->server ? impl_->server->open_connections() : 0; }
const std::string& Gateway::model_id() const { return impl_->model_ids[0]; }

}  // namespace celer
