#include "actors/request_actor.hpp"

#include <algorithm>

#include "actors/wire.hpp"

namespace celer {
namespace {

// The longest stop string minus one: how much earlier text a stop string may reach back into.
size_t stop_reach(const std::vector<std::string>& stop) {
  size_t n = 0;
  for (const auto& s : stop) n = std::max(n, s.size());
  return n == 0 ? 0 : n - 1;
}

using Self = RequestActor::stateful_pointer<RequestState>;

// Waits for a scheduler to take the request (over): a bounded wait, routed again now and then.
void await_scheduler(Self self) {
  if (self->state.waiting_since_us == 0) self->state.waiting_since_us = unix_us();
  self->delayed_send(self, kTakeoverRetry, resume_atom::value, self->state.takeovers);
}

// The stream watchdog, for a scheduler on another node: comes back after kStreamCheck with the
// count of events seen now.
void watch_stream(Self self) {
  const auto& s = self->state;
  if (s.scheduler && s.scheduler.node() != self->node())
    self->delayed_send(self, kStreamCheck, progress_atom::value, s.events);
}

// Routes the rest of the request again: the prompt followed by every token already sent, for
// the tokens still to come. `dead`: the scheduler that died (its supervisor holds the request
// for its successor), or null when none did (the request, or a message of its stream, was lost
// on the way). With nothing left to generate, the stream ends here.
void route_rest(Self self, const SchedulerActor& dead) {
  auto& s = self->state;
  s.handed_to = caf::actor_addr{};
  GenerateRequest rest = s.original;
  rest.prompt_tokens.insert(rest.prompt_tokens.end(), s.generated.begin(), s.generated.end());
  rest.prompt_text.clear();
  rest.max_tokens = s.original.max_tokens - s.sent;
  if (!s.supervisor || rest.max_tokens <= 0 || s.stopped) {
    // Nothing to resume on (or nothing left to generate): end the stream here.
    if (rest.max_tokens <= 0 || s.stopped) {
      Finished fin{s.client_id, s.stopped ? FinishReason::stop : FinishReason::length,
                   static_cast<int32_t>(s.original.prompt_tokens.size()), s.sent, 0, {}};
      fin.times.received_us = s.received_us;
      fin.times.finished_us = unix_us();
      self->send(s.client, event_atom::value, encode(fin));
    } else {
      self->send(s.client, event_atom::value,
                 encode(ErrorReply{s.client_id, ErrorKind::unavailable, "the replica's scheduler stopped"}));
    }
    self->quit();
    return;
  }
  s.base = s.sent;
  // Names the scheduler that died: the supervisor may hear of its death after this message.
  self->send(s.supervisor, resume_atom::value, encode(rest), dead);
  if (s.scheduler && s.scheduler != dead) self->demonitor(s.scheduler.address());
  s.scheduler = nullptr;
  await_scheduler(self);
}

// The stream from a live scheduler lost a message: its sequence there is cancelled (a cancel
// that is lost too leaves it running for nobody; its chunks are refused by id) and the rest is
// routed again.
void stream_lost(Self self) {
  auto& s = self->state;
  self->send(s.scheduler, cancel_atom::value, s.id, static_cast<uint8_t>(FinishReason::cancelled));
  route_rest(self, SchedulerActor{});
}

RequestId event_id(const Message& m) {
  if (auto* c = std::get_if<TokenChunk>(&m)) return c->id;
  if (auto* f = std::get_if<Finished>(&m)) return f->id;
  if (auto* e = std::get_if<ErrorReply>(&m)) return e->id;
  return 0;
}

}  // namespace

RequestActor::behavior_type request_actor(RequestActor::stateful_pointer<RequestState> self, StreamSink client,
                                          SchedulerActor scheduler, ResumeSink supervisor, RequestId client_id, GenerateRequest request,
                                          std::shared_ptr<const ModelCard> card, std::shared_ptr<ConversationMemory> conversations,
                                          int64_t received_us) {
  auto& st = self->state;
  st.client = std::move(client);
  st.scheduler = std::move(scheduler);
  st.supervisor = std::move(supervisor);
  st.client_id = client_id;
  st.id = request.id;
  st.card = std::move(card);
  st.conversations = std::move(conversations);
  st.decoder = std::make_unique<StreamDecoder>(st.card->tokenizer());
  st.stop = request.stop;
  st.original = std::move(request);
  st.received_us = received_us;
  // The scheduler's reference is the only one; when it dies the request must live on to resume.
  // The actor holds itself until it quits (every path ends in quit(): finish, error, client gone).
  st.keep_alive = caf::actor_cast<RequestActor>(self);
  // A client that goes away cancels its request; a scheduler that dies hands it to its successor.
  self->monitor(st.client);
  if (st.scheduler) self->monitor(st.scheduler);
  else await_scheduler(self);  // a cluster's entry: a replica takes it over first
  watch_stream(self);
  // The scheduler holding the request fails it at its deadline; this is the backstop for a
  // request that no scheduler holds then (or one that stopped answering), a moment later.
  if (st.original.deadline_ms > 0)
    self->delayed_send(self, std::chrono::milliseconds(std::max<int64_t>(0, st.original.deadline_ms - unix_us() / 1000)) + kDeadlineGrace,
                       stop_atom::value);
  // An empty first chunk names this actor to the client at once, so a client that leaves (or
  // cancels) while the request still waits or prefills can cancel it then, not at its first token.
  self->send(st.client, event_atom::value, encode(TokenChunk{st.client_id, 0, {}, {}, {}}));
  self->set_down_handler([=](const caf::down_msg& dm) {
    auto& s = self->state;
    if (dm.source == s.client.address()) {
      if (s.scheduler) self->send(s.scheduler, cancel_atom::value, s.id, static_cast<uint8_t>(FinishReason::cancelled));
      self->quit();
      return;
    }
    // Its scheduler died, or the replica it was handed to went down before a scheduler took
    // it (its node died or stopped): either way the rest of the request is routed again.
    const bool scheduler_died = s.scheduler && dm.source == s.scheduler.address();
    const bool handed_to_died = !s.scheduler && dm.source == s.handed_to;
    if (!scheduler_died && !handed_to_died) return;
    route_rest(self, s.scheduler);
  });

  // Sends text (and tokens) to the client, cutting at a stop string. Returns true at a stop.
  auto emit = [=](std::vector<TokenId> tokens, std::string text, std::vector<TokenLogprob> logprobs) {
    auto& s = self->state;
    bool hit = false;
    if (!s.stop.empty() && !text.empty()) {
      const std::string window = s.tail + text;
      size_t cut = std::string::npos;
      for (const auto& stop : s.stop)
        if (!stop.empty()) cut = std::min(cut, window.find(stop));
      if (cut != std::string::npos) {
        hit = true;
        text = cut >= s.tail.size() ? text.substr(0, cut - s.tail.size()) : std::string();
      }
      const std::string joined = s.tail + text;
      const size_t keep = stop_reach(s.stop);
      s.tail = joined.size() > keep ? joined.substr(joined.size() - keep) : joined;
    }
    if (!tokens.empty() || !text.empty()) {
      TokenChunk chunk{s.client_id, s.sent, std::move(tokens), std::move(text), std::move(logprobs)};
      s.sent += static_cast<int32_t>(chunk.tokens.size());
      self->send(s.client, event_atom::value, encode(chunk));
    }
    return hit;
  };

  return {
      [=](event_atom, const WireMessage& wm) {
        auto& s = self->state;
        // Its stream comes from the scheduler that holds it, or an error from its node or
        // supervisor: nobody else writes into a client's stream.
        const caf::actor_addr from = caf::actor_cast<caf::actor_addr>(self->current_sender());
        const bool from_scheduler = s.scheduler && from == s.scheduler.address();
        if (!from_scheduler && from != s.supervisor.address()) return;
        DecodeResult d = decode(wm);
        if (!d.message) return;  // malformed or corrupted (counted by decode): a gap, if it was a chunk
        if (from_scheduler && event_id(*d.message) != s.id) {
          // A sequence of this request that the scheduler should not be running (one resumed
          // after a lost message, or taken twice from a duplicated entry): stopped there.
          self->send(s.scheduler, cancel_atom::value, event_id(*d.message), static_cast<uint8_t>(FinishReason::cancelled));
          return;
        }
        if (from_scheduler) ++s.events;
        if (auto* chunk = std::get_if<TokenChunk>(&*d.message)) {
          if (s.stopped) return;
          if (from_scheduler && s.base + chunk->first_index > s.sent) {
            stream_lost(self);  // it skips tokens: a chunk before it was lost
            return;
          }
          std::vector<TokenId> fresh;
          std::vector<TokenLogprob> logprobs;
          std::string text;
          for (size_t i = 0; i < chunk->tokens.size(); ++i) {
            const int32_t index = s.base + chunk->first_index + static_cast<int32_t>(i);
            if (index < s.sent + static_cast<int32_t>(fresh.size())) continue;  // already sent
            fresh.push_back(chunk->tokens[i]);
            if (!chunk->logprobs.empty()) logprobs.push_back(std::move(chunk->logprobs[i]));
            text += s.decoder->push(chunk->tokens[i]);
          }
          s.generated.insert(s.generated.end(), fresh.begin(), fresh.end());
          if (emit(std::move(fresh), std::move(text), std::move(logprobs))) {
            s.stopped = true;
            self->send(s.scheduler, cancel_atom::value, s.id, static_cast<uint8_t>(FinishReason::stop));
          }
        } else if (auto* fin = std::get_if<Finished>(&*d.message)) {
          if (!s.stopped) emit({}, s.decoder->flush(), {});
          Finished out = *fin;
          out.times.received_us = s.received_us;
          out.times.finished_us = unix_us();
          out.id = s.client_id;
          out.prompt_tokens = static_cast<int32_t>(s.original.prompt_tokens.size());
          // After a resume the replica counted the tokens already sent as prompt, and may have
          // found them in its prefix cache: the client's prompt is the original one.
          out.cached_tokens = std::min(out.cached_tokens, out.prompt_tokens);
          if (s.stopped) out.reason = FinishReason::stop;
          out.completion_tokens = s.sent;
          self->send(s.client, event_atom::value, encode(out));
          if (s.conversations) s.conversations->remember(s.card->tokenizer(), s.original, s.generated);
          self->quit();
        } else if (auto* err = std::get_if<ErrorReply>(&*d.message)) {
          ErrorReply out = *err;
          out.id = s.client_id;
          self->send(s.client, event_atom::value, encode(out));
          self->quit();
        }
      },
      [=](enter_atom, const caf::actor& replica) {
        auto& s = self->state;
        if (caf::actor_cast<caf::actor_addr>(self->current_sender()) != s.supervisor.address() || s.scheduler || !replica) return;
        s.handed_to = replica.address();
        self->monitor(replica);
      },
      [=](resume_atom, const SchedulerActor& scheduler, RequestId id) {
        auto& s = self->state;
        if (!scheduler || caf::actor_cast<caf::actor_addr>(self->current_sender()) != scheduler.address()) return;
        // A second scheduler that took it (the replica it was first handed to, back from a
        // stop after the request was routed again; or one it was routed to again when the
        // first took long), or the same one taking it twice (a duplicated entry), runs it for
        // nobody: stopped. (The same takeover twice, a duplicated message, changes nothing.)
        if (s.scheduler) {
          if (scheduler != s.scheduler || id != s.id)
            self->send(scheduler, cancel_atom::value, id, static_cast<uint8_t>(FinishReason::cancelled));
          return;
        }
        // Taken over by the scheduler that says so, and only while it waits for one.
        s.scheduler = scheduler;
        s.id = id;
        s.events = 0;
        s.unanswered_checks = 0;
        s.waiting_since_us = 0;
        ++s.takeovers;
        self->monitor(scheduler);
        watch_stream(self);
        if (s.cancel_pending) self->send(s.scheduler, cancel_atom::value, s.id, static_cast<uint8_t>(FinishReason::cancelled));
      },
      [=](resume_atom, uint64_t takeovers) {
        // Nobody took the request over yet: routed again (the request, or the message that it
        // was taken, may have been lost), until kTakeoverTimeout (its replica and every other
        // one are gone).
        auto& s = self->state;
        if (caf::actor_cast<caf::actor_addr>(self->current_sender()) != self->address()) return;  // its own timer only
        if (s.scheduler || takeovers != s.takeovers) return;
        if (unix_us() - s.waiting_since_us < std::chrono::duration_cast<std::chrono::microseconds>(kTakeoverTimeout).count()) {
          if (s.handed_to) self->demonitor(s.handed_to);
          route_rest(self, SchedulerActor{});
          return;
        }
        self->send(s.client, event_atom::value,
                   encode(ErrorReply{s.client_id, ErrorKind::unavailable,
                                     "no replica took the request over within " +
                                         std::to_string(std::chrono::duration_cast<std::chrono::seconds>(kTakeoverTimeout).count()) + " s"}));
        self->quit();
      },
      [=](stop_atom) {
        auto& s = self->state;
        if (caf::actor_cast<caf::actor_addr>(self->current_sender()) != self->address()) return;  // its own timer only
        if (s.scheduler) self->send(s.scheduler, cancel_atom::value, s.id, static_cast<uint8_t>(FinishReason::cancelled));
        self->send(s.client, event_atom::value,
                   encode(ErrorReply{s.client_id, ErrorKind::deadline_exceeded,
                                     "the deadline passed after " + std::to_string(s.sent) + " tokens, " +
                                         (s.scheduler ? "its scheduler no longer sending" : "no scheduler holding the request")}));
        self->quit();
      },
      [=](progress_atom, uint64_t seen) {
        // The stream watchdog: a quiet stream's scheduler is asked how far it is.
        auto& s = self->state;
        if (caf::actor_cast<caf::actor_addr>(self->current_sender()) != self->address() || !s.scheduler) return;
        if (s.events != seen) {
          watch_stream(self);
          return;
        }
        const SchedulerActor asked = s.scheduler;
        const RequestId id = s.id;
        self->request(asked, kStreamCheck, progress_atom::value, id)
            .then(
                [=](int32_t next) {
                  auto& s = self->state;
                  if (s.scheduler != asked || s.id != id) return;  // moved on meanwhile
                  s.unanswered_checks = 0;
                  // Not held there (it ended, and the end was lost), or it sent tokens that
                  // never came (after a stop string, later tokens are not taken): lost on the way.
                  const bool lost = next < 0 || (!s.stopped && s.base + next > s.sent);
                  if (lost) stream_lost(self);
                  else watch_stream(self);
                },
                [=](caf::error&) {
                  // No answer: lost too, or the scheduler is busy (asked again later); after
                  // kStreamChecks in a row the stream counts as lost (its takeover may have
                  // named the wrong actor, which will never answer).
                  auto& s = self->state;
                  if (s.scheduler != asked || s.id != id) return;
                  if (++s.unanswered_checks >= kStreamChecks) stream_lost(self);
                  else watch_stream(self);
                });
      },
      [=](cancel_atom) {
        auto& s = self->state;
        if (caf::actor_cast<caf::actor_addr>(self->current_sender()) != s.client.address()) return;  // its client's to cancel
        if (!s.scheduler) {
          s.cancel_pending = true;
          return;
        }
        self->send(s.scheduler, cancel_atom::value, s.id, static_cast<uint8_t>(FinishReason::cancelled));
      },
  };
}

}  // namespace celer
