// The deployment config: defaults, every key, sizes and durations in every form, each kind of
// error with its file, line and key, and the round trip through to_yaml.
#include "runtime/config.hpp"

#include <catch2/catch.hpp>
#include <fstream>
#include <string>

#include "runtime/error.hpp"
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
