// The config of a celer deployment (DESIGN.md section 5): one YAML file with vLLM-like keys, read
// into the plain structs below. Every key is optional and has the default written next to its
// field, so an empty file is a valid config. Reading is strict: an unknown key, a value of the
// wrong type or out of range, or a key given twice is an Error(invalid_argument) whose message is
// "<file>:<line>:<column>: <what>" (1-based, pointing at the key) and names the key and what it
// allows, so a typo in a deployment fails at startup instead of silently running on a default.
//
// A cluster (several `celer node` processes, one per entry of nodes:) is described by the
// cluster:, nodes:, replicas:, router: and routing: sections; without nodes: the config is the
// single-process one and those sections have no effect. In a node or replica entry some keys
// are required (said beside their fields); parse_config fills in the defaults of the others.
//
// Sizes are bytes, written as an integer or with a unit: 512MiB, 2GiB, 100MB (B, KB, MB, GB, TB
// are powers of 1000; KiB, MiB, GiB, TiB powers of 1024). Durations are milliseconds, written as
// an integer or with a unit: 250ms, 2s, 1m, 1h.
#pragma once

#include <array>
#include <chrono>
#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <vector>

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

// The ids of recent text prompts and their answers (runtime/conversation_memory.hpp), so a
// conversation re-sent as text finds its whole history in the prefix cache. max_entries 0: off.
struct ConversationMemoryConfig {
  int32_t max_entries = 1024;
  int64_t max_tokens = int64_t{1} << 20;
  bool operator==(const ConversationMemoryConfig&) const = default;
};

// A latency objective: a stream's first token within ttft of its arrival, each later token
// within itl of the one before. 0: none.
struct LatencyObjective {
  std::chrono::milliseconds ttft{0};
  std::chrono::milliseconds itl{0};
  bool operator==(const LatencyObjective&) const = default;
};

