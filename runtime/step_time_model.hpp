// An online model of how long a model step takes, from its shape, learnt from the steps the
// replica runs: what lets the scheduler size each step's prefill to a latency objective on
// whatever machine it runs on (runtime/step_budget.hpp).
//
//   t(step) ~ c0 + c1 * rows + c2 * tokens + c3 * attended / 1024
//
// rows: the sequences in the step (each costs its sampling and its own attention setup);
// tokens: the new tokens (every weight matrix multiplies each of them); attended: the
// (query, key) pairs of attention, sum over sequences of n_new * (n_past + (n_new + 1) / 2). On
// a CPU a decode step is bound by streaming the weights (c0), a prefill chunk by compute (c2).
//
// The fit is least squares over the last kWindow steps, with a light ridge toward zero so that
// a coefficient the recent steps say nothing about (no prefill for a while) stays small rather
// than arbitrary. A machine that slows down (another tenant, thermal limits) is followed
// within one window.
#pragma once

#include <array>
#include <cstdint>
#include <vector>

#include "runtime/protocol.hpp"

namespace celer {

// The step time the step budget aims at, as a share of the ITL objective (and how much of an
// objective picked from a step time that step is): the gap between two tokens is the step plus
// the scheduling and messages around it, which the model does not see.
constexpr double kItlHeadroom = 0.85;

struct StepShape {
  int32_t rows = 0;
  int32_t tokens = 0;
  double attended = 0;
  // Adds one sequence of n_new tokens after n_past computed positions.
  void add(int32_t n_past, int32_t n_new) {
    ++rows;
    tokens += n_new;
    attended += static_cast<double>(n_new) * (n_past + (n_new + 1) / 2.0);
  }
};

StepShape shape_of(const Step& step);

class StepTimeModel {
 public:
  static constexpr size_t kWindow = 64;
  static constexpr size_t kMinSamples = 8;  // before this many steps, ready() is false

  void observe(const StepShape& shape, double step_us);
  bool ready() const { return n_seen_ >= kMinSamples; }
  double predict_us(const StepShape& shape) const;
  // The most tokens a sequence after n_past positions can add to `base` (0..cap) with the step
  // predicted within target_us.
  int32_t max_new_tokens(const StepShape& base, int32_t n_past, double target_us, int32_t cap) const;
  const std::array<double, 4>& coefficients() const { return coef_; }
  // The most new tokens beyond one a row that a step in the window had: how far the fit has
  // seen prefill. Past about twice that, its per-token cost is a guess (after a window of
  // decode-only steps the ridge has shrunk it toward zero), so the budget grows chunks toward
  // what it predicts rather than jumping there.
  int32_t largest_chunk_seen() const;
  // How much longer than predicted a step that carried prefill ran: the 90th percentile of
  // actual / predicted over the last kErrorWindow such steps, at least 1 (1 until
  // kMinErrorSamples are in). The budget divides its target by it, so that on a machine whose
  // steps vary (another tenant, a noisy neighbour) nine steps in ten still land within it.
  double slow_ratio() const { return slow_ratio_; }
  static constexpr size_t kErrorWindow = 16;
  static constexpr size_t kMinErrorSamples = 8;

 private:
  static std::array<double, 4> features(const StepShape& s);
  void fit();
  void record_error(const StepShape& shape, double step_us);

  struct Sample {
    std::array<double, 4> x;
    double us;
  };
  std::vector<Sample> window_;  // a ring of kWindow
  size_t next_ = 0;
  size_t n_seen_ = 0;
  std::array<double, 4> coef_{};
  std::vector<double> errors_;  // a ring of kErrorWindow ratios, actual / predicted
  size_t next_error_ = 0;
  double slow_ratio_ = 1.0;
};

}  // namespace celer
