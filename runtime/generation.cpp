#include "runtime/generation.hpp"

#include <algorithm>
#include <chrono>

#include "runtime/block_pool.hpp"
#include "runtime/error.hpp"

namespace celer {

const char* to_string(StopReason reason) {
  switch (reason) {
    case StopReason::max_tokens: return "max tokens reached";
    case StopReason::end_of_generation: return "end of generation token";
    case StopReason::context_full: return "context full";
    case StopReason::caller: return "stopped by caller";
  }
  return "?";
}

GenerateStats generate(Engine& engine, std::span<const TokenId> prompt, const GenerateOptions& options,
                       const std::function<bool(TokenId)>& on_token) {
  using clock = std::chrono::steady_clock;
  const Model& model = engine.model();
  const int32_t n_vocab = model.config().n_vocab;
  if (prompt.empty()) throw Error(ErrorCode::invalid_argument, "the prompt is empty");
  if (static_cast<int64_t>(prompt.size()) >= engine.max_context())
    throw Error(ErrorCode::context_overflow, "the prompt has " + std::to_string(prompt.size()) +
                                                 " tokens; the context holds " + std::to_string(engine.max_context()) +
                                                 " (one more is needed for the first generated token)");
  const int32_t room = engine.max_context() - static_cast<int32_t>(prompt.size());
  const int32_t max_new = std::min<int32_t>(options.max_tokens, room);

  BlockPool pool(engine.n_kv_blocks());
  std::vector<int32_t> table;
  const int bs = engine.block_size();
  auto ensure_blocks = [&](int64_t positions) {
    const int64_t need = (positions + bs - 1) / bs - static_cast<int64_t>(table.size());
    if (need > 0 && !pool.allocate(static_cast<int32_t>(need), table))
      throw Error(ErrorCode::out_of_memory, "out of KV blocks");
  };

  std::vector<TokenId> history(prompt.begin(), prompt.end());
  history.reserve(prompt.size() + max_new);
  std::vector<float> logits(n_vocab);
  Sampler sampler(options.sampling, n_vocab);
  GenerateStats stats;
  stats.n_prompt = static_cast<int32_t>(prompt.size());

  const auto t0 = clock::now();
  int32_t n_past = 0;
  const int32_t chunk = engine.options().max_batch_tokens;
  while (n_past < static_cast<int32_t>(prompt.size())) {
    const int32_t n = std::min<int32_t>(chunk, static_cast<int32_t>(prompt.size()) - n_past);
    ensure_blocks(n_past + n);
    const bool last = n_past + n == static_cast<int32_t>(prompt.size());
    SequenceInput in{prompt.subspan(n_past, n), n_past, table, last};
    engine.forward({&in, 1}, logits.data());
    n_past += n;
  }

  auto t_first = clock::now();
  for (int32_t i = 0; i < max_new; ++i) {
    const TokenId next = sampler.sample(logits, history, history.size());
    if (i == 0) {
      t_first = clock::now();
      stats.prompt_seconds = std::chrono::duration<double>(t_first - t0).count();
    }
    history.push_back(next);
    ++stats.n_generated;
    const bool eog = !options.ignore_eos && model.tokenizer().is_end_of_generation(next);
    if (!on_token(next)) {
      stats.stop = StopReason::caller;
      break;
    }
    if (eog) {
      stats.stop = StopReason::end_of_generation;
      break;
    }
    if (i + 1 == max_new) {
      stats.stop = max_new < options.max_tokens ? StopReason::context_full : StopReason::max_tokens;
      break;
    }
    ensure_blocks(n_past + 1);
    SequenceInput in{std::span<const TokenId>(&history.back(), 1), n_past, table, true};
    engine.forward({&in, 1}, logits.data());
    ++n_past;
  }
  stats.decode_seconds = std::chrono::duration<double>(clock::now() - t_first).count();
  return stats;
}

}  // namespace celer
