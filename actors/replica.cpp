#include "actors/replica.hpp"

#include <algorithm>
#include <thread>

#include "actors/supervisor_actor.hpp"
#include "actors/wire.hpp"
#include "runtime/error.hpp"
#include "runtime/kv_cache.hpp"
#include "runtime/memory_info.hpp"

namespace celer {

int32_t serving_context(const ClusterConfig& c, const ModelCard& model) {
  return c.max_context > 0 ? c.max_context : std::min(model.config().n_ctx_train, 4096);
}

ReplicaSetup replica_setup(const ClusterConfig& c, std::shared_ptr<const Model> model) {
  const ModelConfig& m = model->config();
  ReplicaSetup s;
  s.model = model;
  const int32_t context = serving_context(c, *model->card());
  const int32_t min_blocks = (context + kKvBlock - 1) / kKvBlock;
  int64_t blocks = c.kv_cache_blocks;
  // The engine runs the weights as the file stores them: a dtype that asks for another type is
  // refused, never ignored.
  if (c.dtype && *c.dtype != model->main_type())
    throw Error(ErrorCode::invalid_argument,
                "dtype: " + dtype_name(c.dtype) + ", but the model's weights are stored as " + dtype_name(model->main_type()) +
                    " and celer runs them as stored: write dtype: auto (or " + dtype_name(model->main_type()) +
                    "), or convert the file (llama-quantize) to " + dtype_name(c.dtype));
  const TensorType kv_type = c.kv_cache_dtype.value_or(default_kv_type(*model));
  if (kv_type == TensorType::q8_0 && m.head_dim % kQ8Block != 0)
    throw Error(ErrorCode::invalid_argument, "kv_cache_dtype q8_0 needs a head size that is a multiple of 32; "
                                             "the model's is " + std::to_string(m.head_dim));
  const uint64_t block_bytes = KvCache::block_bytes(m.n_layer, m.n_head_kv, m.head_dim, kv_type);
  const std::string asked = c.kv_cache_blocks > 0
                                ? "kv_cache_blocks: " + std::to_string(c.kv_cache_blocks) + " blocks of " + format_bytes(block_bytes)
                                : "kv_cache_memory: " + format_bytes(c.kv_cache_memory);
  if (blocks <= 0) blocks = static_cast<int64_t>(std::min<uint64_t>(c.kv_cache_memory / block_bytes, uint64_t{INT64_MAX}));
  blocks = std::max<int64_t>(blocks, min_blocks);
  // Checked before anything is allocated: a cache that cannot fit would only fail its start
  // over and over with std::bad_alloc.
  const double kv_bytes = static_cast<double>(blocks) * static_cast<double>(block_bytes);
  const MemoryInfo mem = memory_info();
  if (mem.available > 0 && kv_bytes > static_cast<double>(mem.available))
    throw Error(ErrorCode::invalid_argument,
                asked + " asks for " + format_bytes(static_cast<uint64_t>(std::min(kv_bytes, 1.8e19))) + " of KV cache (" +
                    std::to_string(blocks) + " blocks" +
                    (blocks == min_blocks ? ", the fewest that hold one " + std::to_string(context) + "-token sequence" : "") +
                    "), but this machine has " + format_bytes(mem.available) + " of memory available (" +
                    format_bytes(mem.total) + " in all)");
  constexpr int64_t kMaxBlocks = int64_t{1} << 30;
  if (blocks > kMaxBlocks)
    throw Error(ErrorCode::invalid_argument, asked + " makes " + std::to_string(blocks) + " KV blocks; at most " +
                                                 std::to_string(kMaxBlocks) + " are supported");
  s.kv_blocks = static_cast<int32_t>(blocks);

  const int tp = std::max(1, c.tensor_parallel_size);
  s.engine.tp_size = tp;
  s.engine.n_threads = c.threads > 0 ? c.threads
                                     : std::max(1, static_cast<int>(std::thread::hardware_concurrency()) / tp);
  s.engine.max_context = context;
  s.engine.max_batch_tokens = c.max_batch_tokens;
  s.engine.max_seqs = c.max_batch_size;
  s.engine.n_kv_blocks = s.kv_blocks;
  s.engine.q8 = c.q8_activations;
  s.engine.kv_type = kv_type;

  s.scheduler.max_batch_size = c.max_batch_size;
  s.scheduler.max_batch_tokens = c.max_batch_tokens;
  s.scheduler.max_queue = c.max_queue;
  s.scheduler.max_context = context;
  s.scheduler.default_rate = c.rate_limits.default_limit;
  s.scheduler.tenant_rates = c.rate_limits.tenants;
  for (int p = 0; p < kPriorityClasses; ++p) {
    const LatencyObjective o = c.slo.of(static_cast<Priority>(p));
    s.scheduler.slo[static_cast<size_t>(p)] = Objective{o.ttft.count(), o.itl.count()};
  }
  s.scheduler.refuse_late = c.slo.refuse_late;
  s.prefix_caching = c.enable_prefix_caching;
  s.response_cache_entries = c.response_cache.enabled ? static_cast<size_t>(c.response_cache.max_entries) : 0;
  s.response_cache_ttl_ms = c.response_cache.ttl.count();
  s.default_deadline_ms = c.deadline.count();
  s.default_priority = c.default_priority;
  s.max_restarts = c.supervision.max_restarts;
  s.restart_window = c.supervision.window;
  s.restart_backoff = c.supervision.backoff;
  s.step_timeout = c.supervision.hang_timeout;
  s.chaos = c.chaos;
  return s;
}

std::optional<PickedItlObjective> pick_missing_itl(const ClusterConfig& config, ReplicaSetup& setup) {
  if (config.slo.itl_written() || !setup.model) return std::nullopt;
  PickedItlObjective picked =
      pick_itl_objective(*setup.model, setup.engine, setup.scheduler.max_batch_size, setup.scheduler.max_batch_tokens);
  for (Objective& o : setup.scheduler.slo) o.itl_ms = picked.itl_ms;
  return picked;
}

std::shared_ptr<ConversationMemory> conversation_memory(const ClusterConfig& c) {
  if (c.conversation_memory.max_entries == 0) return nullptr;
  return std::make_shared<ConversationMemory>(ConversationMemory::Limits{static_cast<size_t>(c.conversation_memory.max_entries),
                                                                          static_cast<size_t>(c.conversation_memory.max_tokens)});
}

SupervisorActor spawn_replica(caf::actor_system& sys, const ReplicaSetup& setup) { return sys.spawn(supervisor_actor, setup); }

void wait_until_ready(caf::actor_system& sys, const SupervisorActor& replica, std::chrono::milliseconds timeout) {
  caf::scoped_actor self{sys};
  const auto until = std::chrono::steady_clock::now() + timeout;
  std::string problem;
  ShardActor shard;
  // Shards placed on other nodes are built there and connected first: until the group is up
  // the replica names no shard.
  while (!shard && problem.empty()) {
    self->request(replica, timeout, shard_atom::value)
        .receive([&](const ShardActor& a) { shard = a; }, [&](const caf::error& e) { problem = sys.render(e); });
    if (shard || !problem.empty()) break;
    if (std::chrono::steady_clock::now() >= until) problem = "the replica has no shard after " + std::to_string(timeout.count()) + " ms";
    else std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  // A shard answers its first message once its engine exists; an empty step computes nothing.
  if (shard)
    self->request(shard, timeout, step_atom::value, encode(Step{}))
        .receive([&](const WireMessage&) {}, [&](const caf::error& e) { problem = sys.render(e); });
  if (!problem.empty()) throw Error(ErrorCode::io, "the replica did not become ready: " + problem);
}

}  // namespace celer
