// The guard on the client port (actors/transport.hpp) against a real `celer serve` in another
// process: BASP headers that announce huge payloads, before and after a real handshake; ten
// connections of maximal headers and truncated payloads; tokens; and a bounded fuzz run of
// random and mutated frames. Each checks the server's RSS from /proc, the guard's counters on
// /metrics, and that a real client streaming beside the attack gets exactly its tokens.
#include <catch2/catch.hpp>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstring>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "celer/client.hpp"
#include "serve_process.hpp"
#include "test_util.hpp"

using namespace celer;
using namespace std::chrono_literals;

namespace {

constexpr uint32_t kBound = 1 << 20;      // listen.max_message_bytes in these tests
constexpr uint32_t kBuffered = 4 << 20;   // listen.max_buffered_bytes
constexpr long kSlackKb = 24 * 1024;      // allocator and per-connection overheads

// A server with the small bounds above and a small KV cache (a small, steady RSS to measure).
struct GuardedServer {
  TempDir dir;
  std::string config;
  std::unique_ptr<ServeProcess> process;
  explicit GuardedServer(const std::string& extra_listen = "") {
    config = dir.path() + "/guarded.yaml";
    const std::string yaml = "model: " + std::string(CELER_TEST_DATA) + "/stories260K.gguf\nkv_cache_memory: 16MiB\n" +
                             "listen: {max_message_bytes: 1MiB, max_buffered_bytes: 4MiB" + extra_listen + "}\n";
    write_file(config, yaml.data(), yaml.size());
    process = std::make_unique<ServeProcess>(CELER_BIN, std::vector<std::string>{"--config", config, "--http-port", "0"});
  }
  uint16_t port() const { return process->port(); }
};

// A connected socket, or -1 (for threads other than the test's, where REQUIRE may not be used).
int try_connect(uint16_t port) {
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_port = htons(port);
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) == 0) return fd;
  close(fd);
  return -1;
}

int connect_to(uint16_t port) {
  const int fd = try_connect(port);
  INFO("connect to port " << port << ": " << std::strerror(errno));
  REQUIRE(fd >= 0);
  return fd;
}

void send_bytes(int fd, const std::string& bytes) {
  size_t off = 0;
  while (off < bytes.size()) {
    const ssize_t n = send(fd, bytes.data() + off, bytes.size() - off, MSG_NOSIGNAL);
    if (n <= 0) return;  // the server may close first: that is the point
    off += static_cast<size_t>(n);
  }
}

// celer's preamble (transport.cpp): magic, token length, name length, zeros, the token padded
// to 64 bytes, the connecting node's name padded to 64 bytes.
std::string preamble(const std::string& token = "", const std::string& name = "") {
  std::string p = "CELERTP2";
  p += static_cast<char>(token.size());
  p += static_cast<char>(name.size());
  p += std::string(6, '\0');
  p += token + std::string(64 - token.size(), '\0');
  p += name + std::string(64 - name.size(), '\0');
  return p;
}

// A BASP header as CAF 0.17 writes it: operation, two pads, flags, then payload_len,
// operation_data, source and destination actor ids, big-endian.
std::string basp_header(uint8_t op, uint32_t payload_len, uint8_t flags = 0, uint64_t data = 0, uint64_t dest = 0) {
  std::string h(32, '\0');
  h[0] = static_cast<char>(op);
  h[3] = static_cast<char>(flags);
  for (int i = 0; i < 4; ++i) h[4 + i] = static_cast<char>(payload_len >> (24 - 8 * i));
  for (int i = 0; i < 8; ++i) h[8 + i] = static_cast<char>(data >> (56 - 8 * i));
  for (int i = 0; i < 8; ++i) h[24 + i] = static_cast<char>(dest >> (56 - 8 * i));
  return h;
}

