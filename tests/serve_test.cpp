// `celer serve` as an operator meets it: starts that cannot succeed fail fast with one line
// naming the key and the problem, SIGTERM always stops the process within its grace period,
// and streams cut by a shutdown end with an error their clients see.
#include <catch2/catch.hpp>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <chrono>
#include <string>
#include <thread>
#include <vector>

#include "celer/client.hpp"
#include "serve_process.hpp"
#include "test_util.hpp"

using namespace celer;
using namespace std::chrono_literals;

namespace {

const std::string kModel = std::string(CELER_TEST_DATA) + "/stories260K.gguf";

std::string write_config(const TempDir& dir, const std::string& yaml) {
  const std::string path = dir.path() + "/serve.yaml";
  write_file(path, yaml.data(), yaml.size());
  return path;
}

// A random Llama (celer make-model, stories260K's vocabulary, a 4096-token context) in `dir`.
std::string make_random_llama(const TempDir& dir, const std::string& name, int dim, int layers, int heads, int ffn,
                              const std::string& type) {
  const std::string path = dir.path() + "/" + name;
  const CelerRun made = run_celer(CELER_BIN,
                                  {"make-model", "--arch", "llama", "--dim", std::to_string(dim), "--layers", std::to_string(layers),
                                   "--heads", std::to_string(heads), "--kv-heads", std::to_string(heads), "--ffn",
                                   std::to_string(ffn), "--context", "4096", "--vocab", kModel, "--type", type, path},
                                  60s);
  REQUIRE(made.exited(0));
  return path;
}

int connect_to(uint16_t port) {
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_port = htons(port);
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  REQUIRE(connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) == 0);
  return fd;
}

// A streamed completion on a raw socket: the whole response as received until the server
// closes the connection.
class SseStream {
 public:
  SseStream(uint16_t port, int max_tokens) : fd_(connect_to(port)) {
    const std::string body = R"({"prompt": "Once upon a time", "max_tokens": )" + std::to_string(max_tokens) +
                             R"(, "stream": true, "ignore_eos": true, "temperature": 0})";
    const std::string req = "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: " +
                            std::to_string(body.size()) + "\r\n\r\n" + body;
    REQUIRE(send(fd_, req.data(), req.size(), MSG_NOSIGNAL) == static_cast<ssize_t>(req.size()));
  }
  ~SseStream() { close(fd_); }
  // Reads what has arrived within `wait`; false once the connection is closed.
  bool pump(std::chrono::milliseconds wait) {
    pollfd p{fd_, POLLIN, 0};
    if (poll(&p, 1, static_cast<int>(wait.count())) <= 0) return true;
    char buf[8192];
    const ssize_t n = recv(fd_, buf, sizeof buf, 0);
    if (n <= 0) return false;
    text_.append(buf, static_cast<size_t>(n));
    return true;
  }
  int tokens_seen() const {
    int n = 0;
    for (size_t at = 0; (at = text_.find("\"text\":", at)) != std::string::npos; ++at) ++n;
    return n;
  }
  const std::string& text() const { return text_; }

 private:
  int fd_;
  std::string text_;
};

}  // namespace

TEST_CASE("serve: a KV cache that cannot fit is refused before anything is allocated", "[serve]") {
  TempDir dir;
  const std::string config = write_config(dir, "model: " + kModel + "\nkv_cache_memory: 100TiB\n");
  CelerRun r = run_celer(CELER_BIN, {"serve", "--config", config, "--port", "0"}, 20s);
  INFO(r.output);
  CHECK(r.exited(1));
  CHECK(r.seconds < 10);
  CHECK_THAT(r.output, Catch::Contains("kv_cache_memory: 100.0 TiB") && Catch::Contains("available"));
}

