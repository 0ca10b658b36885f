// Generation of one sequence on an engine: prefill the prompt in chunks of the engine's token
// budget, then decode token by token until max_tokens, an end-of-generation token or the callback
// says stop. The loop behind `celer generate` and `celer bench-model`.
#pragma once

#include <cstdint>
#include <functional>
#include <span>
#include <vector>

#include "runtime/engine.hpp"
#include "runtime/sampler.hpp"

namespace celer {

struct GenerateOptions {
  int32_t max_tokens = 128;
  SamplingParams sampling;
  bool ignore_eos = false;
};

enum class StopReason { max_tokens, end_of_generation, context_full, caller };
const char* to_string(StopReason reason);

struct GenerateStats {
  StopReason stop = StopReason::max_tokens;
  int32_t n_prompt = 0;
  int32_t n_generated = 0;
  double prompt_seconds = 0;  // prefill, up to and including the first sampled token (TTFT)
  double decode_seconds = 0;  // the rest
};

// on_token(id) sees each sampled token; returning false stops generation.
GenerateStats generate(Engine& engine, std::span<const TokenId> prompt, const GenerateOptions& options,
                       const std::function<bool(TokenId)>& on_token);

}  // namespace celer
