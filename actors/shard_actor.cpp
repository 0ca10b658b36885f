#include "actors/shard_actor.hpp"

#include <thread>

#include "actors/collective.hpp"
#include "actors/failure.hpp"
#include "actors/wire.hpp"
#include "runtime/error.hpp"
#include "runtime/memory_info.hpp"

namespace celer {

ShardActor::behavior_type shard_actor(ShardActor::stateful_pointer<ShardState> self, std::shared_ptr<const Model> model,
                          EngineOptions options, std::shared_ptr<LocalAllReduceGroup> group, caf::actor_addr owner,
                          std::shared_ptr<MemoryPromise> memory) {
  self->state.owner = std::move(owner);
  // Once the engine is built or has thrown (std::bad_alloc), its memory is no longer a promise.
  struct Release {
    MemoryPromise* p;
    ~Release() {
      if (p) p->release();
    }
  } release_memory{memory.get()};
  exit_with_exception_text(self);  // a failed start (std::bad_alloc) says so to the scheduler
  count_unexpected(self, self->state.malformed);
  // How long a rank waits for its peers' partial sums before it counts them lost: longer than
  // any forward pass takes between two all-reduces.
  constexpr auto kPeerTimeout = std::chrono::seconds(60);
  if (group) {
    options.all_reduce = &group->rank(options.tp_rank);
  } else if (options.tp_size > 1) {
    self->state.network = std::make_shared<NetworkAllReduce>(self->system(), options.tp_rank, options.tp_size, kPeerTimeout);
    options.all_reduce = self->state.network.get();
  }
  self->state.engine = std::make_unique<Engine>(*model, options);
  self->state.executor = std::make_unique<StepExecutor>(*self->state.engine);
  // The model and the group must outlive the engine: keep them alive as long as this actor.
  // A rank that exits aborts its group, so peers blocked in an all-reduce fail instead of hang.
  self->attach_functor([model, group, network = self->state.network] {
    if (group) group->abort();
    if (network) network->abort("a rank of the group stopped");
  });
  return {
      [=](step_atom, const WireMessage& wm) -> WireMessage {
        // A step writes KV blocks: only the scheduler whose blocks they are may send one.
        if (caf::actor_cast<caf::actor_addr>(self->current_sender()) != self->state.owner) {
          ++self->state.malformed;
          return encode(ErrorReply{0, ErrorKind::invalid_request, "shard: a step from an actor that is not its scheduler"});
        }
        DecodeResult d = decode(wm);
        if (!d.message || !std::holds_alternative<Step>(*d.message)) {
          ++self->state.malformed;
          return encode(ErrorReply{0, ErrorKind::invalid_request,
                                   "shard: not a Step: " + (d.message ? message_name(*d.message) : d.error)});
        }
        try {
          ++self->state.steps;
          WireMessage result = encode(self->state.executor->run(std::get<Step>(*d.message)));
          if (self->state.slow_ms > 0 && std::chrono::steady_clock::now() < self->state.slow_until)
            std::this_thread::sleep_for(std::chrono::milliseconds(self->state.slow_ms));
          return result;
        } catch (const Error& e) {
          if (e.code() == ErrorCode::unavailable && self->state.network) {
            // The group is broken (a peer died or went silent mid-step): this rank's KV is as
            // lost as the peer's. The scheduler sees it go down and rebuilds the group.
            self->quit(caf::make_error(caf::sec::runtime_error, std::string("shard: ") + e.what()));
            return encode(ErrorReply{0, ErrorKind::unavailable, std::string("shard: ") + e.what()});
          }
          ++self->state.malformed;
          return encode(ErrorReply{0, ErrorKind::invalid_request, std::string("shard: step refused: ") + e.what()});
        }
      },
      [=](chaos_atom, bool hang, uint32_t duration_ms, uint32_t delay_ms) {
        // Its scheduler takes a fault only in a cluster with `chaos: enabled`. A detached actor:
        // the sleep holds up this shard alone, as a wedged device or a stuck driver call would.
        if (caf::actor_cast<caf::actor_addr>(self->current_sender()) != self->state.owner) {
          ++self->state.malformed;
          return;
        }
        if (hang) {
          std::this_thread::sleep_for(std::chrono::milliseconds(duration_ms));
          return;
        }
        self->state.slow_ms = delay_ms;
        self->state.slow_until = std::chrono::steady_clock::now() + std::chrono::milliseconds(duration_ms);
      },
      [=](collective_atom) -> EndpointActor {
        if (!self->state.network) return EndpointActor{};
        return self->state.network->endpoint();
      },
      [=](peers_atom, std::vector<EndpointActor> peers) -> bool {
        if (!self->state.network || caf::actor_cast<caf::actor_addr>(self->current_sender()) != self->state.owner) return false;
        try {
          self->state.network->connect(std::move(peers));
          return true;
        } catch (const Error& e) {
          self->quit(caf::make_error(caf::sec::runtime_error, std::string("shard: ") + e.what()));
          return false;
        }
      },
  };
}

EngineOptions engine_options(const ShardSpec& spec, int default_threads) {
  EngineOptions o;
  o.n_threads = spec.threads > 0 ? spec.threads : std::max(1, default_threads);
  o.n_kv_blocks = spec.n_kv_blocks;
  o.max_context = spec.max_context;
  o.max_batch_tokens = spec.max_batch_tokens;
  o.max_seqs = spec.max_seqs;
  o.q8 = static_cast<Q8Activations>(spec.q8_activations);
  if (spec.kv_type >= 0) o.kv_type = static_cast<TensorType>(spec.kv_type);
  o.tp_rank = spec.rank;
  o.tp_size = spec.size;
  return o;
}

}  // namespace celer
