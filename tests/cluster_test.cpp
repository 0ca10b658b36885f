// Clusters of real processes on 127.0.0.1: `celer launch` of the examples (with fresh ports),
// tensor parallel across two processes against the reference tokens, two replicas behind a
// router through the client library and the HTTP gateway, and `celer status`.
#include <catch2/catch.hpp>

#include <algorithm>
#include <atomic>
#include <filesystem>
#include <functional>
#include <future>
#include <fstream>
#include <map>
#include <regex>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include <nlohmann/json.hpp>

#include <caf/all.hpp>
#include <caf/io/all.hpp>

#include "actors/transport.hpp"
#include "actors/interfaces.hpp"
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

// `edit`, if given, changes the file's text first (a policy, a router standby, a secret).
Launched launch(const std::string& example, const std::function<std::string(std::string)>& edit = {}) {
  Launched l;
  std::string text = read_file(kExamples + "/" + example);
  if (edit) text = edit(text);
  std::string name = example;  // examples/chaos/cluster.yaml: chaos-cluster.yaml
  std::replace(name.begin(), name.end(), '/', '-');
  l.config = write_temp(name, with_fresh_ports(text, kModel, &l.ports));
  l.process = std::make_unique<CelerProcess>(CELER_BIN, std::vector<std::string>{"launch", l.config});
  const bool up = l.process->wait_for("celer: cluster ready", kUp);
  INFO(l.process->output());  // what it said by then (INFO takes its text when it runs)
  REQUIRE(up);
  return l;
}

nlohmann::json status(uint16_t port) {
  const CelerRun r = run_celer(CELER_BIN, {"status", "--connect", "127.0.0.1:" + std::to_string(port), "--json"},
                               std::chrono::seconds(20));
  INFO(r.output);
  REQUIRE(r.exited(0));
  return nlohmann::json::parse(r.output);
}

// Sends `bytes` to 127.0.0.1:port; true when the other end closes without answering a byte.
bool closed_unanswered(uint16_t port, const std::string& bytes) {
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_port = htons(port);
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  REQUIRE(::connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) == 0);
  (void)::send(fd, bytes.data(), bytes.size(), MSG_NOSIGNAL);
  char c;
  const bool closed = ::recv(fd, &c, 1, 0) <= 0;
  close(fd);
  return closed;
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

// GET 127.0.0.1:port/path; the whole answer.
std::string http_get(uint16_t port, const std::string& path) {
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_port = htons(port);
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (::connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) != 0) {
    close(fd);
    return "";
  }
  const std::string req = "GET " + path + " HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
  (void)::send(fd, req.data(), req.size(), MSG_NOSIGNAL);
  std::string reply;
  char buf[4096];
  ssize_t n;
  while ((n = ::recv(fd, buf, sizeof buf, 0)) > 0) reply.append(buf, static_cast<size_t>(n));
  close(fd);
  return reply;
}

