// The HTTP gateway of a `celer serve` in another process, through a Beast client and raw
// sockets: routes, completions streamed and not (the same tokens as the client library),
// errors with their statuses, limits, a slowloris client and a client that leaves mid-stream
// while others keep being served, half-closed connections and Transfer-Encoding framing.
#include <catch2/catch.hpp>

#include <poll.h>
#include <signal.h>
#include <sys/socket.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <string>
#include <thread>
#include <utility>

#include <boost/asio.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <nlohmann/json.hpp>

#include "celer/client.hpp"
#include "serve_process.hpp"


using namespace celer;
using json = nlohmann::json;
namespace net = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;
using tcp = net::ip::tcp;

namespace {

// `celer serve --port 0 --http-port 0 ...` in another process.
class Server : public ServeProcess {
 public:
  explicit Server(const std::vector<std::string>& extra = {}) : ServeProcess(CELER_BIN, with_http(extra)) {}

 private:
  static std::vector<std::string> with_http(std::vector<std::string> extra) {
    extra.insert(extra.begin(), {"--http-port", "0"});
    return extra;
  }
};

struct Reply {
  int status = 0;
  std::string body;
  std::string content_type;
  json j() const { return json::parse(body); }
};

// One HTTP/1.1 connection (keep-alive: several requests may use it).
class Conn {
 public:
  explicit Conn(uint16_t port) : socket_(ioc_) { socket_.connect({net::ip::make_address("127.0.0.1"), port}); }

  Reply request(const std::string& method, const std::string& target, const std::string& body = {},
                const std::vector<std::pair<std::string, std::string>>& headers = {}) {
    http::request<http::string_body> req{http::string_to_verb(method), target, 11};
    req.set(http::field::host, "127.0.0.1");
    req.set(http::field::content_type, "application/json");
    for (const auto& [k, v] : headers) req.set(k, v);
    req.body() = body;
    req.prepare_payload();
    http::write(socket_, req);
    http::response_parser<http::string_body> parser;
    parser.body_limit(64 << 20);
    http::read(socket_, buffer_, parser);
    Reply r;
    r.status = static_cast<int>(parser.get().result_int());
    r.body = parser.get().body();
    r.content_type = std::string(parser.get()[http::field::content_type]);
    return r;
  }

  tcp::socket& socket() { return socket_; }

 private:
  net::io_context ioc_;
  tcp::socket socket_;
  beast::flat_buffer buffer_;
};

Reply post(uint16_t port, const std::string& target, const json& body) { return Conn(port).request("POST", target, body.dump()); }

// The "data: ..." payloads of an SSE body, in order.
std::vector<std::string> sse_events(const std::string& body) {
  std::vector<std::string> out;
  size_t pos = 0;
  while ((pos = body.find("data: ", pos)) != std::string::npos) {
    const size_t end = body.find("\n\n", pos);
    REQUIRE(end != std::string::npos);
    out.push_back(body.substr(pos + 6, end - pos - 6));
    pos = end + 2;
  }
  return out;
}

// What the server sends on a connection until it closes it; `closed` is false when it was
// still open after `timeout` (a server that forgot to close must fail a test, not hang it).
struct Received {
  std::string bytes;
  bool closed = false;
};

Received read_until_closed(tcp::socket& socket, std::chrono::milliseconds timeout = std::chrono::seconds(30)) {
  Received r;
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  for (;;) {
    using std::chrono::duration_cast, std::chrono::milliseconds;
    const auto left = duration_cast<milliseconds>(deadline - std::chrono::steady_clock::now());
    pollfd p{socket.native_handle(), POLLIN, 0};
    if (left.count() <= 0 || ::poll(&p, 1, static_cast<int>(left.count())) <= 0) return r;
    char buf[4096];
    const ssize_t n = ::recv(socket.native_handle(), buf, sizeof buf, 0);
    if (n <= 0) {  // FIN (or a reset)
      r.closed = true;
      return r;
    }
    r.bytes.append(buf, static_cast<size_t>(n));
  }
}

// The responses in `bytes`, in order; every one of them must be complete.
std::vector<Reply> parse_replies(const std::string& bytes) {
  std::vector<Reply> out;
  size_t at = 0;
  while (at < bytes.size()) {
    http::response_parser<http::string_body> parser;
    parser.eager(true);
    parser.body_limit(64 << 20);
    beast::error_code ec;
    while (!parser.is_done() && at < bytes.size()) {
      at += parser.put(net::buffer(bytes.data() + at, bytes.size() - at), ec);
      if (ec == http::error::need_more) ec = {};
      REQUIRE(!ec);
    }
    REQUIRE(parser.is_done());
    Reply r;
    r.status = static_cast<int>(parser.get().result_int());
    r.body = parser.get().body();
    r.content_type = std::string(parser.get()[http::field::content_type]);
    out.push_back(std::move(r));
  }
  return out;
}

// Sends `bytes` on a new connection and half-closes it (shutdown(SHUT_WR), as `nc -N` does),
// then reads until the server closes.
Received half_closed_exchange(uint16_t port, const std::string& bytes) {
  Conn conn(port);
  net::write(conn.socket(), net::buffer(bytes));
  conn.socket().shutdown(tcp::socket::shutdown_send);
  return read_until_closed(conn.socket());
}

std::string post_bytes(const std::string& target, const std::string& body) {
  return "POST " + target + " HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: " +
         std::to_string(body.size()) + "\r\n\r\n" + body;
}

Completion client_library(uint16_t port, const std::string& prompt, int max_tokens, float temperature, uint64_t seed) {
  auto c = Client::connect("127.0.0.1", port);
  REQUIRE(std::holds_alternative<std::unique_ptr<Client>>(c));
  RequestOptions o;
  o.max_tokens = max_tokens;
  o.ignore_eos = true;
  o.sampling.temperature = temperature;
  o.sampling.top_k = 0;
  o.sampling.top_p = 1;
  o.sampling.min_p = 0;
  o.sampling.seed = seed;
  auto r = std::get<std::unique_ptr<Client>>(c)->generate(prompt, o);
  REQUIRE(std::holds_alternative<Completion>(r));
  return std::get<Completion>(r);
}

std::string client_library_text(uint16_t port, const std::string& prompt, int max_tokens, float temperature, uint64_t seed) {
  return client_library(port, prompt, max_tokens, temperature, seed).text;
}

}  // namespace

