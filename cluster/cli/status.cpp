// celer status --connect HOST:PORT [--json]: the nodes, the replicas' load and where every
// actor runs, as the cluster's router sees them.
#include "cluster/cli/status.hpp"

#include <cstdio>
#include <cstdlib>
#include <sstream>

#include <caf/all.hpp>
#include <caf/io/all.hpp>

#include "actors/transport.hpp"
#include "actors/wire.hpp"
#include "cluster/cli/commands.hpp"
#include "runtime/error.hpp"

namespace celer::cli {

std::pair<std::string, uint16_t> parse_host_port(const std::string& s) {
  const auto colon = s.rfind(':');
  if (colon == std::string::npos || colon == 0)
    throw Error(ErrorCode::invalid_argument, "--connect wants HOST:PORT, not '" + s + "'");
  char* end = nullptr;
  const long port = std::strtol(s.c_str() + colon + 1, &end, 10);
  if (colon + 1 == s.size() || *end != '\0' || port <= 0 || port > 65535)
    throw Error(ErrorCode::invalid_argument, "--connect: bad port in '" + s + "'");
  return {s.substr(0, colon), static_cast<uint16_t>(port)};
}

NodeCredentials node_credentials(const MembershipConfig& cluster) {
  NodeCredentials c{cluster.secret, tls_from_environment(cluster.tls)};
  if (c.secret.empty())
    if (const char* env = std::getenv("CELER_CLUSTER_SECRET")) c.secret = env;
  return c;
}

NodeConnection::NodeConnection(const std::string& host, uint16_t port, const NodeCredentials& credentials,
                               std::chrono::milliseconds timeout) {
  cfg_.load<caf::io::middleman>();
  configure_tls(cfg_, credentials.tls);
  add_message_types(cfg_);
  cfg_.set("scheduler.policy", caf::atom("sharing"));
  cfg_.set("scheduler.max-threads", 1);
  sys_ = std::make_unique<caf::actor_system>(cfg_);
  TransportLimits limits;
  limits.token = credentials.secret;
  limits.tls = credentials.tls;
  transport_ = std::make_unique<Transport>(*sys_, limits);
  node_ = transport_->connect<NodeActor>(host, port, timeout);
}

nlohmann::json fetch_status(const std::string& host, uint16_t port, const NodeCredentials& credentials,
                            std::chrono::milliseconds timeout) {
  NodeConnection c(host, port, credentials, timeout);
  caf::actor_system& sys = c.system();
  caf::scoped_actor self{sys};
  std::string json, problem;
  self->request(c.node(), timeout, status_atom::value)
      .receive(
          [&](const WireMessage& wm) {
            DecodeResult d = decode(wm);
            if (d.message && std::holds_alternative<ClusterStatus>(*d.message)) json = std::get<ClusterStatus>(*d.message).json;
            else problem = "the node answered something that is not a status";
          },
          [&](const caf::error& e) { problem = sys.render(e); });
  if (!problem.empty()) throw Error(ErrorCode::unavailable, host + ":" + std::to_string(port) + ": status: " + problem);
  try {
    return nlohmann::json::parse(json);
  } catch (const std::exception& e) {
    throw Error(ErrorCode::unavailable, host + ":" + std::to_string(port) + ": status is not JSON: " + e.what());
  }
}

namespace {

std::string cell(const nlohmann::json& v) {
  if (v.is_null()) return "-";
  if (v.is_string()) return v.get<std::string>();
  if (v.is_boolean()) return v.get<bool>() ? "yes" : "no";
  if (v.is_number_float()) {
    char buf[32];
    std::snprintf(buf, sizeof buf, "%.1f", v.get<double>());
    return buf;
  }
  return v.dump();
}

// Left-aligned columns, two spaces apart.
std::string table(const std::vector<std::string>& header, const std::vector<std::vector<std::string>>& rows) {
  std::vector<size_t> width(header.size());
  for (size_t c = 0; c < header.size(); ++c) width[c] = header[c].size();
  for (const auto& r : rows)
    for (size_t c = 0; c < r.size() && c < width.size(); ++c) width[c] = std::max(width[c], r[c].size());
  std::ostringstream out;
  auto line = [&](const std::vector<std::string>& r) {
    for (size_t c = 0; c < header.size(); ++c) {
      const std::string& s = c < r.size() ? r[c] : "";
      out << s;
      if (c + 1 < header.size()) out << std::string(width[c] - s.size() + 2, ' ');
    }
    out << "\n";
  };
  line(header);
  for (const auto& r : rows) line(r);
  return out.str();
}

}  // namespace

std::string format_status(const nlohmann::json& s) {
  std::ostringstream out;
  out << "routing: " << cell(s.value("policy", nlohmann::json())) << "\n\n";
  std::vector<std::vector<std::string>> rows;
  for (const auto& n : s.value("nodes", nlohmann::json::array()))
    rows.push_back({cell(n["name"]), n.value("up", false) ? "up" : "down",
                    n["last_heartbeat_ms_ago"].is_null() ? "never" : cell(n["last_heartbeat_ms_ago"]) + " ms ago"});
  out << table({"node", "state", "last heartbeat"}, rows) << "\n";
  rows.clear();
  for (const auto& r : s.value("replicas", nlohmann::json::array())) {
    const bool up = r.value("up", false);
    if (!r.contains("waiting")) {
      rows.push_back({cell(r["name"]), "down"});
      continue;
    }
    char hit[16];
    std::snprintf(hit, sizeof hit, "%.1f%%", 100.0 * r.value("prefix_hit_rate", 0.0));
    rows.push_back({cell(r["name"]), up ? (r.value("draining", false) ? "draining" : "up") : "down", cell(r["waiting"]),
                    cell(r["running"]), cell(r["kv_blocks_used"]), cell(r["kv_blocks_free"]), hit,
                    cell(r["tokens_per_second"]), cell(r["routed"])});
  }
  out << table({"replica", "state", "queued", "running", "kv used", "kv free", "prefix hits", "tokens/s", "routed"}, rows)
      << "\n";
  rows.clear();
  for (const auto& a : s.value("actors", nlohmann::json::array()))
    rows.push_back({cell(a["role"]), a.value("replica", std::string()).empty() ? "-" : cell(a["replica"]),
                    a.contains("rank") ? cell(a["rank"]) : "-", cell(a["node"])});
  out << table({"actor", "replica", "rank", "node"}, rows);
  return out.str();
}

namespace {

struct StatusArgs {
  std::string connect;
  bool json = false;
  int64_t timeout_ms = 5000;
};

int run_status(const StatusArgs& a) {
  const auto [host, port] = parse_host_port(a.connect);
  const nlohmann::json s = fetch_status(host, port, node_credentials(), std::chrono::milliseconds(a.timeout_ms));
  if (a.json) std::printf("%s\n", s.dump(2).c_str());
  else std::fputs(format_status(s).c_str(), stdout);
  return 0;
}

}  // namespace

Command add_status(CLI::App& app) {
  auto a = std::make_shared<StatusArgs>();
  CLI::App* c = app.add_subcommand("status", "Show a running cluster: nodes, replicas' load, where each actor runs");
  c->add_option("--connect", a->connect, "HOST:PORT of any node (the cluster secret from CELER_CLUSTER_SECRET, TLS files from CELER_TLS_CERTIFICATE, _KEY, _CA)")->required();
  c->add_flag("--json", a->json, "Print the status document as JSON (docs/cluster.md)");
  c->add_option("--timeout", a->timeout_ms, "Milliseconds to wait for the answer")->check(CLI::Range(int64_t{1}, int64_t{600'000}));
  return [a] { return run_status(*a); };
}

}  // namespace celer::cli
