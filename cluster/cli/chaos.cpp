// celer chaos --connect HOST:PORT --plan plan.yaml [load options] --report report.json
// (docs/chaos.md): a seeded load of greedy requests from `celer bench`'s generator and, beside
// it, the plan's faults fired at their times through the cluster's chaos endpoint. While it
// runs, the cluster's status is polled every 50 ms to see each fault found (a restart counted,
// a replica or node down) and recovered from (up again and generating). Then the same requests
// run again with no fault: the reference every stream of the chaotic run is held against, so a
// token lost, repeated or changed by a recovery shows in the report.
//
// Threads: workers share one Client and take jobs in arrival order (as `celer bench` does), one
// thread fires the faults through a client of its own, one polls the status; the main thread
// prints the progress line and joins them all before it reads what they recorded.
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <map>
#include <memory>
#include <mutex>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "celer/client.hpp"
#include "cluster/cli/commands.hpp"
#include "runtime/chaos_plan.hpp"
#include "runtime/error.hpp"
#include "runtime/workload.hpp"

namespace celer::cli {
namespace {

using clock_type = std::chrono::steady_clock;
namespace wl = celer::workload;

struct ChaosArgs {
  std::string connect;
  std::string plan;
  std::string report;
  std::string dataset = "random";
  wl::DatasetOptions data;
  std::string request_rate = "inf";
  int max_concurrency = 8;
  int request_timeout_s = 60;
  bool vocab_size_given = false;
};

double ms_since(clock_type::time_point start) {
  return std::chrono::duration<double, std::milli>(clock_type::now() - start).count();
}

std::unique_ptr<Client> connect_to(const std::string& host_port) {
  const auto [host, port] = parse_host_port(host_port);
  auto c = Client::connect(host, port);
  if (auto* e = std::get_if<ClientError>(&c)) throw Error(ErrorCode::unavailable, "cannot connect to " + host_port + ": " + e->message);
  return std::move(std::get<std::unique_ptr<Client>>(c));
}

// One request of the run: what came back, and when (ms since the start).
struct Outcome {
  bool done = false;  // the stream ended, with a completion or an error
  bool ok = false;
  std::string reason;  // when failed: the error's kind
  std::string message;
  double send_ms = 0, end_ms = 0;
  std::vector<double> token_ms;  // [tokens received, duplicates included]
  chaos::StreamTrace trace;
};

// Runs every job of `data` (one request each) at its arrival time over `workers` threads.
struct Load {
  Client* client;
  const wl::Dataset& data;
  const std::vector<double>& arrivals;
  RequestOptions options;
  clock_type::time_point start;
  std::vector<Outcome> outcomes;
  std::atomic<size_t> next{0}, finished{0};

  void work() {
    for (size_t j = next++; j < data.jobs.size(); j = next++) {
      std::this_thread::sleep_until(start + std::chrono::duration_cast<clock_type::duration>(std::chrono::duration<double>(arrivals[j])));
      const wl::BenchRequest& r = data.jobs[j].requests.front();
      Outcome& o = outcomes[j];
      RequestOptions opts = options;
      opts.max_tokens = r.output_len;
      o.send_ms = ms_since(start);
      Client::Stream stream = client->stream_tokens(r.prompt, opts);
      while (auto chunk = stream.next()) {
        if (chunk->tokens.empty()) continue;
        o.token_ms.insert(o.token_ms.end(), chunk->tokens.size(), ms_since(start));
        o.trace.add(chunk->first_index, chunk->tokens);
      }
      o.end_ms = ms_since(start);
      o.done = true;
      if (const auto* e = std::get_if<ClientError>(&stream.result())) {
        o.reason = to_string(e->kind);
        o.message = e->message;
      } else {
        o.ok = true;
      }
      ++finished;
    }
  }

