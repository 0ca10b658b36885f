// The codec between the plain protocol structs (runtime/protocol.hpp) and their Cap'n Proto wire
// form (schema/celer.capnp). encode() writes what it is given; decode() is the trust boundary:
// it validates every field of every message it reads and turns anything malformed into an error
// value, never an exception or a crash (DESIGN.md §4).
//
// No Cap'n Proto header is included here, so code that only sends and receives messages needs
// neither the capnp headers nor the generated ones.
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <variant>
#include <vector>

#include "runtime/protocol.hpp"

namespace celer {

// A Cap'n Proto message as flat 8-byte words (the standard stream framing: segment table, then
// segments): what travels inside a CAF message. Plain words, so it is memcpy-able and a received
// copy is 8-byte aligned. `check` is encode()'s wire_checksum of the words, which decode()
// verifies: a message changed on its way (a byte flipped in a buffer, or by `celer chaos`'s
// corrupt fault) is refused as corrupted rather than read as other valid content. 0: made by
// hand (tests), not checked.
struct WireMessage {
  std::vector<uint64_t> words;
  uint64_t check = 0;
};

// A 64-bit checksum in which every change of a single 8-byte word, anywhere, changes the result
// (each step is a bijection of the running value and of the word); never 0. Not a MAC: the
// cluster secret and TLS are what keep strangers out (docs/security.md).
uint64_t wire_checksum(const void* data, size_t n_bytes);

// Messages decode() refused since the process started (malformed, corrupted, out of range):
// bad input from the network is counted (TransportStats, /metrics), never fatal.
uint64_t decode_failures();

using Message = std::variant<GenerateRequest, TokenChunk, Finished, ErrorReply, Cancel, Step, StepResult,
                             ReplicaStats, BlockPlanRequest, BlockPlan, CachedResponse, ShardSpec, ReplicaReport,
                             RouteQuery, ModelInfo, ClusterStatus, ChaosFault, ChaosReply>;

// Limits decode() enforces. Sizes are element counts, text lengths are bytes.
namespace wire_limits {
constexpr size_t kMaxMessageWords = size_t{8} << 20;  // 64 MiB: the largest buffer decode() reads
constexpr int kNestingLimit = 16;                     // the deepest path (Envelope.step.sequences[i].sampling) is 4
constexpr size_t kMaxPromptTokens = size_t{1} << 20;
constexpr size_t kMaxTextBytes = size_t{1} << 20;     // each string: prompt, stop string, tenant, message, ...
constexpr size_t kMaxStopStrings = 16;
constexpr int32_t kMaxMaxTokens = int32_t{1} << 20;
constexpr size_t kMaxChunkTokens = size_t{1} << 20;
constexpr size_t kMaxStepSequences = 4096;
constexpr size_t kMaxStepCopies = size_t{1} << 16;
constexpr size_t kMaxSequenceTokens = size_t{1} << 20;   // new tokens of one StepSequence
constexpr int64_t kMaxPositions = int64_t{1} << 24;      // n_past + new tokens of one sequence
constexpr int32_t kBlockTokens = 16;                     // KV block size the block tables are counted in
constexpr size_t kMaxRecentTokens = size_t{1} << 20;
constexpr size_t kMaxSampledTokens = kMaxStepSequences;  // at most one per StepSequence
constexpr size_t kMaxPlanSequences = size_t{1} << 16;    // commits, ended ids, candidates, preempted ids of one plan
// The cluster's messages.
constexpr size_t kMaxNameBytes = 64;                     // a replica's name (ShardSpec, ReplicaReport, RouteQuery.exclude), a device
constexpr size_t kMaxPathBytes = 4096;                   // ShardSpec.model_path (PATH_MAX)
constexpr int32_t kMaxTpSize = 64;                       // ShardSpec.size: ranks of one tensor-parallel group
constexpr int32_t kMaxShardThreads = 1024;               // ShardSpec.threads
constexpr int32_t kMaxBatchTokens = int32_t{1} << 20;    // ShardSpec.max_batch_tokens
constexpr int32_t kMaxKvBlocks = int32_t{1} << 30;       // ShardSpec.n_kv_blocks (what replica_setup allows)
constexpr size_t kMaxCachedBlocks = size_t{1} << 22;     // ReplicaReport.cached_blocks: 32 MiB of hashes
constexpr size_t kMaxRouteBlocks = kMaxPromptTokens / kBlockTokens;  // RouteQuery.block_hashes: a longest prompt's full blocks
constexpr size_t kMaxExcluded = 64;                      // RouteQuery.exclude
constexpr size_t kMaxStatusBytes = size_t{16} << 20;     // ClusterStatus.json (kMaxTextBytes does not apply to it)
}  // namespace wire_limits

// Serializes `m` inside an Envelope with version = kProtocolVersion. Does not validate (the
// receiver does, once); throws Error(invalid_argument) only when a field exceeds what Cap'n Proto
// can represent (a list of more than 2^29 elements).
WireMessage encode(const Message& m);

// Exactly one of `message` and `error` is set; `error` names the message kind and field at fault.
struct DecodeResult {
  std::optional<Message> message;
  std::string error;
};

// Reads and validates one message from 8-byte-aligned words, in place (no copy of the buffer).
// Checks: framing and Cap'n Proto limits (traversal limit from the buffer size, nesting 16),
// version, enum values, every numeric field's range and every size bound in wire_limits,
// SamplingParams per celer::validate(), and that each Step block table covers its sequence.
// Never throws; arbitrary bytes give an error.
DecodeResult decode(const uint64_t* words, size_t n_words);
DecodeResult decode(const WireMessage& m);

// The same from raw bytes that may be misaligned: copies into an aligned buffer only when `data`
// is not 8-byte aligned. A length that is not a multiple of 8 is an error.
DecodeResult decode_bytes(const uint8_t* data, size_t n_bytes);

// "GenerateRequest", "TokenChunk", ...: for logs and counters.
const char* message_name(const Message& m);

}  // namespace celer
