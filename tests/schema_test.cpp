// The wire codec: every message kind round-trips field by field, every validation rule rejects a
// crafted message with an error naming the field, and arbitrary bytes (truncations, bit flips,
// garbage, aliased pointers) never crash: they decode to a valid message or give an error.
#include <catch2/catch.hpp>

#include <capnp/message.h>
#include <capnp/serialize.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <limits>
#include <random>

#include "kernels/matmul.hpp"
#include "kernels/types.hpp"
#include "schema/celer.capnp.h"
#include "schema/codec.hpp"

using namespace celer;
namespace cs = celer::capnp_schema;
namespace lim = celer::wire_limits;

namespace {

// ---- sample messages: every field away from its default ----

SamplingParams odd_sampling(uint64_t seed) {
  SamplingParams p;
  p.temperature = 0.25f;
  p.top_k = 7;
  p.top_p = 0.5f;
  p.min_p = 0.125f;
  p.repeat_penalty = 1.3f;
  p.repeat_last_n = 17;
  p.seed = seed;
  return p;
}

GenerateRequest sample_request() {
  GenerateRequest m;
  m.id = 0x1234567890abcdefull;
  m.prompt_text = "Hello, w\xc3\xb6rld";
  m.prompt_tokens = {1, 2, 30000, 0};
  m.sampling = odd_sampling(0xfeedfacecafebeefull);
  m.max_tokens = 77;
  m.stop = {"\n\n", "END", ""};
  m.ignore_eos = true;
  m.add_bos = false;
  m.priority = Priority::batch;
  m.priority_given = true;
  m.tenant = "acme";
  m.session_id = "session-42";
  m.deadline_ms = 1700000000123;
  m.logprobs = 5;
  m.parse_special = true;
  return m;
}

TokenChunk sample_chunk() {
  return TokenChunk{77, 12, {5, 6, 7}, "abc",
                    {TokenLogprob{5, -0.5f, {5, 9}, {-0.5f, -1.5f}}, TokenLogprob{6, -0.125f, {}, {}},
                     TokenLogprob{7, -2.0f, {7}, {-2.0f}}}};
}
Finished sample_finished() {
  return Finished{78, FinishReason::cancelled, 100, 20, 64, StageTimes{1, 2, 3, 4, 5, 6, 7}};
}
ErrorReply sample_error() { return ErrorReply{79, ErrorKind::rate_limited, "tenant acme is over its rate"}; }
Cancel sample_cancel() { return Cancel{80}; }

StepSequence sample_sequence(RequestId id, int32_t n_past, int32_t n_new, bool sample) {
  StepSequence s;
  s.id = id;
  for (int32_t i = 0; i < n_new; ++i) s.tokens.push_back(1000 + i);
  s.n_past = n_past;
  const int32_t blocks = (n_past + n_new + 15) / 16;
  for (int32_t b = 0; b < blocks; ++b) s.block_table.push_back(3 * b + static_cast<int32_t>(id % 7));
  s.sample = sample;
  s.sampling = odd_sampling(id);
  for (int32_t i = 0; i < 64 && i < n_past; ++i) s.recent.push_back(500 + i);
  return s;
}

Step sample_step() {
  Step m;
  m.step_id = 0xabcdef0123ull;
  m.copies = {{4, 9}, {11, 2}};
  m.sequences.push_back(sample_sequence(1, 0, 40, true));    // prefill
  m.sequences.push_back(sample_sequence(2, 517, 1, true));   // decode
  m.sequences.push_back(sample_sequence(3, 31, 17, false));  // a chunk of a longer prefill
  return m;
}

// A batch of 16 sequences each decoding one token: the step a busy replica sends most.
Step decode_step(int n_sequences = 16) {
  Step m;
  m.step_id = 123456;
  for (int i = 0; i < n_sequences; ++i) m.sequences.push_back(sample_sequence(100 + i, 500 + 13 * (i % 64), 1, true));
  return m;
}

StepResult sample_step_result() {
  return StepResult{0xabcdef0123ull,
                    {{1, 42, false, {}}, {2, 0, true, TokenLogprob{0, -0.25f, {0, 3}, {-0.25f, -3.0f}}}, {9, 31999, false, {}}},
                    5230, 1900, 16};
}

ReplicaStats sample_stats() {
  ReplicaStats m;
  m.waiting[0] = 3;
  m.waiting[1] = 5;
  m.waiting[2] = 8;
  m.running = 13;
  m.kv_blocks_used = 210;
  m.kv_blocks_free = 46;
  m.prefix_queries = 10000;
  m.prefix_hits = 7000;
  m.response_cache_hits = 12;
  m.malformed_messages = 2;
  m.preemptions = 17;
  m.shard_restarts = 3;
  m.scheduler_restarts = 1;
  m.cache_restarts = 4;
  m.steps = 900;
  m.step_us = 4'500'000;
  m.allreduce_us = 1'200'000;
  m.allreduce_calls = 14'400;
  m.hung_shards = 2;
  return m;
}

BlockPlanRequest sample_plan_request() {
  BlockPlanRequest m;
  m.plan_id = 901;
  m.reset = true;
  m.commits = {{3, 48, {}}, {4, 17, {9, 8, 7}}};
  m.ended = {7, 8, 0xffffffffffull};
  m.candidates = {BlockCandidate{3, {}, 49, true, 48, true, Priority::interactive},
                  BlockCandidate{9, {1, 2, 3, 4, 5}, 5, false, 0, false, Priority::batch}};
  m.max_batch_tokens = 256;
  m.max_batch_size = 16;
  return m;
}

BlockPlan sample_plan() {
  BlockPlan m;
  m.plan_id = 901;
  m.chosen = {PlannedSequence{3, 48, 1, {0, 5, 9, 12}}, PlannedSequence{9, 0, 5, {13}}};
  m.preempted = {4};
  m.copies = {{2, 13}};
  m.kv_blocks_used = 20;
  m.kv_blocks_free = 44;
  m.prefix_queries = 300;
  m.prefix_hits = 120;
  return m;
}

CachedResponse sample_cached() { return CachedResponse{sample_request(), true, {11, 12, 13}, FinishReason::length}; }

ShardSpec sample_shard_spec() {
  ShardSpec m;
  m.replica = "replica-b";
  m.model_path = "/models/tiny-\xc3\xa9.gguf";
  m.device = "gpu:1";
  m.rank = 2;
  m.size = 4;
  m.threads = 12;
  m.max_context = 8192;
  m.max_batch_tokens = 1024;
  m.max_seqs = 48;
  m.n_kv_blocks = 4096;
  m.q8_activations = static_cast<uint8_t>(Q8Activations::int8);
  m.kv_type = static_cast<int32_t>(TensorType::q8_0);
  return m;
}

ReplicaReport sample_report() {
  ReplicaReport m;
  m.replica = "replica-a";
  m.waiting = 7;
  m.running = 12;
  m.outstanding_tokens = int64_t{1} << 40;
  m.kv_blocks_used = 300;
  m.kv_blocks_free = 212;
  m.prefix_queries = 5000;
  m.prefix_hits = 4096;
  m.tokens_generated = 0xfedcba9876543210ull;
  m.draining = true;
  m.blocks_changed = true;
  m.cached_blocks = {0, 1, 0xffffffffffffffffull, 0x0123456789abcdefull};
  m.scheduler_restarts = 1;
  m.shard_restarts = 2;
  m.cache_restarts = 3;
  m.hung_shards = 4;
  return m;
}

RouteQuery sample_route() {
  RouteQuery m;
  m.session_id = "chat-9";
  m.prompt_tokens = 333;
  m.max_tokens = 64;
  m.block_hashes = {0xdeadbeefull, 0xffffffffffffffffull, 0};
  m.exclude = {"replica-c", "", "replica-d"};
  return m;
}

ModelInfo sample_model_info() { return ModelInfo{"llama-\xc3\xa9-7b", 32000, 4096}; }

ClusterStatus sample_status() { return ClusterStatus{R"({"replicas":[{"name":"r0","up":true}],"routing":"prefix"})"}; }
ChaosFault sample_fault() {
  ChaosFault m;
  m.kind = ChaosFault::Kind::slow;
  m.role = "shard";
  m.replica = "r2";
  m.rank = 1;
  m.node = "n\xc3\xa9";
  m.duration_ms = 1500;
  m.delay_ms = 20;
  m.peer = "front";
  m.probability = 0.25;
  return m;
}
ChaosReply sample_chaos_reply() { return ChaosReply{"n2", 4242, "slowed shard rank 1 of replica r2"}; }

std::vector<Message> every_kind() {
  return {sample_request(), sample_chunk(), sample_finished(), sample_error(),
          sample_cancel(),  sample_step(),  sample_step_result(), sample_stats(),
          sample_plan_request(), sample_plan(), sample_cached(), sample_shard_spec(),
          sample_report(), sample_route(), sample_model_info(), sample_status(), sample_fault(), sample_chaos_reply()};
}

// ---- field-by-field comparisons ----

void require_equal(const SamplingParams& a, const SamplingParams& b) {
  REQUIRE(a.temperature == b.temperature);
  REQUIRE(a.top_k == b.top_k);
  REQUIRE(a.top_p == b.top_p);
  REQUIRE(a.min_p == b.min_p);
  REQUIRE(a.repeat_penalty == b.repeat_penalty);
  REQUIRE(a.repeat_last_n == b.repeat_last_n);
  REQUIRE(a.seed == b.seed);
}

void require_equal(const GenerateRequest& a, const GenerateRequest& b) {
  REQUIRE(a.id == b.id);
  REQUIRE(a.prompt_text == b.prompt_text);
  REQUIRE(a.prompt_tokens == b.prompt_tokens);
  require_equal(a.sampling, b.sampling);
  REQUIRE(a.max_tokens == b.max_tokens);
  REQUIRE(a.stop == b.stop);
  REQUIRE(a.ignore_eos == b.ignore_eos);
  REQUIRE(a.add_bos == b.add_bos);
  REQUIRE(a.priority == b.priority);
  REQUIRE(a.priority_given == b.priority_given);
  REQUIRE(a.tenant == b.tenant);
  REQUIRE(a.session_id == b.session_id);
  REQUIRE(a.deadline_ms == b.deadline_ms);
  REQUIRE(a.logprobs == b.logprobs);
  REQUIRE(a.parse_special == b.parse_special);
}

void require_equal(const TokenChunk& a, const TokenChunk& b) {
  REQUIRE(a.id == b.id);
  REQUIRE(a.first_index == b.first_index);
  REQUIRE(a.tokens == b.tokens);
  REQUIRE(a.text == b.text);
  REQUIRE(a.logprobs == b.logprobs);
}

void require_equal(const Finished& a, const Finished& b) {
  REQUIRE(a.id == b.id);
  REQUIRE(a.reason == b.reason);
  REQUIRE(a.prompt_tokens == b.prompt_tokens);
  REQUIRE(a.completion_tokens == b.completion_tokens);
  REQUIRE(a.cached_tokens == b.cached_tokens);
  REQUIRE(a.times == b.times);
}

void require_equal(const ErrorReply& a, const ErrorReply& b) {
  REQUIRE(a.id == b.id);
  REQUIRE(a.kind == b.kind);
  REQUIRE(a.message == b.message);
}

void require_equal(const Cancel& a, const Cancel& b) { REQUIRE(a.id == b.id); }

void require_equal(const StepSequence& a, const StepSequence& b) {
  REQUIRE(a.id == b.id);
  REQUIRE(a.tokens == b.tokens);
  REQUIRE(a.n_past == b.n_past);
  REQUIRE(a.block_table == b.block_table);
  REQUIRE(a.sample == b.sample);
  require_equal(a.sampling, b.sampling);
  REQUIRE(a.recent == b.recent);
  REQUIRE(a.logprobs == b.logprobs);
}

void require_equal(const Step& a, const Step& b) {
  REQUIRE(a.step_id == b.step_id);
  REQUIRE(a.copies.size() == b.copies.size());
  for (size_t i = 0; i < a.copies.size(); ++i) {
    REQUIRE(a.copies[i].src == b.copies[i].src);
    REQUIRE(a.copies[i].dst == b.copies[i].dst);
  }
  REQUIRE(a.sequences.size() == b.sequences.size());
  for (size_t i = 0; i < a.sequences.size(); ++i) require_equal(a.sequences[i], b.sequences[i]);
}

void require_equal(const StepResult& a, const StepResult& b) {
  REQUIRE(a.step_id == b.step_id);
  REQUIRE(a.tokens.size() == b.tokens.size());
  for (size_t i = 0; i < a.tokens.size(); ++i) {
    REQUIRE(a.tokens[i].id == b.tokens[i].id);
    REQUIRE(a.tokens[i].token == b.tokens[i].token);
    REQUIRE(a.tokens[i].has_logprob == b.tokens[i].has_logprob);
    REQUIRE(a.tokens[i].logprob == b.tokens[i].logprob);
  }
  REQUIRE(a.step_us == b.step_us);
  REQUIRE(a.allreduce_us == b.allreduce_us);
  REQUIRE(a.allreduce_calls == b.allreduce_calls);
}

void require_equal(const ReplicaStats& a, const ReplicaStats& b) {
  for (int i = 0; i < kPriorityClasses; ++i) REQUIRE(a.waiting[i] == b.waiting[i]);
  REQUIRE(a.running == b.running);
  REQUIRE(a.kv_blocks_used == b.kv_blocks_used);
  REQUIRE(a.kv_blocks_free == b.kv_blocks_free);
  REQUIRE(a.prefix_queries == b.prefix_queries);
  REQUIRE(a.prefix_hits == b.prefix_hits);
  REQUIRE(a.response_cache_hits == b.response_cache_hits);
  REQUIRE(a.malformed_messages == b.malformed_messages);
  REQUIRE(a.preemptions == b.preemptions);
  REQUIRE(a.shard_restarts == b.shard_restarts);
  REQUIRE(a.scheduler_restarts == b.scheduler_restarts);
  REQUIRE(a.cache_restarts == b.cache_restarts);
  REQUIRE(a.hung_shards == b.hung_shards);
  REQUIRE(a.steps == b.steps);
  REQUIRE(a.step_us == b.step_us);
  REQUIRE(a.allreduce_us == b.allreduce_us);
  REQUIRE(a.allreduce_calls == b.allreduce_calls);
}

void require_equal(const BlockPlanRequest& a, const BlockPlanRequest& b) {
  REQUIRE(a.plan_id == b.plan_id);
  REQUIRE(a.reset == b.reset);
  REQUIRE(a.commits.size() == b.commits.size());
  for (size_t i = 0; i < a.commits.size(); ++i) {
    REQUIRE(a.commits[i].id == b.commits[i].id);
    REQUIRE(a.commits[i].n_computed == b.commits[i].n_computed);
    REQUIRE(a.commits[i].new_tokens == b.commits[i].new_tokens);
  }
  REQUIRE(a.ended == b.ended);
  REQUIRE(a.candidates.size() == b.candidates.size());
  for (size_t i = 0; i < a.candidates.size(); ++i) {
    const BlockCandidate &x = a.candidates[i], &y = b.candidates[i];
    REQUIRE(x.id == y.id);
    REQUIRE(x.new_tokens == y.new_tokens);
    REQUIRE(x.n_tokens == y.n_tokens);
    REQUIRE(x.started == y.started);
    REQUIRE(x.n_computed == y.n_computed);
    REQUIRE(x.running == y.running);
    REQUIRE(x.priority == y.priority);
  }
  REQUIRE(a.max_batch_tokens == b.max_batch_tokens);
  REQUIRE(a.max_batch_size == b.max_batch_size);
}

void require_equal(const BlockPlan& a, const BlockPlan& b) {
  REQUIRE(a.plan_id == b.plan_id);
  REQUIRE(a.chosen.size() == b.chosen.size());
  for (size_t i = 0; i < a.chosen.size(); ++i) {
    REQUIRE(a.chosen[i].id == b.chosen[i].id);
    REQUIRE(a.chosen[i].n_computed == b.chosen[i].n_computed);
    REQUIRE(a.chosen[i].n_new == b.chosen[i].n_new);
    REQUIRE(a.chosen[i].block_table == b.chosen[i].block_table);
  }
  REQUIRE(a.preempted == b.preempted);
  REQUIRE(a.copies.size() == b.copies.size());
  for (size_t i = 0; i < a.copies.size(); ++i) {
    REQUIRE(a.copies[i].src == b.copies[i].src);
    REQUIRE(a.copies[i].dst == b.copies[i].dst);
  }
  REQUIRE(a.kv_blocks_used == b.kv_blocks_used);
  REQUIRE(a.kv_blocks_free == b.kv_blocks_free);
  REQUIRE(a.prefix_queries == b.prefix_queries);
  REQUIRE(a.prefix_hits == b.prefix_hits);
}

void require_equal(const CachedResponse& a, const CachedResponse& b) {
  require_equal(a.request, b.request);
  REQUIRE(a.found == b.found);
  REQUIRE(a.tokens == b.tokens);
  REQUIRE(a.reason == b.reason);
}

void require_equal(const ShardSpec& a, const ShardSpec& b) {
  REQUIRE(a.replica == b.replica);
  REQUIRE(a.model_path == b.model_path);
  REQUIRE(a.device == b.device);
  REQUIRE(a.rank == b.rank);
  REQUIRE(a.size == b.size);
  REQUIRE(a.threads == b.threads);
  REQUIRE(a.max_context == b.max_context);
  REQUIRE(a.max_batch_tokens == b.max_batch_tokens);
  REQUIRE(a.max_seqs == b.max_seqs);
  REQUIRE(a.n_kv_blocks == b.n_kv_blocks);
  REQUIRE(a.q8_activations == b.q8_activations);
  REQUIRE(a.kv_type == b.kv_type);
}

void require_equal(const ReplicaReport& a, const ReplicaReport& b) {
  REQUIRE(a.replica == b.replica);
  REQUIRE(a.waiting == b.waiting);
  REQUIRE(a.running == b.running);
  REQUIRE(a.outstanding_tokens == b.outstanding_tokens);
  REQUIRE(a.kv_blocks_used == b.kv_blocks_used);
  REQUIRE(a.kv_blocks_free == b.kv_blocks_free);
  REQUIRE(a.prefix_queries == b.prefix_queries);
  REQUIRE(a.prefix_hits == b.prefix_hits);
  REQUIRE(a.tokens_generated == b.tokens_generated);
  REQUIRE(a.draining == b.draining);
  REQUIRE(a.blocks_changed == b.blocks_changed);
  REQUIRE(a.cached_blocks == b.cached_blocks);
  REQUIRE(a.scheduler_restarts == b.scheduler_restarts);
  REQUIRE(a.shard_restarts == b.shard_restarts);
  REQUIRE(a.cache_restarts == b.cache_restarts);
  REQUIRE(a.hung_shards == b.hung_shards);
}

void require_equal(const RouteQuery& a, const RouteQuery& b) {
  REQUIRE(a.session_id == b.session_id);
  REQUIRE(a.prompt_tokens == b.prompt_tokens);
  REQUIRE(a.max_tokens == b.max_tokens);
  REQUIRE(a.block_hashes == b.block_hashes);
  REQUIRE(a.exclude == b.exclude);
}

void require_equal(const ModelInfo& a, const ModelInfo& b) {
  REQUIRE(a.name == b.name);
  REQUIRE(a.n_vocab == b.n_vocab);
  REQUIRE(a.max_context == b.max_context);
}

void require_equal(const ClusterStatus& a, const ClusterStatus& b) { REQUIRE(a.json == b.json); }
void require_equal(const ChaosFault& a, const ChaosFault& b) {
  REQUIRE(a.kind == b.kind);
  REQUIRE(a.role == b.role);
  REQUIRE(a.replica == b.replica);
  REQUIRE(a.rank == b.rank);
  REQUIRE(a.node == b.node);
  REQUIRE(a.duration_ms == b.duration_ms);
  REQUIRE(a.delay_ms == b.delay_ms);
  REQUIRE(a.peer == b.peer);
  REQUIRE(a.probability == b.probability);
}
void require_equal(const ChaosReply& a, const ChaosReply& b) {
  REQUIRE(a.node == b.node);
  REQUIRE(a.pid == b.pid);
  REQUIRE(a.message == b.message);
}

void require_equal(const Message& a, const Message& b) {
  REQUIRE(a.index() == b.index());
  std::visit([&](const auto& x) { require_equal(x, std::get<std::decay_t<decltype(x)>>(b)); }, a);
}

// ---- helpers ----

template <class T>
T round_trip(const T& m) {
  const WireMessage wire = encode(Message{m});
  const DecodeResult r = decode(wire);
  INFO(r.error);
  REQUIRE(r.message.has_value());
  REQUIRE(r.error.empty());
  REQUIRE(std::holds_alternative<T>(*r.message));
  return std::get<T>(*r.message);
}

void require_rejected(const DecodeResult& r, const std::string& needle) {
  REQUIRE_FALSE(r.message.has_value());
  REQUIRE_FALSE(r.error.empty());
  CHECK_THAT(r.error, Catch::Contains(needle));
}

// encode() does not validate, so a bad struct goes through it unchanged.
template <class T>
void require_rejected(const T& m, const std::string& needle) {
  INFO(message_name(Message{m}) << ": expecting an error containing \"" << needle << "\"");
  require_rejected(decode(encode(Message{m})), needle);
}

// Applies `mutate` to a copy of `valid` and requires decode to reject it naming `needle`.
template <class T, class F>
void rejects(const T& valid, F mutate, const std::string& needle) {
  T m = valid;
  mutate(m);
  require_rejected(m, needle);
}

WireMessage flatten(capnp::MessageBuilder& builder) {
  const kj::Array<capnp::word> flat = capnp::messageToFlatArray(builder);
  WireMessage w;
  w.words.resize(flat.size());
  std::memcpy(w.words.data(), flat.begin(), flat.asBytes().size());
  return w;
}

// Every decode result is exactly one of: a valid message, or an error. A message that decoded
// must survive another encode/decode unchanged (validation accepts what it produced).
void require_well_formed(const DecodeResult& r) {
  REQUIRE(r.message.has_value() == r.error.empty());
  if (r.message) {
    const DecodeResult again = decode(encode(*r.message));
    INFO(again.error);
    REQUIRE(again.message.has_value());
    require_equal(*r.message, *again.message);
  }
}

const std::string kHugeText(lim::kMaxTextBytes + 1, 'x');

}  // namespace

