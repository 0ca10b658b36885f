// Token sampling for one sequence: repetition penalty, then top-k, top-p and min-p filtering,
// then temperature, then a draw. Temperature 0 is greedy.
// The draw for the token at position p is a pure function of (seed, p): no generator state
// carries from one token to the next. So a given seed yields the same tokens whatever else
// shares the batch, and a sequence recomputed after a preemption or a lost shard draws exactly
// what it drew before.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "runtime/tokenizer.hpp"

namespace celer {

struct TokenLogprob;  // runtime/protocol.hpp

struct SamplingParams {
  float temperature = 0.8f;    // 0: greedy
  int32_t top_k = 40;          // 0: off
  float top_p = 0.95f;         // 1: off
  float min_p = 0.05f;         // 0: off
  float repeat_penalty = 1.0f; // 1: off (llama.cpp's rule: positive logits / p, negative * p)
  int32_t repeat_last_n = 64;  // tokens the penalty looks back over
  uint64_t seed = 0;
};

// Checks ranges; throws Error(invalid_argument) naming the field.
void validate(const SamplingParams& p);

class Sampler {
 public:
  explicit Sampler(int32_t n_vocab);  // scratch for one vocabulary; parameters come per call
  Sampler(const SamplingParams& params, int32_t n_vocab);  // fixed parameters for sample(logits, ...)

  // Picks the token at `position` from one row of logits. `history` is the sequence so far (or
  // at least its last repeat_last_n tokens), read for the repetition penalty. Allocates nothing
  // after the first call.
  TokenId sample(std::span<const float> logits, std::span<const TokenId> history, uint64_t position) {
    return sample(params_, logits, history, position);
  }
  // The same with parameters of this call (validated by the caller).
  TokenId sample(const SamplingParams& params, std::span<const float> logits, std::span<const TokenId> history,
                 uint64_t position);

  const SamplingParams& params() const { return params_; }

  // `token`'s log-probability under the raw logits (log-softmax, before penalties and filters)
  // and the k most likely tokens with theirs, most likely first (ties: lower id first).
  void logprobs(std::span<const float> logits, TokenId token, int32_t k, TokenLogprob& out);

 private:
  struct Candidate {
    float logit;
    TokenId id;
  };
  SamplingParams params_;
  std::vector<Candidate> candidates_;
  std::vector<TokenId> recent_;
};

}  // namespace celer
