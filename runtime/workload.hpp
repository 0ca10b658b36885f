// The pure half of `celer bench` (DESIGN.md §9): synthetic datasets of token-id prompts, the
// arrival schedule, and the metrics math. Everything here is deterministic given a seed and free
// of clocks, threads and networking, so it is tested in microseconds; cluster/cli/bench.cpp runs
// the workload against a server and feeds what it measured back into summarize().
//
// Random numbers come from std::mt19937_64 (whose output sequence the standard fixes) with our
// own conversions to integers and doubles: the std:: distributions differ between standard
// libraries, and the same seed must give the same workload everywhere.
#pragma once

#include <cstdint>
#include <map>
#include <optional>
#include <random>
#include <string>
#include <string_view>
#include <vector>

#include "runtime/protocol.hpp"

namespace celer::workload {

enum class DatasetKind : uint8_t {
  random,         // independent prompts of random tokens
  shared_prefix,  // groups of prompts sharing a system prompt (exercises the prefix cache)
  multi_turn,     // sessions whose turns re-send the whole conversation so far
};
const char* to_string(DatasetKind kind);
std::optional<DatasetKind> parse_dataset(std::string_view name);  // "random", "shared-prefix", "multi-turn"

struct DatasetOptions {
  DatasetKind kind = DatasetKind::random;
  int32_t num_prompts = 1000;  // random and shared-prefix; multi-turn sends sessions * turns
  uint64_t seed = 0;
  int32_t vocab_size = 32000;  // token ids are drawn from [kFirstTokenId, vocab_size)
  // random
  int32_t random_input_len = 1024;
  int32_t random_output_len = 128;
  // shared-prefix
  int32_t prefix_groups = 4;
  int32_t prefix_len = 256;
  int32_t suffix_len = 64;
  // multi-turn
  int32_t sessions = 8;
  int32_t turns = 4;
  int32_t turn_input_len = 64;
  // shared-prefix and multi-turn
  int32_t output_len = 128;
};

// Ids below 3 are the usual special tokens (unknown, BOS, EOS); prompts avoid them.
constexpr TokenId kFirstTokenId = 3;

// Throws Error(invalid_argument) naming the offending option (as its command-line flag).
void validate(const DatasetOptions& o);

// One request of a dataset. For multi-turn, `prompt` holds only the turn's new user tokens: the
// prompt actually sent is built by Conversation from the earlier turns and their outputs.
struct BenchRequest {
  std::vector<TokenId> prompt;  // [prompt length]
  int32_t output_len = 0;
  int32_t group = -1;    // shared-prefix: the system prompt this request shares
  int32_t session = -1;  // multi-turn: the session and the turn within it
  int32_t turn = -1;
};

// A unit of work the runner schedules: one request, or (multi-turn) one session whose turns
// run one after another.
struct Job {
  std::vector<BenchRequest> requests;  // [1] or [turns]
};

struct Dataset {
  DatasetKind kind = DatasetKind::random;
  std::vector<Job> jobs;
  size_t num_requests() const;
};

// Deterministic: the same options (seed included) give the same dataset. Validates first.
Dataset make_dataset(const DatasetOptions& o);

// A multi-turn session's prompts: turn k sends turn k-1's prompt, then the tokens turn k-1
// generated, then turn k's new user tokens. Re-sending the previous prompt and outputs as
// tokens (not text) keeps them byte-identical, so the server's prefix cache can hit on them.
class Conversation {
 public:
  // The prompt for the next turn, given its new user tokens.
  std::vector<TokenId> next_prompt(const std::vector<TokenId>& user_tokens) const;
  // Appends a finished turn: the prompt it sent and the tokens it generated.
  void add_turn(const std::vector<TokenId>& prompt, const std::vector<TokenId>& output);
  const std::vector<TokenId>& history() const { return history_; }