// =============================================================================================

TEST_CASE("every message kind round-trips field by field", "[schema]") {
  require_equal(round_trip(sample_request()), sample_request());
  require_equal(round_trip(sample_chunk()), sample_chunk());
  require_equal(round_trip(sample_finished()), sample_finished());
  require_equal(round_trip(sample_error()), sample_error());
  require_equal(round_trip(sample_cancel()), sample_cancel());
  require_equal(round_trip(sample_step()), sample_step());
  require_equal(round_trip(sample_step_result()), sample_step_result());
  require_equal(round_trip(sample_stats()), sample_stats());
  require_equal(round_trip(sample_plan_request()), sample_plan_request());
  require_equal(round_trip(sample_plan()), sample_plan());
  require_equal(round_trip(sample_cached()), sample_cached());
  require_equal(round_trip(sample_shard_spec()), sample_shard_spec());
  require_equal(round_trip(sample_report()), sample_report());
  require_equal(round_trip(sample_route()), sample_route());
  require_equal(round_trip(sample_model_info()), sample_model_info());
  require_equal(round_trip(sample_status()), sample_status());
  require_equal(round_trip(sample_fault()), sample_fault());
  require_equal(round_trip(sample_chaos_reply()), sample_chaos_reply());
  for (auto kind : {ChaosFault::Kind::kill, ChaosFault::Kind::hang, ChaosFault::Kind::sigkill, ChaosFault::Kind::sigstop}) {
    ChaosFault f = sample_fault();
    f.kind = kind;
    require_equal(round_trip(f), f);
  }
}