// A sample's value on a /metrics page (-1 when absent).
double metric_value(const std::string& page, const std::string& name) {
  const size_t at = page.find("\n" + name + " ");
  return at == std::string::npos ? -1 : std::stod(page.substr(at + name.size() + 2));
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

uint64_t routed_to(const nlohmann::json& status, const std::string& replica) {
  for (const auto& r : status["replicas"])
    if (r["name"] == replica) return r["routed"].get<uint64_t>();
  FAIL("no replica " << replica << " in the status");
  return 0;
}

// The example's routing policy replaced by `policy`.
std::function<std::string(std::string)> with_policy(const std::string& policy) {
  return [policy](std::string text) { return std::regex_replace(text, std::regex(R"(policy: *\S+)"), "policy: " + policy); };
}

// `celer drain --connect 127.0.0.1:port --node node`, which must succeed.
void drain(uint16_t port, const std::string& node) {
  const CelerRun d = run_celer(CELER_BIN, {"drain", "--connect", "127.0.0.1:" + std::to_string(port), "--node", node},
                               std::chrono::seconds(20));
  INFO(d.output);
  CHECK(d.exited(0));
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
  // The response cache on (the example leaves it at its default, off).
  Launched l = launch("cluster-2node-tp2.yaml", [](std::string text) { return text + "response_cache: {enabled: true}\n"; });
  // nodes a (port 0, http 1) and b (port 2)
  for (const uint16_t entry : {l.ports[0], l.ports[2]}) {
    auto client = connect(entry);
    for (const Reference& ref : load_reference()) {
      const auto got = tokens_of(client->generate_tokens(ref.prompt, greedy(static_cast<int>(ref.generated.size()))));
      CHECK(got == ref.generated);
    }
  }
  // A repeated request through the router is answered from the replica's response cache: the
  // same tokens, one hit more on the replica's /metrics.
  {
    auto client = connect(l.ports[0]);
    const Reference ref = load_reference().front();
    const double hits = metric_value(http_get(l.ports[1], "/metrics"), "celer_response_cache_hits_total");
    CHECK(tokens_of(client->generate_tokens(ref.prompt, greedy(static_cast<int>(ref.generated.size())))) == ref.generated);
    CHECK(metric_value(http_get(l.ports[1], "/metrics"), "celer_response_cache_hits_total") == hits + 1);
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
  const LoadResult r = run_load(l.ports[0], 24, expected, [&] { drain(l.ports[0], "n2"); });
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
  // A replica that is down receives nothing: every new request goes to r1.
  const uint64_t r1_before = routed_to(s, "r1"), r2_before = routed_to(s, "r2");
  auto client = connect(l.ports[0]);
  const Reference ref = load_reference().front();
  for (int i = 0; i < 10; ++i)
    CHECK(tokens_of(client->generate_tokens(ref.prompt, greedy(static_cast<int>(ref.generated.size())))) == ref.generated);
  const nlohmann::json after = status(l.ports[0]);
  CHECK(routed_to(after, "r1") == r1_before + 10);
  CHECK(routed_to(after, "r2") == r2_before);
  l.process->stop(SIGTERM);
}

TEST_CASE("cluster: round-robin alternates between the replicas", "[cluster][routing]") {
  Launched l = launch("cluster-3node-2replicas.yaml", with_policy("round-robin"));
  auto client = connect(l.ports[0]);
  const Reference ref = load_reference().front();
  for (int i = 0; i < 6; ++i) {
    CHECK(tokens_of(client->generate_tokens(ref.prompt, greedy(8))).size() == 8);
    const nlohmann::json s = status(l.ports[0]);
    const uint64_t r1 = routed_to(s, "r1"), r2 = routed_to(s, "r2");
    CHECK(r1 + r2 == static_cast<uint64_t>(i + 1));
    CHECK((r1 == r2 || r1 == r2 + 1 || r2 == r1 + 1));
  }
  CHECK(routed_to(status(l.ports[0]), "r1") == 3);
  l.process->stop(SIGTERM);
}

TEST_CASE("cluster: under session routing a session sticks to its replica", "[cluster][routing]") {
  Launched l = launch("cluster-3node-2replicas.yaml", with_policy("session"));
  auto client = connect(l.ports[0]);
  const Reference ref = load_reference().front();
  const std::vector<std::string> sessions{"alice", "bob", "carol", "dave"};
  auto options = [](const std::string& session) {
    RequestOptions o = greedy(32);
    o.session_id = session;
    return o;
  };
  // The sessions' first turns at once: a new session goes where the load is least, and the
  // router's estimate between reports spreads a burst over both replicas.
  std::vector<Client::Stream> first;
  for (const std::string& s : sessions) first.push_back(client->stream_tokens(ref.prompt, options(s)));
  for (auto& s : first) {
    while (s.next()) {
    }
    CHECK(std::holds_alternative<Completion>(s.result()));
  }
  // Then each session's next turns, one after another: all of them on one replica.
  nlohmann::json s = status(l.ports[0]);
  std::set<std::string> used;
  for (const std::string& session : sessions) {
    const uint64_t r1 = routed_to(s, "r1"), r2 = routed_to(s, "r2");
    for (int turn = 0; turn < 3; ++turn) CHECK(tokens_of(client->generate_tokens(ref.prompt, options(session))).size() == 32);
    s = status(l.ports[0]);
    const uint64_t d1 = routed_to(s, "r1") - r1, d2 = routed_to(s, "r2") - r2;
    INFO("session " << session << ": " << d1 << " to r1, " << d2 << " to r2");
    CHECK(((d1 == 3 && d2 == 0) || (d1 == 0 && d2 == 3)));
    used.insert(d1 > 0 ? "r1" : "r2");
  }
  CHECK(used.size() == 2);  // the sessions live on both replicas, and each stays where it began
  l.process->stop(SIGTERM);
}

TEST_CASE("cluster: under prefix routing a shared-prefix group lands on one replica", "[cluster][routing]") {
  Launched l = launch("cluster-3node-2replicas.yaml", with_policy("prefix"));
  auto client = connect(l.ports[0]);
  // Two groups, each a 64-token system prompt (four full blocks) and distinct 8-token suffixes.
  for (int group = 0; group < 2; ++group) {
    std::vector<TokenId> prefix{1};
    for (int i = 1; i < 64; ++i) prefix.push_back(static_cast<TokenId>(3 + (i * 7 + group * 101) % 500));
    const nlohmann::json before = status(l.ports[0]);
    const uint64_t b1 = routed_to(before, "r1"), b2 = routed_to(before, "r2");
    for (int member = 0; member < 6; ++member) {
      std::vector<TokenId> prompt = prefix;
      for (int i = 0; i < 8; ++i) prompt.push_back(static_cast<TokenId>(3 + (member * 13 + i * 5) % 500));
      CHECK(tokens_of(client->generate_tokens(prompt, greedy(4))).size() == 4);
      // The replica's cache reports its new blocks within 50 ms: the next member sees them.
      if (member == 0) std::this_thread::sleep_for(std::chrono::milliseconds(200));
    }
    const nlohmann::json after = status(l.ports[0]);
    const uint64_t d1 = routed_to(after, "r1") - b1, d2 = routed_to(after, "r2") - b2;
    INFO("group " << group << ": " << d1 << " to r1, " << d2 << " to r2");
    CHECK(((d1 == 6 && d2 == 0) || (d1 == 0 && d2 == 6)));
  }
  l.process->stop(SIGTERM);
}

TEST_CASE("cluster: the standby router takes over when the router's node dies", "[cluster][faults]") {
  // The router on front, its standby on n1; clients of n1 lose front (router and gateway).
  Launched l = launch("cluster-3node-2replicas.yaml", [](std::string text) {
    return std::regex_replace(text, std::regex(R"(router:\n  node: front)"), "router:\n  node: front\n  standby: n1");
  });
  const uint16_t n1 = l.ports[2];
  const nlohmann::json before = status(n1);
  std::map<std::string, std::string> router_nodes;
  for (const auto& a : before["actors"])
    if (a["role"] == "router" || a["role"] == "router-standby") router_nodes[a["role"]] = a["node"];
  CHECK(router_nodes == std::map<std::string, std::string>{{"router", "front"}, {"router-standby", "n1"}});
  const pid_t front = node_pid(l.config, "front");
  REQUIRE(front > 0);
  const auto expected = solo_runs(n1);
  const LoadResult r = run_load(n1, 24, expected, [&] { kill(front, SIGKILL); });
  INFO((r.errors.empty() ? "" : r.errors.front()));
  CHECK(r.failed == 0);
  CHECK(r.mismatched == 0);
  // New requests are routed by the standby, to both replicas.
  auto client = connect(n1);
  const Reference ref = load_reference().front();
  for (int i = 0; i < 8; ++i)
    CHECK(tokens_of(client->generate_tokens(ref.prompt, greedy(static_cast<int>(ref.generated.size())))) == ref.generated);
  const nlohmann::json after = status(n1);
  CHECK(routed_to(after, "r1") + routed_to(after, "r2") >= 8);
  for (const auto& n : after["nodes"])
    if (n["name"] == "front") CHECK(n["up"] == false);
  l.process->stop(SIGTERM);
}

TEST_CASE("cluster: a wrong secret, garbage bytes and a peer not in the config are refused and counted", "[cluster][security]") {
  const std::string secret = "cluster-test-secret";
  Launched l = launch("cluster-3node-2replicas.yaml", [&](std::string text) {
    return std::regex_replace(text, std::regex(R"(secret: *"")"), "secret: " + secret);
  });
  const uint16_t front = l.ports[0];
  // No secret, the wrong one.
  CHECK(std::holds_alternative<ClientError>(Client::connect("127.0.0.1", front)));
  ConnectOptions wrong;
  wrong.token = "guess";
  CHECK(std::holds_alternative<ClientError>(Client::connect("127.0.0.1", front, wrong)));
  // Garbage to every node port.
  for (const uint16_t port : {l.ports[0], l.ports[2], l.ports[3]})
    CHECK(closed_unanswered(port, "GET / HTTP/1.1\r\n\r\n" + std::string(200, '\xff')));
  // A peer that knows the secret but is no node of the config: it says hello under a name the
  // config lacks and under a node's name for an actor of its own node, and tries to join a
  // replica with an actor of its own.
  {
    caf::actor_system_config cfg;
    cfg.load<caf::io::middleman>();
    add_message_types(cfg);
    caf::actor_system sys{cfg};
    TransportLimits limits;
    limits.token = secret;
    Transport transport(sys, limits);
    const auto node = transport.connect<NodeActor>("127.0.0.1", front, std::chrono::seconds(10));
    caf::scoped_actor self{sys};
    RouterActor router;
    self->request(node, std::chrono::seconds(5), router_atom::value)
        .receive([&](const RouterActor& r) { router = r; }, [](const caf::error&) {});
    REQUIRE(router);
    auto impostor = sys.spawn([]() -> caf::behavior { return {[](generate_atom, const WireMessage&) {}}; });
    self->send(router, hello_atom::value, std::string("intruder"));
    self->send(router, hello_atom::value, std::string("n1"));  // n1's name while n1 is up
    caf::send_as(impostor, router, hello_atom::value, std::string("n1"));
    bool refused = false;
    self->request(router, std::chrono::seconds(5), join_atom::value, std::string("r1"), caf::actor_cast<SupervisorActor>(impostor))
        .receive([&](bool) {}, [&](const caf::error&) { refused = true; });
    CHECK(refused);
    // Messages outside the router's interface: answered with an error, counted, nothing more.
    const auto untyped_router = caf::actor_cast<caf::actor>(router);
    self->send(untyped_router, std::string("not a celer message"));
    std::string unexpected;
    self->request(untyped_router, std::chrono::seconds(5), status_atom::value, int32_t{7})
        .receive([&](const WireMessage&) { unexpected = "answered"; }, [&](const caf::error& e) { unexpected = sys.render(e); });
    CHECK_THAT(unexpected, Catch::Contains("unexpected_message"));
    // Nor can it make a node allocate what it cannot hold.
    ShardSpec spec;
    spec.replica = "r1";
    spec.model_path = kModel;
    spec.max_context = 256;
    spec.n_kv_blocks = 1 << 30;
    auto spawn_refusal = [&](const NodeActor& at) {
      std::string why;
      self->request(at, std::chrono::seconds(10), spawn_atom::value, encode(spec))
          .receive([&](const ShardActor&) { why = "built"; }, [&](const caf::error& e) { why = sys.render(e); });
      return why;
    };
    CHECK_THAT(spawn_refusal(node), Catch::Contains("holds no weights"));  // front: the config places no shard there
    const auto n1 = transport.connect<NodeActor>("127.0.0.1", l.ports[2], std::chrono::seconds(10));
    CHECK_THAT(spawn_refusal(n1), Catch::Contains("KV blocks needs"));  // n1 holds weights, not that much memory
    caf::anon_send_exit(impostor, caf::exit_reason::user_shutdown);
  }
  // The cluster keeps serving, on both replicas, the reference tokens.
  ConnectOptions right;
  right.token = secret;
  auto c = Client::connect("127.0.0.1", front, right);
  REQUIRE(std::holds_alternative<std::unique_ptr<Client>>(c));
  auto& client = *std::get<std::unique_ptr<Client>>(c);
  for (const Reference& ref : load_reference())
    CHECK(tokens_of(client.generate_tokens(ref.prompt, greedy(static_cast<int>(ref.generated.size())))) == ref.generated);
  setenv("CELER_CLUSTER_SECRET", secret.c_str(), 1);
  const nlohmann::json s = status(front);
  unsetenv("CELER_CLUSTER_SECRET");
  CHECK(s["refused_peers"].get<uint64_t>() >= 4);
  CHECK(s["malformed_messages"].get<uint64_t>() >= 2);
  CHECK(routed_to(s, "r1") > 0);  // r1 still serves from n1, not from the impostor
  for (const auto& r : s["replicas"]) CHECK(r["up"] == true);
  // The node port's guard counted the rest (front's gateway shows its /metrics).
  const std::string metrics = http_get(l.ports[1], "/metrics");
  CHECK(metric_value(metrics, "celer_transport_refused_total{reason=\"bad_token\"}") >= 2);
  CHECK(metric_value(metrics, "celer_transport_refused_total{reason=\"bad_preamble\"}") >= 1);
  l.process->stop(SIGTERM);
}

namespace {

// A throwaway CA in a fresh folder: ca.pem, and node.pem/node.key signed by it; rogue-ca.pem and
// rogue.pem/rogue.key from another CA. EC P-256 keys, valid for a day.
struct ThrowawayCa {
  std::string dir;
  ThrowawayCa() {
    dir = "/tmp/celer-test-ca-" + std::to_string(getpid());
    std::filesystem::remove_all(dir);
    std::filesystem::create_directories(dir);
    const std::string key = "-newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes";
    auto ca = [&](const std::string& name) {
      return "openssl req -x509 " + key + " -keyout " + dir + "/" + name + "-ca.key -out " + dir + "/" + name +
             "-ca.pem -days 1 -subj /CN=" + name + "-ca";
    };
    auto signed_by = [&](const std::string& name, const std::string& issuer) {
      return "openssl req " + key + " -keyout " + dir + "/" + name + ".key -out " + dir + "/" + name + ".csr -subj /CN=" +
             name + " && openssl x509 -req -in " + dir + "/" + name + ".csr -CA " + dir + "/" + issuer + "-ca.pem -CAkey " +
             dir + "/" + issuer + "-ca.key -CAcreateserial -out " + dir + "/" + name + ".pem -days 1";
    };
    const std::string cmd = "(" + ca("cluster") + " && " + signed_by("node", "cluster") + " && " + ca("rogue") + " && " +
                            signed_by("rogue", "rogue") + ") >/dev/null 2>&1";
    REQUIRE(std::system(cmd.c_str()) == 0);  // the openssl command (scripts/setup installs it)
  }
  ~ThrowawayCa() { std::filesystem::remove_all(dir); }
  std::string file(const std::string& name) const { return dir + "/" + name; }
};

}  // namespace

TEST_CASE("cluster: mutual TLS: TP 2 across two nodes gives the reference tokens; no certificate, a foreign one and "
          "plain bytes are refused and counted",
          "[cluster][security][tls]") {
  const ThrowawayCa ca;
  const std::string tls = "  tls: {certificate: " + ca.file("node.pem") + ", key: " + ca.file("node.key") +
                          ", ca: " + ca.file("cluster-ca.pem") + "}\n";
  Launched l = launch("cluster-2node-tp2.yaml", [&](std::string text) {
    return std::regex_replace(text, std::regex("(\n  secret: \"\"\n)"), "$1" + tls);
  });
  const uint16_t a = l.ports[0], a_http = l.ports[1], b = l.ports[2];
  ConnectOptions member;
  member.tls_certificate = ca.file("node.pem");
  member.tls_key = ca.file("node.key");
  member.tls_ca = ca.file("cluster-ca.pem");
  // A plain client (no TLS), one with a certificate of another CA (which it trusts), and a file
  // this end refuses itself: its certificate is not signed by the CA it names.
  CHECK(std::holds_alternative<ClientError>(Client::connect("127.0.0.1", a)));
  ConnectOptions rogue;
  rogue.tls_certificate = ca.file("rogue.pem");
  rogue.tls_key = ca.file("rogue.key");
  rogue.tls_ca = ca.file("rogue-ca.pem");
  const auto refused = Client::connect("127.0.0.1", b, rogue);
  REQUIRE(std::holds_alternative<ClientError>(refused));
  CHECK_THAT(std::get<ClientError>(refused).message, Catch::Contains("TLS"));
  ConnectOptions mismatched = rogue;
  mismatched.tls_ca = ca.file("cluster-ca.pem");
  const auto unusable = Client::connect("127.0.0.1", a, mismatched);
  REQUIRE(std::holds_alternative<ClientError>(unusable));
  CHECK_THAT(std::get<ClientError>(unusable).message, Catch::Contains("is not signed by ca"));
  CHECK(closed_unanswered(a, "CELERTP2" + std::string(200, '\x01')));  // plain bytes where a TLS handshake belongs
  // Members are served the single-process tokens through either node (the shards exchange their
  // partial sums over TLS), and celer status works with the files from the environment.
  for (const uint16_t entry : {a, b}) {
    auto c = Client::connect("127.0.0.1", entry, member);
    if (auto* e = std::get_if<ClientError>(&c)) FAIL(e->message);
    auto& client = *std::get<std::unique_ptr<Client>>(c);
    for (const Reference& ref : load_reference())
      CHECK(tokens_of(client.generate_tokens(ref.prompt, greedy(static_cast<int>(ref.generated.size())))) == ref.generated);
  }
  setenv("CELER_TLS_CERTIFICATE", member.tls_certificate.c_str(), 1);
  setenv("CELER_TLS_KEY", member.tls_key.c_str(), 1);
  setenv("CELER_TLS_CA", member.tls_ca.c_str(), 1);
  const nlohmann::json s = status(b);
  unsetenv("CELER_TLS_CERTIFICATE");
  unsetenv("CELER_TLS_KEY");
  unsetenv("CELER_TLS_CA");
  for (const auto& r : s["replicas"]) CHECK(r["up"] == true);
  // The plain client and the bytes, counted by a's multiplexer (which may still be at it).
  std::string metrics;
  for (int i = 0; i < 30; ++i) {
    metrics = http_get(a_http, "/metrics");
    if (metric_value(metrics, "celer_transport_refused_total{reason=\"tls\"}") >= 2) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  INFO(metrics.substr(metrics.find("celer_transport"), 1200));
  CHECK(metric_value(metrics, "celer_transport_tls") == 1);
  CHECK(metric_value(metrics, "celer_transport_refused_total{reason=\"tls\"}") >= 2);
  CHECK(l.process->stop(SIGTERM) == 0);
}

TEST_CASE("cluster: TLS files that cannot work are named before a node starts", "[cluster][tls]") {
  const ThrowawayCa ca;
  std::string text = read_file(kExamples + "/cluster-2node-tp2.yaml");
  text = std::regex_replace(text, std::regex("(\n  secret: \"\"\n)"),
                            "$1  tls: {certificate: " + ca.file("rogue.pem") + ", key: " + ca.file("rogue.key") +
                                ", ca: " + ca.file("cluster-ca.pem") + "}\n");
  std::vector<uint16_t> ports;
  const std::string config = write_temp("tls-rogue.yaml", with_fresh_ports(text, kModel, &ports));
  const CelerRun r = run_celer(CELER_BIN, {"launch", config}, std::chrono::seconds(60));
  INFO(r.output);
  CHECK_FALSE(r.exited(0));
  CHECK_THAT(r.output, Catch::Contains("certificate '" + ca.file("rogue.pem") + "' is not signed by ca"));
  CHECK_THAT(r.output, !Catch::Contains("celer: cluster ready"));
}

TEST_CASE("cluster: a node that cannot come up is named with why, and launch exits non-zero", "[cluster]") {
  // Three ranks do not divide the model's 8 attention heads.
  std::string text = read_file(kExamples + "/cluster-2node-tp2.yaml");
  text = std::regex_replace(text, std::regex(R"(      - \{node: b, device: cpu\})"),
                            "      - {node: b, device: cpu}\n      - {node: b, device: cpu}");
  std::vector<uint16_t> ports;
  const std::string config = write_temp("tp3.yaml", with_fresh_ports(text, kModel, &ports));
  const CelerRun r = run_celer(CELER_BIN, {"launch", config}, std::chrono::seconds(60));
  INFO(r.output);
  CHECK_FALSE(r.exited(0));
  CHECK_THAT(r.output, Catch::Contains(config + ":") && Catch::Contains("shards") &&
                           Catch::Contains("do not divide the model's 8 attention heads"));
  CHECK_THAT(r.output, !Catch::Contains("celer: cluster ready"));
}

namespace {

// The output of a shell command, trailing newline dropped.
std::string shell(const std::string& cmd) {
  std::string out;
  if (FILE* p = popen(cmd.c_str(), "r")) {
    char buf[512];
    while (std::fgets(buf, sizeof buf, p)) out += buf;
    pclose(p);
  }
  while (!out.empty() && out.back() == '\n') out.pop_back();
  return out;
}

// A network namespace joined to this one by a veth pair: this side 10.213.N.1, the namespace's
// side 10.213.N.2. Removed (with its link) when it goes.
struct VethNamespace {
  std::string name, here, there, ip;
  bool ok = false;
  VethNamespace() {
    const int n = static_cast<int>(getpid() % 250);
    name = "celer-t" + std::to_string(getpid());
    const std::string link = "cv" + std::to_string(getpid());  // at most 15 characters, with the suffix
    here = "10.213." + std::to_string(n) + ".1";
    there = "10.213." + std::to_string(n) + ".2";
    ip = shell("command -v ip");
    const std::string script = ip + " netns add " + name + " && " + ip + " link add " + link + "a type veth peer name " + link +
                               "b && " + ip + " link set " + link + "b netns " + name + " && " + ip + " addr add " + here +
                               "/30 dev " + link + "a && " + ip + " link set " + link + "a up && " + ip + " netns exec " + name +
                               " " + ip + " addr add " + there + "/30 dev " + link + "b && " + ip + " netns exec " + name + " " +
                               ip + " link set " + link + "b up && " + ip + " netns exec " + name + " " + ip + " link set lo up";
    ok = !ip.empty() && std::system((script + " 2>&1").c_str()) == 0;
  }
  ~VethNamespace() {
    if (!ip.empty()) std::system((ip + " netns del " + name + " >/dev/null 2>&1").c_str());
  }
};

}  // namespace

TEST_CASE("cluster: tensor parallel 2 across two network namespaces gives the reference tokens", "[cluster][netns]") {
  if (geteuid() != 0) {
    WARN("skipped: network namespaces need root (CI runs as root)");
    return;
  }
  VethNamespace ns;
  if (!ns.ok) {
    WARN("skipped: could not make a network namespace with a veth pair (ip netns, ip link add ... type veth)");
    return;
  }
  // The 2-node example, node a on this side of the veth pair and node b in the namespace, each
  // with its own address; an address beyond loopback needs the cluster secret.
  std::string text = read_file(kExamples + "/cluster-2node-tp2.yaml");
  text = std::regex_replace(text, std::regex(R"(secret: *"")"), "secret: netns-secret");
  const size_t b_at = text.find("- name: b");
  REQUIRE(b_at != std::string::npos);
  text = std::regex_replace(text.substr(0, b_at), std::regex("127\\.0\\.0\\.1"), ns.here) +
         std::regex_replace(text.substr(b_at), std::regex("127\\.0\\.0\\.1"), ns.there);
  std::vector<uint16_t> ports;  // a, a's http, b
  const std::string config = write_temp("netns.yaml", with_fresh_ports(text, kModel, &ports));
  CelerProcess a(CELER_BIN, {"node", "--config", config, "--name", "a"});
  CelerProcess b(ns.ip, {"netns", "exec", ns.name, CELER_BIN, "node", "--config", config, "--name", "b"});
  if (!a.wait_for("celer: node a ready on " + ns.here, kUp) || !b.wait_for("celer: node b ready on " + ns.there, kUp))
    FAIL("node a:\n" << a.output() << "\nnode b:\n" << b.output());
  ConnectOptions o;
  o.token = "netns-secret";
  for (const auto& [host, port] : {std::pair{ns.here, ports[0]}, std::pair{ns.there, ports[2]}}) {
    INFO("through " << host << ":" << port);
    auto c = Client::connect(host, port, o);
    REQUIRE(std::holds_alternative<std::unique_ptr<Client>>(c));
    for (const Reference& ref : load_reference())
      CHECK(tokens_of(std::get<std::unique_ptr<Client>>(c)->generate_tokens(ref.prompt,
                                                                             greedy(static_cast<int>(ref.generated.size())))) ==
            ref.generated);
  }
  CHECK(b.stop(SIGTERM) == 0);
  CHECK(a.stop(SIGTERM) == 0);
}

TEST_CASE("cluster: a node that stops answering (SIGSTOP) is declared down; its requests finish on the other replica",
          "[cluster][faults]") {
  Launched l = launch("cluster-3node-2replicas.yaml");  // cluster.node_timeout: the default, 2 s
  const pid_t victim = node_pid(l.config, "n2");
  REQUIRE(victim > 0);
  const auto expected = solo_runs(l.ports[0]);
  const auto stopped_at = std::chrono::steady_clock::now();
  const LoadResult r = run_load(l.ports[0], 24, expected, [&] { kill(victim, SIGSTOP); });
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - stopped_at).count();
  INFO((r.errors.empty() ? "" : r.errors.front()) << "; the load took " << seconds << " s");
  CHECK(r.failed == 0);
  CHECK(r.mismatched == 0);
  const nlohmann::json s = status(l.ports[0]);
  for (const auto& n : s["nodes"])
    if (n["name"] == "n2") CHECK(n["up"] == false);
  for (const auto& rep : s["replicas"])
    if (rep["name"] == "r2") CHECK(rep["up"] == false);
  kill(victim, SIGCONT);
  // Still serving, on r1.
  auto client = connect(l.ports[0]);
  const Reference ref = load_reference().front();
  CHECK(tokens_of(client->generate_tokens(ref.prompt, greedy(static_cast<int>(ref.generated.size())))) == ref.generated);
  l.process->stop(SIGTERM);
}

TEST_CASE("cluster: a shard rank being rebuilt on a node that hangs fails when the node is declared down, not at the "
          "build timeout",
          "[cluster][faults]") {
  Launched l = launch("cluster-2node-tp2.yaml");  // node_timeout 2 s; b holds rank 1 only
  const pid_t b = node_pid(l.config, "b");
  REQUIRE(b > 0);
  // Rank 0, reached the way any peer with the secret could: node a, its router, the replica.
  caf::actor_system_config cfg;
  cfg.load<caf::io::middleman>();
  add_message_types(cfg);
  caf::actor_system sys{cfg};
  Transport transport(sys, TransportLimits{});
  const auto node = transport.connect<NodeActor>("127.0.0.1", l.ports[0], std::chrono::seconds(10));
  caf::scoped_actor self{sys};
  RouterActor router;
  self->request(node, std::chrono::seconds(5), router_atom::value).receive([&](const RouterActor& r) { router = r; }, [](const caf::error&) {});
  REQUIRE(router);
  SupervisorActor replica;
  self->request(router, std::chrono::seconds(5), stats_atom::value)
      .receive([&](const SupervisorActor& s) { replica = s; }, [](const caf::error&) {});
  REQUIRE(replica);
  ShardActor rank0;
  self->request(replica, std::chrono::seconds(5), shard_atom::value).receive([&](const ShardActor& s) { rank0 = s; }, [](const caf::error&) {});
  REQUIRE(rank0);
  // b hangs, then rank 0 dies: the scheduler rebuilds the group and asks b for rank 1, which
  // b cannot answer. A request waits for the group meanwhile.
  kill(b, SIGSTOP);
  caf::anon_send_exit(rank0, caf::exit_reason::kill);
  auto client = connect(l.ports[0]);
  const auto start = std::chrono::steady_clock::now();
  auto outcome = std::async(std::launch::async, [&] { return client->generate_tokens(load_reference().front().prompt, greedy(16)); });
  const bool ended = outcome.wait_for(std::chrono::seconds(60)) == std::future_status::ready;
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  kill(b, SIGCONT);
  INFO(l.process->output());
  REQUIRE(ended);  // (at the build timeout it would take 10 minutes)
  INFO("ended after " << seconds << " s");
  const GenerateOutcome out = outcome.get();
  REQUIRE(std::holds_alternative<ClientError>(out));  // the only replica is gone with b
  CHECK(std::get<ClientError>(out).kind == ErrorKind::unavailable);
  CHECK_THAT(std::get<ClientError>(out).message, Catch::Contains("no replica"));
  l.process->stop(SIGTERM);
}

TEST_CASE("cluster: a client that sends nothing for longer than the node timeout keeps its connection", "[cluster]") {
  Launched l = launch("cluster-3node-2replicas.yaml");  // cluster.node_timeout 2 s
  auto client = connect(l.ports[0]);
  const Reference ref = load_reference().front();
  const auto once = [&] { return tokens_of(client->generate_tokens(ref.prompt, greedy(static_cast<int>(ref.generated.size())))); };
  CHECK(once() == ref.generated);
  std::this_thread::sleep_for(std::chrono::milliseconds(3500));  // idle: only the client's heartbeats
  CHECK(once() == ref.generated);
  l.process->stop(SIGTERM);
}

TEST_CASE("cluster: past the drain timeout a draining node's requests move to another replica, none lost",
          "[cluster][faults]") {
  // drain_timeout 0: nothing may finish on n2; every request running there moves, recomputed.
  Launched l = launch("cluster-3node-2replicas.yaml", [](std::string text) {
    return std::regex_replace(text, std::regex(R"(cluster:\n  secret: "")"), "cluster:\n  secret: \"\"\n  drain_timeout: 0s");
  });
  const auto expected = solo_runs(l.ports[0]);
  const nlohmann::json before = status(l.ports[0]);
  const LoadResult r = run_load(l.ports[0], 24, expected, [&] { drain(l.ports[0], "n2"); });
  INFO((r.errors.empty() ? "" : r.errors.front()));
  CHECK(r.failed == 0);
  CHECK(r.mismatched == 0);
  REQUIRE(l.process->wait_for(R"(\[n2\] celer: node n2 leaving)", std::chrono::seconds(20)));
  // Some of the 24 were on r2 when it went: they were routed again, to r1.
  const nlohmann::json after = status(l.ports[0]);
  CHECK(routed_to(after, "r1") + routed_to(after, "r2") > routed_to(before, "r1") + routed_to(before, "r2") + 24);
  l.process->stop(SIGTERM);
}


// Polls the cluster's status through `port` until `ready` holds of it (false after `timeout`).
bool status_becomes(uint16_t port, const std::function<bool(const nlohmann::json&)>& ready, std::chrono::seconds timeout) {
  const auto until = std::chrono::steady_clock::now() + timeout;
  while (std::chrono::steady_clock::now() < until) {
    const CelerRun r = run_celer(CELER_BIN, {"status", "--connect", "127.0.0.1:" + std::to_string(port), "--json"},
                                 std::chrono::seconds(10));
    if (r.exited(0) && ready(nlohmann::json::parse(r.output))) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(200));
  }
  return false;
}

bool replica_up(const nlohmann::json& s, const std::string& name) {
  for (const auto& r : s["replicas"])
    if (r["name"] == name) return r["up"].get<bool>();
  return false;
}

TEST_CASE("cluster: a node killed and started again rejoins: the node before it dials it again, and its replica serves; so "
          "does the router's node",
          "[cluster][faults]") {
  // Each node its own process, as across machines. front (the router) is listed first, so it
  // dials n1 and n2; a restarted n2 waits for front to dial it again.
  std::vector<uint16_t> ports;  // front, front's http, n1, n2
  const std::string config = write_temp(
      "rejoin.yaml", with_fresh_ports(with_policy("round-robin")(read_file(kExamples + "/cluster-3node-2replicas.yaml")), kModel, &ports));
  auto start = [&](const std::string& name) {
    return std::make_unique<CelerProcess>(CELER_BIN, std::vector<std::string>{"node", "--config", config, "--name", name});
  };
  auto front = start("front");
  auto n1 = start("n1");
  auto n2 = start("n2");
  for (const auto& [p, name] : {std::pair{front.get(), "front"}, std::pair{n1.get(), "n1"}, std::pair{n2.get(), "n2"}}) {
    const bool up = p->wait_for(std::string("celer: node ") + name + " ready", kUp);
    INFO(name << ":\n" << p->output());
    REQUIRE(up);
  }
  const auto both_up = [](const nlohmann::json& s) { return replica_up(s, "r1") && replica_up(s, "r2"); };
  REQUIRE(status_becomes(ports[0], both_up, std::chrono::seconds(20)));

  n2->stop(SIGKILL);
  CHECK(status_becomes(ports[0], [](const nlohmann::json& s) { return !replica_up(s, "r2"); }, std::chrono::seconds(20)));
  n2 = start("n2");
  {
    const bool up = n2->wait_for("celer: node n2 ready", kUp);
    INFO("n2 restarted:\n" << n2->output());
    REQUIRE(up);
  }
  REQUIRE(status_becomes(ports[0], both_up, std::chrono::seconds(20)));
  const uint64_t r2_before = routed_to(status(ports[0]), "r2");
  auto client = connect(ports[0]);
  const Reference ref = load_reference().front();
  for (int i = 0; i < 4; ++i)
    CHECK(tokens_of(client->generate_tokens(ref.prompt, greedy(static_cast<int>(ref.generated.size())))) == ref.generated);
  CHECK(routed_to(status(ports[0]), "r2") >= r2_before + 2);  // round-robin: half of them
  client.reset();

  // The router's node (no standby here) killed and started again: n1 and n2 take its new
  // router when it dials them again, and their replicas join it.
  front->stop(SIGKILL);
  front = start("front");
  {
    const bool up = front->wait_for("celer: node front ready", kUp);
    INFO("front restarted:\n" << front->output());
    REQUIRE(up);
  }
  {
    const bool joined = status_becomes(ports[0], both_up, std::chrono::seconds(30));
    INFO("n1:\n" << n1->output() << "\nn2:\n" << n2->output());
    REQUIRE(joined);
  }
  client = connect(ports[0]);
  for (int i = 0; i < 4; ++i)
    CHECK(tokens_of(client->generate_tokens(ref.prompt, greedy(static_cast<int>(ref.generated.size())))) == ref.generated);
  const nlohmann::json after = status(ports[0]);
  CHECK(routed_to(after, "r1") >= 1);
  CHECK(routed_to(after, "r2") >= 1);
  CHECK(n2->stop(SIGTERM) == 0);
  CHECK(n1->stop(SIGTERM) == 0);
  CHECK(front->stop(SIGTERM) == 0);
}

TEST_CASE("cluster: the node of a tensor-parallel rank killed and started again: the replica is rebuilt on it and "
          "gives the reference tokens",
          "[cluster][faults]") {
  // a schedules r0 and holds rank 0; b holds rank 1. a is listed first: it dials b, again once b
  // is back, and then restarts r0 with b's new node actor.
  std::vector<uint16_t> ports;  // a, a's http, b
  const std::string config =
      write_temp("rejoin-tp.yaml", with_fresh_ports(read_file(kExamples + "/cluster-2node-tp2.yaml"), kModel, &ports));
  auto start = [&](const std::string& name) {
    return std::make_unique<CelerProcess>(CELER_BIN, std::vector<std::string>{"node", "--config", config, "--name", name});
  };
  auto a = start("a");
  auto b = start("b");
  REQUIRE(a->wait_for("celer: node a ready", kUp));
  REQUIRE(b->wait_for("celer: node b ready", kUp));
  const auto r0_up = [](const nlohmann::json& s) { return replica_up(s, "r0"); };
  REQUIRE(status_becomes(ports[0], r0_up, std::chrono::seconds(20)));
  const std::vector<Reference> refs = load_reference();
  const auto generate = [&](const Reference& ref) {
    return tokens_of(connect(ports[0])->generate_tokens(ref.prompt, greedy(static_cast<int>(ref.generated.size()))));
  };
  CHECK(generate(refs.front()) == refs.front().generated);

  b->stop(SIGKILL);
  b = start("b");
  {
    const bool up = b->wait_for("celer: node b ready", kUp);
    INFO("b restarted:\n" << b->output());
    REQUIRE(up);
  }
  const bool again = a->wait_for("celer: node a: replica r0 ready again", kUp);
  INFO("a:\n" << a->output());
  REQUIRE(again);
  REQUIRE(status_becomes(ports[0], r0_up, std::chrono::seconds(20)));
  for (const Reference& ref : refs) CHECK(generate(ref) == ref.generated);
  CHECK(b->stop(SIGTERM) == 0);
  CHECK(a->stop(SIGTERM) == 0);
}

// ---- Faults injected through the chaos endpoint (docs/chaos.md) ----

namespace {

std::function<std::string(std::string)> with_chaos(const std::string& extra = "") {
  return [extra](std::string text) { return text + "chaos: enabled\n" + extra; };
}

ChaosFault fault(ChaosFault::Kind kind, const std::string& role, const std::string& replica, uint32_t duration_ms = 0,
                 uint32_t delay_ms = 0) {
  ChaosFault f;
  f.kind = kind;
  f.role = role;
  f.replica = replica;
  f.duration_ms = duration_ms;
  f.delay_ms = delay_ms;
  return f;
}

ChaosFault node_fault(ChaosFault::Kind kind, const std::string& node, uint32_t duration_ms = 0) {
  ChaosFault f;
  f.kind = kind;
  f.node = node;
  f.duration_ms = duration_ms;
  return f;
}

// A wire-layer fault on the link between two nodes.
ChaosFault link_fault(ChaosFault::Kind kind, const std::string& node, const std::string& peer, double probability,
                      uint32_t duration_ms, uint32_t delay_ms = 0) {
  ChaosFault f;
  f.kind = kind;
  f.node = node;
  f.peer = peer;
  f.probability = probability;
  f.duration_ms = duration_ms;
  f.delay_ms = delay_ms;
  return f;
}

// The load of run_load with `f` injected through the front node once every stream is running:
// nothing fails, and every stream's tokens are its solo run's. Returns the seconds from the
// fault to the load's end.
double check_fault_loses_nothing(Launched& l, const ChaosFault& f, const std::string& reply_says) {
  const auto expected = solo_runs(l.ports[0]);
  auto injector = connect(l.ports[0]);
  std::string said;
  std::chrono::steady_clock::time_point injected;
  const LoadResult r = run_load(l.ports[0], 24, expected, [&] {
    injected = std::chrono::steady_clock::now();
    auto reply = injector->inject_fault(f);
    if (auto* e = std::get_if<ClientError>(&reply)) said = "refused: " + e->message;
    else said = std::get<ChaosReply>(reply).message + " on node " + std::get<ChaosReply>(reply).node;
  });
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - injected).count();
  INFO("the fault: " << said << "; the load ended " << seconds << " s after it; " << (r.errors.empty() ? "" : r.errors.front()));
  CHECK_THAT(said, Catch::Contains(reply_says));
  CHECK(r.failed == 0);
  CHECK(r.mismatched == 0);
  return seconds;
}

}  // namespace

