#include "runtime/step_time_model.hpp"

#include <algorithm>
#include <cmath>

namespace celer {

StepShape shape_of(const Step& step) {
  StepShape s;
  for (const StepSequence& q : step.sequences) s.add(q.n_past, static_cast<int32_t>(q.tokens.size()));
  return s;
}

std::array<double, 4> StepTimeModel::features(const StepShape& s) {
  return {1.0, static_cast<double>(s.rows), static_cast<double>(s.tokens), s.attended / 1024.0};
}

void StepTimeModel::observe(const StepShape& shape, double step_us) {
  if (shape.rows == 0 || !(step_us > 0)) return;
  record_error(shape, step_us);
  const Sample sample{features(shape), step_us};
  if (window_.size() < kWindow) window_.push_back(sample);
  else window_[next_] = sample;
  next_ = (next_ + 1) % kWindow;
  ++n_seen_;
  fit();
}

void StepTimeModel::fit() {
  constexpr int n = 4;
  double a[n][n + 1] = {};
  for (const Sample& s : window_) {
    for (int i = 0; i < n; ++i) {
      for (int j = 0; j < n; ++j) a[i][j] += s.x[i] * s.x[j];
      a[i][n] += s.x[i] * s.us;
    }
  }
  // Ridge: 1% of each feature's mean square (not on the intercept), and a floor so that a
  // feature that was always 0 still gives a solvable system.
  const double count = static_cast<double>(window_.size());
  for (int i = 1; i < n; ++i) a[i][i] += 0.01 * a[i][i] / count + 1e-6;
  // Gaussian elimination with partial pivoting.
  for (int c = 0; c < n; ++c) {
    int pivot = c;
    for (int r = c + 1; r < n; ++r)
      if (std::abs(a[r][c]) > std::abs(a[pivot][c])) pivot = r;
    if (std::abs(a[pivot][c]) < 1e-12) return;  // keep the previous fit
    if (pivot != c)
      for (int j = 0; j <= n; ++j) std::swap(a[c][j], a[pivot][j]);
    for (int r = 0; r < n; ++r) {
      if (r == c) continue;
      const double f = a[r][c] / a[c][c];
      for (int j = c; j <= n; ++j) a[r][j] -= f * a[c][j];
    }
  }
  for (int i = 0; i < n; ++i) coef_[static_cast<size_t>(i)] = a[i][n] / a[i][i];
}

void StepTimeModel::record_error(const StepShape& shape, double step_us) {
  // Decode-only steps are most of the window, so the fit predicts them well by construction;
  // the steps whose error matters are the ones the budget sized.
  if (!ready() || shape.tokens <= shape.rows) return;
  const double predicted = predict_us(shape);
  if (!(predicted > 0)) return;
  const double ratio = step_us / predicted;
  if (errors_.size() < kErrorWindow) errors_.push_back(ratio);
  else errors_[next_error_] = ratio;
  next_error_ = (next_error_ + 1) % kErrorWindow;
  if (errors_.size() < kMinErrorSamples) return;
  std::array<double, kErrorWindow> sorted{};
  std::copy(errors_.begin(), errors_.end(), sorted.begin());
  const auto end = sorted.begin() + static_cast<std::ptrdiff_t>(errors_.size());
  const auto at = sorted.begin() + static_cast<std::ptrdiff_t>((errors_.size() * 9) / 10);
  std::nth_element(sorted.begin(), at, end);
  // Capped: a fit that has just learnt what prefill costs again (after a long decode-only
  // stretch) can be off several times over for a step or two, and is not that far off after.
  slow_ratio_ = std::clamp(*at, 1.0, 2.0);
}

int32_t StepTimeModel::largest_chunk_seen() const {
  double most = 0;
  for (const Sample& s : window_) most = std::max(most, s.x[2] - s.x[1]);
  return static_cast<int32_t>(most);
}

double StepTimeModel::predict_us(const StepShape& shape) const {
  const auto x = features(shape);
  double t = 0;
  for (size_t i = 0; i < x.size(); ++i) t += coef_[i] * x[i];
  return t;
}

int32_t StepTimeModel::max_new_tokens(const StepShape& base, int32_t n_past, double target_us, int32_t cap) const {
  auto with = [&](int32_t p) {
    StepShape s = base;
    s.add(n_past, p);
    return predict_us(s);
  };
  if (cap <= 0 || with(1) > target_us) return 0;
  // The predicted time grows with p (every coefficient the fit gives a cost is non-negative in
  // practice; a negative one only makes the search end early): the largest p within target.
  int32_t lo = 1, hi = cap;
  while (lo < hi) {
    const int32_t mid = lo + (hi - lo + 1) / 2;
    if (with(mid) <= target_us) lo = mid;
    else hi = mid - 1;
  }
  return lo;
}

}  // namespace celer