TEST_CASE("gateway: health, models, routes", "[gateway]") {
  Server server;
  Conn conn(server.http_port());
  Reply h = conn.request("GET", "/health");
  CHECK(h.status == 200);
  CHECK(h.j()["status"] == "ok");
  Reply m = conn.request("GET", "/v1/models");  // the same connection: keep-alive
  REQUIRE(m.status == 200);
  CHECK(m.content_type == "application/json");
  const std::string id = m.j()["data"][0]["id"];
  CHECK(m.j()["object"] == "list");
  CHECK(m.j()["data"][0]["max_model_len"] == 2048);
  CHECK(conn.request("GET", "/v1/models/" + id).status == 200);
  CHECK(conn.request("GET", "/v1/models/stories260K").status == 200);  // the file stem is an id too
  Reply none = conn.request("GET", "/v1/nothing");
  CHECK(none.status == 404);
  CHECK(none.j()["error"]["type"] == "invalid_request_error");
  CHECK(conn.request("GET", "/v1/completions").status == 405);
  CHECK(conn.request("POST", "/health").status == 405);
  Reply metrics = conn.request("GET", "/metrics");
  CHECK(metrics.status == 200);
  CHECK(metrics.content_type.find("text/plain") == 0);
}

TEST_CASE("gateway: completions carry the client library's tokens, streamed or not", "[gateway]") {
  Server server;
  const Completion lib = client_library(server.port(), "Once upon a time", 30, 0.9f, 17);
  const std::string& expected = lib.text;
  json body = {{"model", "stories260K"}, {"prompt", "Once upon a time"}, {"max_tokens", 30}, {"temperature", 0.9},
               {"seed", 17}, {"ignore_eos", true}};
  Reply r = post(server.http_port(), "/v1/completions", body);
  REQUIRE(r.status == 200);
  json j = r.j();
  CHECK(j["object"] == "text_completion");
  CHECK(j["id"].get<std::string>().rfind("cmpl-", 0) == 0);
  CHECK(j["choices"][0]["text"] == expected);
  CHECK(j["choices"][0]["finish_reason"] == "length");
  CHECK(j["usage"]["completion_tokens"] == 30);
  CHECK(j["usage"]["prompt_tokens"].get<int>() > 0);
  CHECK(j["usage"]["total_tokens"] == j["usage"]["prompt_tokens"].get<int>() + 30);
  CHECK(j["usage"]["prompt_tokens_details"]["cached_tokens"].is_number());

  body["stream"] = true;
  body["stream_options"] = {{"include_usage", true}};
  Reply s = post(server.http_port(), "/v1/completions", body);
  REQUIRE(s.status == 200);
  CHECK(s.content_type == "text/event-stream");
  auto events = sse_events(s.body);
  REQUIRE(events.size() >= 12);
  CHECK(events.back() == "[DONE]");
  std::string text;
  int content_chunks = 0;
  for (size_t i = 0; i + 3 < events.size(); ++i) {
    json c = json::parse(events[i]);
    CHECK(c["object"] == "text_completion");
    CHECK(c["choices"][0]["finish_reason"].is_null());
    text += c["choices"][0]["text"].get<std::string>();
    ++content_chunks;
  }
  CHECK(content_chunks >= 10);  // streamed token by token, not at the end
  CHECK(text == expected);
  json fin = json::parse(events[events.size() - 3]);
  CHECK(fin["choices"][0]["finish_reason"] == "length");
  json usage = json::parse(events[events.size() - 2]);
  CHECK(usage["choices"].empty());
  CHECK(usage["usage"]["completion_tokens"] == 30);

  // Extensions for celer bench: each chunk's token ids, and the stage times with the end.
  body["return_token_ids"] = true;
  body["return_stage_times"] = true;
  auto ext = sse_events(post(server.http_port(), "/v1/completions", body).body);
  std::vector<TokenId> ids;
  json times;
  for (const auto& e : ext) {
    if (e == "[DONE]") continue;
    json c = json::parse(e);
    if (c.contains("stage_times")) times = c["stage_times"];
    for (const auto& ch : c["choices"])
      if (ch.contains("token_ids")) for (const auto& id : ch["token_ids"]) ids.push_back(id.get<TokenId>());
  }
  CHECK(ids == lib.tokens);
  REQUIRE(times.is_object());
  CHECK(times["first_token_us"].get<int64_t>() >= times["received_us"].get<int64_t>());
  CHECK(times["finished_us"].get<int64_t>() > 0);

  // Greedy is deterministic; n choices with a seed use seed, seed + 1, ...
  json greedy = {{"prompt", "The dog"}, {"max_tokens", 12}, {"temperature", 0}, {"ignore_eos", true}};
  CHECK(post(server.http_port(), "/v1/completions", greedy).j()["choices"][0]["text"] ==
        client_library_text(server.port(), "The dog", 12, 0, 0));
  json two = {{"prompt", "The dog"}, {"max_tokens", 12}, {"seed", 5}, {"n", 2}, {"ignore_eos", true}};
  Reply n2 = post(server.http_port(), "/v1/completions", two);
  REQUIRE(n2.status == 200);
  REQUIRE(n2.j()["choices"].size() == 2);
  CHECK(n2.j()["choices"][0]["index"] == 0);
  CHECK(n2.j()["choices"][1]["index"] == 1);
  CHECK(n2.j()["choices"][0]["text"] == client_library_text(server.port(), "The dog", 12, 1.0f, 5));
  CHECK(n2.j()["choices"][1]["text"] == client_library_text(server.port(), "The dog", 12, 1.0f, 6));
  CHECK(n2.j()["usage"]["completion_tokens"] == 24);
}