TEST_CASE("default-constructed messages round-trip", "[schema]") {
  // Each default struct is valid except where a rule needs content (a Step sequence needs tokens).
  require_equal(round_trip(GenerateRequest{}), GenerateRequest{});
  require_equal(round_trip(TokenChunk{}), TokenChunk{});
  require_equal(round_trip(Finished{}), Finished{});
  require_equal(round_trip(ErrorReply{}), ErrorReply{});
  require_equal(round_trip(Cancel{}), Cancel{});
  require_equal(round_trip(Step{}), Step{});
  require_equal(round_trip(StepResult{}), StepResult{});
  require_equal(round_trip(ReplicaStats{}), ReplicaStats{});
  require_equal(round_trip(BlockPlan{}), BlockPlan{});
  require_equal(round_trip(CachedResponse{}), CachedResponse{});
  require_equal(round_trip(ReplicaReport{}), ReplicaReport{});
  require_equal(round_trip(RouteQuery{}), RouteQuery{});
  require_equal(round_trip(ModelInfo{}), ModelInfo{});
  require_equal(round_trip(ClusterStatus{}), ClusterStatus{});
  require_equal(round_trip(ChaosFault{}), ChaosFault{});
  require_equal(round_trip(ChaosReply{}), ChaosReply{});

  // A ShardSpec needs a model path, a context and a KV cache size (the scheduler always resolves
  // them); with those three set, every other field keeps its default through the wire.
  require_rejected(ShardSpec{}, "ShardSpec.model_path");
  ShardSpec spec;
  spec.model_path = "m.gguf";
  spec.max_context = 1;
  spec.n_kv_blocks = 1;
  require_equal(round_trip(spec), spec);
  spec.device = "";  // not the default "cpu": an empty device is sent as such
  require_equal(round_trip(spec), spec);
}

