#include "celer/client.hpp"

#include <atomic>
#include <chrono>
#include <cstdlib>

#include <caf/all.hpp>
#include <caf/io/all.hpp>

#include "actors/transport.hpp"
#include "actors/interfaces.hpp"
#include "runtime/error.hpp"

namespace celer {
namespace {

// Nothing heard about a request for this long means the server is stuck: the stream ends
// with an error instead of waiting forever.
constexpr auto kIdleTimeout = std::chrono::minutes(10);

}  // namespace

struct Client::Impl {
  caf::actor_system_config cfg;
  std::unique_ptr<caf::actor_system> sys;
  std::unique_ptr<Transport> transport;
  ServerActor server;
  std::atomic<RequestId> next_id{1};
  uint64_t max_message_bytes = 0;
};

namespace {
// What CAF adds to a WireMessage on the wire (BASP header, message header, type name), with room.
constexpr uint64_t kMessageOverhead = 1024;
}  // namespace

struct Client::Stream::Impl {
  std::unique_ptr<caf::scoped_actor> self;
  ServerActor server;
  RequestActor request;  // the request actor, known from its first message
  bool cancel_pending = false;
  bool ended = false;
  Completion partial;
  GenerateOutcome result;
};

Client::Client(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Client::~Client() = default;

std::variant<std::unique_ptr<Client>, ClientError> Client::connect(const std::string& host, uint16_t port,
                                                                   const ConnectOptions& options) {
  auto impl = std::make_unique<Impl>();
  impl->cfg.load<caf::io::middleman>();
  TlsConfig tls = tls_from_environment();
  if (!options.tls_certificate.empty()) tls.certificate = options.tls_certificate;
  if (!options.tls_key.empty()) tls.key = options.tls_key;
  if (!options.tls_ca.empty()) tls.ca = options.tls_ca;
  try {
    configure_tls(impl->cfg, tls);
  } catch (const Error& e) {
    return ClientError{ErrorKind::invalid_request, e.what()};
  }
  add_message_types(impl->cfg);
  // The client's actors only wait for tokens: the sharing policy's threads sleep while idle,
  // where the default work-stealing threads poll and take CPU from a server on the same machine.
  impl->cfg.set("scheduler.policy", caf::atom("sharing"));
  impl->cfg.set("scheduler.max-threads", 2);
  if (options.heartbeat_ms > 0)
    impl->cfg.set("middleman.heartbeat-interval", caf::timespan{std::chrono::milliseconds(options.heartbeat_ms)});
  impl->sys = std::make_unique<caf::actor_system>(impl->cfg);
  TransportLimits limits;
  limits.token = options.token;
  limits.tls = tls;
  impl->max_message_bytes = options.max_message_bytes;
  if (limits.token.empty())
    if (const char* env = std::getenv("CELER_TOKEN")) limits.token = env;
  try {
    impl->transport = std::make_unique<Transport>(*impl->sys, std::move(limits));
    impl->server = impl->transport->connect<ServerActor>(host, port, std::chrono::milliseconds(std::max<int64_t>(1, options.timeout_ms)));
  } catch (const Error& e) {
    return ClientError{ErrorKind::unavailable, e.what()};
  }
  return std::unique_ptr<Client>(new Client(std::move(impl)));
}

Client::Stream::Stream(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Client::Stream::Stream(Stream&&) noexcept = default;
Client::Stream& Client::Stream::operator=(Stream&&) noexcept = default;

Client::Stream::~Stream() {
  if (impl_ && !impl_->ended) cancel();
}

void Client::Stream::cancel() {
  if (!impl_ || impl_->ended) return;
  if (impl_->request) (*impl_->self)->send(impl_->request, cancel_atom::value);
  else impl_->cancel_pending = true;
}

const GenerateOutcome& Client::Stream::result() const { return impl_->result; }

std::optional<TokenChunk> Client::Stream::next() {
  Impl& s = *impl_;
  std::optional<TokenChunk> out;
  while (!s.ended && !out) {
    (*s.self)->receive(
        [&](event_atom, const WireMessage& wm) {
          if (!s.request) {
            s.request = caf::actor_cast<RequestActor>((*s.self)->current_sender());
            if (s.cancel_pending && s.request) (*s.self)->send(s.request, cancel_atom::value);
          }
          DecodeResult d = decode(wm);
          if (!d.message) {
            s.ended = true;
            s.result = ClientError{ErrorKind::internal, "malformed reply from the server: " + d.error};
          } else if (auto* chunk = std::get_if<TokenChunk>(&*d.message)) {
            if (chunk->is_introduction()) return;
            s.partial.tokens.insert(s.partial.tokens.end(), chunk->tokens.begin(), chunk->tokens.end());
            s.partial.text += chunk->text;
            out = std::move(*chunk);
          } else if (auto* fin = std::get_if<Finished>(&*d.message)) {
            s.ended = true;
            s.partial.reason = fin->reason;
            s.partial.prompt_tokens = fin->prompt_tokens;
            s.partial.completion_tokens = fin->completion_tokens;
            s.partial.cached_tokens = fin->cached_tokens;
            s.partial.times = fin->times;
            s.result = std::move(s.partial);
          } else if (auto* err = std::get_if<ErrorReply>(&*d.message)) {
            s.ended = true;
            s.result = ClientError{err->kind, err->message};
          }
        },
        [&](caf::down_msg&) {
          s.ended = true;
          s.result = ClientError{ErrorKind::unavailable, "the connection to the server was lost"};
        },
        caf::after(kIdleTimeout) >> [&] {
          s.ended = true;
          s.result = ClientError{ErrorKind::unavailable, "no answer from the server for 10 minutes"};
        });
  }
  return out;
}

Client::Stream Client::start(GenerateRequest request) {
  auto s = std::make_unique<Stream::Impl>();
  s->self = std::make_unique<caf::scoped_actor>(*impl_->sys);
  s->server = impl_->server;
  (*s->self)->monitor(s->server);
  request.id = impl_->next_id.fetch_add(1);
  WireMessage wm = encode(request);
  const uint64_t bytes = wm.words.size() * sizeof(uint64_t) + kMessageOverhead;
  if (bytes > impl_->max_message_bytes) {
    s->ended = true;
    s->result = ClientError{ErrorKind::invalid_request,
                            "the request is " + std::to_string(bytes) + " bytes on the wire, over the server's bound of " +
                                std::to_string(impl_->max_message_bytes) +
                                " (listen.max_message_bytes; ConnectOptions::max_message_bytes)"};
    return Stream(std::move(s));
  }
  (*s->self)->send(s->server, generate_atom::value, std::move(wm));
  return Stream(std::move(s));
}

namespace {
GenerateRequest make_request(const RequestOptions& o) {
  GenerateRequest r;
  r.sampling = o.sampling;
  r.max_tokens = o.max_tokens;
  r.stop = o.stop;
  r.ignore_eos = o.ignore_eos;
  r.add_bos = o.add_bos;
  r.priority = o.priority.value_or(Priority::normal);
  r.priority_given = o.priority.has_value();
  r.tenant = o.tenant;
  r.session_id = o.session_id;
  r.deadline_ms = o.timeout_ms > 0 ? unix_us() / 1000 + o.timeout_ms : 0;
  r.logprobs = o.logprobs;
  return r;
}
}  // namespace

std::variant<ModelInfo, ClientError> Client::model_info(int64_t timeout_ms) {
  caf::scoped_actor self{*impl_->sys};
  std::variant<ModelInfo, ClientError> out = ClientError{ErrorKind::unavailable, "no answer"};
  self->request(impl_->server, std::chrono::milliseconds(std::max<int64_t>(1, timeout_ms)), info_atom::value)
      .receive(
          [&](const WireMessage& wm) {
            DecodeResult d = decode(wm);
            if (d.message && std::holds_alternative<ModelInfo>(*d.message)) out = std::get<ModelInfo>(*d.message);
            else out = ClientError{ErrorKind::internal, "malformed model info from the server: " + (d.message ? std::string(message_name(*d.message)) : d.error)};
          },
          [&](const caf::error& e) {
            out = ClientError{ErrorKind::unavailable, "the server did not say which model it serves: " + impl_->sys->render(e)};
          });
  return out;
}

std::variant<ChaosReply, ClientError> Client::inject_fault(const ChaosFault& fault, int64_t timeout_ms) {
  caf::scoped_actor self{*impl_->sys};
  std::variant<ChaosReply, ClientError> out = ClientError{ErrorKind::unavailable, "no answer"};
  self->request(caf::actor_cast<NodeActor>(impl_->server), std::chrono::milliseconds(std::max<int64_t>(1, timeout_ms)),
                chaos_atom::value, encode(fault))
      .receive(
          [&](const WireMessage& wm) {
            DecodeResult d = decode(wm);
            if (d.message && std::holds_alternative<ChaosReply>(*d.message)) out = std::get<ChaosReply>(*d.message);
            else if (d.message && std::holds_alternative<ErrorReply>(*d.message))
              out = ClientError{std::get<ErrorReply>(*d.message).kind, std::get<ErrorReply>(*d.message).message};
            else out = ClientError{ErrorKind::internal, "malformed answer to a fault: " + (d.message ? std::string(message_name(*d.message)) : d.error)};
          },
          [&](const caf::error& e) { out = ClientError{ErrorKind::unavailable, "the fault was not taken: " + impl_->sys->render(e)}; });
  return out;
}

std::variant<std::string, ClientError> Client::cluster_status(int64_t timeout_ms) {
  caf::scoped_actor self{*impl_->sys};
  std::variant<std::string, ClientError> out = ClientError{ErrorKind::unavailable, "no answer"};
  self->request(caf::actor_cast<NodeActor>(impl_->server), std::chrono::milliseconds(std::max<int64_t>(1, timeout_ms)),
                status_atom::value)
      .receive(
          [&](const WireMessage& wm) {
            DecodeResult d = decode(wm);
            if (d.message && std::holds_alternative<ClusterStatus>(*d.message)) out = std::get<ClusterStatus>(*d.message).json;
            else out = ClientError{ErrorKind::internal, "malformed status: " + (d.message ? std::string(message_name(*d.message)) : d.error)};
          },
          [&](const caf::error& e) { out = ClientError{ErrorKind::unavailable, "no status: " + impl_->sys->render(e)}; });
  return out;
}

Client::Stream Client::stream(const std::string& prompt, const RequestOptions& options) {
  GenerateRequest r = make_request(options);
  r.prompt_text = prompt;
  return start(std::move(r));
}

Client::Stream Client::stream_tokens(std::vector<TokenId> prompt, const RequestOptions& options) {
  GenerateRequest r = make_request(options);
  r.prompt_tokens = std::move(prompt);
  return start(std::move(r));
}

GenerateOutcome Client::drain(Stream stream, const std::function<bool(const TokenChunk&)>& on_chunk) {
  while (auto chunk = stream.next())
    if (on_chunk && !on_chunk(*chunk)) stream.cancel();
  return stream.result();
}

GenerateOutcome Client::generate(const std::string& prompt, const RequestOptions& options,
                                 const std::function<bool(const TokenChunk&)>& on_chunk) {
  return drain(stream(prompt, options), on_chunk);
}

GenerateOutcome Client::generate_tokens(std::vector<TokenId> prompt, const RequestOptions& options,
                                        const std::function<bool(const TokenChunk&)>& on_chunk) {
  return drain(stream_tokens(std::move(prompt), options), on_chunk);
}

}  // namespace celer
