// Asking a running cluster about itself: `celer status` and `celer launch`'s table.
#pragma once

#include <chrono>
#include <memory>
#include <string>

#include <caf/all.hpp>
#include <nlohmann/json.hpp>

#include "actors/interfaces.hpp"
#include "actors/transport.hpp"

namespace celer::cli {

// What a connection to a node port presents: the cluster secret and, for a cluster with
// cluster.tls, a certificate its CA signed.
struct NodeCredentials {
  std::string secret;
  TlsConfig tls;
};

// The config's secret and files, each replaced by the environment where it is set there
// (CELER_CLUSTER_SECRET where the config has no secret; CELER_TLS_CERTIFICATE, _KEY, _CA).
NodeCredentials node_credentials(const MembershipConfig& cluster = {});

// A short-lived connection to one node's actor, for the commands that ask a running cluster
// (`celer status`, `celer drain`, `celer launch`'s table): a small actor system, the transport
// guard with the credentials, the connection. Throws Error(unavailable) naming the address, or
// Error(invalid_argument) naming a TLS file that cannot be used.
class NodeConnection {
 public:
  NodeConnection(const std::string& host, uint16_t port, const NodeCredentials& credentials,
                 std::chrono::milliseconds timeout);
  caf::actor_system& system() { return *sys_; }
  const NodeActor& node() const { return node_; }

 private:
  caf::actor_system_config cfg_;
  std::unique_ptr<caf::actor_system> sys_;
  std::unique_ptr<Transport> transport_;
  NodeActor node_;
};

// Connects to the node at host:port (with the cluster secret) and returns the router's status
// document (docs/cluster.md). Throws Error(unavailable) naming what failed.
nlohmann::json fetch_status(const std::string& host, uint16_t port, const NodeCredentials& credentials,
                            std::chrono::milliseconds timeout);

// The status as tables: nodes, replicas, and where each actor runs.
std::string format_status(const nlohmann::json& status);

}  // namespace celer::cli
