# The wire form of every message that crosses an actor boundary (DESIGN.md §4). Each struct
# mirrors one in runtime/protocol.hpp field by field; schema/codec.* converts between the two and
# validates what it reads. Defaults equal the C++ defaults, so a field a sender left unset (or a
# struct pointer it left null) reads as the C++ struct's default.
#
# Changing a field incompatibly means bumping celer::kProtocolVersion; adding fields at the end
# (new ordinals) stays compatible.
@0xf54a582822fe934f;

using Cxx = import "/capnp/c++.capnp";
$Cxx.namespace("celer::capnp_schema");

enum Priority {
  interactive @0;
  normal @1;
  batch @2;
}

enum FinishReason {
  stop @0;
  length @1;
  cancelled @2;
}

enum ErrorKind {
  invalidRequest @0;
  queueFull @1;
  promptTooLong @2;
  rateLimited @3;
  deadlineExceeded @4;
  internal @5;
  unavailable @6;
  sloUnattainable @7;
}

struct SamplingParams {
  temperature @0 :Float32 = 0.8;
  topK @1 :Int32 = 40;
  topP @2 :Float32 = 0.95;
  minP @3 :Float32 = 0.05;
  repeatPenalty @4 :Float32 = 1.0;
  repeatLastN @5 :Int32 = 64;
  seed @6 :UInt64;
}

struct GenerateRequest {
  id @0 :UInt64;
  promptText @1 :Text;
  promptTokens @2 :List(Int32);
  sampling @3 :SamplingParams;
  maxTokens @4 :Int32 = 128;
  stop @5 :List(Text);
  ignoreEos @6 :Bool;
  addBos @7 :Bool = true;
  priority @8 :Priority = normal;
  tenant @9 :Text;
  sessionId @10 :Text;
  deadlineMs @11 :Int64;
  logprobs @12 :Int32 = -1;
  parseSpecial @13 :Bool;
  priorityGiven @14 :Bool;  # false: the replica's priorities.default replaces priority
}

struct TokenLogprob {
  token @0 :Int32;
  logprob @1 :Float32;
  topTokens @2 :List(Int32);
  topLogprobs @3 :List(Float32);
}

struct StageTimes {
  receivedUs @0 :Int64;
  queuedUs @1 :Int64;
  admittedUs @2 :Int64;
  prefillDoneUs @3 :Int64;
  firstTokenUs @4 :Int64;
  lastTokenUs @5 :Int64;
  finishedUs @6 :Int64;
}

struct TokenChunk {
  id @0 :UInt64;
  firstIndex @1 :Int32;
  tokens @2 :List(Int32);
  text @3 :Text;
  logprobs @4 :List(TokenLogprob);
}

struct Finished {
  id @0 :UInt64;
  reason @1 :FinishReason;
  promptTokens @2 :Int32;
  completionTokens @3 :Int32;
  cachedTokens @4 :Int32;
  times @5 :StageTimes;
}

struct ErrorReply {
  id @0 :UInt64;
  kind @1 :ErrorKind = internal;
  message @2 :Text;
}

struct Cancel {
  id @0 :UInt64;
}

struct StepSequence {
  id @0 :UInt64;
  tokens @1 :List(Int32);
  nPast @2 :Int32;
  blockTable @3 :List(Int32);
  sample @4 :Bool;
  sampling @5 :SamplingParams;
  recent @6 :List(Int32);
  logprobs @7 :Int32 = -1;
}

struct BlockCopy {
  src @0 :Int32;
  dst @1 :Int32;
}

struct Step {
  stepId @0 :UInt64;
  copies @1 :List(BlockCopy);
  sequences @2 :List(StepSequence);
}

struct SampledToken {
  id @0 :UInt64;
  token @1 :Int32;
  hasLogprob @2 :Bool;
  logprob @3 :TokenLogprob;
}

struct StepResult {
  stepId @0 :UInt64;
  tokens @1 :List(SampledToken);
  stepUs @2 :UInt64;          # rank 0's time for the step
  allreduceUs @3 :UInt64;     # of which inside all-reduces
  allreduceCalls @4 :UInt32;
}

struct ReplicaStats {
  waiting @0 :List(Int32);  # one count per Priority, exactly kPriorityClasses entries
  running @1 :Int32;
  kvBlocksUsed @2 :Int32;
  kvBlocksFree @3 :Int32;
  prefixQueries @4 :UInt64;
  prefixHits @5 :UInt64;
  responseCacheHits @6 :UInt64;
  malformedMessages @7 :UInt64;
  preemptions @8 :UInt64;
  shardRestarts @9 :UInt64;
  schedulerRestarts @10 :UInt64;
  cacheRestarts @11 :UInt64;
  steps @12 :UInt64;
  stepUs @13 :UInt64;
  allreduceUs @14 :UInt64;
  allreduceCalls @15 :UInt64;
  sloFinished @16 :UInt64;
  sloMet @17 :UInt64;
  sloRefused @18 :UInt64;
  ttftMissed @19 :UInt64;
  itlTokens @20 :UInt64;
  itlTokensOver @21 :UInt64;
  itlSteps @22 :UInt64;
  itlStepsOver @23 :UInt64;
  itlObjectiveUs @24 :UInt64;
  stepBudget @25 :Int32;
  hungShards @26 :UInt64;
}

struct BlockCommit {
  id @0 :UInt64;
  nComputed @1 :Int32;
  newTokens @2 :List(Int32);
}

