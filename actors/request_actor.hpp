// The request actor: one per request, the owner of its output stream. It receives the
// scheduler's token events, detokenizes them incrementally (never half a UTF-8 character), finds
// stop strings, and streams TokenChunks to the client; it passes the client's cancel on.
// It counts what it has sent: a token index it has already sent (a recomputed step after a
// failure) is dropped, so the client never sees a token twice or a gap.
//
// If its scheduler dies, the request actor asks the replica's supervisor to resume it on the
// new scheduler: the prompt followed by every token already sent, for the tokens still to come.
// Sampling depends only on (seed, position), so the continuation produces the same tokens.
// The same path serves a stream that lost a message on its way from a scheduler on another node
// (a link that drops, docs/chaos.md): a chunk that skips an index, or a quiet stream whose
// scheduler says it sent more (or no longer holds the request: its end was lost), cancels the
// sequence there and routes the rest again. A request no scheduler took within
// kTakeoverRetry (its entry was lost) is routed again, until kTakeoverTimeout.
//
// Messages in:  (event_atom, WireMessage{TokenChunk | Finished | ErrorReply}) from the scheduler
//               (resume_atom, scheduler, id) from a new scheduler that took the request over
//               (a null scheduler at spawn: the first one takes it this way too)
//               (cancel_atom) from the client
// When the request ends, a text prompt and the tokens generated for it are remembered
// (runtime/conversation_memory.hpp), so the next turn of the conversation reuses their ids.
// Messages out: (event_atom, WireMessage{TokenChunk | Finished | ErrorReply}) to the client, with
//               the client's request id, the first being an empty TokenChunk that introduces
//               this actor; (cancel_atom, id, reason) to the scheduler.
#pragma once

#include <chrono>
#include <memory>
#include <string>
#include <vector>

#include <caf/all.hpp>

#include "actors/interfaces.hpp"
#include "runtime/conversation_memory.hpp"
#include "runtime/model_card.hpp"
#include "runtime/protocol.hpp"

namespace celer {

// How long a request waits for a scheduler to take it over after its own died (or, at a
// cluster's entry, to take it at all) before it fails; and how often meanwhile it is routed
// again (the message that carried it, or the one that says it was taken, may have been lost).
constexpr auto kTakeoverTimeout = std::chrono::seconds(30);
constexpr auto kTakeoverRetry = std::chrono::seconds(2);
// How long a stream from a scheduler on another node may stay quiet before its scheduler is
// asked how far it is (and how long the answer may take).
constexpr auto kStreamCheck = std::chrono::seconds(2);
constexpr int kStreamChecks = 3;  // unanswered in a row: the stream counts as lost
// How long past its deadline a request actor fails a request that its scheduler has not.
constexpr auto kDeadlineGrace = std::chrono::seconds(1);

struct RequestState {
  StreamSink client;
  SchedulerActor scheduler;
  ResumeSink supervisor;    // asked to resume the request when the scheduler dies (may be null)
  GenerateRequest original; // with its prompt tokens, for a resume
  std::vector<TokenId> generated;  // every token sent
  int32_t base = 0;         // the current scheduler's token index 0 is the stream's index `base`
  RequestId client_id = 0;  // the id the client chose
  RequestId id = 0;         // the replica's id
  std::shared_ptr<const ModelCard> card;  // its tokenizer decodes the stream
  std::shared_ptr<ConversationMemory> conversations;  // told a text prompt's answer (may be null)
  std::unique_ptr<StreamDecoder> decoder;
  std::vector<std::string> stop;
  std::string tail;         // the last text sent, kept to find stop strings spanning chunks
  int32_t sent = 0;         // tokens sent to the client
  bool stopped = false;     // a stop string was found: later tokens are dropped
  int64_t received_us = 0;  // when the replica received the request (StageTimes::received_us)
  RequestActor keep_alive;  // itself: see request_actor()
  uint64_t takeovers = 0;   // schedulers that took the request (over)
  int64_t waiting_since_us = 0;  // when the current wait for a takeover began (0: not waiting)
  uint64_t events = 0;      // events taken from the current scheduler (the stream watchdog's clock)
  int unanswered_checks = 0;  // the watchdog's questions in a row that got no answer
  // The replica its node handed it to, while no scheduler has taken it: if that replica goes
  // down first (its node died or stopped), the request is routed again rather than waiting out
  // the takeover timeout.
  caf::actor_addr handed_to;
  bool cancel_pending = false;  // cancelled while no scheduler held it
  static inline const char* name = "celer.request";
};

RequestActor::behavior_type request_actor(RequestActor::stateful_pointer<RequestState> self, StreamSink client,
                                          SchedulerActor scheduler, ResumeSink supervisor, RequestId client_id, GenerateRequest request,
                                          std::shared_ptr<const ModelCard> card, std::shared_ptr<ConversationMemory> conversations,
                                          int64_t received_us);

}  // namespace celer
