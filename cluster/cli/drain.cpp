// celer drain --connect HOST:PORT --node NAME: the named node stops taking requests, lets its
// requests finish (up to cluster.drain_timeout; then they move to another replica) and leaves.
#include <cstdio>
#include <cstdlib>

#include <caf/all.hpp>
#include <caf/io/all.hpp>

#include "actors/wire.hpp"
#include "cluster/cli/commands.hpp"
#include "cluster/cli/status.hpp"
#include "runtime/error.hpp"

namespace celer::cli {
namespace {

struct DrainArgs {
  std::string connect;
  std::string node;
};

int run_drain(const DrainArgs& a) {
  const auto [host, port] = parse_host_port(a.connect);
  NodeConnection c(host, port, node_credentials(), std::chrono::seconds(10));
  caf::actor_system& sys = c.system();
  caf::scoped_actor self{sys};
  std::string problem;
  self->request(c.node(), std::chrono::seconds(10), drain_atom::value, a.node)
      .receive([](bool) {}, [&](const caf::error& e) { problem = sys.render(e); });
  if (!problem.empty()) throw Error(ErrorCode::unavailable, "drain " + a.node + ": " + problem);
  std::printf("celer: node %s is draining\n", a.node.c_str());
  return 0;
}

}  // namespace

Command add_drain(CLI::App& app) {
  auto a = std::make_shared<DrainArgs>();
  CLI::App* c = app.add_subcommand("drain", "Make one node of a running cluster finish its requests and leave");
  c->add_option("--connect", a->connect, "HOST:PORT of any node (the cluster secret from CELER_CLUSTER_SECRET, TLS files from CELER_TLS_CERTIFICATE, _KEY, _CA)")->required();
  c->add_option("--node", a->node, "The node to drain")->required();
  return [a] { return run_drain(*a); };
}

}  // namespace celer::cli