TEST_CASE("serve: a shard that fails at every start spends its restart budget and the server exits", "[serve]") {
  // The KV cache fits the machine but not the address space this process is given, so the
  // shard's engine throws std::bad_alloc each time it starts.
  TempDir dir;
  const std::string config = write_config(dir, "model: " + kModel +
                                                   "\nkv_cache_memory: 1GiB\nsupervision: {max_restarts: 3, backoff: 10ms}\n");
  // The process takes about 600 MB of address space before its KV cache; 1.2 GB leaves it room to
  // start, not to add 1 GiB. The machine needs only 1 GiB available.
  const std::string cmd = "ulimit -v 1200000; exec " + std::string(CELER_BIN) + " serve --config " + config + " --port 0";
  CelerRun r = run_celer("/bin/sh", {"-c", cmd}, 30s);
  INFO(r.output);
  CHECK(r.exited(1));
  CHECK(r.seconds < 20);
  CHECK_THAT(r.output, Catch::Contains("max_restarts 3") && Catch::Contains("bad_alloc"));
}

TEST_CASE("serve: a stage log that cannot be written fails the start at once", "[serve]") {
  CelerRun r = run_celer(CELER_BIN,
                         {"serve", "--model", kModel, "--port", "0", "--http-port", "0", "--stage-log", "/nonexistent/dir/x.jsonl"},
                         20s);
  INFO(r.output);
  CHECK(r.exited(1));
  CHECK(r.seconds < 5);
  CHECK_THAT(r.output, Catch::Contains("http.stage_log") && Catch::Contains("no such file", Catch::CaseSensitive::No));
  CHECK_THAT(r.output, !Catch::Contains("celer: serving"));
}

TEST_CASE("serve: no model is an error that says how to name one", "[serve]") {
  TempDir dir;
  for (const std::string& yaml : {std::string(""), std::string("model: \"\"\n"), std::string("max_queue: 4\n")}) {
    INFO("config: '" << yaml << "'");
    const std::string config = write_config(dir, yaml);
    CelerRun r = run_celer(CELER_BIN, {"serve", "--config", config, "--port", "0"}, 20s);
    CHECK(r.exited(1));
    CHECK_THAT(r.output, Catch::Contains("no model") && Catch::Contains("--model"));
  }
  CelerRun bare = run_celer(CELER_BIN, {"serve", "--port", "0"}, 20s);
  CHECK(bare.exited(1));
  CHECK_THAT(bare.output, Catch::Contains("no model"));
}

TEST_CASE("serve: a port in use says so, with the port", "[serve]") {
  ServeProcess first(CELER_BIN);
  const std::string port = std::to_string(first.port());
  CelerRun r = run_celer(CELER_BIN, {"serve", "--model", kModel, "--port", port}, 20s);
  INFO(r.output);
  CHECK(r.exited(1));
  CHECK_THAT(r.output, Catch::Contains("listen: ") && Catch::Contains("address already in use") &&
                           Catch::Contains(":" + port));
  // The HTTP port too.
  ServeProcess with_http(CELER_BIN, {"--http-port", "0"});
  const std::string http_port = std::to_string(with_http.http_port());
  CelerRun h = run_celer(CELER_BIN, {"serve", "--model", kModel, "--port", "0", "--http-port", http_port}, 20s);
  INFO(h.output);
  CHECK(h.exited(1));
  CHECK_THAT(h.output, Catch::Contains("address already in use", Catch::CaseSensitive::No) &&
                           Catch::Contains(":" + http_port));
}