  void run(size_t workers) {
    start = clock_type::now();
    outcomes.assign(data.jobs.size(), Outcome{});
    std::vector<std::thread> threads;
    for (size_t i = 0; i < workers; ++i) threads.emplace_back([this] { work(); });
    for (auto& t : threads) t.join();
  }
};

// A poll of the cluster's status, reduced to what finding and recovering from a fault needs.
struct Sample {
  double at_ms = 0;
  bool answered = false;
  std::map<std::string, bool> node_up;
  struct Replica {
    bool up = false;
    uint64_t tokens = 0;
    nlohmann::json restarts;
  };
  std::map<std::string, Replica> replicas;
  std::map<std::string, std::vector<std::string>> schedulers_on;  // node -> replicas scheduled there
  uint64_t rerouted_after_loss = 0;  // the entry's requests routed again after a lost message
};

Sample sample_of(const std::string& json, double at_ms) {
  Sample s;
  s.at_ms = at_ms;
  const nlohmann::json j = nlohmann::json::parse(json, nullptr, false);
  if (j.is_discarded()) return s;
  s.answered = true;
  for (const auto& n : j.value("nodes", nlohmann::json::array())) s.node_up[n.value("name", "")] = n.value("up", false);
  for (const auto& r : j.value("replicas", nlohmann::json::array()))
    s.replicas[r.value("name", "")] = {r.value("up", false), r.value("tokens_generated", uint64_t{0}), r.value("restarts", nlohmann::json())};
  for (const auto& a : j.value("actors", nlohmann::json::array()))
    if (a.value("role", "") == "scheduler") s.schedulers_on[a.value("node", "")].push_back(a.value("replica", ""));
  s.rerouted_after_loss = j.value("entry", nlohmann::json::object()).value("rerouted_after_loss", uint64_t{0});
  return s;
}

struct FiredFault {
  chaos::PlannedFault planned;
  double start_ms = 0, end_ms = 0;
  bool taken = false;
  std::string said;  // the cluster's reply, or why it refused
  std::optional<double> detected_ms, recovered_ms;
};

// When the samples show `f` found and recovered from. A replica's fault is found when its
// restart counters change or it goes down, and recovered from once it is up and has generated
// since; a node's (a kill, a stop, a partition) when the node goes down, and once it and the
// replicas scheduled on it are up and generating again. A link's fault that loses messages
// (drop, corrupt) is found when the entry first routes a request again after a lost message,
// and recovered from at the last such reroute that the fault caused (seen before the fault
// ended, or within the 3 s after). A slowed shard, a slow link and a duplicating one are no
// failure: celer has nothing to find, and they are neither found nor recovered.
void judge(FiredFault& f, const std::vector<Sample>& samples) {
  const ChaosFault& c = f.planned.fault;
  if (!f.taken || c.kind == ChaosFault::Kind::slow || c.kind == ChaosFault::Kind::delay ||
      c.kind == ChaosFault::Kind::duplicate)
    return;
  const bool on_node = c.kind == ChaosFault::Kind::sigkill || c.kind == ChaosFault::Kind::sigstop ||
                       c.kind == ChaosFault::Kind::partition;
  const Sample* before = nullptr;
  for (const Sample& s : samples)
    if (s.answered && s.at_ms <= f.start_ms) before = &s;
  if (!before) return;
  if (c.on_link()) {
    uint64_t last = before->rerouted_after_loss;
    for (const Sample& s : samples) {
      if (!s.answered || s.at_ms <= f.start_ms || s.at_ms > f.end_ms + 3000) continue;
      if (s.rerouted_after_loss == last) continue;
      last = s.rerouted_after_loss;
      if (!f.detected_ms) f.detected_ms = s.at_ms;
      f.recovered_ms = s.at_ms;
    }
    return;
  }
  std::vector<std::string> replicas;
  if (on_node) {
    auto it = before->schedulers_on.find(c.node);
    if (it != before->schedulers_on.end()) replicas = it->second;
  } else {
    replicas = {c.replica};
  }
  const Sample* found = nullptr;
  for (const Sample& s : samples) {
    if (!s.answered || s.at_ms <= f.start_ms) continue;
    if (!found) {
      bool changed = false;
      if (on_node) changed = s.node_up.count(c.node) && !s.node_up.at(c.node);
      for (const std::string& r : replicas) {
        if (!s.replicas.count(r) || !before->replicas.count(r)) continue;
        const auto& now = s.replicas.at(r);
        const auto& was = before->replicas.at(r);
        changed = changed || !now.up || now.restarts != was.restarts;
      }
      if (changed) {
        found = &s;
        f.detected_ms = s.at_ms;
      }
      continue;
    }
    bool back = !on_node || (s.node_up.count(c.node) && s.node_up.at(c.node));
    for (const std::string& r : replicas)
      back = back && s.replicas.count(r) && s.replicas.at(r).up && found->replicas.count(r) &&
             s.replicas.at(r).tokens != found->replicas.at(r).tokens;
    if (back) {
      f.recovered_ms = s.at_ms;
      return;
    }
  }
}

nlohmann::json percentiles(const std::vector<double>& ms) {
  if (ms.empty()) return {{"count", 0}};
  return {{"count", ms.size()},
          {"p50", wl::percentile(ms, 50)},
          {"p90", wl::percentile(ms, 90)},
          {"p99", wl::percentile(ms, 99)}};
}

int run_chaos(ChaosArgs& a) {
  const std::vector<chaos::PlannedFault> plan = chaos::load_plan(a.plan);
  const double rate = parse_rate(a.request_rate);  // refused before anything is sent
  const auto kind = wl::parse_dataset(a.dataset);
  if (!kind || *kind == wl::DatasetKind::multi_turn)
    throw Error(ErrorCode::invalid_argument, "--dataset must be random or shared-prefix, not '" + a.dataset + "'");
  a.data.kind = *kind;
  if (a.max_concurrency < 1) throw Error(ErrorCode::invalid_argument, "--max-concurrency must be at least 1");
  std::unique_ptr<Client> client = connect_to(a.connect), injector = connect_to(a.connect), watcher = connect_to(a.connect);
  auto info = client->model_info();
  if (auto* e = std::get_if<ClientError>(&info)) throw Error(ErrorCode::unavailable, "the cluster did not say its model: " + e->message);
  const ModelInfo& model = std::get<ModelInfo>(info);
  if (!a.vocab_size_given) a.data.vocab_size = model.n_vocab;
  if (a.data.vocab_size > model.n_vocab)
    throw Error(ErrorCode::invalid_argument, "--vocab-size " + std::to_string(a.data.vocab_size) + " is larger than the model's " +
                                                 std::to_string(model.n_vocab));
  const wl::Dataset data = wl::make_dataset(a.data);
  const std::vector<double> arrivals = wl::arrival_times(data.jobs.size(), rate, a.data.seed);
  RequestOptions options;
  options.sampling.temperature = 0;  // greedy: the reference run must give the same tokens
  options.ignore_eos = true;
  options.timeout_ms = int64_t{a.request_timeout_s} * 1000;
  const size_t workers = std::min(data.jobs.size(), static_cast<size_t>(a.max_concurrency));
  std::fprintf(stderr, "celer chaos: %zu requests to %s, %zu faults from %s\n", data.jobs.size(), a.connect.c_str(), plan.size(),
               a.plan.c_str());

  // The chaotic run, with the faults and the status polls beside it.
  Load load{client.get(), data, arrivals, options};
  std::vector<FiredFault> fired(plan.size());
  std::vector<Sample> samples;
  std::atomic<bool> running{true};
  std::atomic<size_t> n_fired{0};
  const auto t0 = clock_type::now();
  std::thread faults([&] {
    for (size_t i = 0; i < plan.size(); ++i) {
      std::this_thread::sleep_until(t0 + plan[i].at);
      FiredFault& f = fired[i];
      f.planned = plan[i];
      f.start_ms = ms_since(t0);
      auto reply = injector->inject_fault(plan[i].fault);
      if (auto* r = std::get_if<ChaosReply>(&reply)) {
        f.taken = true;
        f.said = r->message + " (node " + r->node + ")";
      } else {
        f.said = std::get<ClientError>(reply).message;
      }
      const bool lasts = plan[i].fault.kind == ChaosFault::Kind::hang || plan[i].fault.kind == ChaosFault::Kind::slow ||
                         plan[i].fault.kind == ChaosFault::Kind::sigstop || plan[i].fault.on_wire();
      f.end_ms = f.start_ms + (lasts ? plan[i].fault.duration_ms : 0);
      ++n_fired;
    }
  });
  std::thread poll([&] {
    while (running) {
      const double at = ms_since(t0);
      auto s = watcher->cluster_status(2000);
      samples.push_back(std::holds_alternative<std::string>(s) ? sample_of(std::get<std::string>(s), at) : Sample{at});
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
  });
  std::thread progress([&] {
    while (running) {
      std::fprintf(stderr, "\rceler chaos: %zu/%zu faults fired, %zu/%zu requests done", n_fired.load(), plan.size(),
                   load.finished.load(), data.jobs.size());
      std::this_thread::sleep_for(std::chrono::milliseconds(500));
    }
  });
  load.start = t0;
  load.run(workers);
  faults.join();
  // Past the last fault's end, long enough to see it recovered from.
  double last_end = 0;
  for (const FiredFault& f : fired) last_end = std::max(last_end, f.end_ms);
  while (ms_since(t0) < last_end + 3000) std::this_thread::sleep_for(std::chrono::milliseconds(50));
  running = false;
  poll.join();
  progress.join();
  const double duration_ms = ms_since(t0);
  std::fprintf(stderr, "\rceler chaos: %zu/%zu faults fired, %zu/%zu requests done\n", n_fired.load(), plan.size(),
               load.finished.load(), data.jobs.size());
  for (FiredFault& f : fired) judge(f, samples);

  // The reference: the same greedy requests again, no fault.
  std::fprintf(stderr, "celer chaos: the fault-free reference run\n");
  const std::vector<double> at_once(data.jobs.size(), 0.0);
  Load reference{client.get(), data, at_once, options};
  reference.run(workers);

  // The report.
  size_t completed = 0, lost = 0;
  std::map<std::string, size_t> failed;
  std::map<std::string, std::string> failure_messages;  // the first of each reason
  int64_t duplicated = 0, missing = 0;
  size_t unreferenced = 0;
  for (size_t j = 0; j < load.outcomes.size(); ++j) {
    const Outcome& o = load.outcomes[j];
    if (!o.done) {
      ++lost;
      continue;
    }
    if (!o.ok) {
      if (!failed[o.reason]++) failure_messages[o.reason] = o.message;
      continue;
    }
    ++completed;
    const Outcome& ref = reference.outcomes[j];
    if (!ref.ok) {
      ++unreferenced;
      continue;
    }
    const chaos::TokenCheck c = chaos::check_tokens(o.trace, ref.trace.tokens);
    duplicated += c.duplicated;
    missing += c.missing;
  }
  // Latencies inside and outside the fault windows (a fault's window: from its start to its
  // recovery, or to its end when it was not seen recovering).
  auto in_window = [&](double t) {
    for (const FiredFault& f : fired) {
      const double until = std::max(f.end_ms, f.recovered_ms.value_or(f.end_ms));
      if (f.taken && t >= f.start_ms && t <= until) return true;
    }
    return false;
  };
  std::vector<double> ttft[2], itl[2], e2el[2];
  // The affected requests (inside a window) against their own fault-free run: what the faults
  // cost them.
  std::vector<double> extra_ttft, extra_e2el;
  std::vector<double> per_second(static_cast<size_t>(std::ceil(duration_ms / 1000)) + 1, 0);
  for (size_t j = 0; j < load.outcomes.size(); ++j) {
    const Outcome& o = load.outcomes[j];
    if (!o.ok || o.token_ms.empty()) continue;
    const bool inside = in_window(o.send_ms) || in_window(o.end_ms);
    ttft[inside].push_back(o.token_ms.front() - o.send_ms);
    e2el[inside].push_back(o.end_ms - o.send_ms);
    const Outcome& ref = reference.outcomes[j];
    if (inside && ref.ok && !ref.token_ms.empty()) {
      extra_ttft.push_back((o.token_ms.front() - o.send_ms) - (ref.token_ms.front() - ref.send_ms));
      extra_e2el.push_back((o.end_ms - o.send_ms) - (ref.end_ms - ref.send_ms));
    }
    for (size_t i = 1; i < o.token_ms.size(); ++i) itl[in_window(o.token_ms[i])].push_back(o.token_ms[i] - o.token_ms[i - 1]);
    for (double t : o.token_ms) per_second[std::min(per_second.size() - 1, static_cast<size_t>(t / 1000))] += 1;
  }
  nlohmann::json report;
  report["plan"] = a.plan;
  report["seed"] = a.data.seed;
  report["duration_ms"] = duration_ms;
  report["sent"] = load.outcomes.size();
  report["completed"] = completed;
  report["failed"] = failed;
  report["failure_messages"] = failure_messages;
  report["lost"] = lost;
  report["duplicated_tokens"] = duplicated;
  report["missing_tokens"] = missing;
  report["unreferenced"] = unreferenced;
  report["faults"] = nlohmann::json::array();
  for (const FiredFault& f : fired) {
    nlohmann::json j{{"kind", chaos::kind_name(f.planned.fault.kind)},
                     {"target", f.planned.target()},
                     {"taken", f.taken},
                     {"said", f.said},
                     {"start_ms", f.start_ms},
                     {"end_ms", f.end_ms}};
    j["detected_ms"] = f.detected_ms ? nlohmann::json(*f.detected_ms) : nlohmann::json();
    j["recovered_ms"] = f.recovered_ms ? nlohmann::json(*f.recovered_ms) : nlohmann::json();
    report["faults"].push_back(j);
  }
  report["inside_faults"] = {{"ttft_ms", percentiles(ttft[1])}, {"itl_ms", percentiles(itl[1])}, {"e2el_ms", percentiles(e2el[1])}};
  report["outside_faults"] = {{"ttft_ms", percentiles(ttft[0])}, {"itl_ms", percentiles(itl[0])}, {"e2el_ms", percentiles(e2el[0])}};
  report["affected"] = {{"requests", extra_ttft.size()},
                        {"extra_ttft_ms", percentiles(extra_ttft)},
                        {"extra_e2el_ms", percentiles(extra_e2el)}};
  report["tokens_per_second"] = per_second;
  const std::string text = report.dump(2);
  if (!a.report.empty()) {
    std::ofstream out(a.report);
    out << text << '\n';
    if (!out) throw Error(ErrorCode::io, "cannot write " + a.report);
  }
  std::printf("sent %zu, completed %zu, failed %zu, lost %zu, duplicated tokens %lld, missing tokens %lld\n",
              load.outcomes.size(), completed, load.outcomes.size() - completed - lost, lost, static_cast<long long>(duplicated),
              static_cast<long long>(missing));
  for (const FiredFault& f : fired) {
    auto ms = [](const std::optional<double>& v) { return v ? std::to_string(static_cast<int64_t>(*v)) + " ms" : std::string("-"); };
    std::printf("  %-8s %-14s at %6.0f ms: %s; detected %s, recovered %s\n", chaos::kind_name(f.planned.fault.kind),
                f.planned.target().c_str(), f.start_ms, f.said.c_str(), ms(f.detected_ms).c_str(), ms(f.recovered_ms).c_str());
  }
  return lost == 0 && duplicated == 0 && missing == 0 ? 0 : 3;
}

}  // namespace

Command add_chaos(CLI::App& app) {
  auto a = std::make_shared<ChaosArgs>();
  wl::DatasetOptions& d = a->data;
  d.num_prompts = 64;
  d.random_input_len = 32;
  d.random_output_len = 64;
  CLI::App* c = app.add_subcommand("chaos", "Run a seeded load against a cluster while a plan of faults breaks it (docs/chaos.md)");
  c->add_option("--connect", a->connect, "HOST:PORT of a node of a cluster started with `chaos: enabled`")->required();
  c->add_option("--plan", a->plan, "The plan: a YAML list of faults and when to fire them")->required();
  c->add_option("--report", a->report, "Write the report (JSON, docs/chaos.md) to this file");
  c->add_option("--dataset", a->dataset, "random or shared-prefix")->capture_default_str();
  c->add_option("--num-prompts", d.num_prompts, "Requests to send")->capture_default_str();
  c->add_option("--seed", d.seed, "Seed of the prompts and arrival times")->capture_default_str();
  c->add_option("--request-rate", a->request_rate, "Requests per second, Poisson arrivals; inf sends all at once")
      ->capture_default_str();
  c->add_option("--max-concurrency", a->max_concurrency, "At most this many requests in flight")->capture_default_str();
  c->add_option("--vocab-size", d.vocab_size, "Prompt token ids are drawn from [3, this); default: the model's vocabulary")
      ->each([a](const std::string&) { a->vocab_size_given = true; });
  c->add_option("--random-input-len", d.random_input_len, "random: prompt tokens per request")->capture_default_str();
  c->add_option("--random-output-len", d.random_output_len, "random: tokens to generate per request")->capture_default_str();
  c->add_option("--prefix-groups", d.prefix_groups, "shared-prefix: groups")->capture_default_str();
  c->add_option("--prefix-len", d.prefix_len, "shared-prefix: tokens of each group's prompt")->capture_default_str();
  c->add_option("--suffix-len", d.suffix_len, "shared-prefix: distinct tokens each request adds")->capture_default_str();
  c->add_option("--output-len", d.output_len, "shared-prefix: tokens to generate per request")->capture_default_str();
  c->add_option("--request-timeout", a->request_timeout_s, "Seconds a request may take before it fails (its deadline)")
      ->capture_default_str();
  return [a] { return run_chaos(*a); };
}

}  // namespace celer::cli