TEST_CASE("boundary values are accepted", "[schema]") {
  GenerateRequest r = sample_request();
  r.max_tokens = lim::kMaxMaxTokens;
  r.stop.assign(lim::kMaxStopStrings, std::string(lim::kMaxTextBytes, 's'));
  r.prompt_text = std::string(lim::kMaxTextBytes, 'p');
  r.prompt_tokens.assign(lim::kMaxPromptTokens, std::numeric_limits<int32_t>::max());
  r.id = std::numeric_limits<uint64_t>::max();
  r.deadline_ms = std::numeric_limits<int64_t>::max();
  require_equal(round_trip(r), r);

  r = sample_request();
  r.max_tokens = 1;
  r.sampling.temperature = 0;
  r.sampling.top_p = 1;
  r.sampling.min_p = 0;
  require_equal(round_trip(r), r);

  // A block table covers exactly n_past + tokens: 16 + 1 positions need 2 blocks.
  Step s;
  s.sequences.push_back(sample_sequence(1, 16, 1, true));
  REQUIRE(s.sequences[0].block_table.size() == 2);
  require_equal(round_trip(s), s);
  s.sequences[0].n_past = 15;  // 16 positions fit one block; the second is spare
  require_equal(round_trip(s), s);

  s = decode_step(static_cast<int>(lim::kMaxStepSequences));
  require_equal(round_trip(s), s);

  Finished f = sample_finished();
  f.cached_tokens = f.prompt_tokens;
  require_equal(round_trip(f), f);

  ReplicaStats st = sample_stats();
  st.prefix_hits = st.prefix_queries;
  require_equal(round_trip(st), st);
}

TEST_CASE("boundary values of the cluster's messages are accepted", "[schema]") {
  ShardSpec spec = sample_shard_spec();
  spec.replica.assign(lim::kMaxNameBytes, 'r');
  spec.device.assign(lim::kMaxNameBytes, 'd');
  spec.model_path.assign(lim::kMaxPathBytes, 'p');
  spec.size = lim::kMaxTpSize;
  spec.rank = spec.size - 1;
  spec.threads = lim::kMaxShardThreads;
  spec.max_context = int32_t{1} << 24;
  spec.max_batch_tokens = int32_t{1} << 20;
  spec.max_seqs = 4096;
  spec.n_kv_blocks = int32_t{1} << 30;
  require_equal(round_trip(spec), spec);
  spec = sample_shard_spec();
  spec.rank = 0;
  spec.size = 1;
  spec.threads = 0;
  spec.max_context = 1;
  spec.max_batch_tokens = 1;
  spec.max_seqs = 1;
  spec.n_kv_blocks = 1;
  require_equal(round_trip(spec), spec);
  for (Q8Activations q8 : {Q8Activations::f32, Q8Activations::int8}) {
    spec.q8_activations = static_cast<uint8_t>(q8);
    require_equal(round_trip(spec), spec);
  }
  for (int32_t kv : {-1, 0, 1, 8}) {
    spec.kv_type = kv;
    require_equal(round_trip(spec), spec);
  }

  ReplicaReport rep = sample_report();
  rep.replica.assign(lim::kMaxNameBytes, 'r');
  rep.cached_blocks.resize(size_t{1} << 22);
  for (size_t i = 0; i < rep.cached_blocks.size(); ++i) rep.cached_blocks[i] = i * 0x9e3779b97f4a7c15ull;
  rep.prefix_hits = rep.prefix_queries;
  require_equal(round_trip(rep), rep);

  RouteQuery q = sample_route();
  q.block_hashes.assign(lim::kMaxPromptTokens / 16, 7);
  q.exclude.assign(64, std::string(lim::kMaxNameBytes, 'x'));
  q.prompt_tokens = std::numeric_limits<int32_t>::max();
  q.max_tokens = std::numeric_limits<int32_t>::max();
  q.session_id.assign(lim::kMaxTextBytes, 's');
  require_equal(round_trip(q), q);

  ModelInfo info = sample_model_info();
  info.n_vocab = std::numeric_limits<int32_t>::max();
  info.max_context = int32_t{1} << 24;
  require_equal(round_trip(info), info);

  // The status document is not bound by kMaxTextBytes.
  static_assert(lim::kMaxStatusBytes == size_t{16} << 20 && lim::kMaxStatusBytes > lim::kMaxTextBytes);
  const ClusterStatus status{std::string(lim::kMaxStatusBytes, 'j')};
  require_equal(round_trip(status), status);
}

TEST_CASE("message_name names each kind", "[schema]") {
  const char* expected[] = {"GenerateRequest", "TokenChunk", "Finished", "ErrorReply",
                            "Cancel",          "Step",       "StepResult", "ReplicaStats",
                            "BlockPlanRequest", "BlockPlan", "CachedResponse", "ShardSpec",
                            "ReplicaReport", "RouteQuery", "ModelInfo", "ClusterStatus",
                            "ChaosFault", "ChaosReply"};
  const auto all = every_kind();
  REQUIRE(all.size() == std::size(expected));
  REQUIRE(all.size() == std::variant_size_v<Message>);
  for (size_t i = 0; i < all.size(); ++i) REQUIRE(std::string(message_name(all[i])) == expected[i]);
}

// ---- validation: each rule rejects, naming the field ----

TEST_CASE("GenerateRequest validation", "[schema]") {
  const GenerateRequest ok = sample_request();
  using M = GenerateRequest;
  rejects(ok, [](M& m) { m.prompt_tokens.assign(lim::kMaxPromptTokens + 1, 1); }, "GenerateRequest.prompt_tokens");
  rejects(ok, [](M& m) { m.prompt_tokens[2] = -1; }, "GenerateRequest.prompt_tokens[2]");
  rejects(ok, [](M& m) { m.prompt_text = kHugeText; }, "GenerateRequest.prompt_text");
  rejects(ok, [](M& m) { m.stop.assign(lim::kMaxStopStrings + 1, "x"); }, "GenerateRequest.stop");
  rejects(ok, [](M& m) { m.stop[1] = kHugeText; }, "GenerateRequest.stop[1]");
  rejects(ok, [](M& m) { m.tenant = kHugeText; }, "GenerateRequest.tenant");
  rejects(ok, [](M& m) { m.session_id = kHugeText; }, "GenerateRequest.session_id");
  rejects(ok, [](M& m) { m.max_tokens = 0; }, "GenerateRequest.max_tokens");
  rejects(ok, [](M& m) { m.max_tokens = -3; }, "GenerateRequest.max_tokens");
  rejects(ok, [](M& m) { m.max_tokens = lim::kMaxMaxTokens + 1; }, "GenerateRequest.max_tokens");
  rejects(ok, [](M& m) { m.priority = static_cast<Priority>(3); }, "GenerateRequest.priority");
  rejects(ok, [](M& m) { m.priority = static_cast<Priority>(200); }, "GenerateRequest.priority");
  rejects(ok, [](M& m) { m.deadline_ms = -1; }, "GenerateRequest.deadline_ms");
  rejects(ok, [](M& m) { m.logprobs = -2; }, "GenerateRequest.logprobs");
  rejects(ok, [](M& m) { m.logprobs = kMaxTopLogprobs + 1; }, "GenerateRequest.logprobs");
  // SamplingParams per celer::validate(): the error names the sub-field too.
  rejects(ok, [](M& m) { m.sampling.temperature = -0.5f; }, "GenerateRequest.sampling: temperature");
  rejects(ok, [](M& m) { m.sampling.temperature = std::nanf(""); }, "GenerateRequest.sampling: temperature");
  rejects(ok, [](M& m) { m.sampling.temperature = INFINITY; }, "GenerateRequest.sampling: temperature");
  rejects(ok, [](M& m) { m.sampling.top_k = -1; }, "GenerateRequest.sampling: top_k");
  rejects(ok, [](M& m) { m.sampling.top_p = 0; }, "GenerateRequest.sampling: top_p");
  rejects(ok, [](M& m) { m.sampling.top_p = 1.5f; }, "GenerateRequest.sampling: top_p");
  rejects(ok, [](M& m) { m.sampling.top_p = std::nanf(""); }, "GenerateRequest.sampling: top_p");
  rejects(ok, [](M& m) { m.sampling.min_p = -0.1f; }, "GenerateRequest.sampling: min_p");
  rejects(ok, [](M& m) { m.sampling.min_p = 1.1f; }, "GenerateRequest.sampling: min_p");
  rejects(ok, [](M& m) { m.sampling.repeat_penalty = 0; }, "GenerateRequest.sampling: repeat_penalty");
  rejects(ok, [](M& m) { m.sampling.repeat_penalty = INFINITY; }, "GenerateRequest.sampling: repeat_penalty");
  rejects(ok, [](M& m) { m.sampling.repeat_last_n = -1; }, "GenerateRequest.sampling: repeat_last_n");
}

