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

}  // namespace

caf::behavior request_actor(caf::stateful_actor<RequestState>* self, caf::actor client, caf::actor scheduler,
                            RequestId client_id, RequestId id, std::shared_ptr<const Model> model,
                            std::vector<std::string> stop) {
  auto& st = self->state;
  st.client = std::move(client);
  st.scheduler = std::move(scheduler);
  st.client_id = client_id;
  st.id = id;
  st.model = std::move(model);
  st.decoder = std::make_unique<StreamDecoder>(st.model->tokenizer());
  st.stop = std::move(stop);
  // A client that goes away cancels its request.
  self->monitor(st.client);
  self->set_down_handler([=](const caf::down_msg& dm) {
    if (dm.source == self->state.client.address()) {
      self->send(self->state.scheduler, cancel_atom::value, self->state.id, static_cast<uint8_t>(FinishReason::cancelled));
      self->quit();
    }
  });

  // Sends text (and tokens) to the client, cutting at a stop string. Returns true at a stop.
  auto emit = [=](std::vector<TokenId> tokens, std::string text) {
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
      TokenChunk chunk{s.client_id, s.sent, std::move(tokens), std::move(text)};
      s.sent += static_cast<int32_t>(chunk.tokens.size());
      self->send(s.client, event_atom::value, encode(chunk));
    }
    return hit;
  };

  return {
      [=](event_atom, const WireMessage& wm) {
        auto& s = self->state;
        DecodeResult d = decode(wm);
        if (!d.message) return;  // the scheduler is trusted to send well-formed events
        if (auto* chunk = std::get_if<TokenChunk>(&*d.message)) {
          if (s.stopped) return;
          std::vector<TokenId> fresh;
          std::string text;
          for (size_t i = 0; i < chunk->tokens.size(); ++i) {
            if (chunk->first_index + static_cast<int32_t>(i) < s.sent + static_cast<int32_t>(fresh.size())) continue;
            fresh.push_back(chunk->tokens[i]);
            text += s.decoder->push(chunk->tokens[i]);
          }
          if (emit(std::move(fresh), std::move(text))) {
            s.stopped = true;
            self->send(s.scheduler, cancel_atom::value, s.id, static_cast<uint8_t>(FinishReason::stop));
          }
        } else if (auto* fin = std::get_if<Finished>(&*d.message)) {
          if (!s.stopped) emit({}, s.decoder->flush());
          Finished out = *fin;
          out.id = s.client_id;
          if (s.stopped) out.reason = FinishReason::stop;
          out.completion_tokens = s.sent;
          self->send(s.client, event_atom::value, encode(out));
          self->quit();
        } else if (auto* err = std::get_if<ErrorReply>(&*d.message)) {
          ErrorReply out = *err;
          out.id = s.client_id;
          self->send(s.client, event_atom::value, encode(out));
          self->quit();
        }
      },
      [=](cancel_atom) {
        self->send(self->state.scheduler, cancel_atom::value, self->state.id,
                   static_cast<uint8_t>(FinishReason::cancelled));
      },
  };
}

}  // namespace celer
