// The deployment config: defaults, every key, sizes and durations in every form, each kind of
// error with its file, line and key, and the round trip through to_yaml.
#include "runtime/config.hpp"

#include <catch2/catch.hpp>
#include <fstream>
#include <string>

#include "runtime/error.hpp"
#include "runtime/memory_info.hpp"
#include "tests/test_util.hpp"

using namespace celer;
using Catch::Matchers::Contains;
using Catch::Matchers::StartsWith;
using std::chrono::milliseconds;

namespace {

// The message of the Error that parsing `yaml` (as "test.yaml") throws; "" and a failure if none.
std::string error_of(const std::string& yaml) {
  try {
    parse_config(yaml, "test.yaml");
  } catch (const Error& e) {
    CHECK(e.code() == ErrorCode::invalid_argument);
    return e.what();
  }
  FAIL_CHECK("no error for:\n" << yaml);
  return "";
}

// The error points at `line` (1-based) of test.yaml and names `key` and `allowed`.
void check_error(const std::string& yaml, int line, const std::string& key, const std::string& allowed) {
  std::string msg = error_of(yaml);
  INFO("yaml:\n" << yaml << "\nmessage: " << msg);
  CHECK_THAT(msg, StartsWith("test.yaml:" + std::to_string(line) + ":"));
  CHECK_THAT(msg, Contains(key));
  CHECK_THAT(msg, Contains(allowed));
}

const char* kFull = R"(# every key, none at its default
model: models/llama.gguf
dtype: q8_0
q8_activations: f32
kv_cache_dtype: f32
tensor_parallel_size: 4
threads: 3
max_batch_size: 32
max_batch_tokens: 2048
max_context: 8192
max_queue: 0
block_size: 16
kv_cache_memory: 2GiB
enable_prefix_caching: false
response_cache:
  enabled: true
  max_entries: 99
  ttl: 2s
conversation_memory: {max_entries: 0, max_tokens: 5000}
slo:
  ttft: 2s
  itl: 150ms
  interactive: {ttft: 300ms, itl: 50ms}
  batch: {ttft: 1m}
  admission: refuse
priorities:
  default: interactive
rate_limits:
  default: {tokens_per_second: 50, burst: 100}
  tenants:
    alice: {tokens_per_second: 1000, burst: 4000}
    bob:
      tokens_per_second: 2.5
deadline: 1m
listen:
  host: 0.0.0.0
  port: 0
  token: "s3cret: with # marks"
  max_message_bytes: 2MiB
  max_buffered_bytes: 1GiB
http:
  host: example.org
  port: 8081
  request_timeout: 2s
  idle_timeout: 5m
  stage_log: /tmp/stages.jsonl
supervision:
  max_restarts: 0
  window: 30s
  backoff: 250ms
  hang_timeout: 3s
chaos: enabled
)";

// to_yaml's text reads back to `c`, and prints the same again.
void check_round_trip(const ClusterConfig& c) {
  std::string yaml = to_yaml(c);
  INFO(yaml);
  ClusterConfig back = parse_config(yaml, "printed.yaml");
  CHECK(back == c);
  CHECK(to_yaml(back) == yaml);
}

}  // namespace

