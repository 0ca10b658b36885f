#include "runtime/chaos_plan.hpp"

#include <yaml-cpp/yaml.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <set>
#include <sstream>

#include "runtime/config.hpp"
#include "runtime/error.hpp"

namespace celer::chaos {
namespace {

struct KindName {
  const char* name;
  ChaosFault::Kind kind;
};
constexpr KindName kKinds[] = {{"kill", ChaosFault::Kind::kill},       {"hang", ChaosFault::Kind::hang},
                               {"slow", ChaosFault::Kind::slow},       {"sigkill", ChaosFault::Kind::sigkill},
                               {"sigstop", ChaosFault::Kind::sigstop}, {"drop", ChaosFault::Kind::drop},
                               {"delay", ChaosFault::Kind::delay},     {"duplicate", ChaosFault::Kind::duplicate},
                               {"corrupt", ChaosFault::Kind::corrupt}, {"partition", ChaosFault::Kind::partition}};

PlannedFault read_fault(const YAML::Node& n, const std::string& where) {
  auto fail = [&](const std::string& why) { throw Error(ErrorCode::invalid_argument, where + ": " + why); };
  if (!n.IsMap()) fail("must be a map of kind, at and the fault's target");
  static const std::set<std::string> kKeys = {"kind", "at", "role", "replica", "rank", "node", "peer", "probability", "duration", "delay"};
  for (const auto& kv : n) {
    const std::string key = kv.first.as<std::string>();
    if (!kKeys.count(key))
      fail(key + ": unknown key (kind, at, role, replica, rank, node, peer, probability, duration, delay)");
    if (!kv.second.IsScalar()) fail(key + ": must be a single value");
  }
  auto text = [&](const char* key) { return n[key] ? n[key].as<std::string>() : std::string(); };
  auto duration = [&](const char* key) -> std::chrono::milliseconds {
    if (!n[key]) return std::chrono::milliseconds(0);
    auto d = parse_duration(text(key));
    if (!d) fail(std::string(key) + ": must be a duration such as 500ms, 2s or 1m; got '" + text(key) + "'");
    return *d;
  };
  PlannedFault p;
  const std::string kind = text("kind");
  const auto* k = std::find_if(std::begin(kKinds), std::end(kKinds), [&](const KindName& x) { return kind == x.name; });
  if (k == std::end(kKinds))
    fail("kind: must be kill, hang, slow, sigkill, sigstop, drop, delay, duplicate, corrupt or partition; got '" + kind + "'");
  ChaosFault& f = p.fault;
  f.kind = k->kind;
  if (!n["at"]) fail("at: when to fire it, from the start of the load, is missing");
  p.at = duration("at");
  f.role = text("role");
  f.replica = text("replica");
  f.node = text("node");
  f.peer = text("peer");
  if (n["probability"]) {
    try {
      f.probability = n["probability"].as<double>();
    } catch (const YAML::Exception&) {
      fail("probability: must be a number in (0, 1]; got '" + text("probability") + "'");
    }
    if (!(f.probability > 0 && f.probability <= 1)) fail("probability: must be in (0, 1]; got '" + text("probability") + "'");
  }
  if (n["rank"]) {
    try {
      f.rank = n["rank"].as<int32_t>();
    } catch (const YAML::Exception&) {
      fail("rank: must be a tensor-parallel rank, 0 or more; got '" + text("rank") + "'");
    }
    if (f.rank < 0) fail("rank: must be 0 or more");
  }
  const auto dur = duration("duration"), delay = duration("delay");
  if (dur.count() > UINT32_MAX || delay.count() > UINT32_MAX) fail("duration and delay must be under 49 days");
  f.duration_ms = static_cast<uint32_t>(dur.count());
  f.delay_ms = static_cast<uint32_t>(delay.count());
  const bool on_node = f.kind == ChaosFault::Kind::sigkill || f.kind == ChaosFault::Kind::sigstop || f.kind == ChaosFault::Kind::partition;
  if (!f.on_link() && (!f.peer.empty() || n["probability"])) fail(kind + " takes no peer or probability (the link faults do)");
  if (f.on_link()) {
    if (f.node.empty() || f.peer.empty()) fail(kind + " acts on the link between two nodes: give node and peer");
    if (f.node == f.peer) fail(kind + ": node and peer are both '" + f.node + "'; a link joins two nodes");
    if (!f.role.empty() || !f.replica.empty()) fail(kind + " acts on a link: give node and peer, not role or replica");
    if (!n["probability"]) fail(kind + " needs probability (each actor message's chance, in (0, 1])");
    if (f.duration_ms == 0) fail(kind + " needs duration");
    if (f.kind == ChaosFault::Kind::delay && f.delay_ms == 0) fail("delay needs delay (how long a message is held)");
  } else if (on_node) {
    if (f.node.empty()) fail(kind + " needs node");
    if (!f.role.empty() || !f.replica.empty()) fail(kind + " acts on a node's process: give node, not role or replica");
  } else {
    if (f.replica.empty()) fail(kind + " needs replica");
    if (f.role.empty()) fail(kind + " needs role (scheduler, cache or shard)");
    if (!f.node.empty()) fail(kind + " acts on a replica's actor: give role and replica, not node");
  }
  if ((f.kind == ChaosFault::Kind::hang || f.kind == ChaosFault::Kind::slow || f.kind == ChaosFault::Kind::sigstop ||
       f.kind == ChaosFault::Kind::partition) &&
      f.duration_ms == 0)
    fail(kind + " needs duration");
  if (f.kind == ChaosFault::Kind::slow && f.delay_ms == 0) fail("slow needs delay (added to every step)");
  return p;
}

}  // namespace

const char* kind_name(ChaosFault::Kind kind) {
  for (const KindName& k : kKinds)
    if (k.kind == kind) return k.name;
  return "unknown";
}

std::string PlannedFault::target() const {
  if (fault.kind == ChaosFault::Kind::sigkill || fault.kind == ChaosFault::Kind::sigstop ||
      fault.kind == ChaosFault::Kind::partition)
    return "node " + fault.node;
  if (fault.on_link()) return "link " + fault.node + "-" + fault.peer;
  std::string t = fault.role + " " + fault.replica;
  if (fault.role == "shard") t += "/" + std::to_string(fault.rank);
  return t;
}

std::vector<PlannedFault> parse_plan(const std::string& yaml_text, const std::string& source_name) {
  YAML::Node root;
  try {
    root = YAML::Load(yaml_text);
  } catch (const YAML::Exception& e) {
    throw Error(ErrorCode::invalid_argument, source_name + ":" + std::to_string(e.mark.line + 1) + ": " + e.msg);
  }
  if (!root.IsMap()) throw Error(ErrorCode::invalid_argument, source_name + ": a plan is a map with `faults:`, a list of faults");
  for (const auto& kv : root)
    if (kv.first.as<std::string>() != "faults")
      throw Error(ErrorCode::invalid_argument, source_name + ": " + kv.first.as<std::string>() + ": unknown key (faults)");
  if (!root["faults"]) throw Error(ErrorCode::invalid_argument, source_name + ": faults: the list of faults is missing");
  const YAML::Node faults = root["faults"];
  if (!faults.IsSequence() || faults.size() == 0)
    throw Error(ErrorCode::invalid_argument, source_name + ": faults: must be a list of at least one fault");
  std::vector<PlannedFault> plan;
  for (size_t i = 0; i < faults.size(); ++i)
    plan.push_back(read_fault(faults[i], source_name + ": faults[" + std::to_string(i) + "]"));
  std::stable_sort(plan.begin(), plan.end(), [](const PlannedFault& a, const PlannedFault& b) { return a.at < b.at; });
  return plan;
}

std::vector<PlannedFault> load_plan(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in || std::filesystem::is_directory(path))
    throw Error(ErrorCode::invalid_argument, path + ": cannot open the plan: " + (in ? "a directory" : std::strerror(errno)));
  std::ostringstream text;
  text << in.rdbuf();
  return parse_plan(text.str(), path);
}

void StreamTrace::add(int32_t first_index, const std::vector<TokenId>& chunk) {
  for (size_t i = 0; i < chunk.size(); ++i) {
    const int64_t index = int64_t{first_index} + static_cast<int64_t>(i);
    const int64_t have = static_cast<int64_t>(tokens.size());
    if (index < have) {
      ++duplicated;
      continue;
    }
    if (index > have) {
      // A jump: the positions between were never sent. Marked with -1, which no reference holds.
      skipped += index - have;
      tokens.resize(static_cast<size_t>(index), -1);
    }
    tokens.push_back(chunk[i]);
  }
}

TokenCheck check_tokens(const StreamTrace& got, const std::vector<TokenId>& reference) {
  TokenCheck c;
  c.duplicated = got.duplicated;
  for (size_t i = 0; i < reference.size(); ++i)
    if (i >= got.tokens.size() || got.tokens[i] != reference[i]) ++c.missing;
  if (got.tokens.size() > reference.size()) c.duplicated += static_cast<int64_t>(got.tokens.size() - reference.size());
  return c;
}

}  // namespace celer::chaos
