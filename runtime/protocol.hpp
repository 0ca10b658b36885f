// The messages that cross actor boundaries, as plain structs. schema/celer.capnp defines their
// wire form; schema/codec.* converts between the two and validates everything it reads. The
// synchronous core (scheduler, block manager) works on these structs and never sees Cap'n Proto.
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "runtime/sampler.hpp"
#include "runtime/tokenizer.hpp"

namespace celer {

// Bumped whenever a message changes incompatibly; every message carries it.
constexpr uint16_t kProtocolVersion = 1;

using RequestId = uint64_t;

enum class Priority : uint8_t { interactive = 0, normal = 1, batch = 2 };
constexpr int kPriorityClasses = 3;

enum class FinishReason : uint8_t {
  stop = 0,       // an end-of-generation token or a stop string
  length = 1,     // max_tokens reached
  cancelled = 2,  // the client cancelled or went away
};

// Why a request failed. Each admission rejection has its own code so clients can tell them apart.
enum class ErrorKind : uint8_t {
  invalid_request = 0,   // a malformed or out-of-range field
  queue_full = 1,        // admission: the bounded waiting queue is full
  prompt_too_long = 2,   // admission: prompt + 1 exceeds the context
  rate_limited = 3,      // admission: the tenant's token bucket is empty
  deadline_exceeded = 4, // the request's deadline passed
  internal = 5,          // a failure inside celer that retries could not hide
  unavailable = 6,       // no replica can take requests now
  slo_unattainable = 7,  // admission: the request cannot meet its TTFT objective (slo.admission: refuse)
};
const char* to_string(ErrorKind kind);

// A tenant's token bucket: admission charges prompt + max_tokens tokens.
struct RateLimit {
  double tokens_per_second = 0;  // 0: unlimited
  double burst = 0;              // bucket size in tokens; 0: one second's worth (tokens_per_second)
  bool operator==(const RateLimit&) const = default;
};

// Each token's log-probability under the model (log-softmax of the raw logits, before any
// sampling filter, as OpenAI and vLLM report it) and the k most likely alternatives.
struct TokenLogprob {
  TokenId token = 0;
  float logprob = 0;
  std::vector<TokenId> top_tokens;   // most likely first
  std::vector<float> top_logprobs;   // same length as top_tokens
  bool operator==(const TokenLogprob&) const = default;
};
constexpr int32_t kMaxTopLogprobs = 20;

// When a request passed each stage, in microseconds since the Unix epoch (0: not reached). The
// replica fills them; a front end (the HTTP gateway) adds its own receive and send times.
struct StageTimes {
  int64_t received_us = 0;       // the replica's request actor started
  int64_t queued_us = 0;         // the scheduler admitted it to its waiting queue
  int64_t admitted_us = 0;       // it first entered the running batch
  int64_t prefill_done_us = 0;   // the last prompt token was computed
  int64_t first_token_us = 0;    // the first output token was sampled
  int64_t last_token_us = 0;     // the last output token was sampled
  int64_t finished_us = 0;       // the request actor sent Finished
  bool operator==(const StageTimes&) const = default;
};

// StageTimes' fields by name, in stage order: the one list every text form of them (the HTTP
// API's stage_times, the gateway's stage log, celer bench reading them back) is written from.
inline constexpr std::pair<const char*, int64_t StageTimes::*> kStageTimeFields[] = {
    {"received_us", &StageTimes::received_us},       {"queued_us", &StageTimes::queued_us},
    {"admitted_us", &StageTimes::admitted_us},       {"prefill_done_us", &StageTimes::prefill_done_us},
    {"first_token_us", &StageTimes::first_token_us}, {"last_token_us", &StageTimes::last_token_us},
    {"finished_us", &StageTimes::finished_us},
};

// Microseconds since the Unix epoch (the clock of StageTimes and deadlines).
int64_t unix_us();

struct GenerateRequest {
  RequestId id = 0;
  std::string prompt_text;            // tokenized by the replica when prompt_tokens is empty
  std::vector<TokenId> prompt_tokens;
  SamplingParams sampling;
  int32_t max_tokens = 128;
  std::vector<std::string> stop;      // stop strings
  bool ignore_eos = false;
  bool add_bos = true;                // when tokenizing prompt_text: prepend BOS if the model uses one
  bool parse_special = false;         // when tokenizing prompt_text: the text of special tokens is those tokens (chat templates)
  Priority priority = Priority::normal;
  bool priority_given = false;        // false: the replica's priorities.default replaces `priority`
  std::string tenant;                 // rate-limit bucket ("" = the default bucket)
  std::string session_id;             // routing affinity for multi-turn sessions
  int64_t deadline_ms = 0;            // 0: none; else milliseconds since the Unix epoch
  int32_t logprobs = -1;              // -1: none; k in 0..kMaxTopLogprobs: each token's logprob and the k most likely
};

struct TokenChunk {
  RequestId id = 0;
  int32_t first_index = 0;            // index in the output stream of tokens[0]
  std::vector<TokenId> tokens;
  std::string text;                   // the text these tokens complete (UTF-8 safe)
  std::vector<TokenLogprob> logprobs; // one per token when the request asked for logprobs
  // The request actor's first chunk carries nothing: it introduces the actor to the client.
  bool is_introduction() const { return tokens.empty() && text.empty(); }
};

struct Finished {
  RequestId id = 0;
  FinishReason reason = FinishReason::stop;
  int32_t prompt_tokens = 0;
  int32_t completion_tokens = 0;
  int32_t cached_tokens = 0;          // prompt tokens served from the prefix cache
  StageTimes times;
};

struct ErrorReply {
  RequestId id = 0;
  ErrorKind kind = ErrorKind::internal;
  std::string message;
};

struct Cancel {
  RequestId id = 0;
};

// One sequence's part of a Step (see DESIGN.md §2 and STYLE.md rule 3).
struct StepSequence {
  RequestId id = 0;
  std::vector<TokenId> tokens;        // new tokens to compute, at positions n_past...
  int32_t n_past = 0;
  std::vector<int32_t> block_table;   // covers n_past + tokens.size() positions
  bool sample = false;                // sample a token after the last new one
  SamplingParams sampling;            // when sample
  std::vector<TokenId> recent;        // the tail of the sequence the repetition penalty looks at
  int32_t logprobs = -1;              // when sample: -1 none, else report the token's logprob and the k most likely
};

struct BlockCopy {
  int32_t src = 0;
  int32_t dst = 0;
};

struct Step {
  uint64_t step_id = 0;
  std::vector<BlockCopy> copies;      // done before the forward pass (copy-on-write)
  std::vector<StepSequence> sequences;
};

struct SampledToken {
  RequestId id = 0;
  TokenId token = 0;
  bool has_logprob = false;           // the sequence asked for logprobs
  TokenLogprob logprob;
};

struct StepResult {
  uint64_t step_id = 0;
  std::vector<SampledToken> tokens;   // one per StepSequence with sample = true, in order
  // Rank 0's time for the step: all of it, and the part inside all-reduces (0 without TP).
  uint64_t step_us = 0;
  uint64_t allreduce_us = 0;
  uint32_t allreduce_calls = 0;
};

// Scheduler -> cache, once per step (DESIGN.md §2: block reservation is batched). First what
// happened since the previous plan, in this order: a reset, computed positions, ended
// sequences; then the step's candidates, in the scheduler's order (per priority class: running
// by arrival, then waiting in queue order). The cache answers with a BlockPlan.
struct BlockCommit {
  RequestId id = 0;
  int32_t n_computed = 0;             // positions [0, n_computed) now hold their KV
  std::vector<TokenId> new_tokens;    // tokens up to n_computed the cache has not been sent yet
};

struct BlockCandidate {
  RequestId id = 0;
  std::vector<TokenId> new_tokens;    // the sequence's tokens the cache has not been sent yet
  int32_t n_tokens = 0;               // the sequence's tokens in all (prompt + generated)
  bool started = false;               // holds blocks (n_computed is then its computed positions)
  int32_t n_computed = 0;
  bool running = false;
  Priority priority = Priority::normal;
};

struct BlockPlanRequest {
  uint64_t plan_id = 0;
  bool reset = false;                 // the KV memory was lost: drop every table and cached block
  std::vector<BlockCommit> commits;
  std::vector<RequestId> ended;       // finished or failed: free the blocks, forget the tokens
  std::vector<BlockCandidate> candidates;
  int32_t max_batch_tokens = 0;       // the step's token budget
  int32_t max_batch_size = 0;         // sequences per step
};

// Cache -> scheduler: the step's sequences with their blocks, and who lost theirs.
struct PlannedSequence {
  RequestId id = 0;
  int32_t n_computed = 0;             // positions already computed (a prefix-cache hit when it just started)
  int32_t n_new = 0;                  // tokens to compute in this step
  std::vector<int32_t> block_table;   // covers n_computed + n_new positions
};

struct BlockPlan {
  uint64_t plan_id = 0;
  std::vector<PlannedSequence> chosen;
  std::vector<RequestId> preempted;   // in the order their blocks were taken back
  std::vector<BlockCopy> copies;      // partial-block copies for chosen sequences, before the step
  int32_t kv_blocks_used = 0;         // the cache's state after the plan, for stats
  int32_t kv_blocks_free = 0;
  uint64_t prefix_queries = 0;
  uint64_t prefix_hits = 0;
};

// A response-cache entry, scheduler <-> cache: a lookup sends the request (found = false); the
// answer and an insert carry the stored tokens and finish reason.
struct CachedResponse {
  GenerateRequest request;            // tokenized: the key is the prompt tokens and parameters
  bool found = false;
  std::vector<TokenId> tokens;
  FinishReason reason = FinishReason::stop;
};

struct ReplicaStats {
  int32_t waiting[kPriorityClasses] = {};
  int32_t running = 0;
  int32_t kv_blocks_used = 0;
  int32_t kv_blocks_free = 0;
  uint64_t prefix_queries = 0;        // prompt tokens looked up in the prefix cache
  uint64_t prefix_hits = 0;           // of which served from cached blocks
  uint64_t response_cache_hits = 0;
  uint64_t malformed_messages = 0;
  uint64_t preemptions = 0;           // sequences sent back to the queue to free KV blocks
  uint64_t shard_restarts = 0;        // shard actors respawned by the scheduler
  uint64_t scheduler_restarts = 0;    // schedulers respawned by the replica's supervisor
  uint64_t cache_restarts = 0;        // cache actors respawned by the scheduler
  uint64_t hung_shards = 0;           // shard groups replaced for a step past supervision.hang_timeout
  // Forward steps run, and their time on rank 0: all of it, and inside all-reduces.
  uint64_t steps = 0;
  uint64_t step_us = 0;
  uint64_t allreduce_us = 0;
  uint64_t allreduce_calls = 0;
  // Latency objectives (slo:, runtime/step_budget.hpp). Requests finished, and those that met
  // their TTFT and ITL objectives (goodput); those refused at admission for their TTFT
  // objective; first tokens later than their objective; output tokens after the first, and
  // those later than the ITL objective after the one before; steps with a stream under an ITL
  // objective, and those in which one of them waited longer than it.
  uint64_t slo_finished = 0;
  uint64_t slo_met = 0;
  uint64_t slo_refused = 0;
  uint64_t ttft_missed = 0;
  uint64_t itl_tokens = 0;
  uint64_t itl_tokens_over = 0;
  uint64_t itl_steps = 0;
  uint64_t itl_steps_over = 0;
  uint64_t itl_objective_us = 0;  // the tightest objective of the streams running now (0: none)
  int32_t step_budget = 0;        // the last step's token budget
};

// ---- The cluster's messages (docs/cluster.md) ----

// What a node needs to build one tensor-parallel rank of a replica's shard: the node loads the
// model from its own copy of the file and sizes the engine as the replica's scheduler says.
struct ShardSpec {
  std::string replica;     // the replica's name, for logs and status
  std::string model_path;  // the GGUF file, as the node sees it
  std::string device = "cpu";
  int32_t rank = 0;        // 0 <= rank < size
  int32_t size = 1;        // the replica's tensor-parallel size
  int32_t threads = 0;     // compute threads; 0: the node's default
  int32_t max_context = 0;
  int32_t max_batch_tokens = 512;
  int32_t max_seqs = 16;
  int32_t n_kv_blocks = 0;
  uint8_t q8_activations = 0;  // Q8Activations as its integer value
  int32_t kv_type = -1;        // TensorType as its integer value; -1: the model's default
};

// A replica's state as its scheduler reports it to the router, every few tens of milliseconds
// while it has work and at least once a second when idle.
struct ReplicaReport {
  std::string replica;
  int32_t waiting = 0;             // requests queued, all priorities
  int32_t running = 0;             // sequences in the running batch
  int64_t outstanding_tokens = 0;  // prompt tokens still to compute + tokens still to generate
  int32_t kv_blocks_used = 0;
  int32_t kv_blocks_free = 0;
  uint64_t prefix_queries = 0;
  uint64_t prefix_hits = 0;
  uint64_t tokens_generated = 0;   // since the replica started
  bool draining = false;           // takes no new requests
  // The hash chain of every full block in the replica's prefix cache (KvBlockManager's hashes),
  // sent only when it changed since the last report: `blocks_changed` says whether it did.
  bool blocks_changed = false;
  std::vector<uint64_t> cached_blocks;
  // Restarts since the replica started (its supervisor's of the scheduler; the current
  // scheduler's of its shard group and cache, and the groups replaced for a hang): what
  // `celer chaos` watches to see a fault found.
  uint64_t scheduler_restarts = 0, shard_restarts = 0, cache_restarts = 0, hung_shards = 0;
};

// The one routing message per request: what the router needs to pick a replica.
struct RouteQuery {
  std::string session_id;         // "" for none
  int32_t prompt_tokens = 0;
  int32_t max_tokens = 0;
  std::vector<uint64_t> block_hashes;  // the prompt's full blocks, hashed as the prefix cache does
  std::vector<std::string> exclude;    // replicas not to pick (a resumed request's dead replica)
};

// The model a cluster serves, as clients need to know it (celer bench sizes its prompts by it).
struct ModelInfo {
  std::string name;
  int32_t n_vocab = 0;
  int32_t max_context = 0;  // the serving context (max_context or the model's, capped)
};

// `celer status`: the cluster as its router sees it, as a JSON document (docs/cluster.md lists
// the fields); kept as text so that the command prints it without knowing its every field.
struct ClusterStatus {
  std::string json;
};

// A fault to inject (docs/chaos.md): refused by a cluster whose config does not say
// `chaos: enabled`.
struct ChaosFault {
  // kill .. sigstop act on an actor or a process; drop .. partition on the wire (docs/chaos.md).
  enum class Kind : uint8_t { kill, hang, slow, sigkill, sigstop, drop, delay, duplicate, corrupt, partition };
  Kind kind = Kind::kill;
  std::string role;     // kill: scheduler, cache or shard; hang, slow: shard
  std::string replica;
  int32_t rank = 0;     // a shard's tensor-parallel rank
  std::string node;     // sigkill, sigstop, partition; drop .. corrupt: one end of the link
  std::string peer;     // drop .. corrupt: the other end of the link
  double probability = 0;    // drop .. corrupt: each actor message's chance, 0 < p <= 1
  uint32_t duration_ms = 0;  // hang, slow, sigstop, and every wire fault
  uint32_t delay_ms = 0;     // slow: added to every step; delay: how long a message is held
  bool on_wire() const { return kind >= Kind::drop; }
  bool on_link() const { return on_wire() && kind != Kind::partition; }
};

struct ChaosReply {
  std::string node;  // where the fault was carried out
  int32_t pid = 0;   // that node's process
  std::string message;
};

}  // namespace celer