// Reads until the server closes the connection; false if it is still open after `wait`.
// `got`, if given, receives the bytes the server sent before it closed.
bool closed_within(int fd, std::chrono::milliseconds wait, std::string* got = nullptr) {
  const auto until = std::chrono::steady_clock::now() + wait;
  char buf[4096];
  for (;;) {
    const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(until - std::chrono::steady_clock::now());
    pollfd p{fd, POLLIN, 0};
    if (left.count() <= 0 || poll(&p, 1, static_cast<int>(left.count())) <= 0) return false;
    const ssize_t n = recv(fd, buf, sizeof buf, 0);
    if (n <= 0) return true;
    if (got) got->append(buf, static_cast<size_t>(n));
  }
}

std::string http_get(uint16_t port, const std::string& path) {
  const int fd = connect_to(port);
  send_bytes(fd, "GET " + path + " HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
  std::string out;
  char buf[8192];
  for (ssize_t n; (n = recv(fd, buf, sizeof buf, 0)) > 0;) out.append(buf, static_cast<size_t>(n));
  close(fd);
  return out;
}

// A counter or gauge's value on /metrics (-1 when absent).
double metric(uint16_t http_port, const std::string& name) {
  const std::string page = http_get(http_port, "/metrics");
  const size_t at = page.find("\n" + name + " ");
  if (at == std::string::npos) return -1;
  return std::stod(page.substr(at + name.size() + 2));
}

std::unique_ptr<Client> connect_client(uint16_t port, const std::string& token = "") {
  ConnectOptions o;
  o.token = token;
  auto c = Client::connect("127.0.0.1", port, o);
  if (auto* e = std::get_if<ClientError>(&c)) FAIL(e->message);
  return std::move(std::get<std::unique_ptr<Client>>(c));
}

std::vector<TokenId> greedy(Client& c, const std::string& prompt, int n) {
  RequestOptions o;
  o.max_tokens = n;
  o.ignore_eos = true;
  o.sampling.temperature = 0;
  GenerateOutcome r = c.generate(prompt, o);
  if (auto* e = std::get_if<ClientError>(&r)) FAIL(e->message);
  return std::get<Completion>(r).tokens;
}

// Samples a process's RSS every few milliseconds; the peak.
class RssWatch {
 public:
  explicit RssWatch(const ServeProcess& p) : thread_([this, &p] {
      while (!stop_) {
        peak_ = std::max(peak_.load(), p.rss_kb());
        std::this_thread::sleep_for(5ms);
      }
    }) {}
  ~RssWatch() { finish(); }
  long finish() {
    stop_ = true;
    if (thread_.joinable()) thread_.join();
    return peak_;
  }

 private:
  std::atomic<bool> stop_{false};
  std::atomic<long> peak_{0};
  std::thread thread_;
};

// Stands between a real client and the server: forwards both ways and, once the client's
// first BASP message after its preamble (its handshake) has gone through, sends `inject` to
// the server as if the client had: an attack from a peer that completed a valid handshake.
class Relay {
 public:
  Relay(uint16_t server_port, std::string inject) : server_port_(server_port), inject_(std::move(inject)) {
    listener_ = socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    // No REQUIRE: the fuzz test makes relays on its own thread. A relay that cannot listen
    // has port 0, and whatever connects to it fails.
    if (bind(listener_, reinterpret_cast<sockaddr*>(&a), sizeof a) != 0 || listen(listener_, 1) != 0) return;
    socklen_t len = sizeof a;
    getsockname(listener_, reinterpret_cast<sockaddr*>(&a), &len);
    port_ = ntohs(a.sin_port);
    thread_ = std::thread([this] { run(); });
  }
  ~Relay() {
    shutdown(listener_, SHUT_RDWR);
    close(listener_);
    if (thread_.joinable()) thread_.join();
  }
  uint16_t port() const { return port_; }
  // True once the client's handshake has gone through and the injection is on its way.
  bool injected() const { return injected_; }
  // True once the server has closed its side.
  bool server_closed() const { return server_closed_; }

 private:
  static bool read_exactly(int fd, char* buf, size_t n) {
    while (n > 0) {
      const ssize_t r = recv(fd, buf, n, 0);
      if (r <= 0) return false;
      buf += r;
      n -= static_cast<size_t>(r);
    }
    return true;
  }

  void run() {
    const int client = accept(listener_, nullptr, nullptr);
    if (client < 0) return;
    const int server = try_connect(server_port_);
    if (server < 0) {
      close(client);
      return;
    }
    std::thread down([&] {  // server -> client
      char buf[4096];
      for (ssize_t n; (n = recv(server, buf, sizeof buf, 0)) > 0;) send_bytes(client, std::string(buf, static_cast<size_t>(n)));
      server_closed_ = true;
      shutdown(client, SHUT_RDWR);
    });
    // The preamble at once (the server answers it with its handshake, which the client awaits
    // before it sends its own), then the client's handshake, then the injection.
    std::string pre(144, '\0'), hdr(32, '\0');
    if (read_exactly(client, pre.data(), pre.size())) {
      send_bytes(server, pre);
      if (read_exactly(client, hdr.data(), hdr.size())) {
        uint32_t len = 0;
        for (int i = 0; i < 4; ++i) len = (len << 8) | static_cast<unsigned char>(hdr[4 + i]);
        std::string payload(len, '\0');
        if (read_exactly(client, payload.data(), len)) {
          send_bytes(server, hdr + payload);
          injected_ = true;  // before the send: the server may close (and the test look) before it returns
          send_bytes(server, inject_);
        }
      }
    }
    down.join();
    close(server);
    close(client);
  }

  uint16_t server_port_;
  std::string inject_;
  int listener_ = -1;
  uint16_t port_ = 0;
  std::atomic<bool> injected_{false}, server_closed_{false};
  std::thread thread_;
};

}  // namespace

