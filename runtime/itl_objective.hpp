// The ITL objective a server picks for itself when its config writes none (slo: in
// runtime/config.hpp): measured at start-up on the machine it runs on, with the model it serves.
//
// A step that decodes a full batch and adds a prompt chunk of p tokens takes t(p); the prompt's
// marginal cost per token is (t(p) - t(0)) / p, and falls as p grows (the weights are read once
// per step, whatever p). The objective is the step time at the smallest chunk whose marginal
// cost is within 10% of the best measured, over the scheduler's headroom: streams are as smooth
// as the machine allows without giving up more than about a tenth of prefill throughput.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "runtime/engine.hpp"
#include "runtime/model.hpp"

namespace celer {

struct PickedItlObjective {
  int64_t itl_ms = 0;
  double decode_ms = 0;  // t(0): the full decode batch alone
  int32_t rows = 0;      // its sequences
  int32_t chunk = 0;     // the prompt chunk chosen
  double step_ms = 0;    // t(chunk)
  std::string describe() const;
};

// Runs a few steps on a scratch engine of `engine`'s options (one rank; KV for the steps only).
PickedItlObjective pick_itl_objective(const Model& model, EngineOptions engine, int32_t max_batch_size, int32_t max_batch_tokens);

}  // namespace celer
