// The scheduling policy of one replica: iteration-level continuous batching with chunked
// prefill, priority classes and admission control. Plain and synchronous: the scheduler actor
// calls admit() and cancel() as messages arrive, and once per model iteration prepare() (the
// block request for the cache), apply() (the cache's BlockPlan -> the Step) and, after the
// shards ran it, update() (STYLE.md rule 3). The KV blocks belong to the cache (BlockPlanner,
// runtime/block_planner.hpp): the scheduler never touches them, it tells the cache what
// happened and asks for the next step's blocks in one message. schedule() runs the three steps
// against a local planner, for single-threaded use (tests, tools).
//
// Reservation is batched: a plan gives each running sequence a table covering its positions up
// to the end of its last block. While every sequence of the next step fits in the table it
// holds, nothing waits and nothing ended, prepare() builds that step's plan itself from those
// tables (the walk would choose the same sequences and need no block) and keeps what the cache
// must learn (computed positions, new tokens) for the next real request: a decode step asks
// the cache about once per 16 tokens.
//
// Policy:
// - Every sequence has tokens (prompt, then generated) and a count of computed ones; a step
//   gives each chosen sequence the next tokens to compute, at most max_batch_tokens in all.
//   Prefill and decode are the same path: a sequence in decode has one token left to compute.
//   A sequence whose computed count reaches its token count samples the next token.
// - Order: priority class (interactive, normal, batch), then arrival (FCFS); within a class
//   running sequences before waiting ones. At most max_batch_size sequences per step.
// - KV blocks: a sequence that cannot get its blocks preempts (by recompute) running sequences
//   after it in that order; a waiting one only preempts strictly lower classes. A preempted
//   sequence goes back to the front of its waiting queue, keeps its tokens, frees its blocks,
//   and later recomputes its KV (the prefix cache usually still holds most of it). Since a draw
//   depends only on (seed, position), it then produces exactly the tokens it would have.
// - Admission (admit): rejected at once with its own ErrorKind when the prompt leaves no room
//   in the context, the waiting queue is full, or the tenant's token bucket cannot pay for
//   prompt + max_tokens. Deadlines are checked on admission and at every step.
// - Latency objectives (config.slo): each step's token budget is sized by step_budget() from an
//   online model of step time (StepTimeModel): the decoding streams take one token each, and
//   prefill gets what keeps the step within the tightest ITL objective among the streams in
//   decode, unless a waiting prompt of a higher class would then miss its TTFT objective, when
//   it gets what it needs. max_batch_tokens is the upper bound. With refuse_late, admission
//   refuses a request whose predicted first token is later than its TTFT objective.
#pragma once

#include <array>
#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <string>
#include <unordered_map>
#include <variant>
#include <vector>

#include "runtime/block_planner.hpp"
#include "runtime/kv_block_manager.hpp"
#include "runtime/protocol.hpp"
#include "runtime/step_time_model.hpp"

