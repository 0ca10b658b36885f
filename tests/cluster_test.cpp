// Clusters of real processes on 127.0.0.1: `celer launch` of the examples (with fresh ports),
// tensor parallel across two processes against the reference tokens, two replicas behind a
// router through the client library and the HTTP gateway, and `celer status`.
#include <catch2/catch.hpp>

#include <algorithm>
#include <atomic>
#include <filesystem>
#include <functional>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>
#include <thread>
#include <vector>

#include "celer/client.hpp"
#include "cluster_process.hpp"
#include "serve_process.hpp"  // run_celer

using namespace celer;

namespace {

const std::string kModel = std::string(CELER_TEST_DATA) + "/stories260K.gguf";
const std::string kExamples = CELER_EXAMPLES;
constexpr auto kUp = std::chrono::seconds(60);

struct Reference {
  std::vector<TokenId> prompt, generated;
};

std::vector<Reference> load_reference() {
  std::ifstream in(std::string(CELER_TEST_DATA) + "/stories260K.reference.json");
  REQUIRE(in.good());
  const nlohmann::json j = nlohmann::json::parse(in);
  std::vector<Reference> out;
  for (const auto& r : j.at("results")) out.push_back({r.at("prompt_tokens"), r.at("generated_tokens")});
  return out;
}

std::unique_ptr<Client> connect(uint16_t port) {
  auto c = Client::connect("127.0.0.1", port);
  if (auto* e = std::get_if<ClientError>(&c)) FAIL(e->message);
  return std::move(std::get<std::unique_ptr<Client>>(c));
}

RequestOptions greedy(int n) {
  RequestOptions o;
  o.sampling.temperature = 0;
  o.max_tokens = n;
  o.ignore_eos = true;
  return o;
}

std::vector<TokenId> tokens_of(const GenerateOutcome& r) {
  if (auto* e = std::get_if<ClientError>(&r)) FAIL("request failed: " << e->message);
  return std::get<Completion>(r).tokens;
}

// `celer launch` of an example with fresh ports; `ports` in the order the file lists them.
struct Launched {
  std::vector<uint16_t> ports;
  std::string config;
  std::unique_ptr<CelerProcess> process;
};

Launched launch(const std::string& example) {
  Launched l;
  l.config = write_temp(example, with_fresh_ports(read_file(kExamples + "/" + example), kModel, &l.ports));
  l.process = std::make_unique<CelerProcess>(CELER_BIN, std::vector<std::string>{"launch", l.config});
  INFO(l.process->output());
  REQUIRE(l.process->wait_for("celer: cluster ready", kUp));
  return l;
}

nlohmann::json status(uint16_t port) {
  const CelerRun r = run_celer(CELER_BIN, {"status", "--connect", "127.0.0.1:" + std::to_string(port), "--json"},
                               std::chrono::seconds(20));
  INFO(r.output);
  REQUIRE(r.exited(0));
  return nlohmann::json::parse(r.output);
}

// POST body to 127.0.0.1:port/v1/completions (non-streamed, Connection: close); the body of
// the answer, "" on a failure to connect.
std::string http_completion(uint16_t port, const nlohmann::json& body) {
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_port = htons(port);
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (::connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) != 0) {
    close(fd);
    return "";
  }
  const std::string text = body.dump();
  const std::string req = "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nConnection: close\r\n"
                          "Content-Length: " + std::to_string(text.size()) + "\r\n\r\n" + text;
  (void)::send(fd, req.data(), req.size(), MSG_NOSIGNAL);
  std::string reply;
  char buf[4096];
  ssize_t n;
  while ((n = ::recv(fd, buf, sizeof buf, 0)) > 0) reply.append(buf, static_cast<size_t>(n));
  close(fd);
  const size_t head = reply.find("\r\n\r\n");
  return head == std::string::npos ? "" : reply.substr(head + 4);
}