TEST_CASE("TokenChunk, Finished, ErrorReply validation", "[schema]") {
  const TokenChunk chunk = sample_chunk();
  rejects(chunk, [](TokenChunk& m) { m.first_index = -1; }, "TokenChunk.first_index");
  rejects(chunk, [](TokenChunk& m) { m.tokens[1] = -7; }, "TokenChunk.tokens[1]");
  rejects(chunk, [](TokenChunk& m) { m.tokens.assign(lim::kMaxChunkTokens + 1, 0); }, "TokenChunk.tokens");
  rejects(chunk, [](TokenChunk& m) { m.text = kHugeText; }, "TokenChunk.text");
  rejects(chunk, [](TokenChunk& m) { m.logprobs.pop_back(); }, "TokenChunk.logprobs");
  rejects(chunk, [](TokenChunk& m) { m.logprobs[1].logprob = 0.5f; }, "TokenChunk.logprobs[1].logprob");
  rejects(chunk, [](TokenChunk& m) { m.logprobs[2].logprob = std::nanf(""); }, "TokenChunk.logprobs[2].logprob");
  rejects(chunk, [](TokenChunk& m) { m.logprobs[0].top_logprobs.pop_back(); }, "TokenChunk.logprobs[0].top_logprobs");
  rejects(chunk, [](TokenChunk& m) { m.logprobs[0].top_tokens[1] = -1; }, "TokenChunk.logprobs[0].top_tokens[1]");
  rejects(chunk, [](TokenChunk& m) { m.logprobs[0].top_tokens.assign(kMaxTopLogprobs + 1, 1); m.logprobs[0].top_logprobs.assign(kMaxTopLogprobs + 1, -1.0f); },
          "TokenChunk.logprobs[0].top_tokens");

  const Finished fin = sample_finished();
  rejects(fin, [](Finished& m) { m.reason = static_cast<FinishReason>(3); }, "Finished.reason");
  rejects(fin, [](Finished& m) { m.prompt_tokens = -1; }, "Finished.prompt_tokens");
  rejects(fin, [](Finished& m) { m.completion_tokens = -1; }, "Finished.completion_tokens");
  rejects(fin, [](Finished& m) { m.cached_tokens = -1; }, "Finished.cached_tokens");
  rejects(fin, [](Finished& m) { m.cached_tokens = m.prompt_tokens + 1; }, "Finished.cached_tokens");
  rejects(fin, [](Finished& m) { m.times.first_token_us = -5; }, "Finished.times.first_token_us");

  const ErrorReply err = sample_error();
  rejects(err, [](ErrorReply& m) { m.kind = static_cast<ErrorKind>(8); }, "ErrorReply.kind");
  rejects(err, [](ErrorReply& m) { m.message = kHugeText; }, "ErrorReply.message");
}

TEST_CASE("Step validation", "[schema]") {
  const Step ok = sample_step();
  rejects(ok, [](Step& m) { m.sequences = decode_step(static_cast<int>(lim::kMaxStepSequences) + 1).sequences; }, "Step.sequences");
  rejects(ok, [](Step& m) { m.copies.assign(lim::kMaxStepCopies + 1, BlockCopy{1, 2}); }, "Step.copies");
  rejects(ok, [](Step& m) { m.copies[1].src = -1; }, "Step.copies[1].src");
  rejects(ok, [](Step& m) { m.copies[0].dst = -2; }, "Step.copies[0].dst");
  rejects(ok, [](Step& m) { m.sequences[1].tokens.clear(); }, "Step.sequences[1].tokens");
  rejects(ok, [](Step& m) { m.sequences[0].tokens[5] = -1; }, "Step.sequences[0].tokens[5]");
  rejects(ok, [](Step& m) { m.sequences[0].tokens.assign(lim::kMaxSequenceTokens + 1, 1); }, "Step.sequences[0].tokens");
  rejects(ok, [](Step& m) { m.sequences[2].n_past = -1; }, "Step.sequences[2].n_past");
  rejects(ok, [](Step& m) { m.sequences[2].n_past = std::numeric_limits<int32_t>::max(); }, "Step.sequences[2].n_past");
  rejects(ok, [](Step& m) { m.sequences[1].block_table.pop_back(); }, "Step.sequences[1].block_table");
  rejects(ok, [](Step& m) { m.sequences[1].n_past += 16; }, "Step.sequences[1].block_table");
  rejects(ok, [](Step& m) { m.sequences[0].block_table.clear(); }, "Step.sequences[0].block_table");
  rejects(ok, [](Step& m) { m.sequences[1].block_table[3] = -1; }, "Step.sequences[1].block_table[3]");
  rejects(ok, [](Step& m) { m.sequences[1].block_table.assign(lim::kMaxPositions / 16 + 1, 0); },
          "Step.sequences[1].block_table");
  rejects(ok, [](Step& m) { m.sequences[2].sampling.top_k = -1; }, "Step.sequences[2].sampling: top_k");
  rejects(ok, [](Step& m) { m.sequences[1].sampling.temperature = std::nanf(""); },
          "Step.sequences[1].sampling: temperature");
  rejects(ok, [](Step& m) { m.sequences[1].recent[0] = -1; }, "Step.sequences[1].recent[0]");
  rejects(ok, [](Step& m) { m.sequences[1].recent.assign(lim::kMaxRecentTokens + 1, 0); }, "Step.sequences[1].recent");
}

TEST_CASE("StepResult and ReplicaStats validation", "[schema]") {
  const StepResult res = sample_step_result();
  rejects(res, [](StepResult& m) { m.tokens[2].token = -1; }, "StepResult.tokens[2].token");
  rejects(res, [](StepResult& m) { m.allreduce_us = m.step_us + 1; }, "StepResult.allreduce_us");
  rejects(res, [](StepResult& m) { m.tokens.assign(lim::kMaxSampledTokens + 1, SampledToken{1, 1, false, {}}); }, "StepResult.tokens");

  const ReplicaStats st = sample_stats();
  rejects(st, [](ReplicaStats& m) { m.waiting[2] = -1; }, "ReplicaStats.waiting[2]");
  rejects(st, [](ReplicaStats& m) { m.running = -1; }, "ReplicaStats.running");
  rejects(st, [](ReplicaStats& m) { m.kv_blocks_used = -1; }, "ReplicaStats.kv_blocks_used");
  rejects(st, [](ReplicaStats& m) { m.kv_blocks_free = -1; }, "ReplicaStats.kv_blocks_free");
  rejects(st, [](ReplicaStats& m) { m.prefix_hits = m.prefix_queries + 1; }, "ReplicaStats.prefix_hits");
  rejects(st, [](ReplicaStats& m) { m.allreduce_us = m.step_us + 1; }, "ReplicaStats.allreduce_us");

  // The waiting counts are one per priority class: other lengths can only be built by hand.
  for (unsigned n : {0u, 2u, 4u}) {
    capnp::MallocMessageBuilder b;
    auto env = b.initRoot<cs::Envelope>();
    env.setVersion(kProtocolVersion);
    env.initReplicaStats().initWaiting(n);
    require_rejected(decode(flatten(b)), "ReplicaStats.waiting");
  }
}