TEST_CASE("gateway: chat, logprobs and token prompts", "[gateway]") {
  Server server;
  json chat = {{"model", "stories260K"},
               {"messages", {{{"role", "system"}, {"content", "Tell stories."}}, {{"role", "user"}, {"content", "A dog"}}}},
               {"max_tokens", 8},
               {"temperature", 0},
               {"logprobs", true},
               {"top_logprobs", 2}};
  Reply r = post(server.http_port(), "/v1/chat/completions", chat);
  REQUIRE(r.status == 200);
  json j = r.j();
  CHECK(j["object"] == "chat.completion");
  CHECK(j["choices"][0]["message"]["role"] == "assistant");
  const int n = j["usage"]["completion_tokens"];
  CHECK(n >= 1);
  auto& content = j["choices"][0]["logprobs"]["content"];
  REQUIRE(static_cast<int>(content.size()) == n);
  CHECK(content[0]["top_logprobs"].size() == 2);
  CHECK(content[0]["logprob"].get<double>() <= 0);
  // Greedy: the chosen token is the most likely one.
  CHECK(content[0]["token"] == content[0]["top_logprobs"][0]["token"]);

  chat["stream"] = true;
  Reply s = post(server.http_port(), "/v1/chat/completions", chat);
  REQUIRE(s.status == 200);
  auto events = sse_events(s.body);
  REQUIRE(events.size() >= 3);
  json first = json::parse(events[0]);
  CHECK(first["object"] == "chat.completion.chunk");
  CHECK(first["choices"][0]["delta"]["role"] == "assistant");
  std::string text;
  for (size_t i = 1; i + 1 < events.size(); ++i) {
    json c = json::parse(events[i]);
    if (c["choices"][0]["delta"].contains("content")) text += c["choices"][0]["delta"]["content"].get<std::string>();
  }
  CHECK(text == j["choices"][0]["message"]["content"]);

  Reply tokens = post(server.http_port(), "/v1/completions", {{"prompt", {1, 400, 30}}, {"max_tokens", 3}, {"logprobs", 1}});
  REQUIRE(tokens.status == 200);
  CHECK(tokens.j()["usage"]["prompt_tokens"] == 3);
  CHECK(tokens.j()["choices"][0]["logprobs"]["tokens"].size() == tokens.j()["usage"]["completion_tokens"]);
  CHECK(post(server.http_port(), "/v1/completions", {{"prompt", {1, 999999}}}).status == 400);
}