TEST_CASE("transport: a 32-byte header announcing 4 GiB closes its connection and allocates nothing", "[transport]") {
  GuardedServer server;
  auto client = connect_client(server.port());
  const std::vector<TokenId> reference = greedy(*client, "Once upon a time", 24);
  const long baseline = server.process->rss_kb();
  RssWatch watch(*server.process);

  for (uint8_t op : {0, 1, 2}) {
    INFO("operation " << int(op));
    // A stranger's header, with no preamble: closed on its first 8 bytes.
    int fd = connect_to(server.port());
    send_bytes(fd, basp_header(op, 0xFFFFFFFFu));
    CHECK(closed_within(fd, 2s));
    close(fd);
    // After a valid preamble, before any handshake.
    fd = connect_to(server.port());
    send_bytes(fd, preamble() + basp_header(op, 0xFFFFFFFFu));
    CHECK(closed_within(fd, 2s));
    close(fd);
    // After a real client's valid handshake; a message (operation 2) addressed to an actor.
    Relay relay(server.port(), basp_header(op, 0xFFFFFFFFu, 0, 0, op == 2 ? 1 : 0));
    auto attacker = Client::connect("127.0.0.1", relay.port());  // may see the close before its handshake ends
    const auto until = std::chrono::steady_clock::now() + 3s;
    while (!relay.server_closed() && std::chrono::steady_clock::now() < until) std::this_thread::sleep_for(5ms);
    CHECK(relay.injected());
    CHECK(relay.server_closed());
  }
  std::this_thread::sleep_for(200ms);  // what an unguarded server would be zero-filling by now
  const long peak = watch.finish();
  CHECK(peak - baseline < kSlackKb);
  const uint16_t http = server.process->http_port();
  CHECK(metric(http, "celer_transport_refused_total{reason=\"bad_preamble\"}") == 3);
  // A client handshake (before the handshake and, repeated, after it) and a message after it get
  // as far as the size check; a server handshake, and a message before the handshake, are out of
  // place and refused before it.
  CHECK(metric(http, "celer_transport_refused_total{reason=\"oversized\"}") == 3);
  CHECK(metric(http, "celer_transport_refused_total{reason=\"malformed\"}") == 3);
  CHECK(greedy(*client, "Once upon a time", 24) == reference);
}

