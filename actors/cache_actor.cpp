#include "actors/cache_actor.hpp"

#include "actors/failure.hpp"
#include "actors/wire.hpp"
#include "runtime/error.hpp"

namespace celer {
namespace {

using Self = CacheActor::stateful_base<CacheState>;

int64_t now_ms(Self* self) {
  return std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::steady_clock::now() - self->state.start).count();
}

WireMessage refuse(Self* self, const std::string& why) {
  ++self->state.malformed;
  return encode(ErrorReply{0, ErrorKind::invalid_request, why});
}

// The CachedResponse in `wm`, or nullopt (counted as malformed).
std::optional<CachedResponse> read_entry(Self* self, const WireMessage& wm) {
  DecodeResult d = decode(wm);
  if (!d.message || !std::holds_alternative<CachedResponse>(*d.message)) {
    ++self->state.malformed;
    return std::nullopt;
  }
  return std::move(std::get<CachedResponse>(*d.message));
}

// Tells the router the prefix index changed, no more often than kPrefixReportInterval: the
// first change sends at once and schedules the next look.
void report_prefixes(Self* self, const CacheSetup& setup) {
  auto& st = self->state;
  if (st.routers.empty() || st.report_scheduled || st.blocks->index_version() == st.reported_version) return;
  st.reported_version = st.blocks->index_version();
  ReplicaReport r;
  r.replica = setup.replica;
  r.blocks_changed = true;
  r.cached_blocks = st.blocks->cached_block_hashes();
  const WireMessage wire = encode(r);
  for (const ReportSink& router : st.routers) self->send(router, report_atom::value, cache_atom::value, wire);
  st.report_scheduled = true;
  self->delayed_send(self, kPrefixReportInterval, report_atom::value);
}

}  // namespace

CacheActor::behavior_type cache_actor(Self* self, CacheSetup setup) {
  exit_with_exception_text(self);  // a failed start (std::bad_alloc) says so to the scheduler
  auto& st = self->state;
  count_unexpected(self, st.malformed);
  st.blocks = std::make_unique<KvBlockManager>(setup.kv_blocks, setup.prefix_caching);
  st.planner = std::make_unique<BlockPlanner>(*st.blocks);
  st.responses = std::make_unique<ResponseCache>(setup.response_cache_entries, setup.response_cache_ttl_ms);
  st.routers = setup.routers;
  return {
      // A cache built before its node knew the routers learns them from the node.
      [=](router_atom, const std::vector<ReportSink>& routers) {
        if (!sent_from_this_node(self)) return;
        self->state.routers = routers;
        self->state.reported_version = ~uint64_t{0};  // tell the new routers everything
        report_prefixes(self, setup);
      },
      [=](plan_atom, const WireMessage& wm) -> WireMessage {
        DecodeResult d = decode(wm);
        if (!d.message) return refuse(self, d.error);
        if (!std::holds_alternative<BlockPlanRequest>(*d.message))
          return refuse(self, std::string("expected a BlockPlanRequest, got ") + message_name(*d.message));
        try {
          WireMessage plan = encode(self->state.planner->plan(std::get<BlockPlanRequest>(*d.message)));
          report_prefixes(self, setup);
          return plan;
        } catch (const Error& e) {
          return refuse(self, e.what());
        }
      },
      [=](lookup_atom, const WireMessage& wm) -> WireMessage {
        std::optional<CachedResponse> q = read_entry(self, wm);
        if (!q) return refuse(self, "expected a CachedResponse");
        if (auto answer = self->state.responses->lookup(q->request, now_ms(self))) {
          q->found = true;
          q->tokens = std::move(answer->tokens);
          q->reason = answer->reason;
        } else {
          q->found = false;
          q->tokens.clear();
        }
        q->request.prompt_tokens.clear();  // the asker has them
        return encode(*q);
      },
      [=](report_atom) {
        if (caf::actor_cast<caf::actor_addr>(self->current_sender()) != self->address()) return;  // its own timer only
        self->state.report_scheduled = false;
        report_prefixes(self, setup);
      },
      [=](store_atom, const WireMessage& wm) {
        if (std::optional<CachedResponse> e = read_entry(self, wm))
          self->state.responses->insert(e->request, {std::move(e->tokens), e->reason}, now_ms(self));
      },
  };
}

}  // namespace celer