namespace celer {

// A class's latency objectives in milliseconds (0: none): its first token within ttft_ms of
// admission, each later one within itl_ms of the one before.
struct Objective {
  int64_t ttft_ms = 0;
  int64_t itl_ms = 0;
  bool operator==(const Objective&) const = default;
};

struct SchedulerConfig {
  int32_t max_batch_size = 16;
  int32_t max_batch_tokens = 512;  // the most tokens in a step; the step budget below stays within it
  int32_t max_queue = 256;       // waiting sequences (all classes) beyond a full batch before admission rejects
  int32_t max_context = 2048;
  RateLimit default_rate;        // tenants without their own entry
  std::map<std::string, RateLimit> tenant_rates;
  std::array<Objective, kPriorityClasses> slo{};  // by priority class
  bool refuse_late = false;  // admission refuses a request that cannot meet its TTFT objective
};

// What the latency objectives came to (ReplicaStats' slo_ and itl_ fields).
struct SloCounters {
  uint64_t finished = 0, met = 0, refused = 0, ttft_missed = 0;
  uint64_t itl_tokens = 0, itl_tokens_over = 0, itl_steps = 0, itl_steps_over = 0;
};

// What an update() or a schedule() produced for the request actors.
struct SchedulerEvent {
  enum class Kind { token, finished, error } kind = Kind::token;
  RequestId id = 0;
  TokenId token = 0;            // token: the token and its index in the output stream
  int32_t index = 0;
  bool has_logprob = false;     // token: the request asked for logprobs
  TokenLogprob logprob;
  Finished finished;            // finished: counts and reason
  ErrorReply error;             // error
};

class Scheduler {
 public:
  // is_end_of_generation: the model's end-of-generation tokens (EOS, EOT, ...). Without a block
  // manager, the caller carries prepare()'s requests to a planner elsewhere (the cache actor);
  // with one, schedule() plans against it here.
  explicit Scheduler(const SchedulerConfig& config, std::function<bool(TokenId)> is_end_of_generation);
  Scheduler(const SchedulerConfig& config, KvBlockManager& blocks, std::function<bool(TokenId)> is_end_of_generation);

  // Admits a request whose prompt is tokenized. Returns nullopt, or the rejection.
  std::optional<ErrorReply> admit(const GenerateRequest& request, int64_t now_ms);
  // The sequence leaves at the next schedule() with a `finished` event of this reason (cancel,
  // a stop string found by the request actor). Unknown ids are ignored (already finished).
  void cancel(RequestId id, FinishReason reason = FinishReason::cancelled);

  // The next step's blocks: a plan made here from the tables the sequences hold (see above), or
  // the block request for the cache: what it must learn (commits, ended sequences, a reset) and
  // the candidates in order. `events` receives the finishes and errors decided here (cancels,
  // deadlines). needs_plan() says whether a request carries anything at all.
  std::variant<BlockPlan, BlockPlanRequest> prepare(int64_t now_ms, std::vector<SchedulerEvent>& events);
  static bool needs_plan(const BlockPlanRequest& r) {
    return r.reset || !r.commits.empty() || !r.ended.empty() || !r.candidates.empty();
  }
  // Applies the cache's plan (preemptions, started sequences) and builds the step. An empty step
  // (no sequences) means there is nothing to run.
  Step apply(const BlockPlan& plan);
  // prepare + plan against the local block manager + apply (the two-argument constructor only).
  Step schedule(int64_t now_ms, std::vector<SchedulerEvent>& events);
  // Applies a step's results: computed counts, prefix-cache commits, sampled tokens, finishes.
  void update(const Step& step, const StepResult& result, std::vector<SchedulerEvent>& events);
  // Drops every sequence's KV (a shard or the cache was lost): all running sequences are
  // preempted and will recompute, and the next block request tells the cache to start over.
  // Their generated tokens are kept.
  void reset_kv();
  // Fails every request (waiting and running) with one error: what is left when retries cannot
  // help.
  void fail_all(ErrorKind kind, const std::string& message, std::vector<SchedulerEvent>& events);

  int32_t n_waiting(Priority p) const { return static_cast<int32_t>(waiting_[static_cast<int>(p)].size()); }
  int32_t n_waiting() const;
  int32_t n_running() const { return static_cast<int32_t>(running_.size()); }
  bool idle() const { return seqs_.empty(); }
  uint64_t n_preemptions() const { return preemptions_; }
  // The work still ahead, in tokens: prompt positions not yet computed plus tokens still to
  // generate (up to max_tokens), over every request. What load-aware routing compares.
  int64_t outstanding_tokens() const;
  // The tokens a request held here has generated (each was an event), or nullopt when none of
  // that id is held.
  std::optional<int32_t> generated_tokens(RequestId id) const;
  uint64_t n_local_plans() const { return local_plans_; }  // steps planned without the cache
  // Counts reset_kv() calls: a plan asked for before a reset must not be applied after it.
  uint64_t kv_epoch() const { return kv_epoch_; }
  const SchedulerConfig& config() const { return config_; }
  // The latency objectives: what they came to, the step-time model, the last step's budget and
  // the tightest ITL objective of the streams in decode then (0: none).
  const SloCounters& slo_counters() const { return slo_; }
  const StepTimeModel& step_times() const { return step_times_; }
  int32_t step_budget() const { return budget_; }
  int64_t itl_objective_ms() const { return tightest_itl_ms_; }

