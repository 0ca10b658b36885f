// Encoding is a direct copy of each struct into its Cap'n Proto builder. Decoding reads each
// pointer exactly once (a getter follows a pointer and charges the traversal limit every time it
// is called), checks every field as it copies it into the plain struct, and reports the first
// failure as "<Message>.<field>: <why>". Checks throw celer::Error internally; decode() turns
// that, and every kj::Exception Cap'n Proto raises on malformed framing, into an error value.
#include "schema/codec.hpp"

#include <capnp/message.h>
#include <capnp/serialize.h>
#include <kj/exception.h>
#include <kj/io.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <exception>
#include <string>

#include "kernels/matmul.hpp"
#include "kernels/types.hpp"
#include "runtime/error.hpp"
#include "runtime/sampler.hpp"
#include "schema/celer.capnp.h"

namespace celer {
namespace {

namespace cs = capnp_schema;
namespace lim = wire_limits;

// Cap'n Proto list counts are 29 bits.
constexpr size_t kMaxCapnpListElements = (size_t{1} << 29) - 1;

// ---------------------------------------------------------------------------------------------
// encode

unsigned list_size(size_t n, const char* field) {
  if (n > kMaxCapnpListElements)
    throw Error(ErrorCode::invalid_argument, std::string("encode: ") + field + " has too many elements for Cap'n Proto");
  return static_cast<unsigned>(n);
}

// std::string's buffer is NUL-terminated, as capnp::Text requires.
capnp::Text::Reader text(const std::string& s) { return capnp::Text::Reader(s.data(), s.size()); }

// Empty strings are left as null pointers (they read back as ""), saving a word each.
template <class Setter>
void put_text(const std::string& s, Setter set) {
  if (!s.empty()) set(text(s));
}

// Token ids, block ids (int32) and request ids (uint64) alike.
template <class T>
void put_ints(typename capnp::List<T>::Builder out, const std::vector<T>& in) {
  for (unsigned i = 0; i < in.size(); ++i) out.set(i, in[i]);
}

void put_copies(capnp::List<cs::BlockCopy>::Builder out, const std::vector<BlockCopy>& in) {
  for (unsigned i = 0; i < in.size(); ++i) {
    out[i].setSrc(in[i].src);
    out[i].setDst(in[i].dst);
  }
}

void put(cs::SamplingParams::Builder b, const SamplingParams& p) {
  b.setTemperature(p.temperature);
  b.setTopK(p.top_k);
  b.setTopP(p.top_p);
  b.setMinP(p.min_p);
  b.setRepeatPenalty(p.repeat_penalty);
  b.setRepeatLastN(p.repeat_last_n);
  b.setSeed(p.seed);
}

void put(cs::GenerateRequest::Builder b, const GenerateRequest& m) {
  b.setId(m.id);
  put_text(m.prompt_text, [&](auto t) { b.setPromptText(t); });
  put_ints(b.initPromptTokens(list_size(m.prompt_tokens.size(), "prompt_tokens")), m.prompt_tokens);
  put(b.initSampling(), m.sampling);
  b.setMaxTokens(m.max_tokens);
  auto stop = b.initStop(list_size(m.stop.size(), "stop"));
  for (unsigned i = 0; i < m.stop.size(); ++i) stop.set(i, text(m.stop[i]));
  b.setIgnoreEos(m.ignore_eos);
  b.setAddBos(m.add_bos);
  b.setPriority(static_cast<cs::Priority>(static_cast<uint16_t>(m.priority)));
  put_text(m.tenant, [&](auto t) { b.setTenant(t); });
  put_text(m.session_id, [&](auto t) { b.setSessionId(t); });
  b.setDeadlineMs(m.deadline_ms);
  b.setLogprobs(m.logprobs);
  b.setParseSpecial(m.parse_special);
  b.setPriorityGiven(m.priority_given);
}

void put(cs::TokenLogprob::Builder b, const TokenLogprob& m) {
  b.setToken(m.token);
  b.setLogprob(m.logprob);
  put_ints(b.initTopTokens(list_size(m.top_tokens.size(), "top_tokens")), m.top_tokens);
  auto top = b.initTopLogprobs(list_size(m.top_logprobs.size(), "top_logprobs"));
  for (unsigned i = 0; i < m.top_logprobs.size(); ++i) top.set(i, m.top_logprobs[i]);
}

void put(cs::StageTimes::Builder b, const StageTimes& t) {
  b.setReceivedUs(t.received_us);
  b.setQueuedUs(t.queued_us);
  b.setAdmittedUs(t.admitted_us);
  b.setPrefillDoneUs(t.prefill_done_us);
  b.setFirstTokenUs(t.first_token_us);
  b.setLastTokenUs(t.last_token_us);
  b.setFinishedUs(t.finished_us);
}

void put(cs::TokenChunk::Builder b, const TokenChunk& m) {
  b.setId(m.id);
  b.setFirstIndex(m.first_index);
  put_ints(b.initTokens(list_size(m.tokens.size(), "tokens")), m.tokens);
  put_text(m.text, [&](auto t) { b.setText(t); });
  if (!m.logprobs.empty()) {
    auto lp = b.initLogprobs(list_size(m.logprobs.size(), "logprobs"));
    for (unsigned i = 0; i < m.logprobs.size(); ++i) put(lp[i], m.logprobs[i]);
  }
}

void put(cs::Finished::Builder b, const Finished& m) {
  b.setId(m.id);
  b.setReason(static_cast<cs::FinishReason>(static_cast<uint16_t>(m.reason)));
  b.setPromptTokens(m.prompt_tokens);
  b.setCompletionTokens(m.completion_tokens);
  b.setCachedTokens(m.cached_tokens);
  put(b.initTimes(), m.times);
}

void put(cs::ErrorReply::Builder b, const ErrorReply& m) {
  b.setId(m.id);
  b.setKind(static_cast<cs::ErrorKind>(static_cast<uint16_t>(m.kind)));
  put_text(m.message, [&](auto t) { b.setMessage(t); });
}

void put(cs::Cancel::Builder b, const Cancel& m) { b.setId(m.id); }

void put(cs::StepSequence::Builder b, const StepSequence& s) {
  b.setId(s.id);
  put_ints(b.initTokens(list_size(s.tokens.size(), "tokens")), s.tokens);
  b.setNPast(s.n_past);
  put_ints(b.initBlockTable(list_size(s.block_table.size(), "block_table")), s.block_table);
  b.setSample(s.sample);
  put(b.initSampling(), s.sampling);
  put_ints(b.initRecent(list_size(s.recent.size(), "recent")), s.recent);
  b.setLogprobs(s.logprobs);
}

void put(cs::Step::Builder b, const Step& m) {
  b.setStepId(m.step_id);
  put_copies(b.initCopies(list_size(m.copies.size(), "copies")), m.copies);
  auto seqs = b.initSequences(list_size(m.sequences.size(), "sequences"));
  for (unsigned i = 0; i < m.sequences.size(); ++i) put(seqs[i], m.sequences[i]);
}

void put(cs::StepResult::Builder b, const StepResult& m) {
  b.setStepId(m.step_id);
  auto tokens = b.initTokens(list_size(m.tokens.size(), "tokens"));
  for (unsigned i = 0; i < m.tokens.size(); ++i) {
    tokens[i].setId(m.tokens[i].id);
    tokens[i].setToken(m.tokens[i].token);
    if (m.tokens[i].has_logprob) {
      tokens[i].setHasLogprob(true);
      put(tokens[i].initLogprob(), m.tokens[i].logprob);
    }
  }
  b.setStepUs(m.step_us);
  b.setAllreduceUs(m.allreduce_us);
  b.setAllreduceCalls(m.allreduce_calls);
}

void put(cs::ReplicaStats::Builder b, const ReplicaStats& m) {
  auto waiting = b.initWaiting(kPriorityClasses);
  for (int i = 0; i < kPriorityClasses; ++i) waiting.set(i, m.waiting[i]);
  b.setRunning(m.running);
  b.setKvBlocksUsed(m.kv_blocks_used);
  b.setKvBlocksFree(m.kv_blocks_free);
  b.setPrefixQueries(m.prefix_queries);
  b.setPrefixHits(m.prefix_hits);
  b.setResponseCacheHits(m.response_cache_hits);
  b.setPreemptions(m.preemptions);
  b.setShardRestarts(m.shard_restarts);
  b.setSchedulerRestarts(m.scheduler_restarts);
  b.setCacheRestarts(m.cache_restarts);
  b.setMalformedMessages(m.malformed_messages);
  b.setSteps(m.steps);
  b.setStepUs(m.step_us);
  b.setAllreduceUs(m.allreduce_us);
  b.setAllreduceCalls(m.allreduce_calls);
  b.setSloFinished(m.slo_finished);
  b.setSloMet(m.slo_met);
  b.setSloRefused(m.slo_refused);
  b.setTtftMissed(m.ttft_missed);
  b.setItlTokens(m.itl_tokens);
  b.setItlTokensOver(m.itl_tokens_over);
  b.setItlSteps(m.itl_steps);
  b.setItlStepsOver(m.itl_steps_over);
  b.setItlObjectiveUs(m.itl_objective_us);
  b.setStepBudget(m.step_budget);
  b.setHungShards(m.hung_shards);
}

void put(cs::BlockPlanRequest::Builder b, const BlockPlanRequest& m) {
  b.setPlanId(m.plan_id);
  b.setReset(m.reset);
  auto commits = b.initCommits(list_size(m.commits.size(), "commits"));
  for (unsigned i = 0; i < m.commits.size(); ++i) {
    commits[i].setId(m.commits[i].id);
    commits[i].setNComputed(m.commits[i].n_computed);
    put_ints(commits[i].initNewTokens(list_size(m.commits[i].new_tokens.size(), "new_tokens")), m.commits[i].new_tokens);
  }
  put_ints(b.initEnded(list_size(m.ended.size(), "ended")), m.ended);
  auto cands = b.initCandidates(list_size(m.candidates.size(), "candidates"));
  for (unsigned i = 0; i < m.candidates.size(); ++i) {
    const BlockCandidate& c = m.candidates[i];
    cands[i].setId(c.id);
    put_ints(cands[i].initNewTokens(list_size(c.new_tokens.size(), "new_tokens")), c.new_tokens);
    cands[i].setNTokens(c.n_tokens);
    cands[i].setStarted(c.started);
    cands[i].setNComputed(c.n_computed);
    cands[i].setRunning(c.running);
    cands[i].setPriority(static_cast<cs::Priority>(static_cast<uint16_t>(c.priority)));
  }
  b.setMaxBatchTokens(m.max_batch_tokens);
  b.setMaxBatchSize(m.max_batch_size);
}

void put(cs::BlockPlan::Builder b, const BlockPlan& m) {
  b.setPlanId(m.plan_id);
  auto chosen = b.initChosen(list_size(m.chosen.size(), "chosen"));
  for (unsigned i = 0; i < m.chosen.size(); ++i) {
    const PlannedSequence& p = m.chosen[i];
    chosen[i].setId(p.id);
    chosen[i].setNComputed(p.n_computed);
    chosen[i].setNNew(p.n_new);
    put_ints(chosen[i].initBlockTable(list_size(p.block_table.size(), "block_table")), p.block_table);
  }
  put_ints(b.initPreempted(list_size(m.preempted.size(), "preempted")), m.preempted);
  put_copies(b.initCopies(list_size(m.copies.size(), "copies")), m.copies);
  b.setKvBlocksUsed(m.kv_blocks_used);
  b.setKvBlocksFree(m.kv_blocks_free);
  b.setPrefixQueries(m.prefix_queries);
  b.setPrefixHits(m.prefix_hits);
}

void put(cs::CachedResponse::Builder b, const CachedResponse& m) {
  put(b.initRequest(), m.request);
  b.setFound(m.found);
  put_ints(b.initTokens(list_size(m.tokens.size(), "tokens")), m.tokens);
  b.setReason(static_cast<cs::FinishReason>(static_cast<uint16_t>(m.reason)));
}

void put(cs::ShardSpec::Builder b, const ShardSpec& m) {
  put_text(m.replica, [&](auto t) { b.setReplica(t); });
  put_text(m.model_path, [&](auto t) { b.setModelPath(t); });
  b.setDevice(text(m.device));  // always: "" left null would read back as the default "cpu"
  b.setRank(m.rank);
  b.setSize(m.size);
  b.setThreads(m.threads);
  b.setMaxContext(m.max_context);
  b.setMaxBatchTokens(m.max_batch_tokens);
  b.setMaxSeqs(m.max_seqs);
  b.setNKvBlocks(m.n_kv_blocks);
  b.setQ8Activations(m.q8_activations);
  b.setKvType(m.kv_type);
}

void put(cs::ReplicaReport::Builder b, const ReplicaReport& m) {
  put_text(m.replica, [&](auto t) { b.setReplica(t); });
  b.setWaiting(m.waiting);
  b.setRunning(m.running);
  b.setOutstandingTokens(m.outstanding_tokens);
  b.setKvBlocksUsed(m.kv_blocks_used);
  b.setKvBlocksFree(m.kv_blocks_free);
  b.setPrefixQueries(m.prefix_queries);
  b.setPrefixHits(m.prefix_hits);
  b.setTokensGenerated(m.tokens_generated);
  b.setSchedulerRestarts(m.scheduler_restarts);
  b.setShardRestarts(m.shard_restarts);
  b.setCacheRestarts(m.cache_restarts);
  b.setHungShards(m.hung_shards);
  b.setDraining(m.draining);
  b.setBlocksChanged(m.blocks_changed);
  if (!m.cached_blocks.empty())
    put_ints(b.initCachedBlocks(list_size(m.cached_blocks.size(), "cached_blocks")), m.cached_blocks);
}

void put(cs::RouteQuery::Builder b, const RouteQuery& m) {
  put_text(m.session_id, [&](auto t) { b.setSessionId(t); });
  b.setPromptTokens(m.prompt_tokens);
  b.setMaxTokens(m.max_tokens);
  if (!m.block_hashes.empty())
    put_ints(b.initBlockHashes(list_size(m.block_hashes.size(), "block_hashes")), m.block_hashes);
  if (!m.exclude.empty()) {
    auto exclude = b.initExclude(list_size(m.exclude.size(), "exclude"));
    for (unsigned i = 0; i < m.exclude.size(); ++i) exclude.set(i, text(m.exclude[i]));
  }
}

void put(cs::ModelInfo::Builder b, const ModelInfo& m) {
  put_text(m.name, [&](auto t) { b.setName(t); });
  b.setNVocab(m.n_vocab);
  b.setMaxContext(m.max_context);
}

void put(cs::ClusterStatus::Builder b, const ClusterStatus& m) {
  put_text(m.json, [&](auto t) { b.setJson(t); });
}

void put(cs::ChaosFault::Builder b, const ChaosFault& m) {
  b.setKind(static_cast<cs::ChaosFault::Kind>(m.kind));
  put_text(m.role, [&](auto t) { b.setRole(t); });
  put_text(m.replica, [&](auto t) { b.setReplica(t); });
  b.setRank(m.rank);
  put_text(m.node, [&](auto t) { b.setNode(t); });
  b.setDurationMs(m.duration_ms);
  b.setDelayMs(m.delay_ms);
  put_text(m.peer, [&](auto t) { b.setPeer(t); });
  b.setProbability(m.probability);
}

void put(cs::ChaosReply::Builder b, const ChaosReply& m) {
  put_text(m.node, [&](auto t) { b.setNode(t); });
  b.setPid(m.pid);
  put_text(m.message, [&](auto t) { b.setMessage(t); });
}

struct PutInEnvelope {
  cs::Envelope::Builder env;
  void operator()(const GenerateRequest& m) { put(env.initGenerateRequest(), m); }
  void operator()(const TokenChunk& m) { put(env.initTokenChunk(), m); }
  void operator()(const Finished& m) { put(env.initFinished(), m); }
  void operator()(const ErrorReply& m) { put(env.initErrorReply(), m); }
  void operator()(const Cancel& m) { put(env.initCancel(), m); }
  void operator()(const Step& m) { put(env.initStep(), m); }
  void operator()(const StepResult& m) { put(env.initStepResult(), m); }
  void operator()(const ReplicaStats& m) { put(env.initReplicaStats(), m); }
  void operator()(const BlockPlanRequest& m) { put(env.initBlockPlanRequest(), m); }
  void operator()(const BlockPlan& m) { put(env.initBlockPlan(), m); }
  void operator()(const CachedResponse& m) { put(env.initCachedResponse(), m); }
  void operator()(const ShardSpec& m) { put(env.initShardSpec(), m); }
  void operator()(const ReplicaReport& m) { put(env.initReplicaReport(), m); }
  void operator()(const RouteQuery& m) { put(env.initRouteQuery(), m); }
  void operator()(const ModelInfo& m) { put(env.initModelInfo(), m); }
  void operator()(const ClusterStatus& m) { put(env.initClusterStatus(), m); }
  void operator()(const ChaosFault& m) { put(env.initChaosFault(), m); }
  void operator()(const ChaosReply& m) { put(env.initChaosReply(), m); }
};

// ---------------------------------------------------------------------------------------------
// decode: checks

// Where a field lives: a message ("GenerateRequest") or an element of a list in one
// ("Step.sequences", 3). Formatted only when a check fails, so the happy path builds no strings.
struct At {
  const char* owner;
  int64_t index = -1;