TEST_CASE("cluster: without `chaos: enabled` a fault is refused with the reason and counted; the cluster serves on",
          "[cluster][chaos]") {
  Launched l = launch("cluster-3node-2replicas.yaml");
  auto client = connect(l.ports[0]);
  auto reply = client->inject_fault(fault(ChaosFault::Kind::kill, "shard", "r2"));
  REQUIRE(std::holds_alternative<ClientError>(reply));
  CHECK_THAT(std::get<ClientError>(reply).message, Catch::Contains("chaos: enabled"));
  reply = client->inject_fault(node_fault(ChaosFault::Kind::sigkill, "n2"));
  REQUIRE(std::holds_alternative<ClientError>(reply));
  const nlohmann::json s = status(l.ports[0]);
  CHECK(s["entry"]["chaos"] == false);
  CHECK(s["entry"]["chaos_refused"] == 2);
  for (const auto& rep : s["replicas"]) CHECK(rep["up"] == true);
  const Reference ref = load_reference().front();
  CHECK(tokens_of(client->generate_tokens(ref.prompt, greedy(static_cast<int>(ref.generated.size())))) == ref.generated);
  l.process->stop(SIGTERM);
}

TEST_CASE("cluster: chaos: a target that does not exist is named in the refusal", "[cluster][chaos]") {
  Launched l = launch("cluster-3node-2replicas.yaml", with_chaos());
  auto client = connect(l.ports[0]);
  auto refused = [&](const ChaosFault& f) {
    auto reply = client->inject_fault(f);
    return std::holds_alternative<ClientError>(reply) ? std::get<ClientError>(reply).message : "taken";
  };
  CHECK_THAT(refused(fault(ChaosFault::Kind::kill, "shard", "r9")), Catch::Contains("no replica named 'r9'"));
  ChaosFault rank = fault(ChaosFault::Kind::kill, "shard", "r1");
  rank.rank = 3;
  CHECK_THAT(refused(rank), Catch::Contains("has no shard rank 3"));
  CHECK_THAT(refused(fault(ChaosFault::Kind::hang, "scheduler", "r1", 100)), Catch::Contains("can only be killed"));
  CHECK_THAT(refused(fault(ChaosFault::Kind::kill, "router", "r1")), Catch::Contains("no role 'router'"));
  CHECK_THAT(refused(node_fault(ChaosFault::Kind::sigkill, "n7")), Catch::Contains("no node named 'n7'"));
  CHECK_THAT(refused(node_fault(ChaosFault::Kind::partition, "n7", 1000)), Catch::Contains("no node named 'n7'"));
  CHECK_THAT(refused(link_fault(ChaosFault::Kind::drop, "front", "n7", 0.5, 1000)), Catch::Contains("no node named 'n7'"));
  l.process->stop(SIGTERM);
}

