// What one node of a cluster config runs, worked out from the config before anything starts:
// its peers, whether it holds the router, the replicas whose scheduler it holds (each with the
// single-replica config replica_setup() reads), and its shards' thread count. Also the checks a
// config can only pass once the model is known (a tensor-parallel size that divides its heads).
#pragma once

#include <string>
#include <vector>

#include "cluster/router_actor.hpp"
#include "runtime/config.hpp"
#include "runtime/model.hpp"

namespace celer::cli {

struct ReplicaPlan {
  std::string name;
  ClusterConfig config;  // the cluster's serving keys, with tensor_parallel_size = its shards
  std::string cache_node;
  std::vector<std::string> shard_nodes;  // by rank
  bool all_local = false;  // every shard on the scheduler's node: one process, in-process all-reduce
};

struct NodePlan {
  const NodeConfig* me = nullptr;
  std::string secret;               // cluster.secret, else CELER_CLUSTER_SECRET
  TlsConfig tls;                    // cluster.tls, each file overridden by CELER_TLS_* if set
  // The nodes this one talks to, besides itself, split by who opens the connection: of two
  // nodes that talk, the one listed first in nodes: dials the other and introduces itself
  // (both dialing at once loses messages under CAF 0.17: one of the two connections is closed
  // and the proxies made over it die with it).
  std::vector<std::string> dials;      // listed after this one: this node connects to them
  std::vector<std::string> dialed_by;  // listed before this one: they connect to this node
  bool runs_router = false;
  std::string router_node;
  bool runs_standby = false;
  std::string standby_node;  // "": no standby router
  std::vector<ReplicaPlan> replicas;  // those whose scheduler is here
  int shard_threads = 1;              // per shard rank placed here
};

// Throws Error(invalid_argument) naming the file for a config without nodes: or a name not in it.
NodePlan plan_node(const ClusterConfig& config, const std::string& path, const std::string& name);

const NodeConfig* find_node(const ClusterConfig& config, const std::string& name);

// Every replica's tensor-parallel size divides the model's heads, KV heads and FFN width:
// Error(invalid_argument) at the replica's `shards:` key otherwise.
void check_against_model(const ClusterConfig& config, const ModelCard& model);

RouterSetup router_setup(const ClusterConfig& config);

}  // namespace celer::cli