 private:
  std::vector<TokenId> history_;  // [all earlier prompts' tokens and outputs, in order]
};

// Arrival offsets in seconds from the start, non-decreasing, for n arrivals at `rate` per second:
// a Poisson process, i.e. exponential inter-arrival times of mean 1/rate. As in vLLM's benchmark
// the first arrival is at 0 (no idle lead-in counted in the duration). rate = +infinity puts
// every arrival at 0. Throws on rate <= 0 or NaN. The draws come from a stream of their own, so
// the same seed gives the same arrivals whatever the dataset.
std::vector<double> arrival_times(size_t n, double rate, uint64_t seed);

// What the runner measured for one request. Times are seconds since the benchmark started.
struct RequestRecord {
  int32_t session = -1;  // multi-turn
  int32_t turn = -1;
  bool ok = false;
  std::string error;  // when !ok: to_string(ErrorKind), or "session_aborted" for the turns
                      // of a session after a failed one
  std::string error_message;
  double send_s = 0;
  double end_s = 0;
  std::vector<double> token_times_s;  // [completion tokens]: a chunk of k tokens adds k equal times
  int32_t prompt_tokens = 0;
  int32_t completion_tokens = 0;
  int32_t cached_tokens = 0;
  StageTimes times;  // the server's stage times, when it reported them (all 0 otherwise)
};

// The q-th percentile (q in [0, 100]) by linear interpolation between closest ranks, like
// numpy.percentile's default: rank q/100 * (n-1). Empty input gives 0.
double percentile(std::vector<double> values, double q);

// A latency distribution, in milliseconds.
struct Distribution {
  size_t count = 0;
  double mean = 0;
  double p50 = 0;
  double p90 = 0;
  double p99 = 0;
};
Distribution distribution_ms(const std::vector<double>& seconds);

// The objectives a completed request must meet to count toward goodput, as DistServe defines
// it and `vllm bench serve --goodput ttft:MS tpot:MS e2el:MS` writes them; itl: the objective
// whose share of token gaps over it is reported. Milliseconds; 0: none.
struct GoodputObjectives {
  double ttft_ms = 0, tpot_ms = 0, e2el_ms = 0, itl_ms = 0;
  bool any() const { return ttft_ms > 0 || tpot_ms > 0 || e2el_ms > 0 || itl_ms > 0; }
};
// "KEY:MS" items (keys ttft, tpot, e2el, itl; MS a positive number). Throws Error naming a bad one.
GoodputObjectives parse_goodput(const std::vector<std::string>& items);

struct Summary {
  size_t completed = 0;
  size_t failed = 0;
  std::map<std::string, size_t> failures;  // by reason (see RequestRecord::error)
  double duration_s = 0;
  int64_t prompt_tokens = 0;                 // of completed requests
  int64_t completion_tokens = 0;             // of completed requests
  int64_t cached_tokens = 0;                 // of completed requests
  double request_throughput = 0;             // completed requests / s
  double output_throughput = 0;              // completion tokens / s
  double total_token_throughput = 0;         // (prompt + completion) tokens / s
  double prefix_cache_hit_rate = 0;          // cached / prompt tokens
  Distribution ttft;                         // time to first token
  Distribution tpot;                         // (e2e - ttft) / (completion - 1), requests with more than one token
  Distribution itl;                          // gaps between consecutive token arrivals, all requests pooled
  Distribution e2el;                         // end-to-end latency
  std::vector<double> mean_ttft_ms_by_turn;  // multi-turn: [turns]; empty otherwise
  // Where the end-to-end latency went, from the server's stage times (requests that reported
  // them): name and distribution, in the order a request passes them (see kStageNames).
  std::vector<std::pair<std::string, Distribution>> stages;
  // With objectives: the completed requests that met all of them, per second of the run, and
  // the share of token gaps longer than the itl objective.
  size_t good_requests = 0;
  double goodput = 0;
  double itl_over_share = 0;
};

// The stages of the latency breakdown, each a difference of two StageTimes (or of the
// client's end-to-end latency and the server's span):
//   queue       queued -> admitted (waiting for a place in the batch)
//   prefill     admitted -> prefill done (the prompt's forward passes, chunked)
//   first_token prefill done -> first token sampled
//   decode      first -> last token sampled
//   server      received -> finished on the replica
//   outside     the client's end-to-end latency minus `server`: transport, gateway, client
inline constexpr const char* kStageNames[] = {"queue", "prefill", "first_token", "decode", "server", "outside"};

// Metrics over the completed records; failed ones only count in `failed` and `failures`.
Summary summarize(const std::vector<RequestRecord>& records, double duration_s, const GoodputObjectives& objectives = {});

}  // namespace celer::workload