TEST_CASE("cluster: chaos: a killed scheduler is restarted; its requests finish with every token once", "[cluster][chaos]") {
  Launched l = launch("cluster-3node-2replicas.yaml", with_chaos());
  check_fault_loses_nothing(l, fault(ChaosFault::Kind::kill, "scheduler", "r2"), "killed the scheduler of replica r2 on node n2");
  l.process->stop(SIGTERM);
}

TEST_CASE("cluster: chaos: a killed cache is restarted; its requests recompute and finish with every token once",
          "[cluster][chaos]") {
  Launched l = launch("cluster-3node-2replicas.yaml", with_chaos());
  check_fault_loses_nothing(l, fault(ChaosFault::Kind::kill, "cache", "r2"), "killed the cache of replica r2");
  l.process->stop(SIGTERM);
}

TEST_CASE("cluster: chaos: a killed shard is restarted; its requests recompute and finish with every token once",
          "[cluster][chaos]") {
  Launched l = launch("cluster-3node-2replicas.yaml", with_chaos());
  check_fault_loses_nothing(l, fault(ChaosFault::Kind::kill, "shard", "r2"), "killed shard rank 0 of replica r2 on node n2");
  l.process->stop(SIGTERM);
}

TEST_CASE("cluster: chaos: a hung shard is found by supervision.hang_timeout and replaced; nothing is lost",
          "[cluster][chaos]") {
  Launched l = launch("cluster-3node-2replicas.yaml", with_chaos("supervision: {hang_timeout: 1s}\n"));
  const double seconds =
      check_fault_loses_nothing(l, fault(ChaosFault::Kind::hang, "shard", "r2", 6000), "hung shard rank 0 of replica r2 for 6000 ms");
  // Replaced at the timeout, not when the shard woke: the load ends well before the hang would.
  INFO("the load ended " << seconds << " s after the fault");
  CHECK(seconds < 5);
  l.process->stop(SIGTERM);
}

