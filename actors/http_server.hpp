// A small HTTP/1.1 server on Boost.Beast: one asio::io_context on one dedicated thread owns the
// listener and every connection, all asynchronous, so an idle keep-alive connection costs a
// socket and a few hundred bytes, never a thread. It knows nothing about OpenAI or CAF: each
// request goes to a handler with an HttpExchange through which the answer is written, at once
// or later, whole or as a chunked stream.
//
// Limits (HttpServerOptions): a request's header larger than header_limit gets 431 and its body
// larger than body_limit 413, both then closed; a request that has begun must arrive whole within
// request_timeout (a slowloris client that never finishes its header is closed); a connection
// waiting for its next request is closed after idle_timeout; a client that does not read what is
// written for write_timeout is dropped. Malformed HTTP gets 400, and so does a request whose
// Transfer-Encoding does not end with chunked (RFC 9112 section 6.1), both then closed. Error
// bodies come from the error_body hook (the gateway makes them OpenAI error JSON).
//
// A client that half-closes (shutdown(SHUT_WR) after its request, as `nc -N` does) still gets
// its answers in full, then the connection is closed. A reset while an answer is pending is
// noticed at once; a client that closed both ways is noticed at the first write that fails.
//
// Threads: the handler, HttpExchange's methods and the callbacks run on the I/O thread only.
// Other threads hand work to it with post().
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>

namespace celer {

struct HttpServerOptions {
  std::string host = "127.0.0.1";
  uint16_t port = 0;  // 0: ephemeral
  size_t header_limit = 16 * 1024;
  size_t body_limit = 8 * 1024 * 1024;
  std::chrono::milliseconds request_timeout{30'000};
  std::chrono::milliseconds idle_timeout{120'000};
  std::chrono::milliseconds write_timeout{30'000};
};

struct HttpRequest {
  std::string method;  // "GET", "POST", ...
  std::string target;  // as sent: path and query
  std::string path;    // target without the query
  std::string body;
};

// One request's answer. Exactly one of respond() or start_stream() ... end() is used.
class HttpExchange {
 public:
  virtual ~HttpExchange() = default;
  virtual void respond(int status, const std::string& content_type, std::string body) = 0;
  // A streamed answer: the header now (chunked transfer), then each write() goes out as one
  // chunk as soon as the socket takes it (no buffering beyond the socket's), then end().
  virtual void start_stream(int status, const std::string& content_type) = 0;
  virtual void write(std::string data) = 0;
  virtual void end() = 0;
  // The client went away (reset its connection, or a write failed or timed out; a half-close is
  // not leaving): later writes are dropped. on_gone's callback runs once when that happens
  // before the exchange ended.
  virtual bool gone() const = 0;
  virtual void on_gone(std::function<void()> callback) = 0;
};

using HttpHandler = std::function<void(HttpRequest request, std::shared_ptr<HttpExchange> exchange)>;
// The body of an error the server itself answers (status, message) -> (content type, body).
using HttpErrorBody = std::function<std::pair<std::string, std::string>(int status, const std::string& message)>;

class HttpServer {
 public:
  HttpServer(HttpServerOptions options, HttpHandler handler, HttpErrorBody error_body);
  ~HttpServer();  // stop()
  HttpServer(const HttpServer&) = delete;
  HttpServer& operator=(const HttpServer&) = delete;

  // Binds and listens, then runs the I/O thread; returns the bound port. Throws Error(io).
  uint16_t start();
  // Closes the listener and every connection and joins the I/O thread. Work posted afterwards
  // is dropped.
  void stop();
  // Runs f on the I/O thread (from any thread).
  void post(std::function<void()> f);
  // The same as a function that may outlive the server (then it drops the work): for actors
  // whose last events can arrive after the server stopped.
  std::function<void(std::function<void()>)> poster() const;

  size_t open_connections() const;  // for counters

  struct Impl;  // public for the connection objects in http_server.cpp

 private:
  std::shared_ptr<Impl> impl_;
};

}  // namespace celer