TEST_CASE("gateway: bad requests get OpenAI errors with the right status", "[gateway]") {
  Server server;
  const uint16_t port = server.http_port();
  Conn conn(port);
  Reply malformed = conn.request("POST", "/v1/completions", "{\"prompt\": ");
  CHECK(malformed.status == 400);
  CHECK(malformed.j()["error"]["type"] == "invalid_request_error");
  Reply type = conn.request("POST", "/v1/completions", R"({"prompt":"x","max_tokens":"ten"})");
  CHECK(type.status == 400);
  CHECK(type.j()["error"]["param"] == "max_tokens");
  Reply model = conn.request("POST", "/v1/chat/completions", R"({"model":"gpt-4","messages":[{"role":"user","content":"x"}]})");
  CHECK(model.status == 404);
  CHECK(model.j()["error"]["code"] == "model_not_found");
  std::string huge;
  for (int i = 0; i < 700; ++i) huge += "Once upon a time ";
  Reply too_long = conn.request("POST", "/v1/completions", json{{"prompt", huge}}.dump());
  CHECK(too_long.status == 400);
  CHECK(too_long.j()["error"]["code"] == "context_length_exceeded");
  // The connection survived every error above.
  CHECK(conn.request("GET", "/health").status == 200);

  Reply big = Conn(port).request("POST", "/v1/completions", std::string(9 << 20, ' '));
  CHECK(big.status == 413);
  CHECK(big.j()["error"]["type"] == "invalid_request_error");
  Reply header = Conn(port).request("GET", "/health", {}, {{"X-Big", std::string(20000, 'a')}});
  CHECK(header.status == 431);
  CHECK(Conn(port).request("GET", "/health").status == 200);
}

TEST_CASE("gateway: a slowloris client is closed after the request timeout while others are served", "[gateway]") {
  Server server({"--http-request-timeout", "1500"});
  const uint16_t port = server.http_port();
  Conn slow(port);
  const std::string partial = "POST /v1/completions HTTP/1.1\r\nHost: x\r\nX-Slow: 1\r\n";
  net::write(slow.socket(), net::buffer(partial));
  const auto start = std::chrono::steady_clock::now();
  // Meanwhile another client is served, more than once.
  for (int i = 0; i < 3; ++i) {
    CHECK(Conn(port).request("GET", "/health").status == 200);
    CHECK(post(port, "/v1/completions", {{"prompt", "Hi"}, {"max_tokens", 4}}).status == 200);
  }
  char c;
  beast::error_code ec;
  const size_t n = slow.socket().read_some(net::buffer(&c, 1), ec);  // blocks until the server closes
  const double waited = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  CHECK(n == 0);
  CHECK(ec);  // eof or reset
  CHECK(waited > 1.0);
  CHECK(waited < 6.0);
}

// The value of one sample line of /metrics ("name{labels} value"), or -1 when absent.
double metric(uint16_t port, const std::string& series) {
  const std::string text = Conn(port).request("GET", "/metrics").body;
  const size_t at = text.find("\n" + series + " ");
  if (at == std::string::npos) return -1;
  return std::stod(text.substr(at + series.size() + 2));
}