TEST_CASE("cluster: chaos: a slowed shard slows its replica's steps; nothing is lost", "[cluster][chaos]") {
  Launched l = launch("cluster-3node-2replicas.yaml", with_chaos());
  check_fault_loses_nothing(l, fault(ChaosFault::Kind::slow, "shard", "r2", 1500, 20),
                            "slowed shard rank 0 of replica r2 by 20 ms a step for 1500 ms");
  l.process->stop(SIGTERM);
}

TEST_CASE("cluster: chaos: a node killed from the chaos endpoint: its requests finish on the other replica", "[cluster][chaos]") {
  Launched l = launch("cluster-3node-2replicas.yaml", with_chaos());
  const pid_t victim = node_pid(l.config, "n2");
  check_fault_loses_nothing(l, node_fault(ChaosFault::Kind::sigkill, "n2"), "killed the process of node n2");
  CHECK(kill(victim, 0) != 0);  // gone
  l.process->stop(SIGTERM);
}

TEST_CASE("cluster: chaos: a node stopped from the chaos endpoint is declared down, continues by itself and rejoins",
          "[cluster][chaos]") {
  Launched l = launch("cluster-3node-2replicas.yaml", with_chaos());
  check_fault_loses_nothing(l, node_fault(ChaosFault::Kind::sigstop, "n2", 4000), "stopped the process of node n2 for 4000 ms");
  // It continues after 4 s, and is up again for the router.
  CHECK(status_becomes(l.ports[0], [](const nlohmann::json& s) { return replica_up(s, "r2"); }, std::chrono::seconds(20)));
  l.process->stop(SIGTERM);
}

