#include "actors/shard_actor.hpp"

#include "actors/failure.hpp"
#include "actors/wire.hpp"
#include "runtime/error.hpp"

namespace celer {

caf::behavior shard_actor(caf::stateful_actor<ShardState>* self, std::shared_ptr<const Model> model,
                          EngineOptions options, std::shared_ptr<LocalAllReduceGroup> group) {
  exit_with_exception_text(self);  // a failed start (std::bad_alloc) says so to the scheduler
  if (group) options.all_reduce = &group->rank(options.tp_rank);
  self->state.engine = std::make_unique<Engine>(*model, options);
  self->state.executor = std::make_unique<StepExecutor>(*self->state.engine);
  // The model and the group must outlive the engine: keep them alive as long as this actor.
  // A rank that exits aborts its group, so peers blocked in an all-reduce fail instead of hang.
  self->attach_functor([model, group] {
    if (group) group->abort();
  });
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
