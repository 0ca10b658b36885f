#include "actors/http_server.hpp"

#include <atomic>
#include <cstdio>
#include <deque>
#include <future>
#include <optional>
#include <sstream>
#include <thread>
#include <unordered_map>
#include <utility>  // before Asio: Boost 1.74's awaitable.hpp uses std::exchange without it

#include <boost/asio.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>

#include "runtime/error.hpp"

namespace celer {

namespace net = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;
using tcp = net::ip::tcp;

namespace {
class Session;
}

// Members used by sessions (options, hooks, counters) are declared before the io_context, so
// they are still alive while its destructor destroys the sessions its pending handlers hold.
struct HttpServer::Impl {
  HttpServerOptions opts;
  HttpHandler handler;
  HttpErrorBody error_body;
  std::atomic<size_t> connections{0};
  std::atomic<bool> stopped{false};
  bool running = false;
  std::unordered_map<Session*, std::weak_ptr<Session>> sessions;  // I/O thread only: closed by stop()
  net::io_context ioc{1};
  tcp::acceptor acceptor{ioc};
  net::steady_timer accept_retry{ioc};
  std::thread thread;

  void accept();
  void run();
};

namespace {

std::string serialize(http::response<http::string_body>& res) {
  res.prepare_payload();
  std::ostringstream os;
  os << res;
  return os.str();
}

bool is_http_error(const beast::error_code& ec) {
  return ec.category() == http::make_error_code(http::error::bad_method).category();
}

// A request's Transfer-Encoding: all its lines joined in order, as one list (RFC 9110 section 5.3).
std::string transfer_encoding(const http::fields& fields) {
  std::string joined;
  for (auto [it, end] = fields.equal_range(http::field::transfer_encoding); it != end; ++it) {
    if (!joined.empty()) joined += ", ";
    joined += std::string(it->value());
  }
  return joined;
}

// Whether a Transfer-Encoding list ends with chunked and names it only there, the one framing
// RFC 9112 section 6.1 lets a request's body have. Codings compare case-insensitively with
// spaces and tabs around them trimmed; empty list elements are skipped (RFC 9110 section 5.6.1).
bool chunked_once_and_last(beast::string_view codings) {
  int chunked = 0;
  bool last_chunked = false;
  size_t pos = 0;
  while (pos <= codings.size()) {
    size_t comma = codings.find(',', pos);
    if (comma == beast::string_view::npos) comma = codings.size();
    beast::string_view coding = codings.substr(pos, comma - pos);
    while (!coding.empty() && (coding.front() == ' ' || coding.front() == '\t')) coding.remove_prefix(1);
    while (!coding.empty() && (coding.back() == ' ' || coding.back() == '\t')) coding.remove_suffix(1);
    if (!coding.empty()) {
      last_chunked = beast::iequals(coding, "chunked");
      chunked += last_chunked;
    }
    pos = comma + 1;
  }
  return last_chunked && chunked == 1;
}

class Session;

class Exchange final : public HttpExchange {
 public:
  Exchange(std::weak_ptr<Session> session, unsigned version, bool keep_alive)
      : session_(std::move(session)), version_(version), keep_alive_(keep_alive) {}

  void respond(int status, const std::string& content_type, std::string body) override;
  void start_stream(int status, const std::string& content_type) override;
  void write(std::string data) override;
  void end() override;
  bool gone() const override { return gone_; }
  void on_gone(std::function<void()> callback) override { on_gone_ = std::move(callback); }

  // No request follows this one on the connection (its client half-closed): the answer says
  // Connection: close when its header is still to be written, and the connection closes after it.
  void last_on_connection() { keep_alive_ = false; }

  // The connection broke before the answer was complete.
  void mark_gone() {
    if (gone_ || state_ == State::done) return;
    gone_ = true;
    if (auto cb = std::move(on_gone_)) cb();
  }