// Wire-layer faults on the link between the front (the router and every client's request
// actors) and n2 (replica r2): the front's transport counts what it did to n2's frames.
namespace {

double front_chaos_frames(const Launched& l, const std::string& action) {
  return metric_value(http_get(l.ports[1], "/metrics"), "celer_transport_chaos_frames_total{action=\"" + action + "\"}");
}

}  // namespace

TEST_CASE("cluster: chaos: a link that drops a fifth of its messages: every lost chunk or end is found and the rest "
          "recomputed; nothing is lost",
          "[cluster][chaos]") {
  Launched l = launch("cluster-3node-2replicas.yaml", with_chaos());
  check_fault_loses_nothing(l, link_fault(ChaosFault::Kind::drop, "front", "n2", 0.2, 3000),
                            "drop on the link front-n2 for 3000 ms");
  CHECK(front_chaos_frames(l, "dropped") > 0);
  l.process->stop(SIGTERM);
}

TEST_CASE("cluster: chaos: a link that duplicates half of its messages: no token reaches a client twice", "[cluster][chaos]") {
  Launched l = launch("cluster-3node-2replicas.yaml", with_chaos());
  check_fault_loses_nothing(l, link_fault(ChaosFault::Kind::duplicate, "front", "n2", 0.5, 3000),
                            "duplicate on the link front-n2 for 3000 ms");
  CHECK(front_chaos_frames(l, "duplicated") > 0);
  l.process->stop(SIGTERM);
}