struct BlockCandidate {
  id @0 :UInt64;
  newTokens @1 :List(Int32);
  nTokens @2 :Int32;
  started @3 :Bool;
  nComputed @4 :Int32;
  running @5 :Bool;
  priority @6 :Priority = normal;
}

struct BlockPlanRequest {
  planId @0 :UInt64;
  reset @1 :Bool;
  commits @2 :List(BlockCommit);
  ended @3 :List(UInt64);
  candidates @4 :List(BlockCandidate);
  maxBatchTokens @5 :Int32;
  maxBatchSize @6 :Int32;
}

struct PlannedSequence {
  id @0 :UInt64;
  nComputed @1 :Int32;
  nNew @2 :Int32;
  blockTable @3 :List(Int32);
}

struct BlockPlan {
  planId @0 :UInt64;
  chosen @1 :List(PlannedSequence);
  preempted @2 :List(UInt64);
  copies @3 :List(BlockCopy);
  kvBlocksUsed @4 :Int32;
  kvBlocksFree @5 :Int32;
  prefixQueries @6 :UInt64;
  prefixHits @7 :UInt64;
}

struct CachedResponse {
  request @0 :GenerateRequest;
  found @1 :Bool;
  tokens @2 :List(Int32);
  reason @3 :FinishReason;
}

# ---- The cluster's messages (docs/cluster.md) ----

struct ShardSpec {
  replica @0 :Text;
  modelPath @1 :Text;
  device @2 :Text = "cpu";  # always written: an empty string must not read back as the default
  rank @3 :Int32;
  size @4 :Int32 = 1;
  threads @5 :Int32;
  maxContext @6 :Int32;
  maxBatchTokens @7 :Int32 = 512;
  maxSeqs @8 :Int32 = 16;
  nKvBlocks @9 :Int32;
  q8Activations @10 :UInt8;  # Q8Activations as its integer value
  kvType @11 :Int32 = -1;    # TensorType as its integer value; -1: the model's default
}

struct ReplicaReport {
  replica @0 :Text;
  waiting @1 :Int32;
  running @2 :Int32;
  outstandingTokens @3 :Int64;
  kvBlocksUsed @4 :Int32;
  kvBlocksFree @5 :Int32;
  prefixQueries @6 :UInt64;
  prefixHits @7 :UInt64;
  tokensGenerated @8 :UInt64;
  draining @9 :Bool;
  blocksChanged @10 :Bool;
  cachedBlocks @11 :List(UInt64);
  schedulerRestarts @12 :UInt64;
  shardRestarts @13 :UInt64;
  cacheRestarts @14 :UInt64;
  hungShards @15 :UInt64;
}

struct RouteQuery {
  sessionId @0 :Text;
  promptTokens @1 :Int32;
  maxTokens @2 :Int32;
  blockHashes @3 :List(UInt64);
  exclude @4 :List(Text);
}

struct ModelInfo {
  name @0 :Text;
  nVocab @1 :Int32;
  maxContext @2 :Int32;
}

struct ClusterStatus {
  json @0 :Text;
}

# A fault to inject (docs/chaos.md), from `celer chaos` or a test through any node; taken only by
# a cluster whose config says `chaos: enabled`.
struct ChaosFault {
  kind @0 :Kind;
  enum Kind {
    kill @0;      # the actor (role, replica, rank) exits as killed; its supervisor restarts it
    hang @1;      # the shard rank stops answering for durationMs
    slow @2;      # the shard rank adds delayMs to every step for durationMs
    sigkill @3;   # the process of node `node` is killed
    sigstop @4;   # the process of node `node` is stopped for durationMs, then continued
    drop @5;      # wire layer, link node-peer: each actor message lost with `probability`
    delay @6;     # wire layer, link node-peer: each actor message held delayMs with `probability`
    duplicate @7; # wire layer, link node-peer: each actor message delivered twice with `probability`
    corrupt @8;   # wire layer, link node-peer: one byte of each actor message changed with `probability`
    partition @9; # wire layer: every frame between node `node` and every other node lost
  }
  role @1 :Text;       # kill: scheduler, cache or shard; hang, slow: shard
  replica @2 :Text;
  rank @3 :Int32;      # shard: its tensor-parallel rank
  node @4 :Text;       # sigkill, sigstop, partition; one end of a link
  durationMs @5 :UInt32;
  delayMs @6 :UInt32;
  peer @7 :Text;       # the other end of a link
  probability @8 :Float64;  # drop, delay, duplicate, corrupt: 0 < p <= 1
}

struct ChaosReply {
  node @0 :Text;       # where the fault was carried out
  pid @1 :Int32;       # that node's process
  message @2 :Text;    # what was done
}

# The root of every message on the wire.
struct Envelope {
  version @0 :UInt16;  # must equal celer::kProtocolVersion
  union {
    generateRequest @1 :GenerateRequest;
    tokenChunk @2 :TokenChunk;
    finished @3 :Finished;
    errorReply @4 :ErrorReply;
    cancel @5 :Cancel;
    step @6 :Step;
    stepResult @7 :StepResult;
    replicaStats @8 :ReplicaStats;
    blockPlanRequest @9 :BlockPlanRequest;
    blockPlan @10 :BlockPlan;
    cachedResponse @11 :CachedResponse;
    shardSpec @12 :ShardSpec;
    replicaReport @13 :ReplicaReport;
    routeQuery @14 :RouteQuery;
    modelInfo @15 :ModelInfo;
    clusterStatus @16 :ClusterStatus;
    chaosFault @17 :ChaosFault;
    chaosReply @18 :ChaosReply;
  }
}