 private:
  enum class State { fresh, streaming, done };
  void send(std::string bytes);
  void finish();
  std::weak_ptr<Session> session_;
  unsigned version_;
  bool keep_alive_;
  bool chunked_ = false;
  bool gone_ = false;
  State state_ = State::fresh;
  std::function<void()> on_gone_;
};

// One connection: read a request, hand it to the handler, write its answer, repeat (keep-alive).
// Reads and writes through the beast::tcp_stream never overlap, so its one timeout serves both:
// idle_timeout while waiting for a request's first byte, request_timeout for the rest of it,
// write_timeout for each write. While an answer is being produced, a wait on the raw socket
// notices a client that resets the connection, so its request is cancelled at once. A FIN there
// is a half-close (`nc -N`, shutdown(SHUT_WR) after the request): the client still reads, so the
// answers to what it sent are written in full and then the connection is closed. A client that
// closed both ways is noticed when a write to it fails.
class Session : public std::enable_shared_from_this<Session> {
 public:
  Session(tcp::socket socket, HttpServer::Impl* server) : stream_(std::move(socket)), server_(server) {
    ++server_->connections;
    beast::error_code ec;
    stream_.socket().set_option(tcp::no_delay(true), ec);  // each SSE token leaves at once
    stream_.socket().non_blocking(true, ec);               // for the peek in watch()
  }
  ~Session() {
    if (active_) active_->mark_gone();
    server_->sessions.erase(this);
    --server_->connections;
  }

  void start() {
    server_->sessions[this] = weak_from_this();
    read_next();
  }

  void send(std::string bytes) {
    if (closed_) return;
    pending_ += bytes;
    if (!writing_) write_pending();
  }

  // The active exchange wrote its last byte: continue (or close) once the writes are flushed.
  void exchange_done(bool keep_alive) {
    active_.reset();
    auto hold = std::move(keep_);  // the pending write or read keeps the session from here
    after_flush_ = keep_alive ? AfterFlush::read : AfterFlush::close;
    if (!writing_ && pending_.empty()) continue_after_flush();
  }

 private:
  enum class AfterFlush { nothing, read, close, linger };

  const HttpServerOptions& opts() const { return server_->opts; }

  void read_next() {
    if (closed_) return;
    parser_.emplace();
    parser_->header_limit(static_cast<uint32_t>(opts().header_limit));
    parser_->body_limit(opts().body_limit);
    if (buffer_.size() > 0) return read_header();  // a pipelined request is already here
    if (half_closed_) return close();              // and no other will come
    stream_.expires_after(opts().idle_timeout);
    stream_.async_read_some(buffer_.prepare(4096), [self = shared_from_this()](beast::error_code ec, size_t n) {
      if (ec) return self->close();
      self->buffer_.commit(n);
      self->read_header();
    });
  }

  // From the request's first byte on, all of it must arrive within request_timeout.
  void read_header() {
    stream_.expires_after(opts().request_timeout);
    http::async_read_header(stream_, buffer_, *parser_, [self = shared_from_this()](beast::error_code ec, size_t) {
      if (ec) return self->on_read_error(ec);
      self->on_header();
    });
  }

  void on_header() {
    auto& req = parser_->get();
    // A body whose last transfer coding is not chunked has no length this server can find, and
    // Beast would take it as empty, so it would be read as the next request (a request a proxy
    // in front sees as one body: request smuggling). RFC 9112 section 6.1: answer 400 and close.
    if (req.count(http::field::transfer_encoding) > 0) {
      const std::string codings = transfer_encoding(req);
      if (!chunked_once_and_last(codings))
        return refuse(400, "Transfer-Encoding '" + codings +
                               "' is not supported: a request's last transfer coding must be chunked, applied once");
    }
    // curl sends bodies over 1 KiB only after "100 Continue" (or a 1 s pause).
    if (beast::iequals(req[http::field::expect], "100-continue") && !parser_->is_done()) {
      auto msg = std::make_shared<std::string>("HTTP/1.1 100 Continue\r\n\r\n");
      net::async_write(stream_, net::buffer(*msg), [self = shared_from_this(), msg](beast::error_code ec, size_t) {
        if (ec) return self->close();
        self->read_body();
      });
      return;
    }
    read_body();
  }

