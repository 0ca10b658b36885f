// The client library against a `celer serve` in another process: streaming in both forms,
// cancel, errors as values, and a server that dies mid-stream.
#include <catch2/catch.hpp>

#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <regex>
#include <string>

#include "celer/client.hpp"
#include "runtime/engine.hpp"
#include "runtime/generation.hpp"
#include "test_util.hpp"

extern char** environ;

using namespace celer;

namespace {

// `celer serve --port 0 ...` as a child process; the port is read from its first line.
class Server {
 public:
  explicit Server(const std::vector<std::string>& extra = {}) {
    int fds[2];
    REQUIRE(pipe(fds) == 0);
    posix_spawn_file_actions_t actions;
    posix_spawn_file_actions_init(&actions);
    posix_spawn_file_actions_adddup2(&actions, fds[1], 1);
    posix_spawn_file_actions_addclose(&actions, fds[0]);
    std::vector<std::string> args{CELER_BIN, "serve", "--port", "0"};
    args.insert(args.end(), extra.begin(), extra.end());
    std::vector<char*> argv;
    for (auto& a : args) argv.push_back(a.data());
    argv.push_back(nullptr);
    REQUIRE(posix_spawn(&pid_, CELER_BIN, &actions, nullptr, argv.data(), environ) == 0);
    posix_spawn_file_actions_destroy(&actions);
    close(fds[1]);
    out_ = fdopen(fds[0], "r");
    char line[1024] = {};
    REQUIRE(std::fgets(line, sizeof line, out_) != nullptr);
    std::smatch m;
    std::string s(line);
    REQUIRE(std::regex_search(s, m, std::regex(R"(on 127\.0\.0\.1:(\d+):)")));
    port_ = static_cast<uint16_t>(std::stoi(m[1]));
  }
  ~Server() { stop(SIGTERM); }
  void stop(int sig) {
    if (pid_ <= 0) return;
    kill(pid_, sig);
    int status = 0;
    waitpid(pid_, &status, 0);
    pid_ = -1;
    if (out_) std::fclose(out_);
    out_ = nullptr;
  }
  uint16_t port() const { return port_; }

 private:
  pid_t pid_ = -1;
  FILE* out_ = nullptr;
  uint16_t port_ = 0;
};

std::unique_ptr<Client> connect(uint16_t port) {
  auto c = Client::connect("127.0.0.1", port);
  if (auto* e = std::get_if<ClientError>(&c)) FAIL(e->message);
  return std::move(std::get<std::unique_ptr<Client>>(c));
}

std::vector<TokenId> solo(const std::string& prompt, int n, const SamplingParams& sp) {
  Model m(std::string(CELER_TEST_DATA) + "/stories260K.gguf");
  EngineOptions eo;
  eo.max_seqs = 1;
  Engine e(m, eo);
  GenerateOptions go;
  go.max_tokens = n;
  go.sampling = sp;
  go.ignore_eos = true;
  std::vector<TokenId> out;
  generate(e, m.tokenizer().encode(prompt, true), go, [&](TokenId t) {
    out.push_back(t);
    return true;
  });
  return out;
}

}  // namespace

TEST_CASE("client: streams in both forms carry exactly the model's tokens", "[client]") {
  Server server;
  auto client = connect(server.port());
  RequestOptions o;
  o.max_tokens = 30;
  o.ignore_eos = true;
  o.sampling.temperature = 0.9f;
  o.sampling.seed = 17;
  const auto expected = solo("Once upon a time", 30, o.sampling);

  std::vector<TokenId> seen;
  int chunks = 0;
  auto r = client->generate("Once upon a time", o, [&](const TokenChunk& c) {
    seen.insert(seen.end(), c.tokens.begin(), c.tokens.end());
    ++chunks;
    return true;
  });
  REQUIRE(std::holds_alternative<Completion>(r));
  CHECK(std::get<Completion>(r).tokens == expected);
  CHECK(seen == expected);
  CHECK(chunks >= 10);  // streamed, not delivered at the end
  CHECK(std::get<Completion>(r).reason == FinishReason::length);

  auto stream = client->stream("Once upon a time", o);
  std::vector<TokenId> it;
  while (auto c = stream.next()) it.insert(it.end(), c->tokens.begin(), c->tokens.end());
  CHECK(it == expected);
  REQUIRE(std::holds_alternative<Completion>(stream.result()));
  CHECK(std::get<Completion>(stream.result()).cached_tokens == 0);  // a 5-token prompt fills no block
}

TEST_CASE("client: cancel, errors as values, and a server that goes away", "[client]") {
  Server server;
  auto client = connect(server.port());
  RequestOptions o;
  o.max_tokens = 500;
  o.ignore_eos = true;
  int n = 0;
  auto cancelled = client->generate("The dog", o, [&](const TokenChunk& c) {
    n += static_cast<int>(c.tokens.size());
    return n < 5;
  });
  REQUIRE(std::holds_alternative<Completion>(cancelled));
  CHECK(std::get<Completion>(cancelled).reason == FinishReason::cancelled);
  CHECK(std::get<Completion>(cancelled).completion_tokens < 500);

  std::string huge;
  for (int i = 0; i < 700; ++i) huge += "Once upon a time ";
  auto too_long = client->generate(huge, o);
  REQUIRE(std::holds_alternative<ClientError>(too_long));
  CHECK(std::get<ClientError>(too_long).kind == ErrorKind::prompt_too_long);

  RequestOptions bad = o;
  bad.sampling.top_p = 5;  // refused by the server's decoder
  auto invalid = client->generate("hi", bad);
  REQUIRE(std::holds_alternative<ClientError>(invalid));
  CHECK(std::get<ClientError>(invalid).kind == ErrorKind::invalid_request);

  auto bad_tokens = client->generate_tokens({1, 99999}, o);
  REQUIRE(std::holds_alternative<ClientError>(bad_tokens));
  CHECK(std::get<ClientError>(bad_tokens).message.find("vocabulary") != std::string::npos);

  // Still serving after all that.
  o.max_tokens = 5;
  CHECK(std::holds_alternative<Completion>(client->generate("Lily", o)));

  // The server dies in the middle of a stream: the stream ends with an error, no hang.
  o.max_tokens = 100000;
  auto stream = client->stream("The dog", o);
  REQUIRE(stream.next());
  server.stop(SIGKILL);
  while (stream.next()) {
  }
  REQUIRE(std::holds_alternative<ClientError>(stream.result()));
  CHECK(std::get<ClientError>(stream.result()).kind == ErrorKind::unavailable);
}

TEST_CASE("client: connecting to nothing is an error value", "[client]") {
  auto c = Client::connect("127.0.0.1", 1);
  REQUIRE(std::holds_alternative<ClientError>(c));
  CHECK(std::get<ClientError>(c).kind == ErrorKind::unavailable);
}