// The slo: section (docs/slo.md): objectives for every priority class (ttft, itl), a class's own
// (interactive:, normal:, batch:, each key replacing the section's), and what admission does
// with a request that cannot meet its TTFT objective. With no itl anywhere, the server picks
// one from the step times it measures at start-up (runtime/step_budget.hpp).
struct SloConfig {
  LatencyObjective all;
  std::array<LatencyObjective, kPriorityClasses> classes{};
  bool refuse_late = false;  // admission: refuse; the default, queue, admits it and counts the miss
  LatencyObjective of(Priority p) const {
    const LatencyObjective& c = classes[static_cast<size_t>(p)];
    return {c.ttft.count() > 0 ? c.ttft : all.ttft, c.itl.count() > 0 ? c.itl : all.itl};
  }
  bool itl_written() const {
    for (const auto& c : classes)
      if (c.itl.count() > 0) return true;
    return all.itl.count() > 0;
  }
  bool operator==(const SloConfig&) const = default;
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
  uint16_t port = 8080;                               // 0: ephemeral
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
  // A step that takes longer counts its shard as hung: the shard is stopped and replaced like a
  // dead one (its sequences recompute). Above any real step on the machine.
  std::chrono::milliseconds hang_timeout{120'000};
  bool operator==(const SupervisionConfig&) const = default;
};

// Mutual TLS on node ports (cluster.tls, docs/security.md): PEM files. Every end presents its
// certificate and admits only peers whose certificate the CA signed. All three or none.
struct TlsConfig {
  std::string certificate;  // this end's certificate (chain)
  std::string key;          // its private key, unencrypted
  std::string ca;           // the cluster's CA certificate
  bool enabled() const { return !certificate.empty(); }
  bool operator==(const TlsConfig&) const = default;
};

// The cluster: section: how the nodes guard and watch their connections.
struct MembershipConfig {
  // The shared secret every connection to a node port presents first (1..64 bytes). "": none,
  // and then every node's host must be a loopback address unless tls is given.
  std::string secret;
  TlsConfig tls;
  std::chrono::milliseconds heartbeat_interval{500};  // 10ms..1m
  std::chrono::milliseconds node_timeout{2'000};      // 100ms..10m, > heartbeat_interval: silent this long = down
  std::chrono::milliseconds drain_timeout{30'000};    // 0..1h: a draining node waits this long for in-flight requests
  std::chrono::milliseconds connect_timeout{30'000};  // 100ms..1h: a starting node waits this long for its peers
  bool operator==(const MembershipConfig&) const = default;
};

// One entry of nodes:, a `celer node` process. Its host:port, and its HTTP port if any, are its
// own: no two nodes share one.
struct NodeConfig {
  std::string name;                // required; [A-Za-z0-9_-]{1,32}, unique among the nodes
  std::string host = "127.0.0.1";  // not loopback: cluster.secret or cluster.tls is required
  uint16_t port = 0;               // required; 1..65535
  int32_t threads = 0;             // per shard, 0..1024; 0: the node's cores divided by its shards
  std::optional<HttpConfig> http;  // nullopt: no HTTP gateway on this node
  bool operator==(const NodeConfig&) const = default;
};

// One tensor-parallel shard of a replica.
struct ShardConfig {
  std::string node;            // required; a node's name
  std::string device = "cpu";  // the only device of this build ("cuda:N" is refused: no GPU backend)
  bool operator==(const ShardConfig&) const = default;
};

// One entry of replicas:, a model replica: its scheduler, its prefix cache and its shards.
struct ReplicaConfig {
  std::string name;                 // default "r<index>"; [A-Za-z0-9_-]{1,32}, unique among the replicas
  std::string scheduler;            // a node's name; default: the node of shard 0
  std::string cache;                // a node's name; default: the scheduler's node
  std::vector<ShardConfig> shards;  // required, 1..64: its length is the replica's tensor-parallel size
  // Where the shards: key was read (1-based line and column; 0: not read from a file), for the
  // checks made when the model is loaded (the TP size must divide the model's heads): see
  // config_location. Not part of the value, so not compared: a config printed by to_yaml and read
  // back is equal to the original.
  std::string source;
  int line = 0;
  int column = 0;
  bool operator==(const ReplicaConfig& o) const {
    return name == o.name && scheduler == o.scheduler && cache == o.cache && shards == o.shards;
  }
};

// The router: section. Without nodes: both stay "".
struct RouterConfig {
  std::string node;     // a node's name; default: the first node
  std::string standby;  // a node's name other than node; "": none
  bool operator==(const RouterConfig&) const = default;
};

// How the router picks a replica for a request.
enum class RoutingPolicy {
  standard,           // "default": session, then prefix, then least-loaded
  session,            // the replica that served the request's session before
  prefix,             // the replica holding the longest cached prefix of the prompt
  least_loaded,       // "least-loaded": fewest outstanding tokens
  least_connections,  // "least-connections": fewest requests in flight
  round_robin,        // "round-robin"
};

struct RoutingConfig {
  RoutingPolicy policy = RoutingPolicy::standard;
  // 1.0..100: prefix routing skips a replica whose outstanding tokens exceed this many times the
  // replicas' mean (plus one prompt), so one hot prefix cannot pile every request on one replica.
  double prefix_load_guard = 1.5;
  bool operator==(const RoutingConfig&) const = default;
};

// Fields are named as their YAML keys; a nested section's keys are in its own struct.
struct ClusterConfig {
  std::string model;  // path to a GGUF file; "": the CLI fills in the bundled model
  // nullopt ("auto"): as stored. The engine runs weights only as stored, so any other dtype must
  // equal the model's stored type: the serving code refuses a mismatch (naming both with dtype_name).
  std::optional<TensorType> dtype;
  Q8Activations q8_activations = Q8Activations::int8;
  std::optional<TensorType> kv_cache_dtype;  // f32, f16 or q8_0; nullopt ("auto"): default_kv_type(model)
  int32_t tensor_parallel_size = 1;          // 1..64; single-process only: in a cluster each replica's shards set it
  int32_t threads = 0;                       // per shard; 0: all cores divided by tensor_parallel_size
  int32_t max_batch_size = 16;               // sequences per step
  int32_t max_batch_tokens = 512;            // tokens per step (the chunked-prefill budget)
  int32_t max_context = 0;                   // 0: the model's context, capped at 4096
  int32_t max_queue = 256;                   // waiting requests before admission rejects; 0: no queue
  int32_t block_size = kConfigBlockSize;
  uint64_t kv_cache_memory = uint64_t{512} << 20;  // bytes; ignored when kv_cache_blocks > 0
  int64_t kv_cache_blocks = 0;                     // 0: derived from kv_cache_memory
  bool enable_prefix_caching = true;
  ResponseCacheConfig response_cache;
  ConversationMemoryConfig conversation_memory;
  Priority default_priority = Priority::normal;  // "priorities: {default: ...}": for requests that give none
  RateLimitsConfig rate_limits;
  std::chrono::milliseconds deadline{0};  // default request deadline; 0: none
  SloConfig slo;
  ListenConfig listen;                    // single-process only: in a cluster each node's host and port replace it
  std::optional<HttpConfig> http;         // nullopt: no gateway; single-process only: in a cluster it is a node's
  SupervisionConfig supervision;
  // `chaos: enabled`: the cluster's nodes take faults to inject (docs/chaos.md) from any peer
  // that may talk to them; otherwise every such request is refused and counted.
  bool chaos = false;
  MembershipConfig cluster;
  std::vector<NodeConfig> nodes;        // empty: a single process; non-empty: replicas is too
  std::vector<ReplicaConfig> replicas;  // empty without nodes
  RouterConfig router;
  RoutingConfig routing;
  bool is_cluster() const { return !nodes.empty(); }
  bool operator==(const ClusterConfig&) const = default;
};

// A duration as the config writes one ("250ms", "2s", "1m", or an integer of milliseconds);
// nullopt when `text` is not one.
std::optional<std::chrono::milliseconds> parse_duration(const std::string& text);

// Reads the config file at `path`; a file that cannot be read is an error naming it.
ClusterConfig load_config(const std::string& path);

// Parses a config from YAML text; `source_name` stands for the file in error messages.
ClusterConfig parse_config(const std::string& yaml_text, const std::string& source_name);

// Every key, defaults included, in the file's layout; parse_config reads it back to an equal
// config (for a config parse_config returned: one built by hand must have its replicas' and
// router's defaults filled in). Sizes and durations are written in the largest unit that holds
// them exactly. The cluster sections are written only for a cluster, or where not at their
// defaults; the single-process listen:, http: and tensor_parallel_size only without nodes.
std::string to_yaml(const ClusterConfig& config);

// "file:line:column" of a replica's shards: key, for errors found when the model is loaded.
std::string config_location(const ReplicaConfig& replica);

// The name the config writes for a dtype ("auto" for nullopt, "f16", ...).
std::string dtype_name(std::optional<TensorType> dtype);

// The name the config writes for a routing policy ("default", "least-loaded", ...).
std::string routing_policy_name(RoutingPolicy policy);

}  // namespace celer