  void read_body() {
    if (parser_->is_done()) return on_request();
    http::async_read(stream_, buffer_, *parser_, [self = shared_from_this()](beast::error_code ec, size_t) {
      if (ec) return self->on_read_error(ec);
      self->on_request();
    });
  }

  void on_read_error(const beast::error_code& ec) {
    if (ec == http::error::header_limit)
      return refuse(431, "the request header is larger than " + std::to_string(opts().header_limit) + " bytes");
    if (ec == http::error::body_limit)
      return refuse(413, "the request body is larger than " + std::to_string(opts().body_limit) + " bytes");
    if (is_http_error(ec) && ec != http::error::end_of_stream && ec != http::error::partial_message)
      return refuse(400, "malformed HTTP request: " + ec.message());
    close();  // EOF, reset, or the request did not arrive within request_timeout
  }

  // An error answered by the server itself, then the connection is closed: what the client may
  // still be sending is read and dropped first (for a while), so it sees the answer instead of
  // a reset.
  void refuse(int status, const std::string& message) {
    auto [type, body] = server_->error_body(status, message);
    http::response<http::string_body> res{static_cast<http::status>(status), 11};
    res.set(http::field::server, "celer");
    res.set(http::field::content_type, type);
    res.keep_alive(false);
    res.body() = std::move(body);
    send(serialize(res));
    after_flush_ = AfterFlush::linger;
    if (!writing_ && pending_.empty()) continue_after_flush();
  }

  void on_request() {
    auto req = parser_->release();
    HttpRequest r;
    r.method = std::string(req.method_string());
    r.target = std::string(req.target());
    r.path = r.target.substr(0, r.target.find('?'));
    r.body = std::move(req.body());
    auto exchange = std::make_shared<Exchange>(weak_from_this(), req.version(), req.keep_alive());
    active_ = exchange;
    // While the answer is produced no read may be pending (a pipelined request waits), so the
    // session holds itself until the exchange ends or the connection closes.
    keep_ = shared_from_this();
    stream_.expires_never();
    watch();
    try {
      server_->handler(std::move(r), exchange);
    } catch (const std::exception& e) {
      exchange->respond(500, "text/plain", std::string("internal error: ") + e.what());
    }
  }

  // Readable while an answer is pending means a pipelined request (data), a half-close (EOF)
  // or a reset (an error): peek to tell which. A pipelined request stops the watch, and so does
  // a half-close (the socket stays readable at EOF, so a further wait would spin); from then on
  // a failed write notices a client that left. A reset closes at once, cancelling the request.
  void watch() {
    if (half_closed_) return on_half_close();  // a pipelined request after the FIN was read
    if (watching_ || closed_) return;
    watching_ = true;
    stream_.socket().async_wait(tcp::socket::wait_read, [self = shared_from_this()](beast::error_code ec) {
      self->watching_ = false;
      if (ec == net::error::operation_aborted || self->closed_ || !self->active_) return;
      if (ec) return self->close();
      char c;
      beast::error_code peek_ec;
      const size_t n = self->stream_.socket().receive(net::buffer(&c, 1), tcp::socket::message_peek, peek_ec);
      if (peek_ec == net::error::would_block) return self->watch();
      if (peek_ec == net::error::eof || (!peek_ec && n == 0)) return self->on_half_close();
      if (peek_ec) self->close();  // ECONNRESET: the client is gone
    });
  }

  // The client sent its last byte. Requests already buffered (pipelined before the FIN) are
  // still answered in turn; the answer to the last one closes the connection.
  void on_half_close() {
    half_closed_ = true;
    if (active_ && buffer_.size() == 0) active_->last_on_connection();
  }