TEST_CASE("transport: ten connections of maximal headers and truncated payloads hold at most max_buffered_bytes",
          "[transport]") {
  GuardedServer server;
  auto client = connect_client(server.port());
  const std::vector<TokenId> reference = greedy(*client, "The little dog", 48);
  const long baseline = server.process->rss_kb();
  RssWatch watch(*server.process);
  std::atomic<bool> stop{false};
  std::atomic<int> closed{0};
  std::vector<std::thread> attackers;
  for (int t = 0; t < 10; ++t) {
    attackers.emplace_back([&, t] {
      for (int round = 0; !stop; ++round) {
        const int fd = try_connect(server.port());  // not REQUIRE: this is not the test's thread
        if (fd < 0) continue;
        if (round % 2 == 0) {
          // The largest allowed payload (a client handshake), begun and never finished: it holds
          // its share of the buffer bound until the connection goes.
          send_bytes(fd, preamble() + basp_header(1, kBound) + std::string(1000 + t, 'x'));
          std::this_thread::sleep_for(150ms);
        } else {
          send_bytes(fd, preamble() + basp_header(1, 0xFFFFFFFFu));
          if (closed_within(fd, 2s)) ++closed;
        }
        close(fd);
      }
    });
  }
  // A real client streams beside the attack and gets exactly its tokens, three times over.
  for (int i = 0; i < 3; ++i) CHECK(greedy(*client, "The little dog", 48) == reference);
  // What the guard holds while the attack goes on: within the bound, and not nothing (the
  // attackers' half-sent payloads are counted).
  double most_buffered = 0;
  for (int i = 0; i < 20; ++i) {
    most_buffered = std::max(most_buffered, metric(server.process->http_port(), "celer_transport_buffered_bytes"));
    std::this_thread::sleep_for(25ms);
  }
  CHECK(most_buffered > 0);
  CHECK(most_buffered <= kBuffered);
  stop = true;
  for (auto& a : attackers) a.join();
  const long peak = watch.finish();
  INFO("baseline " << baseline << " kB, peak " << peak << " kB");
  CHECK(peak - baseline < kBuffered / 1024 + kSlackKb);
  CHECK(closed > 0);
  const uint16_t http = server.process->http_port();
  CHECK(metric(http, "celer_transport_refused_total{reason=\"oversized\"}") >= closed);
  CHECK(metric(http, "celer_transport_refused_total{reason=\"over_budget\"}") > 0);  // ten 1 MiB payloads, 4 MiB bound
  std::this_thread::sleep_for(100ms);
  CHECK(metric(http, "celer_transport_buffered_bytes") == 0);  // given back as each connection went
}

TEST_CASE("transport: a token gates the port; a port beyond loopback needs one", "[transport]") {
  GuardedServer server(", token: s3cret-token");
  // No token, the wrong one, the right one.
  auto none = Client::connect("127.0.0.1", server.port());
  REQUIRE(std::holds_alternative<ClientError>(none));
  CHECK_THAT(std::get<ClientError>(none).message, Catch::Contains("token"));
  ConnectOptions wrong;
  wrong.token = "guess";
  CHECK(std::holds_alternative<ClientError>(Client::connect("127.0.0.1", server.port(), wrong)));
  auto client = connect_client(server.port(), "s3cret-token");
  CHECK(greedy(*client, "Once upon a time", 8).size() == 8);
  // A raw peer with the wrong token learns nothing, not even the server's handshake.
  const int fd = connect_to(server.port());
  send_bytes(fd, preamble("guess"));
  std::string answer;
  CHECK(closed_within(fd, 2s, &answer));
  CHECK(answer.empty());
  close(fd);
  CHECK(metric(server.process->http_port(), "celer_transport_refused_total{reason=\"bad_token\"}") == 3);
  // The node name a dialing node presents: a config's name is taken, anything else closes the
  // connection before BASP (the name bytes must be [A-Za-z0-9_-] and zeros after them).
  for (const std::string& bad : {std::string("n\x01"), std::string("a b"), std::string("\xc3\xa9")}) {
    const int fd2 = connect_to(server.port());
    send_bytes(fd2, preamble("s3cret-token", bad));
    CHECK(closed_within(fd2, 2s));
    close(fd2);
  }
  {
    const int fd2 = connect_to(server.port());
    std::string p = preamble("s3cret-token", "n2");
    p[9] = 1;  // says one byte of name, and has two
    send_bytes(fd2, p);
    CHECK(closed_within(fd2, 2s));
    close(fd2);
  }
  CHECK(metric(server.process->http_port(), "celer_transport_refused_total{reason=\"bad_preamble\"}") == 4);

  // Listening beyond loopback without a token is refused before anything starts.
  CelerRun open = run_celer(CELER_BIN,
                            {"serve", "--model", std::string(CELER_TEST_DATA) + "/stories260K.gguf", "--host", "0.0.0.0",
                             "--port", "0"},
                            20s);
  CHECK(open.exited(1));
  CHECK_THAT(open.output, Catch::Contains("listen.token"));
}

