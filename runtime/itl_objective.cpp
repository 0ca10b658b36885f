#include "runtime/itl_objective.hpp"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>

#include "runtime/step_time_model.hpp"

namespace celer {
namespace {

constexpr int32_t kContext = 32;  // positions each decoding sequence has

}  // namespace

std::string PickedItlObjective::describe() const {
  char buf[256];
  std::snprintf(buf, sizeof buf, "%lld ms (a decode step of %d sequences took %.1f ms; with a %d-token prompt chunk %.1f ms)",
                static_cast<long long>(itl_ms), rows, decode_ms, chunk, step_ms);
  return buf;
}

PickedItlObjective pick_itl_objective(const Model& model, EngineOptions eo, int32_t max_batch_size, int32_t max_batch_tokens) {
  using clock = std::chrono::steady_clock;
  const int32_t rows = std::max(1, std::min(max_batch_size - 1, max_batch_tokens / 2));
  const int32_t max_chunk = std::max(1, max_batch_tokens - rows);
  const int32_t per_row = (kContext + 1 + kKvBlock - 1) / kKvBlock;
  const int32_t chunk_blocks = (max_chunk + kKvBlock - 1) / kKvBlock;
  eo.tp_rank = 0;
  eo.tp_size = 1;
  eo.all_reduce = nullptr;
  eo.max_seqs = rows + 1;
  eo.max_batch_tokens = std::max(max_batch_tokens, kContext);
  eo.max_context = std::max(kContext + 1, max_chunk);
  eo.n_kv_blocks = rows * per_row + chunk_blocks;
  Engine engine(model, eo);
  const int32_t n_vocab = model.config().n_vocab;

  std::vector<std::vector<int32_t>> tables(static_cast<size_t>(rows) + 1);
  int32_t next = 0;
  for (int32_t r = 0; r < rows; ++r)
    for (int32_t b = 0; b < per_row; ++b) tables[static_cast<size_t>(r)].push_back(next++);
  for (int32_t b = 0; b < chunk_blocks; ++b) tables[static_cast<size_t>(rows)].push_back(next++);
  std::vector<TokenId> context(kContext), one(1), prompt(static_cast<size_t>(max_chunk));
  for (size_t i = 0; i < context.size(); ++i) context[i] = static_cast<TokenId>((i * 7 + 3) % static_cast<size_t>(n_vocab));
  for (size_t i = 0; i < prompt.size(); ++i) prompt[i] = static_cast<TokenId>((i * 13 + 5) % static_cast<size_t>(n_vocab));
  one[0] = context[0];
  std::vector<float> logits(static_cast<size_t>(rows + 1) * static_cast<size_t>(n_vocab));

  // Each decoding sequence's context, one sequence a step (within any token budget).
  for (int32_t r = 0; r < rows; ++r) {
    SequenceInput in{context, 0, tables[static_cast<size_t>(r)], true};
    engine.forward({&in, 1}, logits.data());
  }
  std::vector<SequenceInput> batch;
  auto time_step = [&](int32_t p) {
    batch.clear();
    for (int32_t r = 0; r < rows; ++r) batch.push_back({one, kContext, tables[static_cast<size_t>(r)], true});
    if (p > 0) batch.push_back({std::span<const TokenId>(prompt.data(), static_cast<size_t>(p)), 0, tables[static_cast<size_t>(rows)], true});
    double best = 1e300;
    for (int rep = 0; rep < 3; ++rep) {  // the fastest of three: the others may have been disturbed
      const auto t0 = clock::now();
      engine.forward(batch, logits.data());
      best = std::min(best, std::chrono::duration<double, std::milli>(clock::now() - t0).count());
    }
    return best;
  };
  time_step(0);  // warm-up
  const double decode = time_step(0);
  std::vector<std::pair<int32_t, double>> steps;
  for (int32_t p = 32; p < max_chunk; p *= 2) steps.push_back({p, time_step(p)});
  steps.push_back({max_chunk, time_step(max_chunk)});
  double best_cost = 1e300;
  for (const auto& [p, t] : steps) best_cost = std::min(best_cost, std::max(1e-6, t - decode) / p);
  PickedItlObjective out;
  out.rows = rows;
  out.decode_ms = decode;
  for (const auto& [p, t] : steps)
    if (std::max(1e-6, t - decode) / p <= best_cost * 1.1) {
      out.chunk = p;
      out.step_ms = t;
      break;
    }
  out.itl_ms = std::max<int64_t>(1, static_cast<int64_t>(std::ceil(out.step_ms / kItlHeadroom)));
  return out;
}

}  // namespace celer