TEST_CASE("gateway: a client that leaves mid-stream does not disturb the others and frees its KV blocks", "[gateway]") {
  Server server;
  const uint16_t port = server.http_port();
  CHECK(metric(port, "celer_kv_blocks{state=\"used\"}") == 0);
  for (int round = 0; round < 3; ++round) {
    Conn leaver(port);
    json body = {{"prompt", "Once upon a time"}, {"max_tokens", 1500}, {"ignore_eos", true}, {"stream", true}};
    http::request<http::string_body> req{http::verb::post, "/v1/completions", 11};
    req.set(http::field::host, "x");
    req.body() = body.dump();
    req.prepare_payload();
    http::write(leaver.socket(), req);
    // Wait for the first token to arrive, then hang up.
    std::string got;
    char buf[4096];
    while (got.find("data: ") == std::string::npos) {
      const size_t n = leaver.socket().read_some(net::buffer(buf));
      got.append(buf, n);
    }
    CHECK(metric(port, "celer_kv_blocks{state=\"used\"}") > 0);  // the stream holds its blocks
    leaver.socket().close();
  }
  // Each departure cancels its request: it leaves the batch and its blocks go back to the cache.
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(20);
  while (std::chrono::steady_clock::now() < deadline &&
         (metric(port, "celer_kv_blocks{state=\"used\"}") != 0 || metric(port, "celer_running_sequences") != 0))
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  CHECK(metric(port, "celer_kv_blocks{state=\"used\"}") == 0);
  CHECK(metric(port, "celer_running_sequences") == 0);
  CHECK(metric(port, "celer_client_disconnects_total") == 3);
  CHECK(metric(port, "celer_requests_total{outcome=\"cancelled\"}") == 3);
  // The server keeps serving, with the same answer as ever.
  json greedy = {{"prompt", "The cat"}, {"max_tokens", 10}, {"temperature", 0}, {"ignore_eos", true}};
  Reply r = post(port, "/v1/completions", greedy);
  REQUIRE(r.status == 200);
  CHECK(r.j()["choices"][0]["text"] == client_library_text(server.port(), "The cat", 10, 0, 0));
  CHECK(Conn(port).request("GET", "/health").status == 200);
}

TEST_CASE("gateway: /metrics counts what happened and the stage log has a line per request", "[gateway]") {
  const std::string log = "/tmp/celer-gateway-test-" + std::to_string(getpid()) + ".jsonl";
  std::remove(log.c_str());
  {
    Server server({"--stage-log", log});
    const uint16_t port = server.http_port();
    json body = {{"prompt", "Once upon a time"}, {"max_tokens", 6}, {"temperature", 0}, {"ignore_eos", true}, {"stream", true}};
    REQUIRE(post(port, "/v1/completions", body).status == 200);
    body["stream"] = false;
    body["n"] = 2;
    REQUIRE(post(port, "/v1/completions", body).status == 200);
    CHECK(post(port, "/v1/completions", json{{"prompt", 5}}).status == 400);
    CHECK(metric(port, "celer_http_responses_total{code=\"200\"}") == 2);  // (each scrape counts after it is rendered)
    CHECK(metric(port, "celer_replica_up") == 1);
    CHECK(metric(port, "celer_requests_total{outcome=\"length\"}") == 3);
    CHECK(metric(port, "celer_http_responses_total{code=\"400\"}") == 1);
    CHECK(metric(port, "celer_time_to_first_token_seconds_count") == 3);
    CHECK(metric(port, "celer_inter_token_latency_seconds_count") == 15);  // 5 gaps in each of 3 streams of 6
    CHECK(metric(port, "celer_e2e_request_latency_seconds_count") == 3);
    CHECK(metric(port, "celer_queue_depth{priority=\"normal\"}") == 0);
    CHECK(metric(port, "celer_actor_restarts_total{actor=\"cache\"}") == 0);
  }
  FILE* f = std::fopen(log.c_str(), "r");
  REQUIRE(f);
  char line[4096];
  int lines = 0;
  while (std::fgets(line, sizeof line, f)) {
    ++lines;
    const json j = json::parse(line);
    INFO(j.dump());
    CHECK(j["completion_tokens"] == 6);
    CHECK(j["finish_reason"] == "length");
    const char* order[] = {"gateway_received_us", "received_us", "queued_us", "admitted_us", "prefill_done_us",
                           "first_token_us", "last_token_us", "finished_us", "sent_us"};
    for (size_t k = 1; k < std::size(order); ++k) CHECK(j[order[k - 1]].get<int64_t>() <= j[order[k]].get<int64_t>());
    CHECK(j["first_sent_us"].get<int64_t>() >= j["first_token_us"].get<int64_t>());
    CHECK(j["last_sent_us"].get<int64_t>() <= j["sent_us"].get<int64_t>());
  }
  std::fclose(f);
  std::remove(log.c_str());
  CHECK(lines == 3);
}

