// The client library against a `celer serve` in another process: streaming in both forms,
// cancel, errors as values, and a server that dies mid-stream.
#include <catch2/catch.hpp>

#include <signal.h>
#include <unistd.h>

#include <cstdio>
#include <string>

#include <caf/all.hpp>
#include <caf/io/all.hpp>

#include "actors/transport.hpp"
#include "actors/interfaces.hpp"
#include "celer/client.hpp"
#include "runtime/engine.hpp"
#include "runtime/generation.hpp"
#include "serve_process.hpp"
#include "test_util.hpp"


using namespace celer;

namespace {

// `celer serve --port 0 ...` in another process.
class Server : public ServeProcess {
 public:
  explicit Server(const std::vector<std::string>& extra = {}) : ServeProcess(CELER_BIN, extra) {}
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

TEST_CASE("client: a request larger than the server's message bound is an error value, not a dropped connection",
          "[client]") {
  Server server;
  ConnectOptions small;
  small.max_message_bytes = 64 << 10;
  auto connected = Client::connect("127.0.0.1", server.port(), small);
  REQUIRE(std::holds_alternative<std::unique_ptr<Client>>(connected));
  Client& client = *std::get<std::unique_ptr<Client>>(connected);
  RequestOptions o;
  o.max_tokens = 4;
  o.sampling.temperature = 0;
  auto big = client.generate_tokens(std::vector<TokenId>(40'000, 1), o);  // 160 KB of token ids
  REQUIRE(std::holds_alternative<ClientError>(big));
  CHECK(std::get<ClientError>(big).kind == ErrorKind::invalid_request);
  CHECK_THAT(std::get<ClientError>(big).message, Catch::Contains("max_message_bytes"));
  // The connection is whole: the next request is served.
  CHECK(std::holds_alternative<Completion>(client.generate("Lily", o)));
}

TEST_CASE("client: a peer may not stop or restart the server's actors", "[client]") {
  Server server;
  caf::actor_system_config cfg;
  cfg.load<caf::io::middleman>();
  add_message_types(cfg);
  caf::actor_system sys{cfg};
  Transport transport(sys, TransportLimits{});
  const auto supervisor = transport.connect<SupervisorActor>("127.0.0.1", server.port(), std::chrono::seconds(10));
  // The published interface is checked at connect time: a one-process server is no cluster node.
  CHECK_THROWS_WITH(transport.connect<NodeActor>("127.0.0.1", server.port(), std::chrono::seconds(10)),
                    Catch::Contains("lacks messages this end sends"));
  caf::scoped_actor self{sys};
  // stop, from another node: refused, and the server keeps serving.
  bool refused = false;
  self->request(supervisor, std::chrono::seconds(5), stop_atom::value)
      .receive([&](bool) {}, [&](const caf::error&) { refused = true; });
  CHECK(refused);
  SchedulerActor scheduler;
  self->request(supervisor, std::chrono::seconds(5), sched_atom::value)
      .receive([&](const SchedulerActor& s) { scheduler = s; }, [&](const caf::error&) {});
  REQUIRE(scheduler);
  refused = false;
  self->request(scheduler, std::chrono::seconds(5), stop_atom::value)
      .receive([&](bool) {}, [&](const caf::error&) { refused = true; });
  CHECK(refused);
  // A forged "respawn" and a forged "gave up" change nothing either.
  self->send(supervisor, sched_atom::value, true);
  self->send(supervisor, failed_atom::value, std::string("forged"));
  self->send(scheduler, shard_atom::value, true);
  self->send(scheduler, cache_atom::value, true);
  auto client = connect(server.port());
  RequestOptions o;
  o.max_tokens = 8;
  o.sampling.temperature = 0;
  auto r = client->generate("Once upon a time", o);
  REQUIRE(std::holds_alternative<Completion>(r));
  CHECK(std::get<Completion>(r).tokens.size() == 8);
  SchedulerActor same;
  self->request(supervisor, std::chrono::seconds(5), sched_atom::value)
      .receive([&](const SchedulerActor& s) { same = s; }, [&](const caf::error&) {});
  CHECK(same == scheduler);  // no second scheduler was started
}