TEST_CASE("an empty document is the default config", "[config]") {
  ClusterConfig defaults;
  for (const char* text : {"", "{}", "# nothing here\n", "---\n"}) {
    INFO(text);
    CHECK(parse_config(text, "empty.yaml") == defaults);
  }
  CHECK(defaults.model.empty());
  CHECK_FALSE(defaults.dtype.has_value());
  CHECK(defaults.q8_activations == Q8Activations::int8);
  CHECK_FALSE(defaults.kv_cache_dtype.has_value());
  CHECK(defaults.tensor_parallel_size == 1);
  CHECK(defaults.threads == 0);
  CHECK(defaults.max_batch_size == 16);
  CHECK(defaults.max_batch_tokens == 512);
  CHECK(defaults.max_context == 0);
  CHECK(defaults.max_queue == 256);
  CHECK(defaults.block_size == 16);
  CHECK(defaults.kv_cache_memory == 512u << 20);
  CHECK(defaults.kv_cache_blocks == 0);
  CHECK(defaults.enable_prefix_caching);
  CHECK_FALSE(defaults.response_cache.enabled);
  CHECK(defaults.response_cache.max_entries == 1024);
  CHECK(defaults.response_cache.ttl == milliseconds(60'000));
  CHECK(defaults.conversation_memory.max_entries == 1024);
  CHECK(defaults.default_priority == Priority::normal);
  CHECK(defaults.rate_limits == RateLimitsConfig{});
  CHECK(defaults.deadline == milliseconds(0));
  CHECK(defaults.listen.host == "127.0.0.1");
  CHECK(defaults.listen.port == 7411);
  CHECK(defaults.listen.token.empty());
  CHECK(defaults.listen.max_message_bytes == uint64_t{8} << 20);
  CHECK(defaults.listen.max_buffered_bytes == uint64_t{64} << 20);
  CHECK_FALSE(defaults.http.has_value());
  CHECK(defaults.supervision.max_restarts == 5);
  CHECK(defaults.supervision.window == milliseconds(60'000));
  CHECK(defaults.supervision.backoff == milliseconds(100));
  CHECK(defaults.supervision.hang_timeout == milliseconds(120'000));
  CHECK_FALSE(defaults.chaos);
}

TEST_CASE("a section given empty takes its defaults", "[config]") {
  ClusterConfig c = parse_config("http:\nresponse_cache: {}\nrate_limits:\n  tenants:\n", "t.yaml");
  REQUIRE(c.http.has_value());
  CHECK(*c.http == HttpConfig{});
  CHECK(c.http->port == 8080);
  CHECK(c.response_cache == ResponseCacheConfig{});
  CHECK(c.rate_limits.tenants.empty());
}

TEST_CASE("every key of a full document", "[config]") {
  ClusterConfig c = parse_config(kFull, "full.yaml");
  CHECK(c.model == "models/llama.gguf");
  CHECK(c.dtype == TensorType::q8_0);
  CHECK(c.q8_activations == Q8Activations::f32);
  CHECK(c.kv_cache_dtype == TensorType::f32);
  CHECK(c.tensor_parallel_size == 4);
  CHECK(c.threads == 3);
  CHECK(c.max_batch_size == 32);
  CHECK(c.max_batch_tokens == 2048);
  CHECK(c.max_context == 8192);
  CHECK(c.max_queue == 0);
  CHECK(c.block_size == 16);
  CHECK(c.kv_cache_memory == uint64_t{2} << 30);
  CHECK(c.kv_cache_blocks == 0);
  CHECK_FALSE(c.enable_prefix_caching);
  CHECK(c.response_cache.enabled);
  CHECK(c.response_cache.max_entries == 99);
  CHECK(c.response_cache.ttl == milliseconds(2000));
  CHECK(c.conversation_memory == ConversationMemoryConfig{0, 5000});
  CHECK(c.slo.refuse_late);
  CHECK(c.slo.itl_written());
  CHECK(c.slo.of(Priority::interactive) == LatencyObjective{milliseconds(300), milliseconds(50)});
  CHECK(c.slo.of(Priority::normal) == LatencyObjective{milliseconds(2000), milliseconds(150)});
  CHECK(c.slo.of(Priority::batch) == LatencyObjective{milliseconds(60'000), milliseconds(150)});
  CHECK(c.default_priority == Priority::interactive);
  CHECK(c.rate_limits.default_limit == RateLimit{50, 100});
  REQUIRE(c.rate_limits.tenants.size() == 2);
  CHECK(c.rate_limits.tenants.at("alice") == RateLimit{1000, 4000});
  CHECK(c.rate_limits.tenants.at("bob") == RateLimit{2.5, 0});
  CHECK(c.deadline == milliseconds(60'000));
  CHECK(c.listen.host == "0.0.0.0");
  CHECK(c.listen.port == 0);
  CHECK(c.listen.token == "s3cret: with # marks");
  CHECK(c.listen.max_message_bytes == uint64_t{2} << 20);
  CHECK(c.listen.max_buffered_bytes == uint64_t{1} << 30);
  REQUIRE(c.http.has_value());
  CHECK(c.http->host == "example.org");
  CHECK(c.http->port == 8081);
  CHECK(c.http->request_timeout == milliseconds(2'000));
  CHECK(c.http->idle_timeout == milliseconds(300'000));
  CHECK(c.http->stage_log == "/tmp/stages.jsonl");
  CHECK(c.supervision.max_restarts == 0);
  CHECK(c.supervision.window == milliseconds(30'000));
  CHECK(c.supervision.backoff == milliseconds(250));
  CHECK(c.supervision.hang_timeout == milliseconds(3'000));
  CHECK(c.chaos);
}

TEST_CASE("kv_cache_blocks instead of kv_cache_memory; every dtype and priority name", "[config]") {
  CHECK(parse_config("kv_cache_blocks: 1000", "t.yaml").kv_cache_blocks == 1000);
  CHECK(parse_config("dtype: auto", "t.yaml").dtype == std::nullopt);
  CHECK(parse_config("dtype: f32", "t.yaml").dtype == TensorType::f32);
  CHECK(parse_config("dtype: f16", "t.yaml").dtype == TensorType::f16);
  CHECK(parse_config("dtype: bf16", "t.yaml").dtype == TensorType::bf16);
  CHECK(parse_config("q8_activations: f32", "t.yaml").q8_activations == Q8Activations::f32);
  CHECK(parse_config("kv_cache_dtype: auto", "t.yaml").kv_cache_dtype == std::nullopt);
  CHECK(parse_config("kv_cache_dtype: f32", "t.yaml").kv_cache_dtype == TensorType::f32);
  CHECK(parse_config("kv_cache_dtype: f16", "t.yaml").kv_cache_dtype == TensorType::f16);
  CHECK(parse_config("kv_cache_dtype: q8_0", "t.yaml").kv_cache_dtype == TensorType::q8_0);
  CHECK(parse_config("priorities: {default: batch}", "t.yaml").default_priority == Priority::batch);
  CHECK(parse_config("priorities: {default: normal}", "t.yaml").default_priority == Priority::normal);
}

TEST_CASE("sizes in every accepted form", "[config]") {
  const std::pair<const char*, uint64_t> cases[] = {
      {"1000", 1000},
      {"7B", 7},
      {"3KB", 3'000},
      {"3KiB", 3 * 1024},
      {"100MB", 100'000'000},
      {"512MiB", uint64_t{512} << 20},
      {"2GB", 2'000'000'000},
      {"2GiB", uint64_t{2} << 30},
      {"1TB", 1'000'000'000'000},
      {"1TiB", uint64_t{1} << 40},
      {"64 MiB", uint64_t{64} << 20},
      {"\"256MiB\"", uint64_t{256} << 20},
      {"010", 10},  // decimal: yaml-cpp's own conversion would read octal
  };
  for (const auto& [text, bytes] : cases) {
    INFO(text);
    CHECK(parse_config(std::string("kv_cache_memory: ") + text, "t.yaml").kv_cache_memory == bytes);
  }
}

TEST_CASE("durations in every accepted form", "[config]") {
  const std::pair<const char*, int64_t> cases[] = {
      {"0", 0}, {"250", 250}, {"250ms", 250}, {"2s", 2'000}, {"1m", 60'000}, {"2h", 7'200'000}, {"5 s", 5'000},
  };
  for (const auto& [text, ms] : cases) {
    INFO(text);
    ClusterConfig c = parse_config(std::string("deadline: ") + text + "\nsupervision: {backoff: " + text + "}\n" +
                                       "response_cache: {ttl: " + text + "}",
                                   "t.yaml");
    CHECK(c.deadline == milliseconds(ms));
    CHECK(c.supervision.backoff == milliseconds(ms));
    CHECK(c.response_cache.ttl == milliseconds(ms));
  }
}

TEST_CASE("an unknown key names itself and lists the valid keys of its section", "[config]") {
  check_error("model: a\nthreads: 2\nmax_batch: 4\n", 3, "max_batch", "valid keys: model, dtype,");
  CHECK_THAT(error_of("max_batch: 4"), Contains("max_batch_size") && Contains("supervision"));
  CHECK_THAT(error_of("model: a\nmax_batch: 4\n"), StartsWith("test.yaml:2:1: max_batch: unknown key"));
  check_error("response_cache:\n  enabled: true\n  size: 4\n", 3, "response_cache.size",
              "valid keys of response_cache: enabled, max_entries, ttl");
  check_error("rate_limits:\n  tenants:\n    alice: {tokens_per_second: 1, bust: 2}\n", 3,
              "rate_limits.tenants.alice.bust", "tokens_per_second, burst");
  check_error("listen:\n  host: a\n  address: b\n", 3, "listen.address", "host, port");
  check_error("priorities:\n  interactive: 1\n", 2, "priorities.interactive", "valid keys of priorities: default");
}

TEST_CASE("a value of the wrong type names the key and the type", "[config]") {
  check_error("model: a\nthreads: four\n", 2, "threads", "integer in 0..4096");
  check_error("threads: 2.5", 1, "threads", "integer");
  check_error("threads: 0x10", 1, "threads", "integer");
  check_error("\n\nenable_prefix_caching: maybe\n", 3, "enable_prefix_caching", "true or false");
  check_error("model: [a, b]", 1, "model", "string");
  check_error("model:\nthreads: 1\n", 1, "model", "string");
  check_error("threads: 1\nresponse_cache: 5\n", 2, "response_cache", "mapping");
  check_error("rate_limits:\n  default: {tokens_per_second: fast}\n", 2, "rate_limits.default.tokens_per_second",
              "number");
  check_error("supervision:\n  window: [1]\n", 2, "supervision.window", "duration");
  check_error("- model: a\n", 1, "the config", "mapping");
}

TEST_CASE("an out-of-range value names the key and the range", "[config]") {
  check_error("tensor_parallel_size: 65", 1, "tensor_parallel_size", "1..64");
  check_error("tensor_parallel_size: 0", 1, "tensor_parallel_size", "1..64");
  check_error("max_batch_size: 0", 1, "max_batch_size", "1..4096");
  check_error("max_batch_tokens: 1048577", 1, "max_batch_tokens", "1..1048576");
  check_error("max_queue: -1", 1, "max_queue", "0..");
  check_error("kv_cache_blocks: -3", 1, "kv_cache_blocks", "0..");
  check_error("kv_cache_memory: 0", 1, "kv_cache_memory", "above 0");
  check_error("threads: 99999999999999999999", 1, "threads", "0..4096");
  check_error("listen:\n  host: a\n  port: 70000\n", 3, "listen.port", "0..65535");
  check_error("http: {port: -1}", 1, "http.port", "0..65535");
  check_error("http: {request_timeout: 0ms}", 1, "http.request_timeout", "");
  check_error("http: {stage_log: [1]}", 1, "http.stage_log", "");
  check_error("listen: {host: \"\"}", 1, "listen.host", "empty");
  check_error("listen: {token: " + std::string(65, 'x') + "}", 1, "listen.token", "at most 64 bytes");
  check_error("listen: {max_message_bytes: 1KiB}", 1, "listen.max_message_bytes", "4KiB..4GiB");
  check_error("listen: {max_message_bytes: 5GiB}", 1, "listen.max_message_bytes", "4KiB..4GiB");
  check_error("listen: {max_buffered_bytes: 0}", 1, "listen.max_buffered_bytes", "above 0");
  check_error("listen:\n  max_buffered_bytes: 4MiB\n", 2, "listen.max_buffered_bytes", "at least max_message_bytes");
  check_error("listen:\n  port: 1\n  max_message_bytes: 128MiB\n", 3, "listen.max_message_bytes", "at least max_message_bytes");
  check_error("response_cache: {max_entries: 0}", 1, "response_cache.max_entries", "1..");
  check_error("rate_limits:\n  tenants:\n    bob:\n      burst: -1\n", 4, "rate_limits.tenants.bob.burst", ">= 0");
  check_error("rate_limits: {default: {burst: .inf}}", 1, "rate_limits.default.burst", ">= 0");
  check_error("supervision:\n  window: 0\n", 2, "supervision.window", "at least 1ms");
  check_error("deadline: -5s", 1, "deadline", "250ms, 2s, 1m");
  check_error("kv_cache_memory: 99999999999TiB", 1, "kv_cache_memory", "MiB");
}

TEST_CASE("a bad enum value lists the names allowed", "[config]") {
  check_error("model: a\ndtype: f64\n", 2, "dtype", "auto, f32, f16, bf16, q8_0");
  check_error("q8_activations: int4", 1, "q8_activations", "f32, int8");
  check_error("kv_cache_dtype: int4", 1, "kv_cache_dtype", "auto, f32, f16, q8_0");
  check_error("priorities:\n  default: urgent\n", 2, "priorities.default", "interactive, normal, batch");
  check_error("chaos: yes", 1, "chaos", "disabled, enabled");
}

TEST_CASE("kv_cache_memory and kv_cache_blocks together are an error at the later one", "[config]") {
  check_error("kv_cache_memory: 1GiB\nthreads: 1\nkv_cache_blocks: 100\n", 3, "kv_cache_blocks", "kv_cache_memory");
  check_error("kv_cache_blocks: 0\nkv_cache_memory: 1GiB\n", 2, "kv_cache_memory", "mutually exclusive");
}

TEST_CASE("block_size other than 16 says 16 is the only one", "[config]") {
  check_error("model: a\nblock_size: 32\n", 2, "block_size", "must be 16");
  CHECK(parse_config("block_size: 16", "t.yaml").block_size == 16);
}

TEST_CASE("a bad size or duration string shows the units", "[config]") {
  check_error("model: a\nkv_cache_memory: 12 parsecs\n", 2, "kv_cache_memory", "12 parsecs");
  CHECK_THAT(error_of("kv_cache_memory: 12 parsecs"), Contains("MiB") && Contains("512MiB"));
  check_error("kv_cache_memory: 1.5GiB", 1, "kv_cache_memory", "GiB");
  check_error("kv_cache_memory: 12mib", 1, "kv_cache_memory", "MiB");
  check_error("deadline: 3 weeks", 1, "deadline", "ms, s");
  check_error("slo:\n  itl: fast\n", 2, "slo.itl", "ms, s");
  check_error("slo: {admission: sometimes}", 1, "slo.admission", "refuse");
  check_error("slo:\n  urgent: {ttft: 1s}\n", 2, "urgent", "interactive");
  check_error("conversation_memory: {max_entries: -1}", 1, "conversation_memory.max_entries", "0..");
}

TEST_CASE("a key given twice is an error at the second", "[config]") {
  check_error("threads: 1\nmodel: a\nthreads: 2\n", 3, "threads", "twice");
  check_error("http:\n  port: 1\n  port: 2\n", 3, "http.port", "twice");
}

TEST_CASE("a YAML syntax error gives its line", "[config]") {
  check_error("model: a\nthreads: 1\n  bad: x\n", 3, "YAML syntax error", "");
  check_error("model: a\n\tthreads: 1\n", 2, "YAML syntax error", "tab");
  check_error("model: a\nthreads: [1, 2\n", 3, "YAML syntax error", "");
  check_error("model: a\n---\nthreads: 2\n", 3, "second YAML document", "");
}

TEST_CASE("load_config reads a file and names it in errors", "[config]") {
  TempDir dir;
  const std::string path = dir.path() + "/cluster.yaml";
  std::ofstream(path) << kFull;
  CHECK(load_config(path) == parse_config(kFull, "x"));

  std::ofstream(path) << "model: a\n\nthreads: lots\n";
  CHECK_THROWS_WITH(load_config(path), StartsWith(path + ":3:1: threads:"));

  const std::string missing = dir.path() + "/no-such.yaml";
  try {
    load_config(missing);
    FAIL("no error for a missing file");
  } catch (const Error& e) {
    CHECK(e.code() == ErrorCode::invalid_argument);
    CHECK_THAT(e.what(), StartsWith(missing + ":"));
  }
  CHECK_THROWS_WITH(load_config(dir.path()), Contains(dir.path()) && Contains("directory"));
}

TEST_CASE("to_yaml round-trips through parse_config", "[config]") {
  ClusterConfig odd;
  odd.model = "~";  // YAML's null when written bare
  odd.dtype = TensorType::bf16;
  odd.kv_cache_dtype = TensorType::f16;
  odd.kv_cache_memory = 1'000'001;  // no unit holds it
  odd.kv_cache_blocks = 0;
  odd.rate_limits.default_limit = {0.1, 1e20};
  odd.rate_limits.tenants["yes"] = {1.0 / 3, 7};  // YAML's true when written bare
  odd.rate_limits.tenants["a: b # c"] = {2, 0};
  odd.response_cache.ttl = milliseconds(1500);
  odd.deadline = milliseconds(90'000);
  odd.supervision.window = milliseconds(7'200'000);
  odd.listen.host = "::1";
  odd.http = HttpConfig{"0.0.0.0", 0, milliseconds(1500), milliseconds(1), "a: b.jsonl"};

  ClusterConfig blocks;
  blocks.kv_cache_blocks = 12345;

  ClusterConfig defaults;
  check_round_trip(defaults);
  check_round_trip(parse_config(kFull, "full.yaml"));
  check_round_trip(odd);
  check_round_trip(blocks);
}

TEST_CASE("to_yaml writes sizes and durations in the largest exact unit", "[config]") {
  ClusterConfig c;
  c.kv_cache_memory = uint64_t{3} << 30;
  c.supervision.backoff = milliseconds(2000);
  std::string yaml = to_yaml(c);
  CHECK_THAT(yaml, Contains("kv_cache_memory: 3GiB"));
  CHECK_THAT(yaml, Contains("backoff: 2s"));
  CHECK_THAT(yaml, Contains("window: 1m"));
  CHECK_THAT(yaml, !Contains("http:"));
}

namespace {

// Three nodes, two replicas: r0 split over a and b, r1 whole on c; every cluster key given.
const char* kCluster = R"(model: m.gguf
cluster:
  secret: "s3cret"
  heartbeat_interval: 250ms
  node_timeout: 3s
  drain_timeout: 0
  connect_timeout: 1m
nodes:
  - name: a
    host: 10.0.0.1
    port: 7501
    threads: 4
    http:
      host: 0.0.0.0
      port: 8080
  - name: b
    host: 10.0.0.2
    port: 7501
  - name: node_c-3
    port: 7503
replicas:
  - name: big
    scheduler: b
    cache: a
    shards:
      - {node: a, device: cpu}
      - {node: b}
  - shards: [{node: node_c-3}]
router:
  node: b
  standby: a
routing:
  policy: least-connections
  prefix_load_guard: 2.25
)";

// Two loopback nodes and a replica of one shard on each: the smallest cluster, for the errors.
const char* kSmallCluster = R"(nodes:
  - {name: a, port: 7501}
  - {name: b, port: 7502}
replicas:
  - shards: [{node: a}]
  - shards: [{node: b}]
)";

}  // namespace

TEST_CASE("a single-process config has no cluster sections", "[config][cluster]") {
  ClusterConfig c = parse_config(kFull, "full.yaml");
  CHECK_FALSE(c.is_cluster());
  CHECK(c.nodes.empty());
  CHECK(c.replicas.empty());
  CHECK(c.router == RouterConfig{});
  CHECK(c.cluster == MembershipConfig{});
  CHECK(c.routing == RoutingConfig{});
  const ClusterConfig defaults;
  const std::string yaml = to_yaml(defaults);
  for (const char* key : {"cluster:", "nodes:", "replicas:", "router:", "routing:"}) CHECK_THAT(yaml, !Contains(key));

  MembershipConfig m;
  CHECK(m.secret.empty());
  CHECK(m.heartbeat_interval == milliseconds(500));
  CHECK(m.node_timeout == milliseconds(2'000));
  CHECK(m.drain_timeout == milliseconds(30'000));
  CHECK(m.connect_timeout == milliseconds(30'000));
  CHECK(RoutingConfig{}.policy == RoutingPolicy::standard);
  CHECK(RoutingConfig{}.prefix_load_guard == 1.5);
}

TEST_CASE("every key of a cluster", "[config][cluster]") {
  ClusterConfig c = parse_config(kCluster, "cluster.yaml");
  REQUIRE(c.is_cluster());
  CHECK(c.cluster.secret == "s3cret");
  CHECK(c.cluster.heartbeat_interval == milliseconds(250));
  CHECK(c.cluster.node_timeout == milliseconds(3'000));
  CHECK(c.cluster.drain_timeout == milliseconds(0));
  CHECK(c.cluster.connect_timeout == milliseconds(60'000));

  REQUIRE(c.nodes.size() == 3);
  HttpConfig http;
  http.host = "0.0.0.0";
  CHECK(c.nodes[0] == NodeConfig{"a", "10.0.0.1", 7501, 4, http});
  CHECK(c.nodes[1] == NodeConfig{"b", "10.0.0.2", 7501, 0, std::nullopt});
  CHECK(c.nodes[2] == NodeConfig{"node_c-3", "127.0.0.1", 7503, 0, std::nullopt});

  REQUIRE(c.replicas.size() == 2);
  const ReplicaConfig& big = c.replicas[0];
  CHECK(big.name == "big");
  CHECK(big.scheduler == "b");
  CHECK(big.cache == "a");
  CHECK(big.shards == std::vector<ShardConfig>{{"a", "cpu"}, {"b", "cpu"}});
  CHECK(big.source == "cluster.yaml");
  CHECK(big.line == 25);
  CHECK(big.column == 5);
  CHECK(config_location(big) == "cluster.yaml:25:5");
  const ReplicaConfig& r1 = c.replicas[1];
  CHECK(r1.name == "r1");
  CHECK(r1.scheduler == "node_c-3");
  CHECK(r1.cache == "node_c-3");
  CHECK(r1.shards == std::vector<ShardConfig>{{"node_c-3", "cpu"}});
  CHECK(config_location(r1) == "cluster.yaml:28:5");

  CHECK(c.router == RouterConfig{"b", "a"});
  CHECK(c.routing.policy == RoutingPolicy::least_connections);
  CHECK(c.routing.prefix_load_guard == 2.25);
  CHECK(routing_policy_name(c.routing.policy) == "least-connections");
}

TEST_CASE("a cluster's defaults", "[config][cluster]") {
  ClusterConfig c = parse_config(kSmallCluster, "t.yaml");
  REQUIRE(c.replicas.size() == 2);
  CHECK(c.replicas[0].name == "r0");
  CHECK(c.replicas[1].name == "r1");
  CHECK(c.replicas[0].scheduler == "a");  // shard 0's node
  CHECK(c.replicas[1].scheduler == "b");
  CHECK(c.replicas[1].cache == "b");  // the scheduler's node
  CHECK(c.router.node == "a");        // the first node
  CHECK(c.router.standby.empty());
  CHECK(c.cluster == MembershipConfig{});
  CHECK(c.routing == RoutingConfig{});
  CHECK(c.nodes[0].host == "127.0.0.1");
  CHECK(c.nodes[0].threads == 0);
  CHECK_FALSE(c.nodes[0].http.has_value());

  // The cache defaults to the scheduler's node, not to shard 0's.
  ClusterConfig s = parse_config(std::string(kSmallCluster) + "  - {scheduler: b, shards: [{node: a}]}\n", "t.yaml");
  CHECK(s.replicas[2].name == "r2");
  CHECK(s.replicas[2].cache == "b");
}

TEST_CASE("every routing policy and a node's HTTP gateway", "[config][cluster]") {
  const std::pair<const char*, RoutingPolicy> policies[] = {
      {"default", RoutingPolicy::standard},
      {"session", RoutingPolicy::session},
      {"prefix", RoutingPolicy::prefix},
      {"least-loaded", RoutingPolicy::least_loaded},
      {"least-connections", RoutingPolicy::least_connections},
      {"round-robin", RoutingPolicy::round_robin},
  };
  for (const auto& [name, policy] : policies) {
    INFO(name);
    CHECK(parse_config(std::string("routing: {policy: ") + name + "}", "t.yaml").routing.policy == policy);
    CHECK(routing_policy_name(policy) == name);
  }
  ClusterConfig c = parse_config(
      "nodes:\n  - name: a\n    port: 7501\n    http: {port: 9000, request_timeout: 5s, stage_log: s.jsonl}\n"
      "replicas:\n  - shards: [{node: a}]\n",
      "t.yaml");
  REQUIRE(c.nodes[0].http.has_value());
  CHECK(c.nodes[0].http->port == 9000);
  CHECK(c.nodes[0].http->host == "127.0.0.1");
  CHECK(c.nodes[0].http->request_timeout == milliseconds(5'000));
  CHECK(c.nodes[0].http->stage_log == "s.jsonl");
}

TEST_CASE("a cluster round-trips through to_yaml", "[config][cluster]") {
  check_round_trip(parse_config(kCluster, "cluster.yaml"));
  check_round_trip(parse_config(kSmallCluster, "small.yaml"));
  const std::string yaml = to_yaml(parse_config(kCluster, "cluster.yaml"));
  CHECK_THAT(yaml, !Contains("listen:") && !Contains("tensor_parallel_size"));
  CHECK_THAT(yaml, Contains("prefix_load_guard: 2.25") && Contains("policy: least-connections"));

  // Cluster sections away from their defaults in a single-process config are written too.
  ClusterConfig single;
  single.cluster.drain_timeout = milliseconds(1500);
  single.routing.prefix_load_guard = 100;
  check_round_trip(single);
}

TEST_CASE("the cluster: section's ranges", "[config][cluster]") {
  check_error("cluster:\n  heartbeat_interval: 5ms\n", 2, "cluster.heartbeat_interval", "10ms..1m");
  check_error("cluster: {heartbeat_interval: 2m}", 1, "cluster.heartbeat_interval", "10ms..1m");
  check_error("cluster: {node_timeout: 11m}", 1, "cluster.node_timeout", "500ms..10m");
  check_error("cluster: {node_timeout: 200ms}", 1, "cluster.node_timeout", "500ms..10m");  // under the clients' heartbeat and then some
  check_error("cluster: {drain_timeout: 2h}", 1, "cluster.drain_timeout", "0..1h");
  check_error("cluster: {connect_timeout: 50ms}", 1, "cluster.connect_timeout", "100ms..1h");
  check_error("cluster: {secret: " + std::string(65, 'x') + "}", 1, "cluster.secret", "at most 64 bytes");
  check_error("cluster: {bogus: 1}", 1, "cluster.bogus", "secret, tls, heartbeat_interval, node_timeout");
  check_error("routing: {prefix_load_guard: 0.5}", 1, "routing.prefix_load_guard", "1..100");
  check_error("routing: {prefix_load_guard: 101}", 1, "routing.prefix_load_guard", "1..100");
  check_error("routing:\n  policy: random\n", 2, "routing.policy",
              "default, session, prefix, least-loaded, least-connections, round-robin");
  // node_timeout must exceed heartbeat_interval: at the later key, or the one given.
  check_error("cluster:\n  heartbeat_interval: 1s\n  node_timeout: 1s\n", 3, "cluster.node_timeout",
              "heartbeat_interval");
  check_error("cluster:\n  node_timeout: 1s\n  heartbeat_interval: 2s\n", 3, "cluster.heartbeat_interval",
              "must be longer");
  check_error("cluster:\n  heartbeat_interval: 5s\n", 2, "cluster.heartbeat_interval", "node_timeout (2s)");
  CHECK(parse_config("cluster: {secret: \"\"}", "t.yaml").cluster.secret.empty());
}

TEST_CASE("a bad node entry names its key", "[config][cluster]") {
  const std::string replicas = "replicas:\n  - shards: [{node: a}]\n";
  check_error("nodes:\n  - port: 7501\n" + replicas, 2, "nodes[0]", "name: is required");
  check_error("nodes:\n  - name: a\n" + replicas, 2, "nodes[0]", "port: is required");
  check_error("nodes:\n  - name: a\n    port: 0\n" + replicas, 3, "nodes[0].port", "1..65535");
  check_error("nodes:\n  - name: a b\n    port: 1\n" + replicas, 2, "nodes[0].name", "A-Z, a-z, 0-9, _ and -");
  check_error("nodes:\n  - name: " + std::string(33, 'n') + "\n    port: 1\n" + replicas, 2, "nodes[0].name", "1..32");
  check_error("nodes:\n  - {name: a, port: 1, threads: 1025}\n" + replicas, 2, "nodes[0].threads", "0..1024");
  check_error("nodes:\n  - {name: a, port: 1, gpu: 1}\n" + replicas, 2, "nodes[0].gpu",
              "valid keys of nodes[0]: name, host, port, threads, http");
  check_error("nodes:\n  - {name: a, port: 1, http: {bind: x}}\n" + replicas, 2, "nodes[0].http.bind", "host, port");
  check_error("nodes:\n  - a\n" + replicas, 2, "nodes[0]", "mapping");
  check_error("nodes: {a: 1}\n" + replicas, 1, "nodes", "must be a list");
  check_error("nodes: []\n" + replicas, 1, "nodes", "at least one node");
}

TEST_CASE("duplicate node names and endpoints", "[config][cluster]") {
  const std::string replicas = "replicas:\n  - shards: [{node: a}]\n";
  check_error("nodes:\n  - {name: a, port: 7501}\n  - {name: b, port: 7502}\n  - {name: a, port: 7503}\n" + replicas, 4,
              "nodes[2].name", "already the name of nodes[0]");
  check_error("nodes:\n  - {name: a, port: 7501}\n  - name: b\n    port: 7501\n" + replicas, 4, "nodes[1].port",
              "127.0.0.1:7501 is already nodes[0]'s node port");
  // A node's HTTP port on a host:port another node listens on, given before or after it.
  check_error(
      "nodes:\n  - {name: a, port: 7501}\n  - name: b\n    port: 7502\n    http:\n      port: 7501\n" + replicas, 6,
      "nodes[1].http.port", "already nodes[0]'s node port");
  check_error("nodes:\n  - {name: a, port: 7501, http: {port: 7502}}\n  - {name: b, port: 7502}\n" + replicas, 3,
              "nodes[1].port", "already nodes[0]'s HTTP port");
  // The same port on different hosts is fine, as is an HTTP port on another host.
  CHECK_NOTHROW(
      parse_config("cluster: {secret: x}\nnodes:\n  - {name: a, host: 10.0.0.1, port: 7501}\n"
                   "  - {name: b, host: 10.0.0.2, port: 7501, http: {host: 10.0.0.2, port: 7502}}\n"
                   "  - {name: c, port: 7502}\n" +
                       replicas,
                   "t.yaml"));
}

TEST_CASE("a node host other machines reach needs cluster.secret", "[config][cluster]") {
  const std::string rest = "replicas:\n  - shards: [{node: a}]\n";
  check_error("nodes:\n  - name: a\n    host: 10.0.0.1\n    port: 7501\n" + rest, 3, "nodes[0].host", "cluster.secret");
  check_error("nodes:\n  - {name: a, host: example.org, port: 7501}\n" + rest, 2, "nodes[0].host", "not a loopback");
  for (const char* host : {"127.0.0.1", "127.1.2.3", "localhost", "::1"}) {
    INFO(host);
    CHECK_NOTHROW(
        parse_config("nodes:\n  - {name: a, host: \"" + std::string(host) + "\", port: 7501}\n" + rest, "t.yaml"));
  }
  CHECK_NOTHROW(
      parse_config("cluster: {secret: k}\nnodes:\n  - {name: a, host: 10.0.0.1, port: 7501}\n" + rest, "t.yaml"));
}

TEST_CASE("cluster.tls: all three files, and it stands in for the secret beyond loopback", "[config][cluster][tls]") {
  const std::string rest = "nodes:\n  - {name: a, host: 10.0.0.1, port: 7501}\nreplicas:\n  - shards: [{node: a}]\n";
  check_error("cluster:\n  tls: {certificate: n.pem, key: n.key}\n" + rest, 2, "cluster.tls", "ca is missing");
  check_error("cluster:\n  tls: {certificate: n.pem, ca: ca.pem}\n" + rest, 2, "cluster.tls", "key is missing");
  check_error("cluster:\n  tls: {certificate: \"\", key: n.key, ca: ca.pem}\n" + rest, 2, "cluster.tls.certificate",
              "must not be empty");
  check_error("cluster:\n  tls: {certificate: n.pem, key: n.key, ca: ca.pem, capath: x}\n" + rest, 2, "cluster.tls.capath",
              "certificate, key, ca");
  const ClusterConfig c = parse_config("cluster:\n  tls: {certificate: n.pem, key: n.key, ca: ca.pem}\n" + rest, "t.yaml");
  CHECK(c.cluster.tls.enabled());
  CHECK(c.cluster.tls.certificate == "n.pem");
  CHECK(c.cluster.tls.key == "n.key");
  CHECK(c.cluster.tls.ca == "ca.pem");
  CHECK(c.cluster.secret.empty());
  check_round_trip(c);
}

TEST_CASE("a replica, router or shard naming an unknown node says which exist", "[config][cluster]") {
  const std::string nodes = "nodes:\n  - {name: a, port: 7501}\n  - {name: b, port: 7502}\n";
  check_error(nodes + "replicas:\n  - shards:\n      - {node: a}\n      - {node: z}\n", 7, "replicas[0].shards[1].node",
              "'z' is not a node; the nodes are a, b");
  check_error(nodes + "replicas:\n  - scheduler: z\n    shards: [{node: a}]\n", 5, "replicas[0].scheduler", "a, b");
  check_error(nodes + "replicas:\n  - cache: z\n    shards: [{node: a}]\n", 5, "replicas[0].cache", "not a node");
  check_error(std::string(kSmallCluster) + "router:\n  node: z\n", 8, "router.node", "the nodes are a, b");
  check_error(std::string(kSmallCluster) + "router:\n  standby: z\n", 8, "router.standby", "not a node");
  check_error(std::string(kSmallCluster) + "router:\n  node: b\n  standby: b\n", 9, "router.standby", "must differ");
  check_error(std::string(kSmallCluster) + "router: {standby: a}\n", 7, "router.standby", "router.node ('a')");
  check_error("router: {node: a}", 1, "router.node", "no nodes: are given");
}

TEST_CASE("a bad replica entry names its key", "[config][cluster]") {
  const std::string nodes = "nodes:\n  - {name: a, port: 7501}\n";
  check_error(nodes + "replicas:\n  - name: r0\n", 4, "replicas[0]", "shards: is required");
  check_error(nodes + "replicas:\n  - shards: []\n", 4, "replicas[0].shards", "1..64 shards");
  check_error(nodes + "replicas:\n  - shards:\n", 4, "replicas[0].shards", "1..64 shards");
  std::string many = nodes + "replicas:\n  - shards:\n";
  for (int i = 0; i < 65; ++i) many += "      - {node: a}\n";
  check_error(many, 4, "replicas[0].shards", "got 65");
  check_error(nodes + "replicas:\n  - shards: [{device: cpu}]\n", 4, "replicas[0].shards[0]", "node: is required");
  check_error(nodes + "replicas:\n  - shards: [{node: a, gpu: 0}]\n", 4, "replicas[0].shards[0].gpu", "node, device");
  check_error(nodes + "replicas:\n  - {shards: [{node: a}], tp: 2}\n", 4, "replicas[0].tp",
              "name, scheduler, cache, shards");
  check_error(nodes + "replicas:\n  - {name: x, shards: [{node: a}]}\n  - {name: x, shards: [{node: a}]}\n", 5,
              "replicas[1].name", "already the name of replicas[0]");
  check_error(nodes + "replicas:\n  - {name: r1, shards: [{node: a}]}\n  - {shards: [{node: a}]}\n", 5, "replicas[1]",
              "'r1' (its default name) is already");
  check_error(nodes + "replicas: []\n", 3, "replicas", "at least one replica");
}

TEST_CASE("a shard's device: cpu; cuda:N needs a GPU build; anything else lists the forms", "[config][cluster]") {
  const std::string nodes = "nodes:\n  - {name: a, port: 7501}\n";
  CHECK(parse_config(nodes + "replicas:\n  - shards: [{node: a, device: cpu}]\n", "t.yaml")
            .replicas[0]
            .shards[0]
            .device == "cpu");
  for (const char* device : {"cuda:0", "cuda:12"}) {
    INFO(device);
    const std::string yaml = nodes + "replicas:\n  - shards:\n      - node: a\n        device: " + device + "\n";
    check_error(yaml, 6, "replicas[0].shards[0].device", "GPU shards need a CUDA build with the GPU backend");
    CHECK_THAT(error_of(yaml), Contains(device) && Contains("not"));
  }
  for (const char* device : {"gpu", "cuda", "cuda:", "cuda:-1", "cuda:x", "CPU"}) {
    INFO(device);
    check_error(nodes + "replicas:\n  - shards: [{node: a, device: \"" + device + "\"}]\n", 4,
                "replicas[0].shards[0].device", "must be cpu, or cuda:N with N a non-negative integer");
  }
}

TEST_CASE("nodes: and replicas: go together, and replace the single-process keys", "[config][cluster]") {
  check_error("model: m\nreplicas:\n  - shards: [{node: a}]\n", 2, "replicas", "needs nodes:");
  check_error("model: m\nnodes:\n  - {name: a, port: 7501}\n", 2, "nodes", "needs replicas:");
  check_error("tensor_parallel_size: 2\n" + std::string(kSmallCluster), 1, "tensor_parallel_size",
              "each replica's shards list sets its tensor-parallel size");
  check_error(std::string(kSmallCluster) + "http:\n  port: 8080\n", 7, "http", "put http: under the node");
  check_error(std::string(kSmallCluster) + "listen:\n  port: 7411\n", 7, "listen", "each node's host and port replace");
  // Without nodes, cluster: and routing: are allowed and change nothing else.
  ClusterConfig c =
      parse_config("cluster: {drain_timeout: 1s}\nrouting: {policy: prefix}\nlisten: {port: 1}\n", "t.yaml");
  CHECK_FALSE(c.is_cluster());
  CHECK(c.listen.port == 1);
}

TEST_CASE("dtype names for the serving code's mismatch check", "[config]") {
  CHECK(dtype_name(std::nullopt) == "auto");
  CHECK(dtype_name(TensorType::f32) == "f32");
  CHECK(dtype_name(TensorType::f16) == "f16");
  CHECK(dtype_name(TensorType::bf16) == "bf16");
  CHECK(dtype_name(TensorType::q8_0) == "q8_0");
  CHECK(parse_config("dtype: q8_0", "t.yaml").dtype == TensorType::q8_0);
}

TEST_CASE("memory promised to allocations being built counts as taken until released", "[config][memory]") {
  // Nothing is allocated here: promises are bookkeeping, checked against MemAvailable.
  MemoryInfo seen;
  uint64_t others = 0;
  MemoryPromise probe;
  REQUIRE(promise_memory(0, seen, others, probe));
  if (seen.available == 0) return;  // no /proc/meminfo: every promise is made, nothing to check
  const uint64_t share = seen.available / 10 * 6;  // 60%: one fits, two do not
  {
    MemoryPromise first, second;
    CHECK(promise_memory(share, seen, others, first));
    CHECK(first.bytes() == share);
    CHECK_FALSE(promise_memory(share, seen, others, second));
    CHECK(others >= share);
    CHECK(second.bytes() == 0);
    first.release();
    CHECK(first.bytes() == 0);
    CHECK(promise_memory(share, seen, others, second));  // the first one's bytes are back
    MemoryPromise moved(std::move(second));
    CHECK(second.bytes() == 0);
    CHECK(moved.bytes() == share);
  }  // destroyed: released
  MemoryPromise again;
  CHECK(promise_memory(share, seen, others, again));
  CHECK(others == 0);
  MemoryPromise huge;
  CHECK_FALSE(promise_memory(seen.available + (uint64_t{1} << 40), seen, others, huge));
}
