// The pure half of `celer chaos` (docs/chaos.md): the plan of faults a run fires, and how a
// run's streams are held against a fault-free reference of the same greedy requests. No
// clocks, threads or networking: cluster/cli/chaos.cpp runs the load and the faults and feeds
// what it saw here.
#pragma once

#include <chrono>
#include <cstdint>
#include <string>
#include <vector>

#include "runtime/protocol.hpp"

namespace celer::chaos {

struct PlannedFault {
  ChaosFault fault;                 // what is sent to the cluster
  std::chrono::milliseconds at{0};  // from the start of the load
  std::string target() const;       // "shard r2/0", "node n2", ...
};

// Reads a plan: `faults:`, a list of {kind, at, and the kind's target keys}, fired in order of
// `at`. Throws Error(invalid_argument) naming the fault's index and key, e.g.
// "plan.yaml: faults[1]: hang needs duration".
std::vector<PlannedFault> parse_plan(const std::string& yaml_text, const std::string& source_name);
std::vector<PlannedFault> load_plan(const std::string& path);

const char* kind_name(ChaosFault::Kind kind);

// What one stream delivered: its chunks as they came (first_index, tokens).
struct StreamTrace {
  void add(int32_t first_index, const std::vector<TokenId>& tokens);
  std::vector<TokenId> tokens;  // by index, each index once (the first copy kept)
  int64_t duplicated = 0;       // tokens of an index already received
  int64_t skipped = 0;          // indices a chunk jumped past
};

// The tokens of a completed stream against the fault-free reference run of the same request:
// missing counts reference positions not received with the reference's token (skipped, wrong,
// or never sent); duplicated counts repeats and tokens past the reference's end.
struct TokenCheck {
  int64_t missing = 0;
  int64_t duplicated = 0;
};
TokenCheck check_tokens(const StreamTrace& got, const std::vector<TokenId>& reference);

}  // namespace celer::chaos