TEST_CASE("transport: random and mutated BASP frames never crash the server or disturb a streaming client",
          "[transport][fuzz]") {
  GuardedServer server;
  auto client = connect_client(server.port());
  const std::vector<TokenId> reference = greedy(*client, "One day", 40);
  const long baseline = server.process->rss_kb();
  RssWatch watch(*server.process);
  std::atomic<bool> stop{false};
  std::atomic<int> frames{0};
  std::thread fuzzer([&] {
    std::mt19937 rng(20261202);
    const uint32_t lengths[] = {0, 1, 31, 32, 33, 4096, kBound - 1, kBound, kBound + 1, 1u << 31, 0xFFFFFFFFu};
    auto random_bytes = [&](size_t n) {
      std::string s(n, '\0');
      for (char& ch : s) ch = static_cast<char>(rng());
      return s;
    };
    for (int i = 0; !stop; ++i) {
      std::string bytes;
      switch (rng() % 5) {
        case 0:  // garbage from the first byte
          bytes = random_bytes(1 + rng() % 200);
          break;
        case 1: {  // a preamble with one byte flipped
          bytes = preamble();
          bytes[rng() % bytes.size()] ^= static_cast<char>(1 + rng() % 255);
          bytes += basp_header(static_cast<uint8_t>(rng()), lengths[rng() % 11]);
          break;
        }
        default: {  // a valid preamble, then headers of every kind and length, whole or cut short
          bytes = preamble();
          for (int k = 0, n = 1 + static_cast<int>(rng() % 3); k < n; ++k) {
            const uint32_t len = lengths[rng() % 11];
            bytes += basp_header(static_cast<uint8_t>(rng() % 12 == 0 ? rng() : rng() % 8), len,
                                 static_cast<uint8_t>(rng()), rng());
            const uint32_t body = std::min<uint32_t>(len, 8192);
            bytes += random_bytes(rng() % 2 ? body : body / 2);
          }
          if (rng() % 4 == 0) bytes.resize(rng() % bytes.size());  // truncated anywhere
        }
      }
      if (i % 25 == 0) {
        // A real handshake, then garbage.
        Relay relay(server.port(), basp_header(2, 64) + random_bytes(64) + random_bytes(rng() % 100));
        auto peer = Client::connect("127.0.0.1", relay.port());
        std::this_thread::sleep_for(20ms);
      } else {
        const int fd = try_connect(server.port());
        if (fd < 0) continue;
        send_bytes(fd, bytes);
        closed_within(fd, 50ms);
        close(fd);
      }
      ++frames;
    }
  });
  const auto until = std::chrono::steady_clock::now() + 6s;
  int streams = 0;
  while (std::chrono::steady_clock::now() < until) {
    CHECK(greedy(*client, "One day", 40) == reference);
    ++streams;
  }
  stop = true;
  fuzzer.join();
  const long peak = watch.finish();
  INFO(frames << " fuzzed connections, " << streams << " streams, baseline " << baseline << " kB, peak " << peak << " kB");
  CHECK(frames > 100);
  CHECK(peak - baseline < kBuffered / 1024 + kSlackKb);
  // Still up and serving new clients.
  auto fresh = connect_client(server.port());
  CHECK(greedy(*fresh, "One day", 40) == reference);
}