TEST_CASE("gateway: pipelined requests on one connection are answered in order", "[gateway]") {
  Server server;
  Conn conn(server.http_port());
  // Two requests in one write: the second arrives while the first (a stream) is being answered.
  const std::string first = json{{"prompt", "Once upon a time"}, {"max_tokens", 40}, {"temperature", 0},
                                 {"ignore_eos", true}, {"stream", true}}.dump();
  std::string bytes = "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: " +
                      std::to_string(first.size()) + "\r\n\r\n" + first + "GET /health HTTP/1.1\r\nHost: x\r\n\r\n";
  net::write(conn.socket(), net::buffer(bytes));
  beast::flat_buffer buffer;
  http::response_parser<http::string_body> stream;
  http::read(conn.socket(), buffer, stream);
  CHECK(stream.get().result_int() == 200);
  const auto events = sse_events(stream.get().body());
  REQUIRE(!events.empty());
  CHECK(events.back() == "[DONE]");
  std::string text;
  for (const auto& e : events)
    if (e != "[DONE]") text += json::parse(e)["choices"][0]["text"].get<std::string>();
  CHECK(text == client_library_text(server.port(), "Once upon a time", 40, 0, 0));
  http::response_parser<http::string_body> health;
  http::read(conn.socket(), buffer, health);
  CHECK(health.get().result_int() == 200);
}

TEST_CASE("gateway: a client that leaves while its request waits in the queue cancels it before it runs", "[gateway]") {
  const std::string config = "/tmp/celer-gateway-queue-" + std::to_string(getpid()) + ".yaml";
  {
    FILE* f = std::fopen(config.c_str(), "w");
    REQUIRE(f);
    std::fprintf(f, "model: %s/stories260K.gguf\nmax_batch_size: 1\nmax_queue: 4\n", CELER_TEST_DATA);
    std::fclose(f);
  }
  Server server({"--config", config});
  const uint16_t port = server.http_port();
  // A holds the only batch slot for a while; B queues behind it and its client leaves.
  std::thread a([&] {
    json body = {{"prompt", "Once upon a time"}, {"max_tokens", 2000}, {"ignore_eos", true}, {"temperature", 0}};
    CHECK(post(port, "/v1/completions", body).status == 200);
  });
  while (metric(port, "celer_running_sequences") < 1) std::this_thread::sleep_for(std::chrono::milliseconds(2));
  {
    Conn b(port);
    const std::string body = json{{"prompt", "The dog ran to the park and"}, {"max_tokens", 20}, {"stream", true}}.dump();
    const std::string bytes = "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: " + std::to_string(body.size()) +
                              "\r\n\r\n" + body;
    net::write(b.socket(), net::buffer(bytes));
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
    while (metric(port, "celer_queue_depth{priority=\"normal\"}") < 1 && std::chrono::steady_clock::now() < deadline)
      std::this_thread::sleep_for(std::chrono::milliseconds(2));
    CHECK(metric(port, "celer_queue_depth{priority=\"normal\"}") == 1);
    // B hangs up while queued, abortively (SO_LINGER 0: a reset), which is how a client that is
    // gone differs from one that only half-closed (a FIN) and still waits for its answer.
    b.socket().set_option(net::socket_base::linger(true, 0));
    b.socket().close();
  }
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
  while (metric(port, "celer_queue_depth{priority=\"normal\"}") != 0 && std::chrono::steady_clock::now() < deadline)
    std::this_thread::sleep_for(std::chrono::milliseconds(2));
  const double running_a = metric(port, "celer_running_sequences");
  a.join();
  std::remove(config.c_str());
  // B left the queue while A still ran (it never ran: only A's prompt reached the prefix cache).
  CHECK(running_a == 1);
  CHECK(metric(port, "celer_requests_total{outcome=\"cancelled\"}") == 1);
  CHECK(metric(port, "celer_requests_total{outcome=\"length\"}") == 1);
  const double queried = metric(port, "celer_prefix_cache_queried_tokens_total");
  CHECK(queried == 5);  // "Once upon a time" with BOS
}

