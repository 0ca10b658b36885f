#include "actors/shard_actor.hpp"

#include "actors/wire.hpp"
#include "runtime/error.hpp"

namespace celer {

caf::behavior shard_actor(caf::stateful_actor<ShardState>* self, std::shared_ptr<const Model> model,
                          EngineOptions options) {
  self->state.engine = std::make_unique<Engine>(*model, options);
  self->state.executor = std::make_unique<StepExecutor>(*self->state.engine);
  // The model must outlive the engine: keep it alive as long as this actor.
  self->attach_functor([model] {});
  return {
      [=](step_atom, const WireMessage& wm) -> WireMessage {
        DecodeResult d = decode(wm);
        if (!d.message || !std::holds_alternative<Step>(*d.message)) {
          ++self->state.malformed;
          return encode(ErrorReply{0, ErrorKind::invalid_request,
                                   "shard: not a Step: " + (d.message ? message_name(*d.message) : d.error)});
        }
        try {
          ++self->state.steps;
          return encode(self->state.executor->run(std::get<Step>(*d.message)));
        } catch (const Error& e) {
          ++self->state.malformed;
          return encode(ErrorReply{0, ErrorKind::invalid_request, std::string("shard: step refused: ") + e.what()});
        }
      },
  };
}

}  // namespace celer