TEST_CASE("BlockPlanRequest, BlockPlan and CachedResponse validation", "[schema]") {
  const BlockPlanRequest q = sample_plan_request();
  rejects(q, [](BlockPlanRequest& m) { m.commits[1].n_computed = -1; }, "BlockPlanRequest.commits[1].n_computed");
  rejects(q, [](BlockPlanRequest& m) { m.commits[1].n_computed = 2; }, "BlockPlanRequest.commits[1].new_tokens");
  rejects(q, [](BlockPlanRequest& m) { m.commits[1].new_tokens[2] = -1; }, "BlockPlanRequest.commits[1].new_tokens[2]");
  rejects(q, [](BlockPlanRequest& m) { m.candidates[1].n_tokens = 0; }, "BlockPlanRequest.candidates[1].n_tokens");
  rejects(q, [](BlockPlanRequest& m) { m.candidates[1].n_tokens = 4; }, "BlockPlanRequest.candidates[1].new_tokens");
  rejects(q, [](BlockPlanRequest& m) { m.candidates[1].new_tokens[0] = -3; }, "BlockPlanRequest.candidates[1].new_tokens[0]");
  rejects(q, [](BlockPlanRequest& m) { m.candidates[0].n_computed = 50; }, "BlockPlanRequest.candidates[0].n_computed");
  rejects(q, [](BlockPlanRequest& m) { m.candidates[0].priority = static_cast<Priority>(3); }, "BlockPlanRequest.candidates[0].priority");
  rejects(q, [](BlockPlanRequest& m) { m.max_batch_tokens = 0; }, "BlockPlanRequest.max_batch_tokens");
  rejects(q, [](BlockPlanRequest& m) { m.max_batch_size = 0; }, "BlockPlanRequest.max_batch_size");
  rejects(q, [](BlockPlanRequest& m) { m.ended.assign(lim::kMaxPlanSequences + 1, 1); }, "BlockPlanRequest.ended");

  const BlockPlan p = sample_plan();
  rejects(p, [](BlockPlan& m) { m.chosen[0].n_new = 0; }, "BlockPlan.chosen[0].n_new");
  rejects(p, [](BlockPlan& m) { m.chosen[0].n_computed = -1; }, "BlockPlan.chosen[0].n_computed");
  rejects(p, [](BlockPlan& m) { m.chosen[0].block_table.pop_back(); }, "BlockPlan.chosen[0].block_table");
  rejects(p, [](BlockPlan& m) { m.chosen[1].block_table[0] = -1; }, "BlockPlan.chosen[1].block_table[0]");
  rejects(p, [](BlockPlan& m) { m.copies[0].dst = -2; }, "BlockPlan.copies[0].dst");
  rejects(p, [](BlockPlan& m) { m.kv_blocks_free = -1; }, "BlockPlan.kv_blocks_free");
  rejects(p, [](BlockPlan& m) { m.prefix_hits = m.prefix_queries + 1; }, "BlockPlan.prefix_hits");

  const CachedResponse c = sample_cached();
  rejects(c, [](CachedResponse& m) { m.tokens[2] = -1; }, "CachedResponse.tokens[2]");
  rejects(c, [](CachedResponse& m) { m.reason = static_cast<FinishReason>(9); }, "CachedResponse.reason");
  rejects(c, [](CachedResponse& m) { m.request.max_tokens = 0; }, "GenerateRequest.max_tokens");
}

TEST_CASE("ShardSpec validation", "[schema]") {
  const ShardSpec ok = sample_shard_spec();
  using M = ShardSpec;
  rejects(ok, [](M& m) { m.replica.assign(lim::kMaxNameBytes + 1, 'r'); }, "ShardSpec.replica");
  rejects(ok, [](M& m) { m.model_path.clear(); }, "ShardSpec.model_path");
  rejects(ok, [](M& m) { m.model_path.assign(lim::kMaxPathBytes + 1, 'p'); }, "ShardSpec.model_path");
  rejects(ok, [](M& m) { m.device.assign(lim::kMaxNameBytes + 1, 'd'); }, "ShardSpec.device");
  rejects(ok, [](M& m) { m.rank = -1; }, "ShardSpec.rank");
  rejects(ok, [](M& m) { m.rank = m.size; }, "ShardSpec.rank");
  rejects(ok, [](M& m) { m.size = 0; }, "ShardSpec.size");
  rejects(ok, [](M& m) { m.size = -4; }, "ShardSpec.size");
  rejects(ok, [](M& m) { m.size = lim::kMaxTpSize + 1; m.rank = 0; }, "ShardSpec.size");
  rejects(ok, [](M& m) { m.threads = -1; }, "ShardSpec.threads");
  rejects(ok, [](M& m) { m.threads = 1025; }, "ShardSpec.threads");
  rejects(ok, [](M& m) { m.max_context = 0; }, "ShardSpec.max_context");
  rejects(ok, [](M& m) { m.max_context = (int32_t{1} << 24) + 1; }, "ShardSpec.max_context");
  rejects(ok, [](M& m) { m.max_batch_tokens = 0; }, "ShardSpec.max_batch_tokens");
  rejects(ok, [](M& m) { m.max_batch_tokens = (int32_t{1} << 20) + 1; }, "ShardSpec.max_batch_tokens");
  rejects(ok, [](M& m) { m.max_seqs = 0; }, "ShardSpec.max_seqs");
  rejects(ok, [](M& m) { m.max_seqs = 4097; }, "ShardSpec.max_seqs");
  rejects(ok, [](M& m) { m.n_kv_blocks = 0; }, "ShardSpec.n_kv_blocks");
  rejects(ok, [](M& m) { m.n_kv_blocks = -1; }, "ShardSpec.n_kv_blocks");
  rejects(ok, [](M& m) { m.n_kv_blocks = (int32_t{1} << 30) + 1; }, "ShardSpec.n_kv_blocks");
  rejects(ok, [](M& m) { m.q8_activations = 2; }, "ShardSpec.q8_activations");
  rejects(ok, [](M& m) { m.q8_activations = 255; }, "ShardSpec.q8_activations");
  for (int32_t kv : {-2, 2, 7, static_cast<int32_t>(TensorType::bf16), std::numeric_limits<int32_t>::max()})
    rejects(ok, [kv](M& m) { m.kv_type = kv; }, "ShardSpec.kv_type");
}

TEST_CASE("ReplicaReport, RouteQuery, ModelInfo, ClusterStatus and ChaosFault validation", "[schema]") {
  const ReplicaReport rep = sample_report();
  rejects(rep, [](ReplicaReport& m) { m.replica.assign(lim::kMaxNameBytes + 1, 'r'); }, "ReplicaReport.replica");
  rejects(rep, [](ReplicaReport& m) { m.waiting = -1; }, "ReplicaReport.waiting");
  rejects(rep, [](ReplicaReport& m) { m.running = -1; }, "ReplicaReport.running");
  rejects(rep, [](ReplicaReport& m) { m.outstanding_tokens = -1; }, "ReplicaReport.outstanding_tokens");
  rejects(rep, [](ReplicaReport& m) { m.kv_blocks_used = -1; }, "ReplicaReport.kv_blocks_used");
  rejects(rep, [](ReplicaReport& m) { m.kv_blocks_free = -1; }, "ReplicaReport.kv_blocks_free");
  rejects(rep, [](ReplicaReport& m) { m.prefix_hits = m.prefix_queries + 1; }, "ReplicaReport.prefix_hits");
  rejects(rep, [](ReplicaReport& m) { m.cached_blocks.assign((size_t{1} << 22) + 1, 3); }, "ReplicaReport.cached_blocks");

  const RouteQuery q = sample_route();
  rejects(q, [](RouteQuery& m) { m.session_id = kHugeText; }, "RouteQuery.session_id");
  rejects(q, [](RouteQuery& m) { m.prompt_tokens = -1; }, "RouteQuery.prompt_tokens");
  rejects(q, [](RouteQuery& m) { m.max_tokens = -1; }, "RouteQuery.max_tokens");
  rejects(q, [](RouteQuery& m) { m.block_hashes.assign(lim::kMaxPromptTokens / 16 + 1, 1); }, "RouteQuery.block_hashes");
  rejects(q, [](RouteQuery& m) { m.exclude.assign(65, "r"); }, "RouteQuery.exclude");
  rejects(q, [](RouteQuery& m) { m.exclude[2].assign(lim::kMaxNameBytes + 1, 'x'); }, "RouteQuery.exclude[2]");

  const ModelInfo info = sample_model_info();
  rejects(info, [](ModelInfo& m) { m.name = kHugeText; }, "ModelInfo.name");
  rejects(info, [](ModelInfo& m) { m.n_vocab = -1; }, "ModelInfo.n_vocab");
  rejects(info, [](ModelInfo& m) { m.max_context = -1; }, "ModelInfo.max_context");
  rejects(info, [](ModelInfo& m) { m.max_context = (int32_t{1} << 24) + 1; }, "ModelInfo.max_context");

  require_rejected(ClusterStatus{std::string(lim::kMaxStatusBytes + 1, 'j')}, "ClusterStatus.json");

  const ChaosFault f = sample_fault();
  rejects(f, [](ChaosFault& m) { m.role = kHugeText; }, "ChaosFault.role");
  rejects(f, [](ChaosFault& m) { m.replica = kHugeText; }, "ChaosFault.replica");
  rejects(f, [](ChaosFault& m) { m.node = kHugeText; }, "ChaosFault.node");
  rejects(f, [](ChaosFault& m) { m.rank = -1; }, "ChaosFault.rank");
  rejects(f, [](ChaosFault& m) { m.kind = static_cast<ChaosFault::Kind>(10); }, "ChaosFault.kind");
  rejects(f, [](ChaosFault& m) { m.peer = kHugeText; }, "ChaosFault.peer");
  rejects(f, [](ChaosFault& m) { m.probability = 1.5; }, "ChaosFault.probability");
  rejects(f, [](ChaosFault& m) { m.probability = -0.1; }, "ChaosFault.probability");
  rejects(sample_chaos_reply(), [](ChaosReply& m) { m.message = kHugeText; }, "ChaosReply.message");
}