TEST_CASE("gateway: a half-closed GET /health is answered and then the connection is closed", "[gateway][half-close]") {
  Server server;
  const uint16_t port = server.http_port();
  // A few times: a server that takes the FIN for a disconnect loses the answer only when it sees
  // the FIN before the replica answers, which is a race (it nearly always did).
  for (int round = 0; round < 5; ++round) {
    INFO("round " << round);
    Received one = half_closed_exchange(port, "GET /health HTTP/1.1\r\nHost: x\r\n\r\n");
    CHECK(one.closed);
    auto replies = parse_replies(one.bytes);
    REQUIRE(replies.size() == 1);
    CHECK(replies[0].status == 200);
    CHECK(replies[0].j()["status"] == "ok");
  }
  // Requests pipelined before the FIN are all answered, in order.
  Received two =
      half_closed_exchange(port, "GET /health HTTP/1.1\r\nHost: x\r\n\r\nGET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n");
  CHECK(two.closed);
  auto replies = parse_replies(two.bytes);
  REQUIRE(replies.size() == 2);
  CHECK(replies[0].j()["status"] == "ok");
  CHECK(replies[1].j()["object"] == "list");
}

TEST_CASE("gateway: a half-closed completion gets its whole answer", "[gateway][half-close]") {
  Server server;
  const uint16_t port = server.http_port();
  const std::string expected = client_library_text(server.port(), "Once upon a time", 12, 0, 0);
  const json body = {{"prompt", "Once upon a time"}, {"max_tokens", 12}, {"temperature", 0}, {"ignore_eos", true}};
  Received plain = half_closed_exchange(port, post_bytes("/v1/completions", body.dump()));
  CHECK(plain.closed);
  auto replies = parse_replies(plain.bytes);
  REQUIRE(replies.size() == 1);
  REQUIRE(replies[0].status == 200);
  CHECK(replies[0].j()["choices"][0]["text"] == expected);
  CHECK(replies[0].j()["usage"]["completion_tokens"] == 12);
  // It was not taken for a client that left.
  CHECK(metric(port, "celer_client_disconnects_total") == 0);
  CHECK(metric(port, "celer_requests_total{outcome=\"cancelled\"}") == 0);
}

TEST_CASE("gateway: a half-closed streamed completion gets its whole stream", "[gateway][half-close]") {
  Server server;
  const uint16_t port = server.http_port();
  const std::string expected = client_library_text(server.port(), "Once upon a time", 12, 0, 0);
  const json body = {{"prompt", "Once upon a time"}, {"max_tokens", 12}, {"temperature", 0}, {"ignore_eos", true},
                     {"stream", true}};
  Received streamed = half_closed_exchange(port, post_bytes("/v1/completions", body.dump()));
  CHECK(streamed.closed);
  // The last SSE event, then the chunked body's terminator.
  const std::string tail = "data: [DONE]\n\n\r\n0\r\n\r\n";
  REQUIRE(streamed.bytes.size() > tail.size());
  CHECK(streamed.bytes.compare(streamed.bytes.size() - tail.size(), tail.size(), tail) == 0);
  auto replies = parse_replies(streamed.bytes);
  REQUIRE(replies.size() == 1);
  REQUIRE(replies[0].status == 200);
  CHECK(replies[0].content_type == "text/event-stream");
  std::string text;
  for (const auto& e : sse_events(replies[0].body))
    if (e != "[DONE]") text += json::parse(e)["choices"][0]["text"].get<std::string>();
  CHECK(text == expected);
  CHECK(metric(port, "celer_client_disconnects_total") == 0);
  CHECK(metric(port, "celer_requests_total{outcome=\"cancelled\"}") == 0);
}