  std::string path(const char* field, int64_t elem = -1) const {
    std::string s = owner;
    if (index >= 0) s += "[" + std::to_string(index) + "]";
    s += ".";
    s += field;
    if (elem >= 0) s += "[" + std::to_string(elem) + "]";
    return s;
  }
};

[[noreturn]] void reject(const At& at, const char* field, const std::string& why, int64_t elem = -1) {
  throw Error(ErrorCode::invalid_argument, at.path(field, elem) + ": " + why);
}

template <class T>
T in_range(T v, T lo, T hi, const At& at, const char* field) {
  if (v < lo || v > hi)
    reject(at, field, "must be in [" + std::to_string(lo) + ", " + std::to_string(hi) + "], got " + std::to_string(v));
  return v;
}

template <class T>
T non_negative(T v, const At& at, const char* field) {
  if (v < 0) reject(at, field, "must be >= 0, got " + std::to_string(v));
  return v;
}

// Cap'n Proto hands out any 16-bit value for an enum field, including ones this build does not know.
template <class Enum, class WireEnum>
Enum read_enum(WireEnum w, int n_values, const At& at, const char* field) {
  const auto raw = static_cast<uint16_t>(w);
  if (raw >= n_values)
    reject(at, field, "unknown value " + std::to_string(raw) + " (expected < " + std::to_string(n_values) + ")");
  return static_cast<Enum>(raw);
}

// A string of at most `max` bytes.
std::string read_text(capnp::Text::Reader t, size_t max, const At& at, const char* field, int64_t elem = -1) {
  if (t.size() > max) reject(at, field, std::to_string(t.size()) + " bytes, more than " + std::to_string(max), elem);
  return std::string(t.cStr(), t.size());
}

std::string read_text(capnp::Text::Reader t, const At& at, const char* field, int64_t elem = -1) {
  return read_text(t, lim::kMaxTextBytes, at, field, elem);
}

void check_count(size_t n, size_t max, const At& at, const char* field) {
  if (n > max) reject(at, field, std::to_string(n) + " entries, more than " + std::to_string(max));
}

// Token ids and block ids: at most `max` of them, each >= 0.
std::vector<int32_t> read_ids(capnp::List<int32_t>::Reader list, size_t max, const At& at, const char* field) {
  check_count(list.size(), max, at, field);
  std::vector<int32_t> out(list.size());
  for (unsigned i = 0; i < list.size(); ++i) {
    const int32_t v = list[i];
    if (v < 0) reject(at, field, "must be >= 0, got " + std::to_string(v), i);
    out[i] = v;
  }
  return out;
}

SamplingParams read(cs::SamplingParams::Reader r, const At& at) {
  SamplingParams p;
  p.temperature = r.getTemperature();
  p.top_k = r.getTopK();
  p.top_p = r.getTopP();
  p.min_p = r.getMinP();
  p.repeat_penalty = r.getRepeatPenalty();
  p.repeat_last_n = r.getRepeatLastN();
  p.seed = r.getSeed();
  // One rule set for every receiver: the sampler's own (its messages name the field).
  try {
    validate(p);
  } catch (const Error& e) {
    reject(at, "sampling", e.what());
  }
  return p;
}

// ---------------------------------------------------------------------------------------------
// decode: one function per message

GenerateRequest read(cs::GenerateRequest::Reader r) {
  const At at{"GenerateRequest"};
  GenerateRequest m;
  m.id = r.getId();
  m.prompt_text = read_text(r.getPromptText(), at, "prompt_text");
  m.prompt_tokens = read_ids(r.getPromptTokens(), lim::kMaxPromptTokens, at, "prompt_tokens");
  m.sampling = read(r.getSampling(), at);
  m.max_tokens = in_range(r.getMaxTokens(), 1, lim::kMaxMaxTokens, at, "max_tokens");
  const auto stop = r.getStop();
  check_count(stop.size(), lim::kMaxStopStrings, at, "stop");
  m.stop.reserve(stop.size());
  for (unsigned i = 0; i < stop.size(); ++i) m.stop.push_back(read_text(stop[i], at, "stop", i));
  m.ignore_eos = r.getIgnoreEos();
  m.add_bos = r.getAddBos();
  m.priority = read_enum<Priority>(r.getPriority(), kPriorityClasses, at, "priority");
  m.tenant = read_text(r.getTenant(), at, "tenant");
  m.session_id = read_text(r.getSessionId(), at, "session_id");
  m.deadline_ms = non_negative(r.getDeadlineMs(), at, "deadline_ms");
  m.logprobs = in_range(r.getLogprobs(), -1, kMaxTopLogprobs, at, "logprobs");
  m.parse_special = r.getParseSpecial();
  m.priority_given = r.getPriorityGiven();
  return m;
}

// A log-probability is <= 0 (the float rounding of a log-softmax may overshoot 0 slightly); NaN
// fails the comparison too.
float read_logprob(float v, const At& at, const char* field, int64_t elem = -1) {
  if (!(v <= 1e-3f)) reject(at, field, "must be a log-probability (<= 0), got " + std::to_string(v), elem);
  return v;
}

TokenLogprob read(cs::TokenLogprob::Reader r, const At& at) {
  TokenLogprob m;
  m.token = non_negative(r.getToken(), at, "token");
  m.logprob = read_logprob(r.getLogprob(), at, "logprob");
  m.top_tokens = read_ids(r.getTopTokens(), kMaxTopLogprobs, at, "top_tokens");
  const auto top = r.getTopLogprobs();
  if (top.size() != m.top_tokens.size())
    reject(at, "top_logprobs", std::to_string(top.size()) + " entries for " + std::to_string(m.top_tokens.size()) +
                                   " top_tokens");
  m.top_logprobs.resize(top.size());
  for (unsigned i = 0; i < top.size(); ++i) m.top_logprobs[i] = read_logprob(top[i], at, "top_logprobs", i);
  return m;
}

StageTimes read(cs::StageTimes::Reader r, const At& at) {
  StageTimes t;
  t.received_us = non_negative(r.getReceivedUs(), at, "times.received_us");
  t.queued_us = non_negative(r.getQueuedUs(), at, "times.queued_us");
  t.admitted_us = non_negative(r.getAdmittedUs(), at, "times.admitted_us");
  t.prefill_done_us = non_negative(r.getPrefillDoneUs(), at, "times.prefill_done_us");
  t.first_token_us = non_negative(r.getFirstTokenUs(), at, "times.first_token_us");
  t.last_token_us = non_negative(r.getLastTokenUs(), at, "times.last_token_us");
  t.finished_us = non_negative(r.getFinishedUs(), at, "times.finished_us");
  return t;
}

TokenChunk read(cs::TokenChunk::Reader r) {
  const At at{"TokenChunk"};
  TokenChunk m;
  m.id = r.getId();
  m.first_index = non_negative(r.getFirstIndex(), at, "first_index");
  m.tokens = read_ids(r.getTokens(), lim::kMaxChunkTokens, at, "tokens");
  m.text = read_text(r.getText(), at, "text");
  const auto lp = r.getLogprobs();
  if (lp.size() != 0 && lp.size() != m.tokens.size())
    reject(at, "logprobs", std::to_string(lp.size()) + " entries for " + std::to_string(m.tokens.size()) +
                               " tokens (expected none or one per token)");
  m.logprobs.reserve(lp.size());
  for (unsigned i = 0; i < lp.size(); ++i) m.logprobs.push_back(read(lp[i], At{"TokenChunk.logprobs", i}));
  return m;
}

Finished read(cs::Finished::Reader r) {
  const At at{"Finished"};
  Finished m;
  m.id = r.getId();
  m.reason = read_enum<FinishReason>(r.getReason(), static_cast<int>(FinishReason::cancelled) + 1, at, "reason");
  m.prompt_tokens = non_negative(r.getPromptTokens(), at, "prompt_tokens");
  m.completion_tokens = non_negative(r.getCompletionTokens(), at, "completion_tokens");
  // Cached tokens are a part of the prompt.
  m.cached_tokens = in_range(r.getCachedTokens(), 0, m.prompt_tokens, at, "cached_tokens");
  m.times = read(r.getTimes(), at);
  return m;
}

ErrorReply read(cs::ErrorReply::Reader r) {
  const At at{"ErrorReply"};
  ErrorReply m;
  m.id = r.getId();
  m.kind = read_enum<ErrorKind>(r.getKind(), static_cast<int>(ErrorKind::slo_unattainable) + 1, at, "kind");
  m.message = read_text(r.getMessage(), at, "message");
  return m;
}

Cancel read(cs::Cancel::Reader r) { return Cancel{r.getId()}; }

// A block table (block ids >= 0) that must cover `positions` positions; `which` says in errors
// which positions they are.
std::vector<int32_t> read_block_table(capnp::List<int32_t>::Reader list, int64_t positions, const At& at,
                                      const char* which) {
  std::vector<int32_t> table = read_ids(list, lim::kMaxPositions / lim::kBlockTokens, at, "block_table");
  const int64_t needed = (positions + lim::kBlockTokens - 1) / lim::kBlockTokens;
  if (static_cast<int64_t>(table.size()) < needed)
    reject(at, "block_table", std::to_string(table.size()) + " blocks cover fewer than the " + std::to_string(positions) +
                                  " positions" + which + " (needs " + std::to_string(needed) + ")");
  return table;
}

StepSequence read(cs::StepSequence::Reader r, unsigned index) {
  const At at{"Step.sequences", index};
  StepSequence s;
  s.id = r.getId();
  s.tokens = read_ids(r.getTokens(), lim::kMaxSequenceTokens, at, "tokens");
  if (s.tokens.empty()) reject(at, "tokens", "must not be empty (a sequence in a step computes at least one token)");
  s.n_past = non_negative(r.getNPast(), at, "n_past");
  // 64-bit sums: n_past near INT32_MAX must not wrap.
  const int64_t positions = int64_t{s.n_past} + static_cast<int64_t>(s.tokens.size());
  if (positions > lim::kMaxPositions)
    reject(at, "n_past", "n_past + tokens = " + std::to_string(positions) + " positions, more than " +
                             std::to_string(lim::kMaxPositions));
  s.block_table = read_block_table(r.getBlockTable(), positions, at, " n_past + tokens");
  s.sample = r.getSample();
  // Checked even when sample is false: a sender that fills it with garbage is broken either way.
  s.sampling = read(r.getSampling(), at);
  s.recent = read_ids(r.getRecent(), lim::kMaxRecentTokens, at, "recent");
  s.logprobs = in_range(r.getLogprobs(), -1, kMaxTopLogprobs, at, "logprobs");
  return s;
}

// Block copies (src -> dst) of a Step or a BlockPlan: block ids, each >= 0. `elements` names
// the list's elements in errors ("Step.copies").
std::vector<BlockCopy> read_copies(capnp::List<cs::BlockCopy>::Reader list, const At& at, const char* elements) {
  check_count(list.size(), lim::kMaxStepCopies, at, "copies");
  std::vector<BlockCopy> out(list.size());
  for (unsigned i = 0; i < list.size(); ++i) {
    const At copy_at{elements, i};
    out[i].src = non_negative(list[i].getSrc(), copy_at, "src");
    out[i].dst = non_negative(list[i].getDst(), copy_at, "dst");
  }
  return out;
}

Step read(cs::Step::Reader r) {
  const At at{"Step"};
  Step m;
  m.step_id = r.getStepId();
  m.copies = read_copies(r.getCopies(), at, "Step.copies");
  const auto seqs = r.getSequences();
  check_count(seqs.size(), lim::kMaxStepSequences, at, "sequences");
  m.sequences.reserve(seqs.size());
  for (unsigned i = 0; i < seqs.size(); ++i) m.sequences.push_back(read(seqs[i], i));
  return m;
}

StepResult read(cs::StepResult::Reader r) {
  const At at{"StepResult"};
  StepResult m;
  m.step_id = r.getStepId();
  const auto tokens = r.getTokens();
  check_count(tokens.size(), lim::kMaxSampledTokens, at, "tokens");
  m.tokens.resize(tokens.size());
  for (unsigned i = 0; i < tokens.size(); ++i) {
    m.tokens[i].id = tokens[i].getId();
    const At token_at{"StepResult.tokens", i};
    m.tokens[i].token = non_negative(tokens[i].getToken(), token_at, "token");
    m.tokens[i].has_logprob = tokens[i].getHasLogprob();
    if (m.tokens[i].has_logprob) m.tokens[i].logprob = read(tokens[i].getLogprob(), token_at);
  }
  m.step_us = r.getStepUs();
  m.allreduce_us = in_range<uint64_t>(r.getAllreduceUs(), 0, m.step_us, at, "allreduce_us");
  m.allreduce_calls = r.getAllreduceCalls();
  return m;
}

ReplicaStats read(cs::ReplicaStats::Reader r) {
  const At at{"ReplicaStats"};
  ReplicaStats m;
  const auto waiting = r.getWaiting();
  if (waiting.size() != kPriorityClasses)
    reject(at, "waiting", std::to_string(waiting.size()) + " entries, expected one per priority class (" +
                              std::to_string(kPriorityClasses) + ")");
  for (int i = 0; i < kPriorityClasses; ++i) {
    m.waiting[i] = waiting[i];
    if (m.waiting[i] < 0) reject(at, "waiting", "must be >= 0, got " + std::to_string(m.waiting[i]), i);
  }
  m.running = non_negative(r.getRunning(), at, "running");
  m.kv_blocks_used = non_negative(r.getKvBlocksUsed(), at, "kv_blocks_used");
  m.kv_blocks_free = non_negative(r.getKvBlocksFree(), at, "kv_blocks_free");
  m.prefix_queries = r.getPrefixQueries();
  m.prefix_hits = in_range<uint64_t>(r.getPrefixHits(), 0, m.prefix_queries, at, "prefix_hits");
  m.response_cache_hits = r.getResponseCacheHits();
  m.malformed_messages = r.getMalformedMessages();
  m.preemptions = r.getPreemptions();
  m.shard_restarts = r.getShardRestarts();
  m.scheduler_restarts = r.getSchedulerRestarts();
  m.cache_restarts = r.getCacheRestarts();
  m.steps = r.getSteps();
  m.step_us = r.getStepUs();
  m.allreduce_us = in_range<uint64_t>(r.getAllreduceUs(), 0, m.step_us, at, "allreduce_us");
  m.allreduce_calls = r.getAllreduceCalls();
  m.slo_finished = r.getSloFinished();
  m.slo_met = in_range<uint64_t>(r.getSloMet(), 0, m.slo_finished, at, "slo_met");
  m.slo_refused = r.getSloRefused();
  m.ttft_missed = r.getTtftMissed();
  m.itl_tokens = r.getItlTokens();
  m.itl_tokens_over = in_range<uint64_t>(r.getItlTokensOver(), 0, m.itl_tokens, at, "itl_tokens_over");
  m.itl_steps = r.getItlSteps();
  m.itl_steps_over = in_range<uint64_t>(r.getItlStepsOver(), 0, m.itl_steps, at, "itl_steps_over");
  m.itl_objective_us = r.getItlObjectiveUs();
  m.step_budget = non_negative(r.getStepBudget(), at, "step_budget");
  m.hung_shards = r.getHungShards();
  return m;
}

// Request ids and block hashes alike: any 64-bit value, at most `max` of them.
std::vector<uint64_t> read_u64s(capnp::List<uint64_t>::Reader list, size_t max, const At& at, const char* field) {
  check_count(list.size(), max, at, field);
  std::vector<RequestId> out(list.size());
  for (unsigned i = 0; i < list.size(); ++i) out[i] = list[i];
  return out;
}

BlockPlanRequest read(cs::BlockPlanRequest::Reader r) {
  const At at{"BlockPlanRequest"};
  BlockPlanRequest m;
  m.plan_id = r.getPlanId();
  m.reset = r.getReset();
  const auto commits = r.getCommits();
  check_count(commits.size(), lim::kMaxPlanSequences, at, "commits");
  m.commits.resize(commits.size());
  for (unsigned i = 0; i < commits.size(); ++i) {
    const At c_at{"BlockPlanRequest.commits", i};
    m.commits[i].id = commits[i].getId();
    m.commits[i].n_computed = in_range<int32_t>(commits[i].getNComputed(), 0, lim::kMaxPositions, c_at, "n_computed");
    m.commits[i].new_tokens = read_ids(commits[i].getNewTokens(), lim::kMaxPositions, c_at, "new_tokens");
    if (static_cast<int64_t>(m.commits[i].new_tokens.size()) > m.commits[i].n_computed)
      reject(c_at, "new_tokens", std::to_string(m.commits[i].new_tokens.size()) + " new tokens, more than n_computed " +
                                     std::to_string(m.commits[i].n_computed));
  }
  m.ended = read_u64s(r.getEnded(), lim::kMaxPlanSequences, at, "ended");
  const auto cands = r.getCandidates();
  check_count(cands.size(), lim::kMaxPlanSequences, at, "candidates");
  m.candidates.resize(cands.size());
  for (unsigned i = 0; i < cands.size(); ++i) {
    const At c_at{"BlockPlanRequest.candidates", i};
    BlockCandidate& c = m.candidates[i];
    c.id = cands[i].getId();
    c.new_tokens = read_ids(cands[i].getNewTokens(), lim::kMaxPositions, c_at, "new_tokens");
    c.n_tokens = in_range<int32_t>(cands[i].getNTokens(), 1, lim::kMaxPositions, c_at, "n_tokens");
    if (static_cast<int64_t>(c.new_tokens.size()) > c.n_tokens)
      reject(c_at, "new_tokens", std::to_string(c.new_tokens.size()) + " new tokens, more than n_tokens " + std::to_string(c.n_tokens));
    c.started = cands[i].getStarted();
    c.n_computed = in_range<int32_t>(cands[i].getNComputed(), 0, c.n_tokens, c_at, "n_computed");
    c.running = cands[i].getRunning();
    c.priority = read_enum<Priority>(cands[i].getPriority(), kPriorityClasses, c_at, "priority");
  }
  m.max_batch_tokens = in_range<int32_t>(r.getMaxBatchTokens(), 1, lim::kMaxPositions, at, "max_batch_tokens");
  m.max_batch_size = in_range<int32_t>(r.getMaxBatchSize(), 1, static_cast<int32_t>(lim::kMaxStepSequences), at, "max_batch_size");
  return m;
}

BlockPlan read(cs::BlockPlan::Reader r) {
  const At at{"BlockPlan"};
  BlockPlan m;
  m.plan_id = r.getPlanId();
  const auto chosen = r.getChosen();
  check_count(chosen.size(), lim::kMaxStepSequences, at, "chosen");
  m.chosen.resize(chosen.size());
  for (unsigned i = 0; i < chosen.size(); ++i) {
    const At p_at{"BlockPlan.chosen", i};
    PlannedSequence& p = m.chosen[i];
    p.id = chosen[i].getId();
    p.n_computed = in_range<int32_t>(chosen[i].getNComputed(), 0, lim::kMaxPositions, p_at, "n_computed");
    p.n_new = in_range<int32_t>(chosen[i].getNNew(), 1, lim::kMaxPositions, p_at, "n_new");
    const int64_t positions = int64_t{p.n_computed} + p.n_new;
    if (positions > lim::kMaxPositions)
      reject(p_at, "n_new", "n_computed + n_new = " + std::to_string(positions) + " positions, more than " +
                                std::to_string(lim::kMaxPositions));
    p.block_table = read_block_table(chosen[i].getBlockTable(), positions, p_at, "");
  }
  m.preempted = read_u64s(r.getPreempted(), lim::kMaxPlanSequences, at, "preempted");
  m.copies = read_copies(r.getCopies(), at, "BlockPlan.copies");
  m.kv_blocks_used = non_negative(r.getKvBlocksUsed(), at, "kv_blocks_used");
  m.kv_blocks_free = non_negative(r.getKvBlocksFree(), at, "kv_blocks_free");
  m.prefix_queries = r.getPrefixQueries();
  m.prefix_hits = in_range<uint64_t>(r.getPrefixHits(), 0, m.prefix_queries, at, "prefix_hits");
  return m;
}

CachedResponse read(cs::CachedResponse::Reader r) {
  const At at{"CachedResponse"};
  CachedResponse m;
  m.request = read(r.getRequest());
  m.found = r.getFound();
  m.tokens = read_ids(r.getTokens(), static_cast<size_t>(lim::kMaxMaxTokens), at, "tokens");
  m.reason = read_enum<FinishReason>(r.getReason(), static_cast<int>(FinishReason::cancelled) + 1, at, "reason");
  return m;
}

// ---- the cluster's messages ----

ShardSpec read(cs::ShardSpec::Reader r) {
  const At at{"ShardSpec"};
  ShardSpec m;
  m.replica = read_text(r.getReplica(), lim::kMaxNameBytes, at, "replica");
  m.model_path = read_text(r.getModelPath(), lim::kMaxPathBytes, at, "model_path");
  if (m.model_path.empty()) reject(at, "model_path", "must not be empty");
  m.device = read_text(r.getDevice(), lim::kMaxNameBytes, at, "device");
  m.size = in_range<int32_t>(r.getSize(), 1, lim::kMaxTpSize, at, "size");
  m.rank = in_range<int32_t>(r.getRank(), 0, m.size - 1, at, "rank");
  m.threads = in_range<int32_t>(r.getThreads(), 0, lim::kMaxShardThreads, at, "threads");
  m.max_context = in_range<int32_t>(r.getMaxContext(), 1, lim::kMaxPositions, at, "max_context");
  m.max_batch_tokens = in_range<int32_t>(r.getMaxBatchTokens(), 1, lim::kMaxBatchTokens, at, "max_batch_tokens");
  m.max_seqs = in_range<int32_t>(r.getMaxSeqs(), 1, static_cast<int32_t>(lim::kMaxStepSequences), at, "max_seqs");
  m.n_kv_blocks = in_range<int32_t>(r.getNKvBlocks(), 1, lim::kMaxKvBlocks, at, "n_kv_blocks");
  m.q8_activations = r.getQ8Activations();
  if (m.q8_activations > static_cast<uint8_t>(Q8Activations::int8))
    reject(at, "q8_activations", "unknown Q8Activations value " + std::to_string(m.q8_activations) + " (expected " +
                                     std::to_string(static_cast<int>(Q8Activations::f32)) + " or " +
                                     std::to_string(static_cast<int>(Q8Activations::int8)) + ")");
  // The KV cache's element types, or -1 for the model's default.
  m.kv_type = r.getKvType();
  if (m.kv_type != -1 && m.kv_type != static_cast<int32_t>(TensorType::f32) &&
      m.kv_type != static_cast<int32_t>(TensorType::f16) && m.kv_type != static_cast<int32_t>(TensorType::q8_0))
    reject(at, "kv_type", "must be -1 (the model's default) or the TensorType of f32 (" +
                              std::to_string(static_cast<int32_t>(TensorType::f32)) + "), f16 (" +
                              std::to_string(static_cast<int32_t>(TensorType::f16)) + ") or q8_0 (" +
                              std::to_string(static_cast<int32_t>(TensorType::q8_0)) + "), got " + std::to_string(m.kv_type));
  return m;
}

ReplicaReport read(cs::ReplicaReport::Reader r) {
  const At at{"ReplicaReport"};
  ReplicaReport m;
  m.replica = read_text(r.getReplica(), lim::kMaxNameBytes, at, "replica");
  m.waiting = non_negative(r.getWaiting(), at, "waiting");
  m.running = non_negative(r.getRunning(), at, "running");
  m.outstanding_tokens = non_negative(r.getOutstandingTokens(), at, "outstanding_tokens");
  m.kv_blocks_used = non_negative(r.getKvBlocksUsed(), at, "kv_blocks_used");
  m.kv_blocks_free = non_negative(r.getKvBlocksFree(), at, "kv_blocks_free");
  m.prefix_queries = r.getPrefixQueries();
  m.prefix_hits = in_range<uint64_t>(r.getPrefixHits(), 0, m.prefix_queries, at, "prefix_hits");
  m.tokens_generated = r.getTokensGenerated();
  m.scheduler_restarts = r.getSchedulerRestarts();
  m.shard_restarts = r.getShardRestarts();
  m.cache_restarts = r.getCacheRestarts();
  m.hung_shards = r.getHungShards();
  m.draining = r.getDraining();
  m.blocks_changed = r.getBlocksChanged();
  m.cached_blocks = read_u64s(r.getCachedBlocks(), lim::kMaxCachedBlocks, at, "cached_blocks");
  return m;
}

RouteQuery read(cs::RouteQuery::Reader r) {
  const At at{"RouteQuery"};
  RouteQuery m;
  m.session_id = read_text(r.getSessionId(), at, "session_id");
  m.prompt_tokens = non_negative(r.getPromptTokens(), at, "prompt_tokens");
  m.max_tokens = non_negative(r.getMaxTokens(), at, "max_tokens");
  m.block_hashes = read_u64s(r.getBlockHashes(), lim::kMaxRouteBlocks, at, "block_hashes");
  const auto exclude = r.getExclude();
  check_count(exclude.size(), lim::kMaxExcluded, at, "exclude");
  m.exclude.reserve(exclude.size());
  for (unsigned i = 0; i < exclude.size(); ++i)
    m.exclude.push_back(read_text(exclude[i], lim::kMaxNameBytes, at, "exclude", i));
  return m;
}

ModelInfo read(cs::ModelInfo::Reader r) {
  const At at{"ModelInfo"};
  ModelInfo m;
  m.name = read_text(r.getName(), at, "name");
  m.n_vocab = non_negative(r.getNVocab(), at, "n_vocab");
  m.max_context = in_range<int32_t>(r.getMaxContext(), 0, lim::kMaxPositions, at, "max_context");
  return m;
}

ClusterStatus read(cs::ClusterStatus::Reader r) {
  return ClusterStatus{read_text(r.getJson(), lim::kMaxStatusBytes, At{"ClusterStatus"}, "json")};
}

ChaosFault read(cs::ChaosFault::Reader r) {
  const At at{"ChaosFault"};
  ChaosFault m;
  const auto kind = static_cast<uint16_t>(r.getKind());
  if (kind > static_cast<uint16_t>(ChaosFault::Kind::partition))
    throw Error(ErrorCode::invalid_argument, "ChaosFault.kind: unknown kind " + std::to_string(kind));
  m.kind = static_cast<ChaosFault::Kind>(kind);
  m.role = read_text(r.getRole(), at, "role");
  m.replica = read_text(r.getReplica(), at, "replica");
  m.rank = in_range<int32_t>(r.getRank(), 0, 4096, at, "rank");
  m.node = read_text(r.getNode(), at, "node");
  m.duration_ms = r.getDurationMs();
  m.delay_ms = r.getDelayMs();
  m.peer = read_text(r.getPeer(), at, "peer");
  m.probability = r.getProbability();
  if (!(m.probability >= 0 && m.probability <= 1))
    throw Error(ErrorCode::invalid_argument, "ChaosFault.probability: must be within 0..1");
  return m;
}

ChaosReply read(cs::ChaosReply::Reader r) {
  const At at{"ChaosReply"};
  ChaosReply m;
  m.node = read_text(r.getNode(), at, "node");
  m.pid = r.getPid();
  m.message = read_text(r.getMessage(), at, "message");
  return m;
}

Message read(cs::Envelope::Reader env) {
  switch (env.which()) {
    case cs::Envelope::GENERATE_REQUEST: return read(env.getGenerateRequest());
    case cs::Envelope::TOKEN_CHUNK: return read(env.getTokenChunk());
    case cs::Envelope::FINISHED: return read(env.getFinished());
    case cs::Envelope::ERROR_REPLY: return read(env.getErrorReply());
    case cs::Envelope::CANCEL: return read(env.getCancel());
    case cs::Envelope::STEP: return read(env.getStep());
    case cs::Envelope::STEP_RESULT: return read(env.getStepResult());
    case cs::Envelope::REPLICA_STATS: return read(env.getReplicaStats());
    case cs::Envelope::BLOCK_PLAN_REQUEST: return read(env.getBlockPlanRequest());
    case cs::Envelope::BLOCK_PLAN: return read(env.getBlockPlan());
    case cs::Envelope::CACHED_RESPONSE: return read(env.getCachedResponse());
    case cs::Envelope::SHARD_SPEC: return read(env.getShardSpec());
    case cs::Envelope::REPLICA_REPORT: return read(env.getReplicaReport());
    case cs::Envelope::ROUTE_QUERY: return read(env.getRouteQuery());
    case cs::Envelope::MODEL_INFO: return read(env.getModelInfo());
    case cs::Envelope::CLUSTER_STATUS: return read(env.getClusterStatus());
    case cs::Envelope::CHAOS_FAULT: return read(env.getChaosFault());
    case cs::Envelope::CHAOS_REPLY: return read(env.getChaosReply());
  }
  throw Error(ErrorCode::invalid_argument,
              "Envelope: unknown message kind " + std::to_string(static_cast<uint16_t>(env.which())));
}

DecodeResult failure(std::string why) { return DecodeResult{std::nullopt, std::move(why)}; }

}  // namespace

// ---------------------------------------------------------------------------------------------

WireMessage encode(const Message& m) {
  try {
    // The first segment is 1024 words (8 KiB): every message but long prompts and large steps
    // fits in it, and a multi-segment message is still one flat buffer below.
    capnp::MallocMessageBuilder builder;
    auto env = builder.initRoot<cs::Envelope>();
    env.setVersion(kProtocolVersion);
    std::visit(PutInEnvelope{env}, m);

    // Framing and segments written straight into the vector: one copy of the message.
    const auto segments = builder.getSegmentsForOutput();
    WireMessage out;
    out.words.resize(capnp::computeSerializedSizeInWords(segments));
    kj::ArrayOutputStream stream(
        kj::arrayPtr(reinterpret_cast<kj::byte*>(out.words.data()), out.words.size() * sizeof(uint64_t)));
    capnp::writeMessage(stream, segments);
    out.check = wire_checksum(out.words.data(), out.words.size() * sizeof(uint64_t));
    return out;
  } catch (const kj::Exception& e) {
    throw Error(ErrorCode::invalid_argument,
                std::string("encode ") + message_name(m) + ": " + e.getDescription().cStr());
  }
}

DecodeResult decode(const uint64_t* words, size_t n_words) {
  if (words == nullptr || n_words == 0) return failure("empty message");
  // A uint64_t pointer cast from unaligned bytes: take the copying path.
  if (reinterpret_cast<uintptr_t>(words) % alignof(uint64_t) != 0)
    return decode_bytes(reinterpret_cast<const uint8_t*>(words), n_words * sizeof(uint64_t));
  if (n_words > lim::kMaxMessageWords)
    return failure("message of " + std::to_string(n_words) + " words is larger than 64 MiB");
  try {
    capnp::ReaderOptions options;
    // Reading every object once costs at most the buffer's size; the 2x headroom tolerates a
    // getter called twice, while pointers aliasing one object (an amplification attack: a small
    // message that reads as a huge one) fail after at most twice the buffer.
    options.traversalLimitInWords = std::min<uint64_t>(2 * uint64_t{n_words} + 16, lim::kMaxMessageWords);
    options.nestingLimit = lim::kNestingLimit;
    capnp::FlatArrayMessageReader reader(kj::arrayPtr(reinterpret_cast<const capnp::word*>(words), n_words),
                                         options);
    // One buffer holds exactly one message: trailing words mean a framing error upstream.
    const auto trailing = reinterpret_cast<const capnp::word*>(words + n_words) - reader.getEnd();
    if (trailing != 0) return failure(std::to_string(trailing) + " words after the end of the message");
    const auto env = reader.getRoot<cs::Envelope>();
    if (env.getVersion() != kProtocolVersion)
      return failure("Envelope.version: " + std::to_string(env.getVersion()) + ", expected " +
                     std::to_string(kProtocolVersion));
    return DecodeResult{read(env), {}};
  } catch (const Error& e) {
    return failure(e.what());
  } catch (const kj::Exception& e) {
    return failure(std::string("malformed Cap'n Proto message: ") + e.getDescription().cStr());
  } catch (const std::exception& e) {  // bad_alloc and the like
    return failure(std::string("decode failed: ") + e.what());
  }
}

uint64_t wire_checksum(const void* data, size_t n_bytes) {
  const auto* p = static_cast<const unsigned char*>(data);
  uint64_t h = 0x243F6A8885A308D3ull ^ n_bytes;
  auto mix = [&](uint64_t w) {
    h = (h ^ w) * 0x9E3779B97F4A7C15ull;
    h ^= h >> 29;
  };
  size_t i = 0;
  for (; i + 8 <= n_bytes; i += 8) {
    uint64_t w;
    std::memcpy(&w, p + i, 8);
    mix(w);
  }
  if (i < n_bytes) {
    uint64_t w = 0;
    std::memcpy(&w, p + i, n_bytes - i);
    mix(w);
  }
  return h == 0 ? 1 : h;
}

namespace {
std::atomic<uint64_t> g_decode_failures{0};
}

uint64_t decode_failures() { return g_decode_failures.load(std::memory_order_relaxed); }

DecodeResult decode(const WireMessage& m) {
  if (m.check != 0 && m.check != wire_checksum(m.words.data(), m.words.size() * sizeof(uint64_t))) {
    g_decode_failures.fetch_add(1, std::memory_order_relaxed);
    return failure("the message's checksum does not match its content: it was corrupted on its way");
  }
  DecodeResult d = decode(m.words.data(), m.words.size());
  if (!d.message) g_decode_failures.fetch_add(1, std::memory_order_relaxed);
  return d;
}

DecodeResult decode_bytes(const uint8_t* data, size_t n_bytes) {
  if (n_bytes % sizeof(uint64_t) != 0)
    return failure("message length " + std::to_string(n_bytes) + " bytes is not a multiple of 8");
  if (data == nullptr || n_bytes == 0) return failure("empty message");
  const size_t n_words = n_bytes / sizeof(uint64_t);
  if (reinterpret_cast<uintptr_t>(data) % alignof(uint64_t) == 0)
    return decode(reinterpret_cast<const uint64_t*>(data), n_words);
  // Cap'n Proto reads words in place and needs them aligned: copy, but only after the size check.
  if (n_words > lim::kMaxMessageWords)
    return failure("message of " + std::to_string(n_words) + " words is larger than 64 MiB");
  std::vector<uint64_t> aligned;
  try {
    aligned.resize(n_words);
  } catch (const std::exception& e) {
    return failure(std::string("decode failed: ") + e.what());
  }
  std::memcpy(aligned.data(), data, n_bytes);
  return decode(aligned.data(), n_words);
}

const char* message_name(const Message& m) {
  // Indexed by the variant's alternatives, in order.
  static constexpr const char* kNames[] = {"GenerateRequest", "TokenChunk", "Finished", "ErrorReply",
                                           "Cancel",          "Step",       "StepResult", "ReplicaStats",
                                           "BlockPlanRequest", "BlockPlan", "CachedResponse", "ShardSpec",
                                           "ReplicaReport", "RouteQuery", "ModelInfo", "ClusterStatus",
                                           "ChaosFault", "ChaosReply"};
  static_assert(std::size(kNames) == std::variant_size_v<Message>);
  return m.index() < std::size(kNames) ? kNames[m.index()] : "valueless";
}

}  // namespace celer
