// Asking a running cluster about itself: `celer status` and `celer launch`'s table.
#pragma once

#include <chrono>
#include <string>

#include <nlohmann/json.hpp>

namespace celer::cli {

// Connects to the node at host:port (with the cluster secret) and returns the router's status
// document (docs/cluster.md). Throws Error(unavailable) naming what failed.
nlohmann::json fetch_status(const std::string& host, uint16_t port, const std::string& secret,
                            std::chrono::milliseconds timeout);

// The status as tables: nodes, replicas, and where each actor runs.
std::string format_status(const nlohmann::json& status);

}  // namespace celer::cli