TEST_CASE("cluster: chaos: a link that corrupts a third of its messages: each is refused by its checksum and counted; "
          "nothing is lost",
          "[cluster][chaos]") {
  Launched l = launch("cluster-3node-2replicas.yaml", with_chaos());
  const double refused_before = metric_value(http_get(l.ports[1], "/metrics"), "celer_messages_refused_total");
  check_fault_loses_nothing(l, link_fault(ChaosFault::Kind::corrupt, "front", "n2", 0.3, 3000),
                            "corrupt on the link front-n2 for 3000 ms");
  CHECK(front_chaos_frames(l, "corrupted") > 0);
  CHECK(metric_value(http_get(l.ports[1], "/metrics"), "celer_messages_refused_total") > refused_before);
  l.process->stop(SIGTERM);
}

TEST_CASE("cluster: chaos: a slow link holds messages in order; nothing is lost", "[cluster][chaos]") {
  Launched l = launch("cluster-3node-2replicas.yaml", with_chaos());
  check_fault_loses_nothing(l, link_fault(ChaosFault::Kind::delay, "front", "n2", 0.3, 3000, 200),
                            "delay on the link front-n2 for 3000 ms");
  CHECK(front_chaos_frames(l, "delayed") > 0);
  l.process->stop(SIGTERM);
}