TEST_CASE("envelope: version, kind and framing are checked", "[schema]") {
  SECTION("wrong versions are rejected") {
    for (uint16_t v : {uint16_t{0}, uint16_t{kProtocolVersion + 1}, uint16_t{0xffff}}) {
      capnp::MallocMessageBuilder b;
      auto env = b.initRoot<cs::Envelope>();
      env.setVersion(v);
      env.initCancel().setId(5);
      require_rejected(decode(flatten(b)), "Envelope.version");
    }
  }
  SECTION("a message built by hand with the capnp builder decodes") {
    capnp::MallocMessageBuilder b;
    auto env = b.initRoot<cs::Envelope>();
    env.setVersion(kProtocolVersion);
    env.initCancel().setId(5);
    const DecodeResult r = decode(flatten(b));
    REQUIRE(r.message);
    REQUIRE(std::get<Cancel>(*r.message).id == 5);
  }
  SECTION("an unknown union member is rejected") {
    WireMessage w = encode(Message{sample_cancel()});
    // Single segment: [segment table][root pointer][Envelope data: version (16 bits), which (16 bits)].
    REQUIRE(w.words[0] >> 32 == w.words.size() - 1);
    const uint64_t unknown = std::variant_size_v<Message>;  // one past the last union member
    w.words[2] = (w.words[2] & ~(uint64_t{0xffff} << 16)) | (unknown << 16);
    require_rejected(decode(w), "corrupted on its way");  // changed after encode(): the checksum says so
    w.check = 0;  // as if made by hand: the field checks see it
    require_rejected(decode(w), "unknown message kind " + std::to_string(unknown));
  }
  SECTION("a null or absent body reads as the defaults") {
    // A sender that set the union tag but no body: the Cancel reads as Cancel{}.
    capnp::MallocMessageBuilder b;
    auto env = b.initRoot<cs::Envelope>();
    env.setVersion(kProtocolVersion);
    env.initCancel();
    const DecodeResult r = decode(flatten(b));
    REQUIRE(r.message);
  }
  SECTION("unset fields read as the C++ defaults (the schema's defaults mirror protocol.hpp)") {
    capnp::MallocMessageBuilder b;
    auto env = b.initRoot<cs::Envelope>();
    env.setVersion(kProtocolVersion);
    env.initGenerateRequest();  // no field set, sampling pointer null
    const DecodeResult r = decode(flatten(b));
    INFO(r.error);
    REQUIRE(r.message);
    require_equal(std::get<GenerateRequest>(*r.message), GenerateRequest{});

    capnp::MallocMessageBuilder e;
    auto env2 = e.initRoot<cs::Envelope>();
    env2.setVersion(kProtocolVersion);
    env2.initErrorReply();
    const DecodeResult r2 = decode(flatten(e));
    REQUIRE(r2.message);
    require_equal(std::get<ErrorReply>(*r2.message), ErrorReply{});

    // The cluster's messages: a ShardSpec with only what has no usable default set.
    capnp::MallocMessageBuilder sb;
    auto senv = sb.initRoot<cs::Envelope>();
    senv.setVersion(kProtocolVersion);
    auto spec_b = senv.initShardSpec();
    spec_b.setModelPath("m.gguf");
    spec_b.setMaxContext(64);
    spec_b.setNKvBlocks(4);
    const DecodeResult rs = decode(flatten(sb));
    INFO(rs.error);
    REQUIRE(rs.message);
    ShardSpec spec;
    spec.model_path = "m.gguf";
    spec.max_context = 64;
    spec.n_kv_blocks = 4;
    require_equal(std::get<ShardSpec>(*rs.message), spec);
    REQUIRE(std::get<ShardSpec>(*rs.message).device == "cpu");
    REQUIRE(std::get<ShardSpec>(*rs.message).kv_type == -1);

    auto empty_body = [](auto init) {
      capnp::MallocMessageBuilder mb;
      auto menv = mb.initRoot<cs::Envelope>();
      menv.setVersion(kProtocolVersion);
      init(menv);
      const DecodeResult d = decode(flatten(mb));
      INFO(d.error);
      REQUIRE(d.message);
      return *d.message;
    };
    require_equal(std::get<ReplicaReport>(empty_body([](auto env) { env.initReplicaReport(); })), ReplicaReport{});
    require_equal(std::get<RouteQuery>(empty_body([](auto env) { env.initRouteQuery(); })), RouteQuery{});
    require_equal(std::get<ModelInfo>(empty_body([](auto env) { env.initModelInfo(); })), ModelInfo{});
    require_equal(std::get<ClusterStatus>(empty_body([](auto env) { env.initClusterStatus(); })), ClusterStatus{});
  }
  SECTION("trailing words after the message are rejected") {
    WireMessage w = encode(Message{sample_chunk()});
    w.words.push_back(0);
    w.check = wire_checksum(w.words.data(), w.words.size() * sizeof(uint64_t));
    require_rejected(decode(w), "after the end");
  }
  SECTION("a message changed after encode() is refused by its checksum, whichever word changed, and counted") {
    const WireMessage good = encode(Message{sample_chunk()});
    REQUIRE(good.check != 0);
    const uint64_t before = decode_failures();
    for (size_t i = 0; i < good.words.size(); ++i) {
      for (int bit : {0, 17, 63}) {
        WireMessage w = good;
        w.words[i] ^= uint64_t{1} << bit;
        require_rejected(decode(w), "checksum");
      }
    }
    WireMessage w = good;
    w.check ^= 1;
    require_rejected(decode(w), "checksum");
    CHECK(decode_failures() == before + 3 * good.words.size() + 1);
    CHECK(decode(good).message.has_value());
  }
  SECTION("empty buffers are rejected") {
    require_rejected(decode(nullptr, 0), "empty");
    require_rejected(decode(WireMessage{}), "empty");
    require_rejected(decode_bytes(nullptr, 0), "empty");
  }
  SECTION("a length that is not a multiple of 8 is rejected") {
    const WireMessage w = encode(Message{sample_request()});
    const auto* bytes = reinterpret_cast<const uint8_t*>(w.words.data());
    for (size_t cut = 1; cut < 8; ++cut)
      require_rejected(decode_bytes(bytes, w.words.size() * 8 - cut), "not a multiple of 8");
    require_rejected(decode_bytes(bytes, 3), "not a multiple of 8");
  }
}

TEST_CASE("decode_bytes reads misaligned and aligned buffers", "[schema]") {
  for (const Message& m : every_kind()) {
    const WireMessage w = encode(m);
    const size_t n = w.words.size() * 8;
    std::vector<uint8_t> storage(n + 8);
    for (size_t shift : {0, 1, 3, 7}) {
      INFO(message_name(m) << " at offset " << shift);
      uint8_t* at = storage.data() + shift;
      // vector storage is at least 8-byte aligned, so shift 0 takes the in-place path.
      REQUIRE((reinterpret_cast<uintptr_t>(at) % 8 == 0) == (shift == 0));
      std::memcpy(at, w.words.data(), n);
      const DecodeResult r = decode_bytes(at, n);
      INFO(r.error);
      REQUIRE(r.message);
      require_equal(*r.message, m);
    }
  }
}

// ---- hostile bytes ----

TEST_CASE("every truncation of an encoded Step is an error", "[schema]") {
  const WireMessage w = encode(Message{decode_step()});
  for (size_t len = 0; len < w.words.size(); ++len) {
    INFO("prefix of " << len << " of " << w.words.size() << " words");
    const DecodeResult r = decode(w.words.data(), len);
    REQUIRE_FALSE(r.message);
    REQUIRE_FALSE(r.error.empty());
  }
  // Byte prefixes too, through the misaligned-copy path.
  const auto* bytes = reinterpret_cast<const uint8_t*>(w.words.data());
  std::vector<uint8_t> shifted(w.words.size() * 8 + 1);
  std::memcpy(shifted.data() + 1, bytes, w.words.size() * 8);
  for (size_t len = 0; len < w.words.size() * 8; ++len) {
    const DecodeResult r = decode_bytes(shifted.data() + 1, len);
    REQUIRE_FALSE(r.message);
    REQUIRE_FALSE(r.error.empty());
  }
}

