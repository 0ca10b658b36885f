#include "runtime/sampler.hpp"

#include <algorithm>
#include <cmath>
#include <string>

#include "kernels/vec.hpp"
#include "runtime/error.hpp"
#include "runtime/protocol.hpp"

namespace celer {

void validate(const SamplingParams& p) {
  auto bad = [](const std::string& what) { throw Error(ErrorCode::invalid_argument, what); };
  if (!(p.temperature >= 0) || !std::isfinite(p.temperature)) bad("temperature must be a finite number >= 0");
  if (p.top_k < 0) bad("top_k must be >= 0 (0 turns it off)");
  if (!(p.top_p > 0 && p.top_p <= 1)) bad("top_p must be in (0, 1]");
  if (!(p.min_p >= 0 && p.min_p <= 1)) bad("min_p must be in [0, 1]");
  if (!(p.repeat_penalty > 0) || !std::isfinite(p.repeat_penalty)) bad("repeat_penalty must be a finite number > 0");
  if (p.repeat_last_n < 0) bad("repeat_last_n must be >= 0");
}

namespace {

// A uniform draw in [0, 1) from (seed, position): two rounds of splitmix64's finalizer, 53 bits.
double uniform_draw(uint64_t seed, uint64_t position) {
  uint64_t z = seed + 0x9e3779b97f4a7c15ull * (position + 1);
  for (int round = 0; round < 2; ++round) {
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    z ^= z >> 31;
  }
  return static_cast<double>(z >> 11) * 0x1.0p-53;
}

}  // namespace

Sampler::Sampler(int32_t n_vocab) { candidates_.reserve(n_vocab); }

Sampler::Sampler(const SamplingParams& params, int32_t n_vocab) : params_(params) {
  validate(params);
  candidates_.reserve(n_vocab);
  recent_.reserve(params.repeat_last_n);
}

TokenId Sampler::sample(const SamplingParams& p, std::span<const float> logits, std::span<const TokenId> history,
                        uint64_t position) {
  const int32_t n_vocab = static_cast<int32_t>(logits.size());

  // The penalty touches only the last repeat_last_n distinct tokens, so apply it to a copy of
  // just those logits instead of copying the whole row.
  recent_.clear();
  if (p.repeat_penalty != 1.0f && p.repeat_last_n > 0) {
    const size_t from = history.size() > static_cast<size_t>(p.repeat_last_n) ? history.size() - p.repeat_last_n : 0;
    for (size_t i = from; i < history.size(); ++i)
      if (history[i] >= 0 && history[i] < n_vocab &&
          std::find(recent_.begin(), recent_.end(), history[i]) == recent_.end())
        recent_.push_back(history[i]);
  }
  auto logit = [&](TokenId id) {
    float l = logits[id];
    if (!recent_.empty() && std::find(recent_.begin(), recent_.end(), id) != recent_.end())
      l = l > 0 ? l / p.repeat_penalty : l * p.repeat_penalty;
    return l;
  };

  if (p.temperature == 0.0f) {  // greedy: the first maximum, as argmax does
    if (recent_.empty())  // the common case, a plain scan (it runs once per token per sequence)
      return static_cast<TokenId>(vec_best().argmax(logits.data(), n_vocab));
    TokenId best = 0;
    float best_l = logit(0);
    for (TokenId i = 1; i < n_vocab; ++i) {
      const float l = logit(i);
      if (l > best_l) best_l = l, best = i;
    }
    return best;
  }

  candidates_.clear();
  for (TokenId i = 0; i < n_vocab; ++i) candidates_.push_back({recent_.empty() ? logits[i] : logit(i), i});
  auto by_logit = [](const Candidate& a, const Candidate& b) { return a.logit > b.logit || (a.logit == b.logit && a.id < b.id); };

  // top-k: keep the k largest, sorted. Without top-k the whole row is sorted once.
  size_t n = candidates_.size();
  if (p.top_k > 0 && static_cast<size_t>(p.top_k) < n) {
    n = p.top_k;
    std::partial_sort(candidates_.begin(), candidates_.begin() + n, candidates_.end(), by_logit);
  } else {
    std::sort(candidates_.begin(), candidates_.end(), by_logit);
  }

  // Softmax at temperature 1 for the filters (as llama.cpp applies top-p and min-p before temperature).
  const float max_l = candidates_[0].logit;
  double sum = 0;
  for (size_t i = 0; i < n; ++i) sum += std::exp(static_cast<double>(candidates_[i].logit - max_l));
  if (p.top_p < 1.0f) {
    double cum = 0;
    for (size_t i = 0; i < n; ++i) {
      cum += std::exp(static_cast<double>(candidates_[i].logit - max_l)) / sum;
      if (cum >= p.top_p) {
        n = i + 1;
        break;
      }
    }
  }
  if (p.min_p > 0.0f) {
    // p_i >= min_p * p_max  <=>  logit_i >= logit_max + log(min_p); the best token always stays.
    const float threshold = max_l + std::log(p.min_p);
    size_t keep = 1;
    while (keep < n && candidates_[keep].logit >= threshold) ++keep;
    n = keep;
  }

  // Temperature, then draw.
  double total = 0;
  for (size_t i = 0; i < n; ++i) total += std::exp(static_cast<double>(candidates_[i].logit - max_l) / p.temperature);
  const double r = uniform_draw(p.seed, position) * total;
  double acc = 0;
  for (size_t i = 0; i < n; ++i) {
    acc += std::exp(static_cast<double>(candidates_[i].logit - max_l) / p.temperature);
    if (r < acc) return candidates_[i].id;
  }
  return candidates_[n - 1].id;
}

void Sampler::logprobs(std::span<const float> logits, TokenId token, int32_t k, TokenLogprob& out) {
  // log p_i = l_i - (max + log sum_j exp(l_j - max)), in double so the sum of 10^5 terms keeps
  // its precision.
  float max_logit = logits[0];
  for (float l : logits) max_logit = std::max(max_logit, l);
  double sum = 0;
  for (float l : logits) sum += std::exp(static_cast<double>(l) - max_logit);
  const double log_z = max_logit + std::log(sum);
  out.token = token;
  out.logprob = static_cast<float>(logits[token] - log_z);
  out.top_tokens.clear();
  out.top_logprobs.clear();
  k = std::min<int32_t>(k, static_cast<int32_t>(logits.size()));
  if (k <= 0) return;
  candidates_.clear();
  for (size_t i = 0; i < logits.size(); ++i) candidates_.push_back({logits[i], static_cast<TokenId>(i)});
  auto more_likely = [](const Candidate& a, const Candidate& b) { return a.logit > b.logit || (a.logit == b.logit && a.id < b.id); };
  std::partial_sort(candidates_.begin(), candidates_.begin() + k, candidates_.end(), more_likely);
  for (int32_t i = 0; i < k; ++i) {
    out.top_tokens.push_back(candidates_[i].id);
    out.top_logprobs.push_back(static_cast<float>(candidates_[i].logit - log_z));
  }
}

}  // namespace celer
