// celer's client library: connect to a running celer (`celer serve`) over TCP, send requests,
// receive their tokens as they are generated, cancel. Errors are values, never exceptions.
//
//   auto c = celer::Client::connect("127.0.0.1", 7411);
//   if (auto* err = std::get_if<celer::ClientError>(&c)) { ... }
//   auto& client = *std::get<std::unique_ptr<celer::Client>>(c);
//   // Callback form: blocks until the request ends; return false from the callback to cancel.
//   auto r = client.generate("Once upon a time", {}, [](const celer::TokenChunk& c) {
//     std::cout << c.text << std::flush; return true; });
//   // Iterator form:
//   auto stream = client.stream("Once upon a time", {});
//   while (auto chunk = stream.next()) std::cout << chunk->text;
//   auto result = stream.result();
//
// A Client is thread-safe: several threads may run streams at once (each stream is used by one
// thread). Streams must end before their Client. Link the CMake target celer::client.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <variant>
#include <vector>

#include "runtime/protocol.hpp"

namespace celer {

struct ClientError {
  ErrorKind kind = ErrorKind::internal;
  std::string message;
};

struct RequestOptions {
  SamplingParams sampling;
  int32_t max_tokens = 128;
  std::vector<std::string> stop;
  bool ignore_eos = false;
  bool add_bos = true;         // for text prompts: prepend BOS when the model uses one
  std::optional<Priority> priority;  // none: the server's priorities.default
  std::string tenant;
  std::string session_id;
  int64_t timeout_ms = 0;      // 0: none; else the request's deadline from now
  int32_t logprobs = -1;       // -1: none; k in 0..20: each token's logprob and the k most likely (TokenChunk::logprobs)
};

struct Completion {
  std::vector<TokenId> tokens;
  std::string text;
  FinishReason reason = FinishReason::stop;
  int32_t prompt_tokens = 0;
  int32_t completion_tokens = 0;
  int32_t cached_tokens = 0;
  StageTimes times;            // when the request passed each stage on the server
};

using GenerateOutcome = std::variant<Completion, ClientError>;

struct ConnectOptions {
  // The server's listen.token; a server that listens beyond loopback requires one. Empty: the
  // CELER_TOKEN environment variable's value, if set.
  std::string token;
  int64_t timeout_ms = 10'000;  // to connect and complete the handshake
  // The server's listen.max_message_bytes. A request larger than this is answered here with an
  // invalid_request error, not sent: the server would close the connection on it, and every
  // other stream on the connection with it.
  uint64_t max_message_bytes = uint64_t{8} << 20;
  // How often the connection carries a heartbeat while nothing else is sent. A cluster node
  // closes a connection silent for its cluster.node_timeout (at least 500 ms): that is how it
  // finds peers that are alive but stuck, and a client waiting for a long answer must not look
  // like one.
  int64_t heartbeat_ms = 100;
  // Mutual TLS, for a cluster with cluster.tls: PEM files of a certificate the cluster's CA
  // signed, its unencrypted key, and the CA's certificate. Each one left empty: the
  // CELER_TLS_CERTIFICATE, CELER_TLS_KEY or CELER_TLS_CA environment variable's value, if set.
  std::string tls_certificate;
  std::string tls_key;
  std::string tls_ca;
};

class Client {
 public:
  // Connects to a celer server; the error says why not (refused, unreachable, not a celer port,
  // wrong token).
  static std::variant<std::unique_ptr<Client>, ClientError> connect(const std::string& host, uint16_t port,
                                                                    const ConnectOptions& options = {});
  ~Client();

  class Stream {
   public:
    Stream(Stream&&) noexcept;
    Stream& operator=(Stream&&) noexcept;
    ~Stream();  // cancels the request if it has not ended
    // The next chunk of tokens and text; nullopt once the request has ended (see result()).
    std::optional<TokenChunk> next();
    void cancel();
    // Valid once next() returned nullopt.
    const GenerateOutcome& result() const;

   private:
    friend class Client;
    struct Impl;
    explicit Stream(std::unique_ptr<Impl> impl);
    std::unique_ptr<Impl> impl_;
  };

  // The model the server serves: its name, vocabulary size and serving context length.
  std::variant<ModelInfo, ClientError> model_info(int64_t timeout_ms = 10'000);
  // Injects a fault through the cluster node this client is connected to (docs/chaos.md):
  // refused unless the cluster was started with `chaos: enabled`.
  std::variant<ChaosReply, ClientError> inject_fault(const ChaosFault& fault, int64_t timeout_ms = 10'000);
  // A cluster's status as `celer status --json` prints it (docs/cluster.md), from the router
  // through the node this client is connected to.
  std::variant<std::string, ClientError> cluster_status(int64_t timeout_ms = 10'000);

  Stream stream(const std::string& prompt, const RequestOptions& options);
  Stream stream_tokens(std::vector<TokenId> prompt, const RequestOptions& options);

  // on_chunk (optional) sees each chunk as it arrives; returning false cancels the request.
  GenerateOutcome generate(const std::string& prompt, const RequestOptions& options,
                           const std::function<bool(const TokenChunk&)>& on_chunk = {});
  GenerateOutcome generate_tokens(std::vector<TokenId> prompt, const RequestOptions& options,
                                  const std::function<bool(const TokenChunk&)>& on_chunk = {});

 private:
  struct Impl;
  explicit Client(std::unique_ptr<Impl> impl);
  Stream start(GenerateRequest request);
  GenerateOutcome drain(Stream stream, const std::function<bool(const TokenChunk&)>& on_chunk);
  std::unique_ptr<Impl> impl_;
};

}  // namespace celer