 private:
  struct Sequence {
    GenerateRequest request;      // sampling, limits, priority; prompt_tokens moved to tokens
    std::vector<TokenId> tokens;  // prompt, then generated
    int32_t n_prompt = 0;
    int32_t n_computed = 0;
    int32_t n_cached = 0;         // prompt tokens found in the prefix cache on first admission
    uint64_t arrival = 0;
    int64_t admitted_ms = 0;      // admission time on the scheduler's clock (TTFT objectives)
    StageTimes times;             // queued, admitted, prefill done, first and last token
    int32_t n_sent = 0;           // tokens the cache has been sent (BlockCandidate::new_tokens)
    std::vector<int32_t> table;   // the blocks the cache's last plan gave it (empty: none)
    bool started() const { return !table.empty(); }  // holds blocks in the cache
    bool running = false;
    bool cancelled = false;
    FinishReason cancel_reason = FinishReason::cancelled;
  };
  struct Bucket {
    double tokens = 0;
    int64_t last_ms = 0;
    bool primed = false;
  };

  bool take_tokens(const std::string& tenant, double amount, int64_t now_ms);
  const Objective& objective(const Sequence& s) const { return config_.slo[static_cast<size_t>(s.request.priority)]; }
  // This step's token budget (see the policy above), and the time the queue ahead of a new
  // request of class p with n_prompt tokens needs for its prefill (-1: unknown yet).
  int32_t compute_budget(int64_t now_ms);
  double predicted_ttft_ms(Priority p, int32_t n_prompt) const;
  // The model's time for `tokens` of prefill from position n_past, in chunks, beside `decode`.
  double prefill_us(const StepShape& decode, int64_t tokens, int32_t n_past, int32_t chunk) const;
  std::vector<RequestId> running_in_order() const;  // by class, then arrival (the walk's order)
  std::optional<BlockPlan> plan_locally(const std::vector<RequestId>& running_in_order) const;
  void preempt(Sequence& s);  // the scheduler's half: the cache took (or lost) its blocks
  void finish(Sequence& s, FinishReason reason, std::vector<SchedulerEvent>& events);
  void fail(Sequence& s, ErrorKind kind, const std::string& message, std::vector<SchedulerEvent>& events);
  void remove(RequestId id);
  // Order key: class, then arrival.
  static bool before(const Sequence& a, const Sequence& b);

  SchedulerConfig config_;
  std::unique_ptr<BlockPlanner> planner_;  // schedule()'s local planner, when given blocks
  // What the cache must learn with the next block request.
  bool reset_pending_ = false;
  std::vector<BlockCommit> commits_;
  std::vector<RequestId> ended_;
  uint64_t next_plan_ = 1;
  uint64_t local_plans_ = 0;
  uint64_t kv_epoch_ = 0;
  std::function<bool(TokenId)> is_eog_;
  std::unordered_map<RequestId, Sequence> seqs_;
  std::deque<RequestId> waiting_[kPriorityClasses];
  std::vector<RequestId> running_;
  std::map<std::string, Bucket> buckets_;
  uint64_t next_arrival_ = 0;
  uint64_t next_step_ = 1;
  uint64_t preemptions_ = 0;
  bool has_slo_ = false;  // some class has an objective
  StepTimeModel step_times_;
  int32_t budget_ = 0;
  int64_t tightest_itl_ms_ = 0;
  SloCounters slo_;
};

}  // namespace celer
