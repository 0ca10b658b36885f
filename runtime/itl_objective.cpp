#include "runtime/itl_objective.hpp"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>

#include "runtime/step_time_model.hpp"

namespace celer {
namespace {

constexpr int32_t kContext = 32;          // positions each decoding sequence has
constexpr double kRateKept = 0.9;   // of the largest chunk's step throughput
constexpr int32_t kMinChunk = 32;   // the smallest chunk picked: steps have costs the scratch engine does not see

double median(std::vector<double>& v) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  const size_t m = v.size() / 2;
  return v.size() % 2 ? v[m] : (v[m - 1] + v[m]) / 2;
}

}  // namespace

std::string PickedItlObjective::describe() const {
  char buf[320];
  std::snprintf(buf, sizeof buf,
                "%lld ms (a decode step of %d sequences takes %.1f ms and each prompt token adds %.2f ms; "
                "%d-token chunks keep 90%% of the throughput of %d-token ones, in %.1f ms steps)",
                static_cast<long long>(itl_ms), rows, decode_ms, per_token_ms, chunk, max_chunk, step_ms);
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
    // The fastest of several tries (the others may have been disturbed): five for the short
    // steps, which set the line's intercept and cost little, three for the long ones.
    const int tries = p <= 64 ? 5 : 3;
    double best = 1e300;
    for (int rep = 0; rep < tries; ++rep) {
      const auto t0 = clock::now();
      engine.forward(batch, logits.data());
      best = std::min(best, std::chrono::duration<double, std::milli>(clock::now() - t0).count());
    }
    return best;
  };
  time_step(0);  // warm-up
  std::vector<std::pair<double, double>> steps;
  steps.push_back({0, time_step(0)});
  for (int32_t p = 32; p < max_chunk; p *= 2) steps.push_back({p, time_step(p)});
  steps.push_back({max_chunk, time_step(max_chunk)});

  return fit_itl_objective(steps, rows, max_chunk);
}

PickedItlObjective fit_itl_objective(std::span<const std::pair<double, double>> steps, int32_t rows, int32_t max_chunk) {
  // t = a + b * p, fitted by Theil-Sen: b is the median of the slopes between every two steps, a
  // the median of t - b * p. One disturbed step moves neither (least squares would let a slow
  // largest chunk tilt the line and halve a).
  std::vector<double> values;
  for (size_t i = 0; i < steps.size(); ++i)
    for (size_t j = i + 1; j < steps.size(); ++j)
      if (steps[j].first != steps[i].first) values.push_back((steps[j].second - steps[i].second) / (steps[j].first - steps[i].first));
  const double b = std::max(1e-6, median(values));
  values.clear();
  for (const auto& [p, t] : steps) values.push_back(t - b * p);
  const double a = std::max(1e-3, median(values));

  // A step's throughput is (rows + p) / (a + b p) tokens a millisecond: the decode rows are
  // work done too. Where a decode row costs less than a prompt token (a > b * rows: the weights'
  // reads dominate a decode step, as on a GPU or a wide CPU), larger chunks raise it; where it
  // costs as much (a CPU that is compute-bound already at the decode batch), every chunk gives
  // the same, and the smallest is as good.
  auto rate = [&](double p) { return (rows + p) / (a + b * p); };
  const double target = kRateKept * rate(max_chunk);
  PickedItlObjective out;
  out.rows = rows;
  out.decode_ms = a;
  out.per_token_ms = b;
  out.max_chunk = max_chunk;
  out.chunk = std::min(kMinChunk, max_chunk);
  while (out.chunk < max_chunk && rate(out.chunk) < target) ++out.chunk;
  out.step_ms = a + b * out.chunk;
  out.itl_ms = std::max<int64_t>(1, static_cast<int64_t>(std::ceil(out.step_ms / kItlHeadroom)));
  return out;
}

}  // namespace celer