TEST_CASE("cluster: chaos: a node partitioned at the wire layer is declared down, its requests finish on the other "
          "replica, and it rejoins when the partition ends",
          "[cluster][chaos]") {
  Launched l = launch("cluster-3node-2replicas.yaml", with_chaos());
  check_fault_loses_nothing(l, node_fault(ChaosFault::Kind::partition, "n2", 4000), "partition of node n2 for 4000 ms");
  CHECK(front_chaos_frames(l, "dropped") > 0);
  // Its replica, and the node itself, are up again for the router.
  CHECK(status_becomes(
      l.ports[0],
      [](const nlohmann::json& s) {
        bool node_up = false;
        for (const auto& n : s["nodes"])
          if (n["name"] == "n2") node_up = n["up"] == true;
        return node_up && replica_up(s, "r2");
      },
      std::chrono::seconds(30)));
  l.process->stop(SIGTERM);
}

// ---- celer chaos: a plan of faults beside a seeded load, and its report ----

namespace {

nlohmann::json run_chaos_plan(const Launched& l, const std::string& plan, int expected_exit = 0) {
  const std::string report = write_temp("chaos-report.json", "");
  const CelerRun r = run_celer(CELER_BIN,
                               {"chaos", "--connect", "127.0.0.1:" + std::to_string(l.ports[0]), "--plan",
                                kExamples + "/chaos/" + plan, "--report", report, "--num-prompts", "48", "--max-concurrency",
                                "8", "--random-output-len", "300", "--seed", "5"},
                               std::chrono::seconds(120));
  INFO(r.output);
  CHECK(r.exited(expected_exit));
  return nlohmann::json::parse(read_file(report));
}

void check_nothing_lost(const nlohmann::json& report) {
  INFO(report.dump(2));
  CHECK(report["sent"] == 48);
  CHECK(report["completed"] == 48);
  CHECK(report["failed"].empty());
  CHECK(report["lost"] == 0);
  CHECK(report["duplicated_tokens"] == 0);
  CHECK(report["missing_tokens"] == 0);
  CHECK(report["unreferenced"] == 0);
}

}  // namespace

TEST_CASE("celer chaos: a killed shard is found and recovered from; the report counts nothing lost against the reference",
          "[cluster][chaos]") {
  Launched l = launch("chaos/cluster.yaml");
  const nlohmann::json report = run_chaos_plan(l, "kill-shard.yaml");
  check_nothing_lost(report);
  INFO(report.dump(2));
  REQUIRE(report["faults"].size() == 1);
  const auto& f = report["faults"][0];
  CHECK(f["kind"] == "kill");
  CHECK(f["target"] == "shard r2/0");
  CHECK(f["taken"] == true);
  REQUIRE(f["detected_ms"].is_number());
  REQUIRE(f["recovered_ms"].is_number());
  CHECK(f["detected_ms"].get<double>() >= f["start_ms"].get<double>());
  CHECK(f["detected_ms"].get<double>() - f["start_ms"].get<double>() < 2000);
  CHECK(f["recovered_ms"].get<double>() > f["detected_ms"].get<double>());
  CHECK(report["outside_faults"]["ttft_ms"]["count"].get<int>() + report["inside_faults"]["ttft_ms"]["count"].get<int>() == 48);
  CHECK(report["affected"]["requests"] == report["inside_faults"]["ttft_ms"]["count"]);
  CHECK(report["affected"]["extra_e2el_ms"]["count"] == report["affected"]["requests"]);
  double tokens = 0;
  for (const auto& t : report["tokens_per_second"]) tokens += t.get<double>();
  CHECK(tokens == 48 * 300);
  l.process->stop(SIGTERM);
}

TEST_CASE("celer chaos: a node stopped and continued is found down and recovered from; nothing lost", "[cluster][chaos]") {
  Launched l = launch("chaos/cluster.yaml");
  const nlohmann::json report = run_chaos_plan(l, "sigstop-node.yaml");
  check_nothing_lost(report);
  INFO(report.dump(2));
  const auto& f = report["faults"][0];
  CHECK(f["target"] == "node n2");
  CHECK(f["end_ms"].get<double>() - f["start_ms"].get<double>() == Approx(4000).margin(1e-6));  // doubles: start + 4000 - start
  REQUIRE(f["detected_ms"].is_number());
  CHECK(f["detected_ms"].get<double>() - f["start_ms"].get<double>() < 4000);  // node_timeout, 2 s, and a heartbeat
  REQUIRE(f["recovered_ms"].is_number());
  CHECK(f["recovered_ms"].get<double>() > f["end_ms"].get<double>());
  l.process->stop(SIGTERM);
}

TEST_CASE("celer chaos: against a cluster without `chaos: enabled` every fault is refused and reported so", "[cluster][chaos]") {
  Launched l = launch("chaos/cluster.yaml", [](std::string text) {
    const size_t at = text.find("chaos: enabled\n");
    return text.erase(at, std::string("chaos: enabled\n").size());
  });
  const nlohmann::json report = run_chaos_plan(l, "kill-cache.yaml");
  check_nothing_lost(report);
  const auto& f = report["faults"][0];
  CHECK(f["taken"] == false);
  CHECK_THAT(f["said"].get<std::string>(), Catch::Contains("chaos: enabled"));
  CHECK(f["detected_ms"].is_null());
  l.process->stop(SIGTERM);
}
