// Reading: each section is a table of its keys, in schema order, each with a handler that reads
// one value into the struct. Walking the mapping's entries (rather than looking keys up) is what
// finds unknown and repeated keys; the table's order is the list of valid keys an error shows.
#include "runtime/config.hpp"

#include <arpa/inet.h>
#include <yaml-cpp/yaml.h>

#include <algorithm>
#include <cerrno>
#include <charconv>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <set>
#include <sstream>
#include <string_view>
#include <utility>
#include <vector>

#include "runtime/error.hpp"

namespace celer {
namespace {

using std::chrono::milliseconds;

[[noreturn]] void fail_at(const std::string& source, const YAML::Mark& mark, const std::string& what) {
  throw Error(ErrorCode::invalid_argument,
              source + ":" + std::to_string(mark.line + 1) + ":" + std::to_string(mark.column + 1) + ": " + what);
}

// A unit a number may carry, and what one of it is in the base unit (bytes, milliseconds).
struct Unit {
  const char* name;
  uint64_t factor;
};

// Largest first: to_yaml writes a value in the first unit that holds it exactly.
const std::vector<Unit> kSizeUnits = {
    {"TiB", uint64_t{1} << 40},
    {"TB", 1'000'000'000'000},
    {"GiB", uint64_t{1} << 30},
    {"GB", 1'000'000'000},
    {"MiB", uint64_t{1} << 20},
    {"MB", 1'000'000},
    {"KiB", uint64_t{1} << 10},
    {"KB", 1'000},
    {"B", 1},
};
const std::vector<Unit> kDurationUnits = {{"h", 3'600'000}, {"m", 60'000}, {"s", 1'000}, {"ms", 1}};

std::string unit_names(const std::vector<Unit>& units) {  // smallest first
  std::string names;
  for (auto u = units.rbegin(); u != units.rend(); ++u) names += (names.empty() ? "" : ", ") + std::string(u->name);
  return names;
}

// "<digits>[ ]<unit>" or bare "<digits>" (in the base unit). Decimal only: yaml-cpp's own integer
// conversion would read 010 as octal.
bool parse_with_unit(const std::string& text, const std::vector<Unit>& units, uint64_t* out) {
  const char* end = text.data() + text.size();
  uint64_t n = 0;
  auto [rest, ec] = std::from_chars(text.data(), end, n);
  if (ec != std::errc() || rest == text.data()) return false;
  while (rest != end && *rest == ' ') ++rest;
  if (rest == end) {
    *out = n;
    return true;
  }
  for (const Unit& u : units) {
    if (std::string_view(rest, end - rest) != u.name) continue;
    if (n > UINT64_MAX / u.factor) return false;
    *out = n * u.factor;
    return true;
  }
  return false;
}

std::string format_with_unit(uint64_t value, const std::vector<Unit>& units) {
  for (const Unit& u : units) {
    if (value != 0 && value % u.factor == 0) return std::to_string(value / u.factor) + u.name;
  }
  return std::to_string(value);
}

const char* kind_of(const YAML::Node& node) {
  switch (node.Type()) {
    case YAML::NodeType::Map:
      return "a mapping";
    case YAML::NodeType::Sequence:
      return "a list";
    case YAML::NodeType::Null:
      return "nothing";
    default:
      return "a scalar";
  }
}

// A value under a key, with what its error messages need: the file, the key's dotted path
// ("response_cache.ttl") and the key's position, which every error about the value points at.
class Value {
 public:
  Value(const std::string& source, std::string path, const YAML::Mark& mark, YAML::Node node)
      : source_(source), path_(std::move(path)), mark_(mark), node_(std::move(node)) {}

  const std::string& source() const { return source_; }
  const std::string& path() const { return path_; }
  const YAML::Mark& mark() const { return mark_; }

  [[noreturn]] void fail(const std::string& what) const {
    fail_at(source_, mark_, (path_.empty() ? "the config" : path_) + ": " + what);
  }

  // The entries of a mapping (a null value counts as an empty one), keys checked to be unique.
  std::vector<std::pair<std::string, Value>> entries() const;

  // The items of a list (a null value counts as an empty one), each with its position.
  std::vector<Value> items() const;

  // The value under `key` of this mapping; nullopt where the file leaves the key out.
  std::optional<Value> find(const std::string& key) const {
    for (auto& [k, v] : entries()) {
      if (k == key) return v;
    }
    return std::nullopt;
  }

  // The value under `key`, or this one where the key is left out (defaulted): where an error
  // about that key's value, found after reading, points.
  Value at(const std::string& key) const {
    std::optional<Value> v = find(key);
    return v ? *v : *this;
  }

  std::string string(bool allow_empty) const {
    const std::string& s = scalar("a string");
    if (s.empty() && !allow_empty) fail("must not be empty");
    return s;
  }

  bool boolean() const {
    bool b = false;
    if (!YAML::convert<bool>::decode(node_, b)) fail("must be true or false, got " + shown());
    return b;
  }

  int64_t integer(int64_t lo, int64_t hi) const {
    const std::string& s = scalar("an integer");
    int64_t v = 0;
    auto [rest, ec] = std::from_chars(s.data(), s.data() + s.size(), v);
    if (ec != std::errc() || rest != s.data() + s.size() || v < lo || v > hi) {
      fail("must be an integer in " + std::to_string(lo) + ".." + std::to_string(hi) + ", got " + shown());
    }
    return v;
  }
  int32_t count(int32_t lo, int32_t hi) const { return static_cast<int32_t>(integer(lo, hi)); }

  double non_negative_number() const {
    double v = 0;
    if (!finite_number(&v) || v < 0) fail("must be a number >= 0, got " + shown());
    return v;
  }

  double number_in(double lo, double hi) const {
    double v = 0;
    if (!finite_number(&v) || v < lo || v > hi) fail("must be a number in " + range(lo, hi) + ", got " + shown());
    return v;
  }

  uint64_t positive_size() const {
    uint64_t v = 0;
    if (!parse_with_unit(scalar("a size"), kSizeUnits, &v) || v == 0) {
      fail("must be a size above 0: an integer of bytes or a number with a unit (" + unit_names(kSizeUnits) +
           "), e.g. 512MiB; got " + shown());
    }
    return v;
  }

  milliseconds duration(uint64_t min_ms, uint64_t max_ms = uint64_t{INT64_MAX}) const {
    uint64_t v = 0;
    if (!parse_with_unit(scalar("a duration"), kDurationUnits, &v) || v < min_ms || v > max_ms) {
      std::string bounds;
      if (max_ms < uint64_t{INT64_MAX}) {
        bounds = " in " + format_with_unit(min_ms, kDurationUnits) + ".." + format_with_unit(max_ms, kDurationUnits);
      } else if (min_ms > 0) {
        bounds = " of at least " + std::to_string(min_ms) + "ms";
      }
      fail("must be a duration" + bounds + ": an integer of milliseconds or a number with a unit (" +
           unit_names(kDurationUnits) + "), e.g. 250ms, 2s, 1m; got " + shown());
    }
    return milliseconds(static_cast<int64_t>(v));
  }

  template <class E>
  E choice(const std::vector<std::pair<const char*, E>>& names) const {
    const std::string& s = scalar("a name");
    std::string allowed;
    for (const auto& [name, e] : names) {
      if (s == name) return e;
      allowed += (allowed.empty() ? "" : ", ") + std::string(name);
    }
    fail("must be one of " + allowed + "; got " + shown());
  }

 private:
  const std::string& scalar(const char* expected) const {
    if (!node_.IsScalar()) fail(std::string("must be ") + expected + ", got " + kind_of(node_));
    return node_.Scalar();
  }
  std::string shown() const { return node_.IsScalar() ? "'" + node_.Scalar() + "'" : kind_of(node_); }

  bool finite_number(double* out) const {
    const std::string& s = scalar("a number");
    auto [rest, ec] = std::from_chars(s.data(), s.data() + s.size(), *out);
    return ec == std::errc() && rest == s.data() + s.size() && std::isfinite(*out);
  }
  static std::string range(double lo, double hi) {
    std::ostringstream text;
    text << lo << ".." << hi;
    return text.str();
  }

  const std::string& source_;  // parse_config's source_name, which outlives every Value
  std::string path_;
  YAML::Mark mark_;
  YAML::Node node_;
};

std::vector<std::pair<std::string, Value>> Value::entries() const {
  if (node_.IsNull()) return {};
  if (!node_.IsMap()) fail(std::string("must be a mapping of keys, got ") + kind_of(node_));
  std::vector<std::pair<std::string, Value>> out;
  std::set<std::string> seen;
  const std::string prefix = path_.empty() ? "" : path_ + ".";
  for (const auto& entry : node_) {  // by value: yaml-cpp's iterators hand out temporaries
    const YAML::Node& key = entry.first;
    if (!key.IsScalar())
      fail_at(source_, key.Mark(), "the keys of " + (path_.empty() ? "the config" : path_) + " must be names");
    if (!seen.insert(key.Scalar()).second) fail_at(source_, key.Mark(), prefix + key.Scalar() + ": key given twice");
    out.emplace_back(key.Scalar(), Value(source_, prefix + key.Scalar(), key.Mark(), entry.second));
  }
  return out;
}

std::vector<Value> Value::items() const {
  if (node_.IsNull()) return {};
  if (!node_.IsSequence()) fail(std::string("must be a list, got ") + kind_of(node_));
  std::vector<Value> out;
  for (size_t i = 0; i < node_.size(); ++i) {
    const YAML::Node item = node_[i];
    out.emplace_back(source_, path_ + "[" + std::to_string(i) + "]", item.Mark(), item);
  }
  return out;
}

using Fields = std::vector<std::pair<const char*, std::function<void(const Value&)>>>;

// Hands each entry of `section` to its field's handler; a key with no field is an error listing
// the valid ones.
void read_fields(const Value& section, const Fields& fields) {
  for (const auto& [key, value] : section.entries()) {
    auto field = std::find_if(fields.begin(), fields.end(), [&](const auto& f) { return key == f.first; });
    if (field != fields.end()) {
      field->second(value);
      continue;
    }
    std::string valid;
    for (const auto& f : fields) valid += (valid.empty() ? "" : ", ") + std::string(f.first);
    value.fail("unknown key; valid keys" + (section.path().empty() ? "" : " of " + section.path()) + ": " + valid);
  }
}

// Names of enum values as the file writes them; reading and to_yaml share these tables.
template <class E>
using Names = std::vector<std::pair<const char*, E>>;

const Names<bool> kChaosModes = {{"disabled", false}, {"enabled", true}};
const Names<std::optional<TensorType>> kDtypes = {
    {"auto", std::nullopt},     {"f32", TensorType::f32},   {"f16", TensorType::f16},
    {"bf16", TensorType::bf16}, {"q8_0", TensorType::q8_0},
};
const Names<std::optional<TensorType>> kKvDtypes = {
    {"auto", std::nullopt}, {"f32", TensorType::f32}, {"f16", TensorType::f16}, {"q8_0", TensorType::q8_0}};
const Names<Q8Activations> kQ8Activations = {{"f32", Q8Activations::f32}, {"int8", Q8Activations::int8}};
const Names<Priority> kPriorities = {
    {"interactive", Priority::interactive}, {"normal", Priority::normal}, {"batch", Priority::batch}};
const Names<RoutingPolicy> kRoutingPolicies = {
    {"default", RoutingPolicy::standard},
    {"session", RoutingPolicy::session},
    {"prefix", RoutingPolicy::prefix},
    {"least-loaded", RoutingPolicy::least_loaded},
    {"least-connections", RoutingPolicy::least_connections},
    {"round-robin", RoutingPolicy::round_robin},
};

template <class E>
const char* name_of(const Names<E>& names, E value) {
  for (const auto& [name, e] : names) {
    if (e == value) return name;
  }
  return "?";
}

void read_response_cache(const Value& v, ResponseCacheConfig& c) {
  read_fields(v, {
                     {"enabled", [&](const Value& x) { c.enabled = x.boolean(); }},
                     {"max_entries", [&](const Value& x) { c.max_entries = x.count(1, 1 << 24); }},
                     {"ttl", [&](const Value& x) { c.ttl = x.duration(0); }},
                 });
}

void read_conversation_memory(const Value& v, ConversationMemoryConfig& c) {
  read_fields(v, {
                     {"max_entries", [&](const Value& x) { c.max_entries = x.count(0, 1 << 24); }},
                     {"max_tokens", [&](const Value& x) { c.max_tokens = x.integer(1, int64_t{1} << 32); }},
                 });
}

void read_objective(const Value& v, LatencyObjective& o) {
  read_fields(v, {
                     {"ttft", [&](const Value& x) { o.ttft = x.duration(0); }},
                     {"itl", [&](const Value& x) { o.itl = x.duration(0); }},
                 });
}

void read_slo(const Value& v, SloConfig& c) {
  auto for_class = [&](Priority p) { return [&c, p](const Value& x) { read_objective(x, c.classes[static_cast<size_t>(p)]); }; };
  static const Names<bool> kAdmission = {{"queue", false}, {"refuse", true}};
  read_fields(v, {
                     {"ttft", [&](const Value& x) { c.all.ttft = x.duration(0); }},
                     {"itl", [&](const Value& x) { c.all.itl = x.duration(0); }},
                     {"interactive", for_class(Priority::interactive)},
                     {"normal", for_class(Priority::normal)},
                     {"batch", for_class(Priority::batch)},
                     {"admission", [&](const Value& x) { c.refuse_late = x.choice(kAdmission); }},
                 });
}

RateLimit read_rate_limit(const Value& v) {
  RateLimit r;
  read_fields(v, {
                     {"tokens_per_second", [&](const Value& x) { r.tokens_per_second = x.non_negative_number(); }},
                     {"burst", [&](const Value& x) { r.burst = x.non_negative_number(); }},
                 });
  return r;
}

void read_rate_limits(const Value& v, RateLimitsConfig& c) {
  auto read_tenants = [&](const Value& x) {
    for (const auto& [name, limit] : x.entries()) {
      if (name.empty()) limit.fail("a tenant name must not be empty");
      c.tenants[name] = read_rate_limit(limit);
    }
  };
  read_fields(v, {
                     {"default", [&](const Value& x) { c.default_limit = read_rate_limit(x); }},
                     {"tenants", read_tenants},
                 });
}

// listen.token and cluster.secret: "" for none, else what a transport preamble carries.
std::string read_secret(const Value& x) {
  std::string secret = x.string(true);
  if (secret.size() > 64) x.fail("must be at most 64 bytes, got " + std::to_string(secret.size()));
  return secret;
}

// host and port, then the section's own keys (the HTTP gateway's timeouts and log).
template <class Endpoint>  // ListenConfig or HttpConfig
void read_endpoint(const Value& v, Endpoint& e, Fields more = {}) {
  more.insert(more.begin(), {{"host", [&](const Value& x) { e.host = x.string(false); }},
                             {"port", [&](const Value& x) { e.port = static_cast<uint16_t>(x.integer(0, 65535)); }}});
  read_fields(v, more);
}

void read_http(const Value& v, HttpConfig& c) {
  read_endpoint(v, c,
                {
                    {"request_timeout", [&](const Value& x) { c.request_timeout = x.duration(1); }},
                    {"idle_timeout", [&](const Value& x) { c.idle_timeout = x.duration(1); }},
                    {"stage_log", [&](const Value& x) { c.stage_log = x.string(true); }},
                });
}

void read_listen(const Value& v, ListenConfig& c) {
  read_endpoint(v, c,
                {
                    {"token", [&](const Value& x) { c.token = read_secret(x); }},
                    {"max_message_bytes",
                     [&](const Value& x) {
                       c.max_message_bytes = x.positive_size();
                       if (c.max_message_bytes < 4096 || c.max_message_bytes > (uint64_t{1} << 32))
                         x.fail("must be a size in 4KiB..4GiB, got " + std::to_string(c.max_message_bytes) + " bytes");
                     }},
                    {"max_buffered_bytes", [&](const Value& x) { c.max_buffered_bytes = x.positive_size(); }},
                });
  // A budget smaller than one message would refuse every message between the two.
  if (c.max_buffered_bytes < c.max_message_bytes)
    v.at(v.find("max_buffered_bytes") ? "max_buffered_bytes" : "max_message_bytes")
        .fail("max_buffered_bytes (" + std::to_string(c.max_buffered_bytes) + " bytes) must be at least max_message_bytes (" +
              std::to_string(c.max_message_bytes) + " bytes): a message larger than the budget could never be received");
}

void read_supervision(const Value& v, SupervisionConfig& c) {
  read_fields(v, {
                     {"max_restarts", [&](const Value& x) { c.max_restarts = x.count(0, 1'000'000); }},
                     {"window", [&](const Value& x) { c.window = x.duration(1); }},
                     {"backoff", [&](const Value& x) { c.backoff = x.duration(0); }},
                     {"hang_timeout", [&](const Value& x) { c.hang_timeout = x.duration(100); }},
                 });
}

int32_t read_block_size(const Value& x) {
  int32_t n = x.count(1, 1 << 20);
  if (n != kConfigBlockSize) x.fail("must be 16, the only block size supported now; got " + std::to_string(n));
  return n;
}

// The cluster sections. Reading checks each entry alone; check_cluster, once every key is read,
// checks what spans entries (names used where they are defined, endpoints unique) and fills in
// the defaults that depend on other entries.

// True for addresses only this machine reaches (127.0.0.0/8, ::1, localhost). The same test as
// actors/transport.hpp's is_loopback_host, which celer_runtime cannot call: it is built on CAF.
bool is_loopback_address(const std::string& host) {
  if (host == "localhost" || host == "::1" || host == "[::1]") return true;
  in_addr a{};
  return inet_pton(AF_INET, host.c_str(), &a) == 1 && (ntohl(a.s_addr) >> 24) == 127;
}

// Node and replica names appear in logs, metrics labels and other keys, so they are kept plain.
std::string read_name(const Value& x) {
  std::string name = x.string(false);
  const bool plain = name.size() <= 32 && std::all_of(name.begin(), name.end(), [](char ch) {
                       return (ch >= 'A' && ch <= 'Z') || (ch >= 'a' && ch <= 'z') || (ch >= '0' && ch <= '9') ||
                              ch == '_' || ch == '-';
                     });
  if (!plain) x.fail("must be 1..32 characters of A-Z, a-z, 0-9, _ and -; got '" + name + "'");
  return name;
}

// All three files or none: a node that presents no certificate is refused by the others.
void read_tls(const Value& v, TlsConfig& c) {
  read_fields(v, {
                     {"certificate", [&](const Value& x) { c.certificate = x.string(false); }},
                     {"key", [&](const Value& x) { c.key = x.string(false); }},
                     {"ca", [&](const Value& x) { c.ca = x.string(false); }},
                 });
  for (const char* key : {"certificate", "key", "ca"})
    if (!v.find(key)) v.fail(std::string("needs certificate, key and ca (PEM files); ") + key + " is missing");
}

void read_membership(const Value& v, MembershipConfig& c) {
  read_fields(v, {
                     {"secret", [&](const Value& x) { c.secret = read_secret(x); }},
                     {"tls", [&](const Value& x) { read_tls(x, c.tls); }},
                     {"heartbeat_interval", [&](const Value& x) { c.heartbeat_interval = x.duration(10, 60'000); }},
                     {"node_timeout", [&](const Value& x) { c.node_timeout = x.duration(500, 600'000); }},
                     {"drain_timeout", [&](const Value& x) { c.drain_timeout = x.duration(0, 3'600'000); }},
                     {"connect_timeout", [&](const Value& x) { c.connect_timeout = x.duration(100, 3'600'000); }},
                 });
  if (c.node_timeout > c.heartbeat_interval) return;
  // At the later of the two given (one of them is: the defaults are in order).
  const Value timeout = v.at("node_timeout"), beat = v.at("heartbeat_interval");
  const Value& later = timeout.mark().pos >= beat.mark().pos ? timeout : beat;
  later.fail("cluster.node_timeout (" + format_with_unit(c.node_timeout.count(), kDurationUnits) +
             ") must be longer than cluster.heartbeat_interval (" +
             format_with_unit(c.heartbeat_interval.count(), kDurationUnits) +
             "): a node is declared down only after missing heartbeats");
}

NodeConfig read_node(const Value& v) {
  NodeConfig n;
  read_fields(v, {
                     {"name", [&](const Value& x) { n.name = read_name(x); }},
                     {"host", [&](const Value& x) { n.host = x.string(false); }},
                     {"port", [&](const Value& x) { n.port = static_cast<uint16_t>(x.integer(1, 65535)); }},
                     {"threads", [&](const Value& x) { n.threads = x.count(0, 1024); }},
                     {"http", [&](const Value& x) { read_http(x, n.http.emplace()); }},
                 });
  if (n.name.empty()) v.fail("name: is required (1..32 characters of A-Z, a-z, 0-9, _ and -)");
  if (n.port == 0) v.fail("port: is required (1..65535): the port the node listens on for its peers");
  return n;
}

std::string read_device(const Value& x) {
  const std::string device = x.string(false);
  if (device == "cpu") return device;
  const std::string index = device.substr(0, 5) == "cuda:" ? device.substr(5) : "";
  if (!index.empty() && std::all_of(index.begin(), index.end(), [](char ch) { return ch >= '0' && ch <= '9'; })) {
    x.fail("'" + device + "': GPU shards need a CUDA build with the GPU backend, which this build is not; use cpu");
  }
  x.fail("must be cpu, or cuda:N with N a non-negative integer (GPU builds only); got '" + device + "'");
}

ShardConfig read_shard(const Value& v) {
  ShardConfig s;
  read_fields(v, {
                     {"node", [&](const Value& x) { s.node = x.string(false); }},
                     {"device", [&](const Value& x) { s.device = read_device(x); }},
                 });
  if (s.node.empty()) v.fail("node: is required: the node this shard runs on");
  return s;
}

// Entry `index` of replicas:, with its scheduler and cache defaulted (its nodes are checked later).
ReplicaConfig read_replica(const Value& v, size_t index) {
  ReplicaConfig r;
  auto read_shards = [&](const Value& x) {
    for (const Value& item : x.items()) r.shards.push_back(read_shard(item));
    if (r.shards.empty() || r.shards.size() > 64) {
      x.fail("must list 1..64 shards (their number is the replica's tensor-parallel size), got " +
             std::to_string(r.shards.size()));
    }
    r.source = x.source();
    r.line = x.mark().line + 1;
    r.column = x.mark().column + 1;
  };
  read_fields(v, {
                     {"name", [&](const Value& x) { r.name = read_name(x); }},
                     {"scheduler", [&](const Value& x) { r.scheduler = x.string(false); }},
                     {"cache", [&](const Value& x) { r.cache = x.string(false); }},
                     {"shards", read_shards},
                 });
  if (r.shards.empty()) v.fail("shards: is required: the list of the replica's shards, e.g. [{node: a}]");
  if (r.name.empty()) r.name = "r" + std::to_string(index);
  if (r.scheduler.empty()) r.scheduler = r.shards.front().node;
  if (r.cache.empty()) r.cache = r.scheduler;
  return r;
}

void read_router(const Value& v, RouterConfig& c) {
  read_fields(v, {
                     {"node", [&](const Value& x) { c.node = x.string(false); }},
                     {"standby", [&](const Value& x) { c.standby = x.string(true); }},
                 });
}

void read_routing(const Value& v, RoutingConfig& c) {
  read_fields(v, {
                     {"policy", [&](const Value& x) { c.policy = x.choice(kRoutingPolicies); }},
                     {"prefix_load_guard", [&](const Value& x) { c.prefix_load_guard = x.number_in(1.0, 100.0); }},
                 });
}

// `name`, given at `where`, is one of the nodes.
void check_node_name(const Value& where, const std::string& name, const std::vector<NodeConfig>& nodes) {
  std::string names;
  for (const NodeConfig& n : nodes) {
    if (n.name == name) return;
    names += (names.empty() ? "" : ", ") + n.name;
  }
  where.fail("'" + name + "' is not a node; " + (names.empty() ? "no nodes: are given" : "the nodes are " + names));
}

// Node names unique; each node port and HTTP port its own host:port; a secret for any host
// other machines reach.
void check_nodes(const Value& list, const ClusterConfig& c) {
  const std::vector<Value> items = list.items();
  std::map<std::string, std::string> names;                           // name -> the entry that has it
  std::map<std::pair<std::string, uint16_t>, std::string> endpoints;  // host:port -> what listens on it
  auto claim = [&](const Value& where, const std::string& host, uint16_t port, const std::string& what) {
    auto [it, fresh] = endpoints.emplace(std::pair(host, port), what);
    if (!fresh) {
      where.fail(host + ":" + std::to_string(port) + " is already " + it->second +
                 "; every node port and HTTP port needs a host:port of its own");
    }
  };
  for (size_t i = 0; i < c.nodes.size(); ++i) {
    const NodeConfig& n = c.nodes[i];
    const Value& item = items[i];
    auto [it, fresh] = names.emplace(n.name, item.path());
    if (!fresh)
      item.at("name").fail("'" + n.name + "' is already the name of " + it->second + "; node names must be unique");
    if (c.cluster.secret.empty() && !c.cluster.tls.enabled() && !is_loopback_address(n.host)) {
      item.at("host").fail("'" + n.host + "' is not a loopback address, so cluster.tls or cluster.secret is required: " +
                           "the certificates or the secret every connection to a node port presents first");
    }
    claim(item.at("port"), n.host, n.port, item.path() + "'s node port");
    if (n.http && n.http->port != 0)
      claim(item.at("http").at("port"), n.http->host, n.http->port, item.path() + "'s HTTP port");
  }
}

// Every node a replica names exists; replica names unique.
void check_replicas(const Value& list, const ClusterConfig& c) {
  const std::vector<Value> items = list.items();
  std::map<std::string, std::string> names;  // name -> the entry that has it
  for (size_t i = 0; i < c.replicas.size(); ++i) {
    const ReplicaConfig& r = c.replicas[i];
    const Value& item = items[i];
    const std::vector<Value> shards = item.at("shards").items();
    for (size_t j = 0; j < r.shards.size(); ++j) check_node_name(shards[j].at("node"), r.shards[j].node, c.nodes);
    check_node_name(item.at("scheduler"), r.scheduler, c.nodes);
    check_node_name(item.at("cache"), r.cache, c.nodes);
    auto [it, fresh] = names.emplace(r.name, item.path());
    if (!fresh) {
      const std::string given = item.find("name") ? "" : " (its default name)";
      item.at("name").fail("'" + r.name + "'" + given + " is already the name of " + it->second +
                           "; replica names must be unique");
    }
  }
}

void check_router(const Value& root, ClusterConfig& c) {
  RouterConfig& r = c.router;
  const Value section = root.at("router");
  if (r.node.empty() && c.is_cluster()) r.node = c.nodes.front().name;
  if (!r.node.empty()) check_node_name(section.at("node"), r.node, c.nodes);
  if (r.standby.empty()) return;
  check_node_name(section.at("standby"), r.standby, c.nodes);
  if (r.standby == r.node) {
    section.at("standby").fail("must differ from router.node ('" + r.node +
                               "'): the standby takes over when the router's node is down");
  }
}

void check_cluster(const Value& root, ClusterConfig& c) {
  const std::optional<Value> nodes = root.find("nodes"), replicas = root.find("replicas");
  if (nodes && !replicas) nodes->fail("needs replicas: (which nodes run each replica's scheduler, cache and shards)");
  if (replicas && !nodes) replicas->fail("needs nodes: (the processes the replicas' shards run on)");
  if (nodes) {
    if (auto x = root.find("listen")) {
      x->fail("not allowed with nodes; each node's host and port replace listen's, and cluster.secret its token");
    }
    if (auto x = root.find("http")) {
      x->fail("not allowed with nodes; put http: under the node that runs the gateway (nodes[i].http)");
    }
    if (auto x = root.find("tensor_parallel_size")) {
      x->fail("not allowed with replicas; the length of each replica's shards list sets its tensor-parallel size");
    }
    check_nodes(*nodes, c);
    check_replicas(*replicas, c);
  }
  check_router(root, c);
}

void read_config(const Value& root, ClusterConfig& c) {
  std::optional<Value> memory, blocks;  // where each was given, to refuse both
  auto read_memory = [&](const Value& x) {
    c.kv_cache_memory = x.positive_size();
    memory.emplace(x);
  };
  auto read_blocks = [&](const Value& x) {
    c.kv_cache_blocks = x.integer(0, INT32_MAX);
    blocks.emplace(x);
  };
  auto read_priorities = [&](const Value& x) {
    read_fields(x, {{"default", [&](const Value& p) { c.default_priority = p.choice(kPriorities); }}});
  };
  auto read_nodes = [&](const Value& x) {
    for (const Value& item : x.items()) c.nodes.push_back(read_node(item));
    if (c.nodes.empty()) x.fail("must list at least one node");
  };
  auto read_replicas = [&](const Value& x) {
    for (const Value& item : x.items()) c.replicas.push_back(read_replica(item, c.replicas.size()));
    if (c.replicas.empty()) x.fail("must list at least one replica");
  };
  read_fields(root, {
                        {"model", [&](const Value& x) { c.model = x.string(true); }},
                        {"dtype", [&](const Value& x) { c.dtype = x.choice(kDtypes); }},
                        {"q8_activations", [&](const Value& x) { c.q8_activations = x.choice(kQ8Activations); }},
                        {"kv_cache_dtype", [&](const Value& x) { c.kv_cache_dtype = x.choice(kKvDtypes); }},
                        {"tensor_parallel_size", [&](const Value& x) { c.tensor_parallel_size = x.count(1, 64); }},
                        {"threads", [&](const Value& x) { c.threads = x.count(0, 4096); }},
                        {"max_batch_size", [&](const Value& x) { c.max_batch_size = x.count(1, 4096); }},
                        {"max_batch_tokens", [&](const Value& x) { c.max_batch_tokens = x.count(1, 1 << 20); }},
                        {"max_context", [&](const Value& x) { c.max_context = x.count(0, 1 << 20); }},
                        {"max_queue", [&](const Value& x) { c.max_queue = x.count(0, 1 << 20); }},
                        {"block_size", [&](const Value& x) { c.block_size = read_block_size(x); }},
                        {"kv_cache_memory", read_memory},
                        {"kv_cache_blocks", read_blocks},
                        {"enable_prefix_caching", [&](const Value& x) { c.enable_prefix_caching = x.boolean(); }},
                        {"response_cache", [&](const Value& x) { read_response_cache(x, c.response_cache); }},
                        {"conversation_memory", [&](const Value& x) { read_conversation_memory(x, c.conversation_memory); }},
                        {"priorities", read_priorities},
                        {"rate_limits", [&](const Value& x) { read_rate_limits(x, c.rate_limits); }},
                        {"deadline", [&](const Value& x) { c.deadline = x.duration(0); }},
                        {"slo", [&](const Value& x) { read_slo(x, c.slo); }},
                        {"listen", [&](const Value& x) { read_listen(x, c.listen); }},
                        {"http", [&](const Value& x) { read_http(x, c.http.emplace()); }},
                        {"supervision", [&](const Value& x) { read_supervision(x, c.supervision); }},
                        {"chaos", [&](const Value& x) { c.chaos = x.choice(kChaosModes); }},
                        {"cluster", [&](const Value& x) { read_membership(x, c.cluster); }},
                        {"nodes", read_nodes},
                        {"replicas", read_replicas},
                        {"router", [&](const Value& x) { read_router(x, c.router); }},
                        {"routing", [&](const Value& x) { read_routing(x, c.routing); }},
                    });
  if (memory && blocks) {
    const Value& later = memory->mark().pos > blocks->mark().pos ? *memory : *blocks;
    later.fail("kv_cache_memory and kv_cache_blocks are mutually exclusive: give one of them");
  }
  check_cluster(root, c);
}

std::string number(double v) {
  char buf[64];
  auto [end, ec] = std::to_chars(buf, buf + sizeof(buf), v);  // the shortest form that reads back exactly
  return std::string(buf, end);
}

std::string format_duration(milliseconds d) {
  return format_with_unit(static_cast<uint64_t>(d.count()), kDurationUnits);
}

void emit_rate_limit(YAML::Emitter& out, const RateLimit& r) {
  out << YAML::Flow << YAML::BeginMap;
  out << YAML::Key << "tokens_per_second" << YAML::Value << number(r.tokens_per_second);
  out << YAML::Key << "burst" << YAML::Value << number(r.burst);
  out << YAML::EndMap;
}

// Opens section `key` with its host and port; the caller adds its own keys and ends the map.
template <class Endpoint>
void begin_endpoint(YAML::Emitter& out, const char* key, const Endpoint& e) {
  out << YAML::Key << key << YAML::Value << YAML::BeginMap;
  out << YAML::Key << "host" << YAML::Value << YAML::DoubleQuoted << e.host;
  out << YAML::Key << "port" << YAML::Value << e.port;
}

void emit_http(YAML::Emitter& out, const HttpConfig& h) {
  begin_endpoint(out, "http", h);
  out << YAML::Key << "request_timeout" << YAML::Value << format_duration(h.request_timeout);
  out << YAML::Key << "idle_timeout" << YAML::Value << format_duration(h.idle_timeout);
  out << YAML::Key << "stage_log" << YAML::Value << YAML::DoubleQuoted << h.stage_log;
  out << YAML::EndMap;
}

void emit_nodes(YAML::Emitter& out, const std::vector<NodeConfig>& nodes) {
  out << YAML::Key << "nodes" << YAML::Value << YAML::BeginSeq;
  for (const NodeConfig& n : nodes) {
    out << YAML::BeginMap;
    out << YAML::Key << "name" << YAML::Value << YAML::DoubleQuoted << n.name;
    out << YAML::Key << "host" << YAML::Value << YAML::DoubleQuoted << n.host;
    out << YAML::Key << "port" << YAML::Value << n.port;
    out << YAML::Key << "threads" << YAML::Value << n.threads;
    if (n.http) emit_http(out, *n.http);
    out << YAML::EndMap;
  }
  out << YAML::EndSeq;
}

// A name left "" (a config built by hand) is left out, for parse_config to default.
void emit_name(YAML::Emitter& out, const char* key, const std::string& name) {
  if (!name.empty()) out << YAML::Key << key << YAML::Value << YAML::DoubleQuoted << name;
}

void emit_replicas(YAML::Emitter& out, const std::vector<ReplicaConfig>& replicas) {
  out << YAML::Key << "replicas" << YAML::Value << YAML::BeginSeq;
  for (const ReplicaConfig& r : replicas) {
    out << YAML::BeginMap;
    emit_name(out, "name", r.name);
    emit_name(out, "scheduler", r.scheduler);
    emit_name(out, "cache", r.cache);
    out << YAML::Key << "shards" << YAML::Value << YAML::BeginSeq;
    for (const ShardConfig& s : r.shards) {
      out << YAML::Flow << YAML::BeginMap;
      out << YAML::Key << "node" << YAML::Value << YAML::DoubleQuoted << s.node;
      out << YAML::Key << "device" << YAML::Value << YAML::DoubleQuoted << s.device;
      out << YAML::EndMap;
    }
    out << YAML::EndSeq << YAML::EndMap;
  }
  out << YAML::EndSeq;
}

// cluster:, router: and routing: for a cluster or where not at their defaults; nodes: and
// replicas: where non-empty.
void emit_cluster_sections(YAML::Emitter& out, const ClusterConfig& c) {
  if (c.is_cluster() || c.cluster != MembershipConfig{}) {
    out << YAML::Key << "cluster" << YAML::Value << YAML::BeginMap;
    out << YAML::Key << "secret" << YAML::Value << YAML::DoubleQuoted << c.cluster.secret;
    if (c.cluster.tls.enabled()) {
      out << YAML::Key << "tls" << YAML::Value << YAML::BeginMap;
      out << YAML::Key << "certificate" << YAML::Value << YAML::DoubleQuoted << c.cluster.tls.certificate;
      out << YAML::Key << "key" << YAML::Value << YAML::DoubleQuoted << c.cluster.tls.key;
      out << YAML::Key << "ca" << YAML::Value << YAML::DoubleQuoted << c.cluster.tls.ca;
      out << YAML::EndMap;
    }
    out << YAML::Key << "heartbeat_interval" << YAML::Value << format_duration(c.cluster.heartbeat_interval);
    out << YAML::Key << "node_timeout" << YAML::Value << format_duration(c.cluster.node_timeout);
    out << YAML::Key << "drain_timeout" << YAML::Value << format_duration(c.cluster.drain_timeout);
    out << YAML::Key << "connect_timeout" << YAML::Value << format_duration(c.cluster.connect_timeout);
    out << YAML::EndMap;
  }
  if (!c.nodes.empty()) emit_nodes(out, c.nodes);
  if (!c.replicas.empty()) emit_replicas(out, c.replicas);
  if (c.is_cluster() || c.router != RouterConfig{}) {
    out << YAML::Key << "router" << YAML::Value << YAML::BeginMap;
    emit_name(out, "node", c.router.node);
    out << YAML::Key << "standby" << YAML::Value << YAML::DoubleQuoted << c.router.standby;
    out << YAML::EndMap;
  }
  if (c.is_cluster() || c.routing != RoutingConfig{}) {
    out << YAML::Key << "routing" << YAML::Value << YAML::BeginMap;
    out << YAML::Key << "policy" << YAML::Value << name_of(kRoutingPolicies, c.routing.policy);
    out << YAML::Key << "prefix_load_guard" << YAML::Value << number(c.routing.prefix_load_guard);
    out << YAML::EndMap;
  }
}

// The sections after the top-level scalar keys.
void emit_sections(YAML::Emitter& out, const ClusterConfig& c) {
  out << YAML::Key << "response_cache" << YAML::Value << YAML::BeginMap;
  out << YAML::Key << "enabled" << YAML::Value << c.response_cache.enabled;
  out << YAML::Key << "max_entries" << YAML::Value << c.response_cache.max_entries;
  out << YAML::Key << "ttl" << YAML::Value << format_duration(c.response_cache.ttl);
  out << YAML::EndMap;
  out << YAML::Key << "conversation_memory" << YAML::Value << YAML::BeginMap;
  out << YAML::Key << "max_entries" << YAML::Value << c.conversation_memory.max_entries;
  out << YAML::Key << "max_tokens" << YAML::Value << c.conversation_memory.max_tokens;
  out << YAML::EndMap;
  out << YAML::Key << "priorities" << YAML::Value << YAML::BeginMap;
  out << YAML::Key << "default" << YAML::Value << name_of(kPriorities, c.default_priority) << YAML::EndMap;
  out << YAML::Key << "rate_limits" << YAML::Value << YAML::BeginMap << YAML::Key << "default" << YAML::Value;
  emit_rate_limit(out, c.rate_limits.default_limit);
  out << YAML::Key << "tenants" << YAML::Value << YAML::BeginMap;
  for (const auto& [name, limit] : c.rate_limits.tenants) {
    out << YAML::Key << YAML::DoubleQuoted << name << YAML::Value;
    emit_rate_limit(out, limit);
  }
  out << YAML::EndMap << YAML::EndMap;
  out << YAML::Key << "deadline" << YAML::Value << format_duration(c.deadline);
  out << YAML::Key << "slo" << YAML::Value << YAML::BeginMap;
  out << YAML::Key << "ttft" << YAML::Value << format_duration(c.slo.all.ttft);
  out << YAML::Key << "itl" << YAML::Value << format_duration(c.slo.all.itl);
  for (int p = 0; p < kPriorityClasses; ++p) {
    const LatencyObjective& o = c.slo.classes[static_cast<size_t>(p)];
    if (o == LatencyObjective{}) continue;
    out << YAML::Key << name_of(kPriorities, static_cast<Priority>(p)) << YAML::Value << YAML::Flow << YAML::BeginMap;
    out << YAML::Key << "ttft" << YAML::Value << format_duration(o.ttft);
    out << YAML::Key << "itl" << YAML::Value << format_duration(o.itl) << YAML::EndMap;
  }
  out << YAML::Key << "admission" << YAML::Value << (c.slo.refuse_late ? "refuse" : "queue");
  out << YAML::EndMap;
  if (!c.is_cluster()) {  // in a cluster, the nodes' endpoints replace these
    begin_endpoint(out, "listen", c.listen);
    out << YAML::Key << "token" << YAML::Value << YAML::DoubleQuoted << c.listen.token;
    out << YAML::Key << "max_message_bytes" << YAML::Value << format_with_unit(c.listen.max_message_bytes, kSizeUnits);
    out << YAML::Key << "max_buffered_bytes" << YAML::Value
        << format_with_unit(c.listen.max_buffered_bytes, kSizeUnits);
    out << YAML::EndMap;
    if (c.http) emit_http(out, *c.http);
  }
  out << YAML::Key << "supervision" << YAML::Value << YAML::BeginMap;
  out << YAML::Key << "max_restarts" << YAML::Value << c.supervision.max_restarts;
  out << YAML::Key << "window" << YAML::Value << format_duration(c.supervision.window);
  out << YAML::Key << "backoff" << YAML::Value << format_duration(c.supervision.backoff);
  out << YAML::Key << "hang_timeout" << YAML::Value << format_duration(c.supervision.hang_timeout);
  out << YAML::EndMap;
  out << YAML::Key << "chaos" << YAML::Value << (c.chaos ? "enabled" : "disabled");
  emit_cluster_sections(out, c);
}

}  // namespace

ClusterConfig parse_config(const std::string& yaml_text, const std::string& source_name) {
  std::vector<YAML::Node> documents;
  try {
    documents = YAML::LoadAll(yaml_text);
  } catch (const YAML::Exception& e) {
    fail_at(source_name, e.mark, "YAML syntax error: " + e.msg);
  }
  if (documents.size() > 1) fail_at(source_name, documents[1].Mark(), "a second YAML document; a config is one");
  YAML::Node root = documents.empty() ? YAML::Node() : documents[0];
  ClusterConfig config;
  read_config(Value(source_name, "", root.Mark(), root), config);
  return config;
}

std::optional<std::chrono::milliseconds> parse_duration(const std::string& text) {
  uint64_t v = 0;
  if (!parse_with_unit(text, kDurationUnits, &v) || v > uint64_t{INT64_MAX}) return std::nullopt;
  return std::chrono::milliseconds(static_cast<int64_t>(v));
}

ClusterConfig load_config(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw Error(ErrorCode::invalid_argument, path + ": cannot open config file: " + std::strerror(errno));
  // fopen accepts a directory, and reading one yields nothing, which would pass as an empty config.
  if (std::filesystem::is_directory(path)) throw Error(ErrorCode::invalid_argument, path + ": is a directory");
  std::ostringstream text;
  text << in.rdbuf();
  return parse_config(text.str(), path);
}

std::string to_yaml(const ClusterConfig& c) {
  YAML::Emitter out;
  out << YAML::BeginMap;
  out << YAML::Key << "model" << YAML::Value << YAML::DoubleQuoted << c.model;
  out << YAML::Key << "dtype" << YAML::Value << name_of(kDtypes, c.dtype);
  out << YAML::Key << "q8_activations" << YAML::Value << name_of(kQ8Activations, c.q8_activations);
  out << YAML::Key << "kv_cache_dtype" << YAML::Value << name_of(kKvDtypes, c.kv_cache_dtype);
  if (!c.is_cluster()) out << YAML::Key << "tensor_parallel_size" << YAML::Value << c.tensor_parallel_size;
  out << YAML::Key << "threads" << YAML::Value << c.threads;
  out << YAML::Key << "max_batch_size" << YAML::Value << c.max_batch_size;
  out << YAML::Key << "max_batch_tokens" << YAML::Value << c.max_batch_tokens;
  out << YAML::Key << "max_context" << YAML::Value << c.max_context;
  out << YAML::Key << "max_queue" << YAML::Value << c.max_queue;
  out << YAML::Key << "block_size" << YAML::Value << c.block_size;
  if (c.kv_cache_blocks > 0) {
    out << YAML::Key << "kv_cache_blocks" << YAML::Value << c.kv_cache_blocks;
  } else {
    out << YAML::Key << "kv_cache_memory" << YAML::Value << format_with_unit(c.kv_cache_memory, kSizeUnits);
  }
  out << YAML::Key << "enable_prefix_caching" << YAML::Value << c.enable_prefix_caching;
  emit_sections(out, c);
  out << YAML::EndMap;
  return std::string(out.c_str()) + "\n";
}

std::string config_location(const ReplicaConfig& replica) {
  return replica.source + ":" + std::to_string(replica.line) + ":" + std::to_string(replica.column);
}

std::string dtype_name(std::optional<TensorType> dtype) {
  const std::string name = name_of(kDtypes, dtype);
  return name == "?" ? to_string(*dtype) : name;
}

std::string routing_policy_name(RoutingPolicy policy) {
  return name_of(kRoutingPolicies, policy);
}

}  // namespace celer
