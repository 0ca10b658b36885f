// The ITL objective a server picks for itself when its config writes none (slo: in
// runtime/config.hpp): measured at start-up on the machine it runs on, with the model it serves.
//
// A step that decodes a full batch of `rows` sequences and adds a prompt chunk of p tokens takes
// t(p) = a + b*p: a is the decode batch alone, b each prompt token (a straight line fitted to
// steps of several chunk sizes by Theil-Sen, so that one disturbed step does not move the pick).
// The step then does rows + p tokens of work in t(p). The objective is the step time at the
// smallest chunk (at least 32 tokens) whose throughput is within 90% of the largest chunk's the
// budget allows, over the scheduler's headroom: streams are as smooth as the machine allows
// without giving up more than a tenth of its throughput.
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "runtime/engine.hpp"
#include "runtime/model.hpp"

namespace celer {

struct PickedItlObjective {
  int64_t itl_ms = 0;
  double decode_ms = 0;     // a: the full decode batch alone (fitted)
  double per_token_ms = 0;  // b: each prompt token the step adds (fitted)
  int32_t rows = 0;         // the decode batch's sequences
  int32_t chunk = 0;        // the prompt chunk chosen
  int32_t max_chunk = 0;    // the largest the budget allows
  double step_ms = 0;       // a + b * chunk
  std::string describe() const;
};

// Runs a few steps on a scratch engine of `engine`'s options (one rank; KV for the steps only).
PickedItlObjective pick_itl_objective(const Model& model, EngineOptions engine, int32_t max_batch_size, int32_t max_batch_tokens);

// The pick from measured steps: (prompt chunk, step ms) pairs of a decode batch of `rows`.
PickedItlObjective fit_itl_objective(std::span<const std::pair<double, double>> steps, int32_t rows, int32_t max_chunk);

}  // namespace celer