  void write_pending() {
    writing_ = true;
    inflight_.swap(pending_);
    pending_.clear();
    stream_.expires_after(opts().write_timeout);
    net::async_write(stream_, net::buffer(inflight_), [self = shared_from_this()](beast::error_code ec, size_t) {
      self->writing_ = false;
      self->inflight_.clear();
      if (ec) return self->close();
      if (!self->pending_.empty()) return self->write_pending();
      self->continue_after_flush();
    });
  }

  void continue_after_flush() {
    const AfterFlush next = after_flush_;
    after_flush_ = AfterFlush::nothing;
    switch (next) {
      case AfterFlush::nothing: return;
      case AfterFlush::read: return read_next();
      case AfterFlush::close: return close();
      case AfterFlush::linger: return linger();
    }
  }

  void linger() {
    beast::error_code ec;
    stream_.socket().shutdown(tcp::socket::shutdown_send, ec);
    stream_.expires_after(std::min<std::chrono::milliseconds>(opts().request_timeout, std::chrono::seconds(5)));
    drain();
  }

  void drain() {
    if (closed_) return;
    if (drained_ > 4 * opts().body_limit + (1 << 20)) return close();
    stream_.async_read_some(net::buffer(scratch_), [self = shared_from_this()](beast::error_code ec, size_t n) {
      if (ec) return self->close();
      self->drained_ += n;
      self->drain();
    });
  }

 public:
  // Closes the connection; an exchange still active learns its client is gone.
  void close() {
    if (closed_) return;
    auto hold = std::move(keep_);  // released when this returns
    closed_ = true;
    if (active_) active_->mark_gone();
    active_.reset();
    beast::error_code ec;
    stream_.socket().shutdown(tcp::socket::shutdown_both, ec);
    stream_.close();
  }