TEST_CASE("serve: SIGTERM with live streams stops within the grace period; every stream ends with an error",
          "[serve]") {
  // A random 30M-parameter model: slow enough here that 20 streams of 600 tokens are all still
  // running when the signal comes.
  TempDir dir;
  const std::string model = make_random_llama(dir, "slow.gguf", 512, 8, 8, 1536, "f32");
  // All 20 streams run at once (batch and KV blocks for each).
  const std::string config = write_config(dir, "model: " + model + "\nmax_batch_size: 32\nkv_cache_blocks: 1024\n");
  ServeProcess server(CELER_BIN, {"--config", config, "--http-port", "0"});
  std::vector<std::unique_ptr<SseStream>> sse;
  for (int i = 0; i < 16; ++i) sse.push_back(std::make_unique<SseStream>(server.http_port(), 600));
  auto c = Client::connect("127.0.0.1", server.port());
  REQUIRE(std::holds_alternative<std::unique_ptr<Client>>(c));
  Client& client = *std::get<std::unique_ptr<Client>>(c);
  RequestOptions o;
  o.max_tokens = 600;
  o.ignore_eos = true;
  std::vector<Client::Stream> streams;
  for (int i = 0; i < 4; ++i) streams.push_back(client.stream("Once upon a time", o));
  for (auto& s : streams) REQUIRE(s.next());  // each has begun
  // Every SSE stream has sent tokens.
  const auto until = std::chrono::steady_clock::now() + 20s;
  for (auto& s : sse)
    while (s->tokens_seen() < 2 && std::chrono::steady_clock::now() < until) s->pump(10ms);

  const auto sent = std::chrono::steady_clock::now();
  const pid_t pid = server.pid();
  std::atomic<bool> exited{false};
  std::thread stopper([&] {
    const int status = server.stop(SIGTERM);
    exited = WIFEXITED(status) && WEXITSTATUS(status) == 0;
  });
  for (auto& s : sse)
    while (s->pump(100ms) && std::chrono::steady_clock::now() - sent < 15s) {
    }
  stopper.join();
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - sent).count();
  INFO("SIGTERM to exit with 16 SSE and 4 client-library streams: " << seconds << " s (pid " << pid << ")");
  CHECK(exited);
  CHECK(seconds < 10);
  for (auto& s : sse) {
    const std::string& t = s->text();
    INFO(t.substr(t.size() > 600 ? t.size() - 600 : 0));
    CHECK_THAT(t, Catch::Contains("shutting down"));
    const size_t err = t.rfind("data: {\"error\"");
    const size_t done = t.rfind("data: [DONE]");
    CHECK(err != std::string::npos);
    CHECK(done != std::string::npos);
    CHECK(done > err);
    CHECK(t.size() >= 5);
    CHECK(t.substr(t.size() - 5) == "0\r\n\r\n");  // the chunked body's last chunk: ended, not cut
  }
  for (auto& s : streams) {
    while (s.next()) {
    }
    REQUIRE(std::holds_alternative<ClientError>(s.result()));
    CHECK_THAT(std::get<ClientError>(s.result()).message, Catch::Contains("shutting down"));
  }
}

TEST_CASE("serve: --print-config does not print the token", "[serve]") {
  TempDir dir;
  const std::string config = write_config(dir, "model: " + kModel + "\nlisten: {token: do-not-print-me}\n");
  CelerRun r = run_celer(CELER_BIN, {"serve", "--config", config, "--print-config"}, 20s);
  INFO(r.output);
  CHECK(r.exited(0));
  CHECK_THAT(r.output, Catch::Contains("token: \"(redacted)\"") && !Catch::Contains("do-not-print-me"));
}

namespace {

// One run of the ITL test's load on a server: a stream decodes, then six long prompts arrive
// at once. The stream's gaps between tokens, before and while the prompts run.
struct ItlRun {
  std::vector<double> gaps_before_ms, gaps_during_ms;
  int prompts_done = 0;
};

ItlRun run_itl_load(uint16_t port, int32_t n_vocab) {
  auto connect = [&] {
    auto c = Client::connect("127.0.0.1", port);
    REQUIRE(std::holds_alternative<std::unique_ptr<Client>>(c));
    return std::move(std::get<std::unique_ptr<Client>>(c));
  };
  std::unique_ptr<Client> streamer = connect(), prompter = connect();
  RequestOptions o;
  o.max_tokens = 400;
  o.ignore_eos = true;
  o.sampling.temperature = 0;
  std::vector<TokenId> prompt{1, 403, 407, 261, 378, 316, 266, 275};
  Client::Stream stream = streamer->stream_tokens(prompt, o);
  ItlRun run;
  std::atomic<bool> prompts_running{false}, prompts_over{false};
  std::thread prompts;
  auto last = std::chrono::steady_clock::now();
  int tokens = 0;
  while (auto chunk = stream.next()) {
    if (chunk->tokens.empty()) continue;
    const auto now = std::chrono::steady_clock::now();
    const double gap = std::chrono::duration<double, std::milli>(now - last).count();
    last = now;
    if (tokens > 0 && !prompts_over) (prompts_running ? run.gaps_during_ms : run.gaps_before_ms).push_back(gap);
    tokens += static_cast<int>(chunk->tokens.size());
    if (tokens >= 30 && !prompts.joinable()) {
      prompts_running = true;
      prompts = std::thread([&] {
        RequestOptions po;
        po.max_tokens = 1;
        po.sampling.temperature = 0;
        std::vector<Client::Stream> long_prompts;
        for (int p = 0; p < 6; ++p) {
          std::vector<TokenId> ids(1000);
          for (size_t i = 0; i < ids.size(); ++i) ids[i] = static_cast<TokenId>(3 + (i * 31 + static_cast<size_t>(p) * 97) % static_cast<size_t>(n_vocab - 3));
          long_prompts.push_back(prompter->stream_tokens(std::move(ids), po));
        }
        for (auto& s : long_prompts) {
          while (s.next()) {
          }
          if (std::holds_alternative<Completion>(s.result())) ++run.prompts_done;
        }
        prompts_over = true;
      });
    }
  }
  if (prompts.joinable()) prompts.join();
  REQUIRE(std::holds_alternative<Completion>(stream.result()));
  return run;
}

double quantile(std::vector<double> v, double q) {
  REQUIRE_FALSE(v.empty());
  std::sort(v.begin(), v.end());
  return v[std::min(v.size() - 1, static_cast<size_t>(q * static_cast<double>(v.size())))];
}

}  // namespace

