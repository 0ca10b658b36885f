// The config of a celer deployment (DESIGN.md section 5): one YAML file with vLLM-like keys, read
// into the plain structs below. Every key is optional and has the default written next to its
// field, so an empty file is a valid config. Reading is strict: an unknown key, a value of the
// wrong type or out of range, or a key given twice is an Error(invalid_argument) whose message is
// "<file>:<line>:<column>: <what>" (1-based, pointing at the key) and names the key and what it
// allows, so a typo in a deployment fails at startup instead of silently running on a default.
//
// Sizes are bytes, written as an integer or with a unit: 512MiB, 2GiB, 100MB (B, KB, MB, GB, TB
// are powers of 1000; KiB, MiB, GiB, TiB powers of 1024). Durations are milliseconds, written as
// an integer or with a unit: 250ms, 2s, 1m, 1h.
#pragma once

#include <chrono>
#include <cstdint>
#include <map>
#include <optional>
#include <string>

#include "kernels/matmul.hpp"    // Q8Activations
#include "kernels/types.hpp"     // TensorType
#include "runtime/protocol.hpp"  // Priority

namespace celer {

// The only KV block size the engine and the prefix index support (tokens per block).
constexpr int32_t kConfigBlockSize = 16;

struct ResponseCacheConfig {
  bool enabled = false;
  int32_t max_entries = 1024;
  std::chrono::milliseconds ttl{60'000};
  bool operator==(const ResponseCacheConfig&) const = default;
};

// A token bucket: refilled at tokens_per_second, holding at most burst tokens.

// Absent from the file = the defaults = no limits.
struct RateLimitsConfig {
  RateLimit default_limit;                   // "default": tenants not listed below
  std::map<std::string, RateLimit> tenants;  // by tenant name
  bool operator==(const RateLimitsConfig&) const = default;
};

// The client-library endpoint and the guard on it (actors/transport.hpp, docs/security.md).
struct ListenConfig {
  std::string host = "127.0.0.1";
  uint16_t port = 7411;  // 0: ephemeral
  std::string token;     // the secret clients present first; required when host is not loopback
  uint64_t max_message_bytes = uint64_t{8} << 20;    // one message from a peer
  uint64_t max_buffered_bytes = uint64_t{64} << 20;  // all large messages being received at once
  bool operator==(const ListenConfig&) const = default;
};

// The HTTP gateway (docs/http.md): its endpoint, its timeouts, and where it logs each request's
// stage times (one JSON line per finished choice; "" for none).
struct HttpConfig {
  std::string host = "127.0.0.1";
  uint16_t port = 8080;  // 0: ephemeral
  std::chrono::milliseconds request_timeout{30'000};  // a begun request must arrive whole within this
  std::chrono::milliseconds idle_timeout{120'000};    // an idle keep-alive connection is closed after this
  std::string stage_log;
  bool operator==(const HttpConfig&) const = default;
};

// Each node's supervisor: an actor that fails more than max_restarts times within window is not
// restarted again; restarts wait backoff first.
struct SupervisionConfig {
  int32_t max_restarts = 5;
  std::chrono::milliseconds window{60'000};
  std::chrono::milliseconds backoff{100};
  bool operator==(const SupervisionConfig&) const = default;
};

// Fields are named as their YAML keys; a nested section's keys are in its own struct.
struct ClusterConfig {
  std::string model;                // path to a GGUF file; "": the CLI fills in the bundled model
  std::optional<TensorType> dtype;  // nullopt ("auto"): as stored, the only one the engine runs now
  Q8Activations q8_activations = Q8Activations::int8;
  std::optional<TensorType> kv_cache_dtype;  // f32, f16 or q8_0; nullopt ("auto"): default_kv_type(model)
  int32_t tensor_parallel_size = 1;  // 1..64
  int32_t threads = 0;               // per shard; 0: all cores divided by tensor_parallel_size
  int32_t max_batch_size = 16;       // sequences per step
  int32_t max_batch_tokens = 512;    // tokens per step (the chunked-prefill budget)
  int32_t max_context = 0;           // 0: the model's context, capped at 4096
  int32_t max_queue = 256;           // waiting requests before admission rejects; 0: no queue
  int32_t block_size = kConfigBlockSize;
  uint64_t kv_cache_memory = uint64_t{512} << 20;  // bytes; ignored when kv_cache_blocks > 0
  int64_t kv_cache_blocks = 0;                     // 0: derived from kv_cache_memory
  bool enable_prefix_caching = true;
  ResponseCacheConfig response_cache;
  Priority default_priority = Priority::normal;  // "priorities: {default: ...}": for requests that give none
  RateLimitsConfig rate_limits;
  std::chrono::milliseconds deadline{0};  // default request deadline; 0: none
  ListenConfig listen;
  std::optional<HttpConfig> http;  // nullopt: no gateway
  SupervisionConfig supervision;
  bool operator==(const ClusterConfig&) const = default;
};

// Reads the config file at `path`; a file that cannot be read is an error naming it.
ClusterConfig load_config(const std::string& path);

// Parses a config from YAML text; `source_name` stands for the file in error messages.
ClusterConfig parse_config(const std::string& yaml_text, const std::string& source_name);

// Every key, defaults included, in the file's layout; parse_config reads it back to an equal
// config. Sizes and durations are written in the largest unit that holds them exactly.
std::string to_yaml(const ClusterConfig& config);

}  // namespace celer