TEST_CASE("every truncation of the cluster's messages is an error", "[schema]") {
  for (const Message& m : {Message{sample_shard_spec()}, Message{sample_report()}, Message{sample_route()},
                           Message{sample_model_info()}, Message{sample_status()}}) {
    const WireMessage w = encode(m);
    for (size_t len = 0; len < w.words.size(); ++len) {
      INFO(message_name(m) << ": prefix of " << len << " of " << w.words.size() << " words");
      const DecodeResult r = decode(w.words.data(), len);
      REQUIRE_FALSE(r.message);
      REQUIRE_FALSE(r.error.empty());
    }
  }
}

TEST_CASE("random bit flips never crash", "[schema]") {
  std::mt19937_64 rng(20240611);
  size_t decoded = 0, rejected = 0;
  const auto all = every_kind();
  for (int trial = 0; trial < 8000; ++trial) {
    const Message& original = all[trial % all.size()];
    WireMessage w = encode(original);
    const int flips = 1 + static_cast<int>(rng() % 4);
    for (int f = 0; f < flips; ++f) {
      const size_t bit = rng() % (w.words.size() * 64);
      w.words[bit / 64] ^= uint64_t{1} << (bit % 64);
    }
    const DecodeResult r = decode(w);
    require_well_formed(r);
    (r.message ? decoded : rejected) += 1;
  }
  std::printf("bit flips: %zu decoded to a valid message, %zu rejected\n", decoded, rejected);
  CHECK(decoded > 0);
  CHECK(rejected > 0);
}

TEST_CASE("random garbage never crashes", "[schema]") {
  std::mt19937_64 rng(77);
  size_t decoded = 0;
  for (int trial = 0; trial < 4000; ++trial) {
    const size_t n_words = rng() % 300;
    std::vector<uint64_t> words(n_words);
    for (auto& w : words) {
      // Mostly small values (plausible pointers and counts), some fully random words.
      w = (rng() % 3 == 0) ? rng() : rng() % 64 * ((rng() % 2) ? 1 : uint64_t{1} << 32);
    }
    // Half the trials get a plausible single-segment header so the bytes reach the struct reader.
    if (n_words > 0 && trial % 2 == 0) words[0] = uint64_t{n_words - 1} << 32;
    const DecodeResult r = decode(words.data(), words.size());
    require_well_formed(r);
    decoded += r.message.has_value();
    // The same bytes misaligned, with an odd length tacked on half the time.
    std::vector<uint8_t> bytes(n_words * 8 + 9);
    if (n_words > 0) std::memcpy(bytes.data() + 1, words.data(), n_words * 8);
    require_well_formed(decode_bytes(bytes.data() + 1, n_words * 8 + (trial % 2) * (1 + rng() % 7)));
  }
  std::printf("garbage: %zu of 4000 decoded to a valid message\n", decoded);

  // Valid encodings with whole words replaced: garbage pointers and counts deep inside a message.
  const auto all = every_kind();
  decoded = 0;
  for (int trial = 0; trial < 4000; ++trial) {
    WireMessage w = encode(all[trial % all.size()]);
    for (int k = 0, n = 1 + static_cast<int>(rng() % 3); k < n; ++k)
      w.words[rng() % w.words.size()] = (rng() % 2) ? rng() : rng() % 4096;
    const DecodeResult r = decode(w);
    require_well_formed(r);
    decoded += r.message.has_value();
  }
  std::printf("replaced words: %zu of 4000 decoded to a valid message\n", decoded);
}

// A hand-laid single-segment message, for shapes no builder produces: here many StepSequences whose
// token and block-table pointers all alias one list (a small message that reads as a huge one).
TEST_CASE("aliased pointers hit the traversal limit", "[schema]") {
  std::vector<uint64_t> seg;
  auto alloc = [&](size_t n) {
    seg.resize(seg.size() + n, 0);
    return seg.size() - n;
  };
  auto offset_bits = [](size_t ptr_at, size_t target) {
    const int64_t off = static_cast<int64_t>(target) - static_cast<int64_t>(ptr_at) - 1;
    return static_cast<uint64_t>(static_cast<uint32_t>(off) << 2);  // 30-bit signed word offset
  };
  auto struct_ptr = [&](size_t at, size_t target, uint16_t data_words, uint16_t ptrs) {
    seg[at] = offset_bits(at, target) | uint64_t{data_words} << 32 | uint64_t{ptrs} << 48;
  };
  auto list_ptr = [&](size_t at, size_t target, uint64_t elem_size, uint64_t count) {
    seg[at] = offset_bits(at, target) | 1 | elem_size << 32 | count << 35;
  };
  using Env = cs::Envelope::_capnpPrivate;
  using StepS = cs::Step::_capnpPrivate;
  using Seq = cs::StepSequence::_capnpPrivate;
  constexpr uint64_t kFourBytes = 4, kComposite = 7;
  const uint64_t n_tokens = 16384, n_blocks = n_tokens / 16, n_seqs = 64;

  const size_t root = alloc(1);
  const size_t env = alloc(Env::dataWordSize + Env::pointerCount);
  struct_ptr(root, env, Env::dataWordSize, Env::pointerCount);
  seg[env] = kProtocolVersion | uint64_t{cs::Envelope::STEP} << 16;
  const size_t step = alloc(StepS::dataWordSize + StepS::pointerCount);
  struct_ptr(env + Env::dataWordSize, step, StepS::dataWordSize, StepS::pointerCount);
  const size_t seq_words = Seq::dataWordSize + Seq::pointerCount;
  const size_t list = alloc(1 + n_seqs * seq_words);
  list_ptr(step + StepS::dataWordSize + 1, list, kComposite, n_seqs * seq_words);  // sequences = pointer 1
  seg[list] = (n_seqs << 2) | uint64_t{Seq::dataWordSize} << 32 | uint64_t{Seq::pointerCount} << 48;  // tag
  const size_t tokens = alloc(n_tokens / 2);
  const size_t blocks = alloc(n_blocks / 2);
  for (uint64_t i = 0; i < n_seqs; ++i) {
    const size_t ptrs = list + 1 + i * seq_words + Seq::dataWordSize;
    list_ptr(ptrs + 0, tokens, kFourBytes, n_tokens);      // tokens: zeros, valid ids
    list_ptr(ptrs + 1, blocks, kFourBytes, n_blocks);      // block_table: covers n_tokens positions
  }
  std::vector<uint64_t> words{uint64_t{seg.size()} << 32};  // segment table: one segment
  words.insert(words.end(), seg.begin(), seg.end());

  const DecodeResult r = decode(words.data(), words.size());
  INFO(r.error);
  REQUIRE_FALSE(r.message);
  CHECK_THAT(r.error, Catch::Contains("traversal limit"));

  // The same layout with each sequence's pointers aimed at lists of its own would be 64 times
  // the size; with one sequence the aliasing is harmless and the message decodes.
  seg[list] = (uint64_t{1} << 2) | uint64_t{Seq::dataWordSize} << 32 | uint64_t{Seq::pointerCount} << 48;
  seg[step + StepS::dataWordSize + 1] = offset_bits(step + StepS::dataWordSize + 1, list) | 1 | kComposite << 32 |
                                        uint64_t{seq_words} << 35;
  words.assign(1, uint64_t{seg.size()} << 32);
  words.insert(words.end(), seg.begin(), seg.end());
  const DecodeResult one = decode(words.data(), words.size());
  INFO(one.error);
  REQUIRE(one.message);
  REQUIRE(std::get<Step>(*one.message).sequences.at(0).tokens.size() == n_tokens);
}

// ---- cost ----

TEST_CASE("encode + decode time of a 16-sequence decode Step", "[schema][timing]") {
  const Step step = decode_step(16);
  const Message m{step};
  const int iterations = 20000;
  size_t sink = 0;
  const WireMessage w = encode(m);

  using Clock = std::chrono::steady_clock;
  auto time_us = [&](auto&& body) {
    for (int i = 0; i < 500; ++i) body();  // warm up the allocator and caches
    const auto t0 = Clock::now();
    for (int i = 0; i < iterations; ++i) body();
    return std::chrono::duration<double, std::micro>(Clock::now() - t0).count() / iterations;
  };
  const double enc = time_us([&] { sink += encode(m).words.size(); });
  const double dec = time_us([&] { sink += decode(w).message.has_value(); });
  const double both = time_us([&] { sink += decode(encode(m)).message.has_value(); });
  std::printf("16-sequence decode Step (%zu bytes): encode %.2f us, decode %.2f us, encode+decode %.2f us\n",
              w.words.size() * 8, enc, dec, both);
  REQUIRE(sink > 0);
}