// The pid of the `celer node` process running `name` of `config` (a child of celer launch).
pid_t node_pid(const std::string& config, const std::string& name) {
  for (const auto& entry : std::filesystem::directory_iterator("/proc")) {
    const std::string pid = entry.path().filename();
    if (pid.find_first_not_of("0123456789") != std::string::npos) continue;
    std::ifstream in(entry.path() / "cmdline");
    std::string cmd((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    std::replace(cmd.begin(), cmd.end(), '\0', ' ');
    if (cmd.find(" node --config " + config + " --name " + name + " ") != std::string::npos) return std::stoi(pid);
  }
  return -1;
}

// Long greedy runs of the reference prompts (400 tokens past end-of-sequence), each once and
// alone through `port`: what every run under load must give.
constexpr int kLongRun = 400;
std::vector<std::vector<TokenId>> solo_runs(uint16_t port) {
  auto client = connect(port);
  std::vector<std::vector<TokenId>> out;
  for (const Reference& ref : load_reference()) out.push_back(tokens_of(client->generate_tokens(ref.prompt, greedy(kLongRun))));
  return out;
}

// Runs `n` of those requests at once through `port`, and `during` once every stream has its
// first token (so the fault finds them all in flight); counts failures and requests whose
// tokens differ from the solo run's.
struct LoadResult {
  int failed = 0, mismatched = 0;
  std::vector<std::string> errors;
};

LoadResult run_load(uint16_t port, int n, const std::vector<std::vector<TokenId>>& expected, const std::function<void()>& during) {
  const std::vector<Reference> refs = load_reference();
  auto client = connect(port);
  std::vector<Client::Stream> streams;
  for (int i = 0; i < n; ++i) streams.push_back(client->stream_tokens(refs[static_cast<size_t>(i) % refs.size()].prompt, greedy(kLongRun)));
  std::vector<std::vector<TokenId>> got(static_cast<size_t>(n));
  for (int i = 0; i < n; ++i)
    while (got[i].empty()) {
      auto chunk = streams[i].next();
      if (!chunk) break;
      got[i].insert(got[i].end(), chunk->tokens.begin(), chunk->tokens.end());
    }
  during();
  LoadResult r;
  for (int i = 0; i < n; ++i) {
    while (auto chunk = streams[i].next()) got[i].insert(got[i].end(), chunk->tokens.begin(), chunk->tokens.end());
    const GenerateOutcome& out = streams[i].result();
    if (auto* e = std::get_if<ClientError>(&out)) {
      ++r.failed;
      r.errors.push_back(e->message);
    } else if (got[i] != expected[static_cast<size_t>(i) % expected.size()] || std::get<Completion>(out).tokens != got[i]) {
      ++r.mismatched;
    }
  }
  return r;
}

}  // namespace

TEST_CASE("cluster: tensor parallel 2 across two processes gives the reference tokens", "[cluster]") {
  Launched l = launch("cluster-2node-tp2.yaml");
  // nodes a (port 0, http 1) and b (port 2)
  for (const uint16_t entry : {l.ports[0], l.ports[2]}) {
    auto client = connect(entry);
    for (const Reference& ref : load_reference()) {
      const auto got = tokens_of(client->generate_tokens(ref.prompt, greedy(static_cast<int>(ref.generated.size()))));
      CHECK(got == ref.generated);
    }
  }
  const nlohmann::json s = status(l.ports[2]);
  REQUIRE(s["replicas"].size() == 1);
  CHECK(s["replicas"][0]["up"] == true);
  int shards = 0;
  for (const auto& a : s["actors"])
    if (a["role"] == "shard") ++shards;
  CHECK(shards == 2);
  CHECK(l.process->stop(SIGTERM) == 0);
}

TEST_CASE("cluster: two replicas behind a router serve concurrent requests, none lost, each as its solo run", "[cluster]") {
  Launched l = launch("cluster-3node-2replicas.yaml");
  // front (port 0, http 1), n1 (2), n2 (3)
  const std::vector<Reference> refs = load_reference();
  constexpr int kRequests = 200;
  std::atomic<int> mismatched{0}, failed{0};
  std::vector<std::thread> threads;
  constexpr int kThreads = 8;
  for (int t = 0; t < kThreads; ++t)
    threads.emplace_back([&, t] {
      auto c = Client::connect("127.0.0.1", l.ports[t % 2 == 0 ? 0 : 2]);
      if (std::holds_alternative<ClientError>(c)) {
        failed += kRequests / kThreads;
        return;
      }
      auto& client = *std::get<std::unique_ptr<Client>>(c);
      std::vector<Client::Stream> streams;
      std::vector<size_t> which;
      for (int i = t; i < kRequests; i += kThreads) {
        const Reference& ref = refs[static_cast<size_t>(i) % refs.size()];
        streams.push_back(client.stream_tokens(ref.prompt, greedy(static_cast<int>(ref.generated.size()))));
        which.push_back(static_cast<size_t>(i) % refs.size());
      }
      for (size_t k = 0; k < streams.size(); ++k) {
        while (streams[k].next()) {
        }
        const GenerateOutcome& r = streams[k].result();
        if (std::holds_alternative<ClientError>(r)) ++failed;
        else if (std::get<Completion>(r).tokens != refs[which[k]].generated) ++mismatched;
      }
    });
  for (auto& th : threads) th.join();
  CHECK(failed == 0);
  CHECK(mismatched == 0);

  const nlohmann::json s = status(l.ports[0]);
  REQUIRE(s["replicas"].size() == 2);
  uint64_t routed = 0;
  for (const auto& r : s["replicas"]) {
    CHECK(r["up"] == true);
    routed += r["routed"].get<uint64_t>();
    // Both replicas took a share of a load that one alone would queue.
    CHECK(r["routed"].get<uint64_t>() > 0);
  }
  CHECK(routed == kRequests);

  // The same through the HTTP gateway on the router's node: each answer is the solo run's text.
  auto client = connect(l.ports[0]);
  std::vector<std::string> solo_text;
  for (const Reference& ref : refs) {
    const GenerateOutcome out = client->generate_tokens(ref.prompt, greedy(static_cast<int>(ref.generated.size())));
    REQUIRE(std::holds_alternative<Completion>(out));
    solo_text.push_back(std::get<Completion>(out).text);
  }
  std::atomic<int> http_failed{0}, http_mismatched{0};
  threads.clear();
  for (int t = 0; t < kThreads; ++t)
    threads.emplace_back([&, t] {
      for (int i = t; i < 48; i += kThreads) {
        const Reference& ref = refs[static_cast<size_t>(i) % refs.size()];
        const nlohmann::json body = {{"prompt", ref.prompt}, {"max_tokens", ref.generated.size()},
                                     {"temperature", 0}, {"ignore_eos", true}};
        nlohmann::json reply;
        try {
          reply = nlohmann::json::parse(http_completion(l.ports[1], body));
        } catch (const std::exception&) {
          ++http_failed;
          continue;
        }
        if (!reply.contains("choices")) ++http_failed;
        else if (reply["choices"][0]["text"] != solo_text[static_cast<size_t>(i) % refs.size()]) ++http_mismatched;
      }
    });
  for (auto& th : threads) th.join();
  CHECK(http_failed == 0);
  CHECK(http_mismatched == 0);
  CHECK(l.process->stop(SIGTERM) == 0);
}

TEST_CASE("cluster: draining a node under load loses nothing; the drained node leaves", "[cluster]") {
  Launched l = launch("cluster-3node-2replicas.yaml");
  const auto expected = solo_runs(l.ports[0]);
  const LoadResult r = run_load(l.ports[0], 24, expected, [&] {
    const CelerRun d = run_celer(CELER_BIN, {"drain", "--connect", "127.0.0.1:" + std::to_string(l.ports[0]), "--node", "n2"},
                                 std::chrono::seconds(20));
    INFO(d.output);
    CHECK(d.exited(0));
  });
  INFO((r.errors.empty() ? "" : r.errors.front()));
  CHECK(r.failed == 0);
  CHECK(r.mismatched == 0);
  REQUIRE(l.process->wait_for(R"(\[n2\] celer: node n2 leaving)", std::chrono::seconds(40)));
  // The cluster keeps serving on the other replica.
  auto client = connect(l.ports[0]);
  const Reference ref = load_reference().front();
  CHECK(tokens_of(client->generate_tokens(ref.prompt, greedy(static_cast<int>(ref.generated.size())))) == ref.generated);
  l.process->stop(SIGTERM);
}

TEST_CASE("cluster: SIGKILL of a node holding a replica: its requests finish on the other, no token lost or repeated",
          "[cluster]") {
  Launched l = launch("cluster-3node-2replicas.yaml");
  const pid_t victim = node_pid(l.config, "n2");
  REQUIRE(victim > 0);
  const auto expected = solo_runs(l.ports[0]);
  const LoadResult r = run_load(l.ports[0], 24, expected, [&] { kill(victim, SIGKILL); });
  INFO((r.errors.empty() ? "" : r.errors.front()));
  CHECK(r.failed == 0);
  CHECK(r.mismatched == 0);
  const nlohmann::json s = status(l.ports[0]);
  for (const auto& rep : s["replicas"])
    if (rep["name"] == "r2") CHECK(rep["up"] == false);
  l.process->stop(SIGTERM);
}