 private:
  beast::tcp_stream stream_;
  HttpServer::Impl* server_;  // outlives every session (see Impl)
  beast::flat_buffer buffer_;
  std::optional<http::request_parser<http::string_body>> parser_;
  std::string pending_;   // bytes waiting for the current write to finish (coalesced)
  std::string inflight_;  // bytes of the current write
  bool writing_ = false;
  bool watching_ = false;
  bool half_closed_ = false;  // the client's FIN was seen: no bytes follow those in buffer_
  bool closed_ = false;
  AfterFlush after_flush_ = AfterFlush::nothing;
  std::shared_ptr<Exchange> active_;
  std::shared_ptr<Session> keep_;  // itself, while an exchange is active
  size_t drained_ = 0;
  char scratch_[16384];
};

void Exchange::send(std::string bytes) {
  if (auto s = session_.lock()) s->send(std::move(bytes));
}

void Exchange::finish() {
  state_ = State::done;
  on_gone_ = nullptr;
  if (auto s = session_.lock()) s->exchange_done(keep_alive_);
}

void Exchange::respond(int status, const std::string& content_type, std::string body) {
  if (state_ != State::fresh || gone_) return;
  http::response<http::string_body> res{static_cast<http::status>(status), version_};
  res.set(http::field::server, "celer");
  res.set(http::field::content_type, content_type);
  res.keep_alive(keep_alive_);
  res.body() = std::move(body);
  send(serialize(res));
  finish();
}

void Exchange::start_stream(int status, const std::string& content_type) {
  if (state_ != State::fresh || gone_) return;
  http::response<http::empty_body> res{static_cast<http::status>(status), version_};
  res.set(http::field::server, "celer");
  res.set(http::field::content_type, content_type);
  res.set(http::field::cache_control, "no-cache");
  res.set("X-Accel-Buffering", "no");  // tells a proxy in front not to buffer the stream
  if (version_ >= 11) {
    chunked_ = true;
    res.chunked(true);
  } else {
    keep_alive_ = false;  // HTTP/1.0 has no chunks: the end of the stream is the end of the connection
  }
  res.keep_alive(keep_alive_);
  std::ostringstream os;
  os << res.base();
  send(os.str());
  state_ = State::streaming;
}

void Exchange::write(std::string data) {
  if (state_ != State::streaming || gone_ || data.empty()) return;  // an empty chunk would end the body
  if (chunked_) send(beast::buffers_to_string(http::make_chunk(net::buffer(data))));
  else send(std::move(data));
}

void Exchange::end() {
  if (state_ != State::streaming) return;
  if (!gone_ && chunked_) send(beast::buffers_to_string(http::make_chunk_last()));
  finish();
}

}  // namespace

void HttpServer::Impl::accept() {
  acceptor.async_accept([this](beast::error_code ec, tcp::socket socket) {
    if (stopped || ec == net::error::operation_aborted) return;
    if (ec) {
      // Out of file descriptors (or a similar transient failure): try again shortly rather
      // than spin.
      accept_retry.expires_after(std::chrono::milliseconds(100));
      accept_retry.async_wait([this](beast::error_code e) {
        if (!e) accept();
      });
      return;
    }
    std::make_shared<Session>(std::move(socket), this)->start();
    accept();
  });
}

void HttpServer::Impl::run() {
  // A handler that throws must not take the server down: report it and keep serving.
  while (!stopped) {
    try {
      ioc.run();
      return;
    } catch (const std::exception& e) {
      std::fprintf(stderr, "celer: http: %s\n", e.what());
    }
  }
}

HttpServer::HttpServer(HttpServerOptions options, HttpHandler handler, HttpErrorBody error_body)
    : impl_(std::make_shared<Impl>()) {
  impl_->opts = std::move(options);
  impl_->handler = std::move(handler);
  impl_->error_body = std::move(error_body);
}

HttpServer::~HttpServer() { stop(); }

uint16_t HttpServer::start() {
  Impl& s = *impl_;
  beast::error_code ec;
  tcp::resolver resolver(s.ioc);
  auto results = resolver.resolve(s.opts.host, std::to_string(s.opts.port), tcp::resolver::passive, ec);
  const std::string where = s.opts.host + ":" + std::to_string(s.opts.port);
  if (ec || results.empty()) throw Error(ErrorCode::io, "cannot resolve http address " + where + ": " + ec.message());
  const tcp::endpoint endpoint = results.begin()->endpoint();
  s.acceptor.open(endpoint.protocol(), ec);
  if (!ec) s.acceptor.set_option(net::socket_base::reuse_address(true), ec);
  if (!ec) s.acceptor.bind(endpoint, ec);
  if (!ec) s.acceptor.listen(net::socket_base::max_listen_connections, ec);
  if (ec) throw Error(ErrorCode::io, "cannot listen for http on " + where + ": " + ec.message());
  const uint16_t port = s.acceptor.local_endpoint().port();
  s.accept();
  s.running = true;
  s.thread = std::thread([impl = impl_.get()] { impl->run(); });
  return port;
}

void HttpServer::stop() {
  Impl& s = *impl_;
  if (!s.running) return;
  s.running = false;
  // Close the listener and every connection on the I/O thread (their exchanges report their
  // clients gone), then stop it.
  std::promise<void> closed;
  net::post(s.ioc, [&s, &closed] {
    beast::error_code ec;
    s.acceptor.close(ec);
    std::vector<std::shared_ptr<Session>> open;
    for (auto& [ptr, weak] : s.sessions)
      if (auto session = weak.lock()) open.push_back(std::move(session));
    for (auto& session : open) session->close();
    closed.set_value();
  });
  closed.get_future().wait_for(std::chrono::seconds(5));
  s.stopped = true;
  s.ioc.stop();
  if (s.thread.joinable()) s.thread.join();
  beast::error_code ec;
  s.acceptor.close(ec);
}

void HttpServer::post(std::function<void()> f) {
  if (!impl_->stopped) net::post(impl_->ioc, std::move(f));
}

std::function<void(std::function<void()>)> HttpServer::poster() const {
  return [weak = std::weak_ptr<Impl>(impl_)](std::function<void()> f) {
    if (auto s = weak.lock(); s && !s->stopped) net::post(s->ioc, std::move(f));
  };
}

size_t HttpServer::open_connections() const { return impl_->connections; }

}  // namespace celer