TEST_CASE("serve: a stream with an ITL objective keeps its gaps within it while long prompts arrive", "[serve][slo]") {
  // A random 5M-parameter model on one thread: a decode step takes a few milliseconds, a
  // 1000-token prompt in one step a hundred or more.
  TempDir dir;
  const std::string model = make_random_llama(dir, "m.gguf", 256, 6, 4, 768, "q8_0");
  const std::string base = "model: " + model + "\nmax_batch_size: 8\nmax_batch_tokens: 1024\nthreads: 1\nkv_cache_blocks: 1024\n";
  const int32_t n_vocab = 512;

  // First the fixed budget (an objective no step reaches): the step time this machine has now.
  ItlRun fixed;
  {
    const std::string config = write_config(dir, base + "slo: {itl: 1h}\n");
    ServeProcess server(CELER_BIN, {"--config", config});
    fixed = run_itl_load(server.port(), n_vocab);
  }
  const double decode_ms = quantile(fixed.gaps_before_ms, 0.5);
  const double long_ms = quantile(fixed.gaps_during_ms, 1.0);
  // The objective: a third of the long step, and room for several decode steps.
  const int64_t itl_ms = static_cast<int64_t>(std::ceil(std::max(long_ms / 3, 4 * decode_ms)));
  INFO("fixed budget: decode gap p50 " << decode_ms << " ms, longest gap " << long_ms << " ms; objective " << itl_ms << " ms");
  CHECK(fixed.prompts_done == 6);
  REQUIRE(long_ms > 1.5 * static_cast<double>(itl_ms));  // the fixed budget misses it: the check below can fail

  const std::string config = write_config(dir, base + "slo: {itl: " + std::to_string(itl_ms) + "ms}\n");
  ServeProcess server(CELER_BIN, {"--config", config});
  const ItlRun paced = run_itl_load(server.port(), n_vocab);
  // The gaps of the steps that carried a prompt chunk: longer than the slowest decode steps.
  const double decode_p90_ms = quantile(fixed.gaps_before_ms, 0.9);
  std::vector<double> during;
  std::string all;
  for (double g : paced.gaps_during_ms) {
    if (g > 2 * decode_p90_ms + 1) during.push_back(g);
    all += std::to_string(static_cast<int>(g)) + " ";
  }
  const size_t over = static_cast<size_t>(std::count_if(during.begin(), during.end(), [&](double g) { return g > static_cast<double>(itl_ms); }));
  INFO("with the objective, the stream's gaps (ms) while the prompts ran: " << all);
  INFO(during.size() << " steps carried prompt chunks, " << over << " over " << itl_ms << " ms; p50 " << quantile(during, 0.5)
                     << " p90 " << quantile(during, 0.9) << " max " << quantile(during, 1.0) << " ms");
  CHECK(paced.prompts_done == 6);
  CHECK(during.size() >= 12);  // the prompts took many steps, each with the stream's token
  CHECK(static_cast<double>(over) <= 0.15 * static_cast<double>(during.size()));
  CHECK(quantile(during, 1.0) < 2 * static_cast<double>(itl_ms));  // none near the fixed budget's long steps
}
