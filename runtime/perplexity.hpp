// Perplexity the way llama.cpp's llama-perplexity computes it, so the numbers compare: the text
// tokenized once (with BOS when the vocabulary adds one), cut into chunks of n_ctx tokens, each
// chunk's first token replaced by BOS, every chunk evaluated from an empty cache, and only the
// second half scored: the logits at positions n_ctx/2 .. n_ctx-2 against the tokens after
// them. PPL = exp(mean negative log-likelihood); its error is llama.cpp's (the standard error of
// the mean NLL, times PPL).
#pragma once

#include <functional>
#include <string>
#include <vector>

#include "runtime/model.hpp"

namespace celer {

struct PerplexityOptions {
  int n_ctx = 512;
  int chunks = -1;  // at most this many (-1: every whole chunk the text has)
  int threads = 1;
};

struct PerplexityResult {
  int n_ctx = 0;
  int chunks = 0;
  int64_t text_tokens = 0;
  int64_t scored = 0;
  double ppl = 0;
  double ppl_error = 0;
  std::vector<double> running;  // PPL after each chunk (llama-perplexity's [1]x,[2]y,...)
};

// `progress` (if set) hears each chunk as it is done: (done, total, PPL so far). Throws
// Error(invalid_argument) when the text has fewer than 2 * n_ctx tokens or n_ctx is past the
// model's context.
PerplexityResult perplexity(const Model& model, const std::string& text, const PerplexityOptions& options,
                            const std::function<void(int, int, double)>& progress = {});

}  // namespace celer