TEST_CASE("gateway: a Transfer-Encoding that does not end with chunked is a 400 and closes the connection",
          "[gateway][transfer-encoding]") {
  Server server;
  const uint16_t port = server.http_port();
  // Each body is a valid request of its own: it must not be read as the next, pipelined one.
  const std::string smuggled = "GET /health HTTP/1.1\r\nHost: x\r\n\r\n";
  for (const std::string coding : {"gzip", "identity", "chunked, gzip", "xchunked", "chunked, chunked"}) {
    INFO("Transfer-Encoding: " << coding);
    Conn conn(port);
    const std::string bytes = "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                              "Transfer-Encoding: " + coding + "\r\n\r\n" + smuggled;
    net::write(conn.socket(), net::buffer(bytes));
    Received got = read_until_closed(conn.socket(), std::chrono::seconds(5));
    CHECK(got.closed);
    auto replies = parse_replies(got.bytes);
    CHECK(replies.size() == 1);  // (not fatal: every coding is tried)
    if (replies.empty()) continue;
    CHECK(replies[0].status == 400);
    CHECK(replies[0].j()["error"]["code"] == "invalid_http");
    CHECK(replies[0].j()["error"]["message"].get<std::string>().find("'" + coding + "'") != std::string::npos);
  }
  // chunked alone is still a body (in any case), and the connection stays open after it.
  for (const std::string coding : {"chunked", "CHUNKED"}) {
    INFO("Transfer-Encoding: " << coding);
    Conn conn(port);
    const std::string body = json{{"prompt", "Once upon a time"}, {"max_tokens", 3}, {"ignore_eos", true}}.dump();
    const std::string first = body.substr(0, 10), rest = body.substr(10);
    auto hex = [](size_t n) {
      char buf[32];
      std::snprintf(buf, sizeof buf, "%zx", n);
      return std::string(buf);
    };
    // Two chunks, then the last (empty) one.
    const std::string chunks =
        hex(first.size()) + "\r\n" + first + "\r\n" + hex(rest.size()) + "\r\n" + rest + "\r\n0\r\n\r\n";
    const std::string bytes = "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                              "Transfer-Encoding: " + coding + "\r\n\r\n" + chunks;
    net::write(conn.socket(), net::buffer(bytes));
    beast::flat_buffer buffer;
    http::response_parser<http::string_body> parser;
    http::read(conn.socket(), buffer, parser);
    REQUIRE(parser.get().result_int() == 200);
    CHECK(json::parse(parser.get().body())["usage"]["completion_tokens"] == 3);
    CHECK(conn.request("GET", "/health").status == 200);
  }
}

// A conversation re-sent as text: every turn's prompt repeats the turns before it, the
// server's own answers included, as the client received them. The server remembers the ids it
// generated (runtime/conversation_memory.hpp), so turn k finds all of turn k-1 in the prefix
// cache up to its last full block: the prompt and the answer, whose last token was sampled
// but never computed.
TEST_CASE("gateway: a conversation re-sent as text finds its earlier turns, answers included, in the prefix cache",
          "[gateway][conversation]") {
  Server server;
  const char* words[] = {"a red ball", "the big tree", "her mom", "a little cat", "the park"};
  for (const bool chat : {false, true})
    for (const bool session : {false, true}) {
      DYNAMIC_SECTION((chat ? "chat" : "completions") << (session ? " with a session id" : " without a session id")) {
        std::string prompt = std::string("Once upon a time, ") + (session ? "Tom" : "Sue") + (chat ? " sang" : " ran");
        json messages = json::array({{{"role", "user"}, {"content", prompt}}});
        int previous_positions = 0;  // positions of the previous turn whose KV was computed
        std::string previous_answer;
        for (int turn = 0; turn < 4; ++turn) {
          // Sampled at a high temperature: answers that re-tokenizing would not give back.
          json body = {{"max_tokens", 24}, {"temperature", 1.5}, {"seed", 7 + turn}};
          if (session) body["session_id"] = chat ? "chat-1" : "text-1";
          if (chat) body["messages"] = messages;
          else body["prompt"] = prompt;
          Reply r = post(server.http_port(), chat ? "/v1/chat/completions" : "/v1/completions", body);
          REQUIRE(r.status == 200);
          const json j = r.j();
          const int prompt_tokens = j["usage"]["prompt_tokens"];
          const int completion_tokens = j["usage"]["completion_tokens"];
          const int cached = j["usage"]["prompt_tokens_details"]["cached_tokens"];
          INFO("turn " << turn << ": " << prompt_tokens << " prompt tokens, " << cached << " cached; the last answer " << previous_answer);
          if (turn > 0) CHECK(cached >= previous_positions / 16 * 16);
          previous_positions = prompt_tokens + completion_tokens - 1;
          const std::string answer = chat ? j["choices"][0]["message"]["content"].get<std::string>()
                                          : j["choices"][0]["text"].get<std::string>();
          previous_answer = j["choices"][0]["finish_reason"].get<std::string>() + ": " + json(answer).dump();
          const std::string next = std::string(" Then she saw ") + words[turn] + ".";
          if (chat) {
            messages.push_back({{"role", "assistant"}, {"content", answer}});
            messages.push_back({{"role", "user"}, {"content", next}});
          } else {
            prompt += answer + next;
          }
        }
      }
    }
}
