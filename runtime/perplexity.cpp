#include "runtime/perplexity.hpp"

#include <algorithm>
#include <cmath>

#include "runtime/block_pool.hpp"
#include "runtime/engine.hpp"
#include "runtime/error.hpp"

namespace celer {

PerplexityResult perplexity(const Model& model, const std::string& text, const PerplexityOptions& options,
                            const std::function<void(int, int, double)>& progress) {
  const Tokenizer& tok = model.tokenizer();
  const int n_ctx = options.n_ctx;
  if (n_ctx < 4) throw Error(ErrorCode::invalid_argument, "perplexity: a context of " + std::to_string(n_ctx) + " tokens is too small");
  if (n_ctx > model.config().n_ctx_train && model.config().n_ctx_train > 0)
    throw Error(ErrorCode::invalid_argument, "perplexity: a context of " + std::to_string(n_ctx) + " tokens is past the model's " +
                                                 std::to_string(model.config().n_ctx_train));
  const bool add_bos = tok.add_bos_default();
  std::vector<TokenId> tokens = tok.encode(text, add_bos, false);
  if (static_cast<int64_t>(tokens.size()) < 2 * int64_t{n_ctx})
    throw Error(ErrorCode::invalid_argument, "perplexity: the text is " + std::to_string(tokens.size()) +
                                                 " tokens; a context of " + std::to_string(n_ctx) + " needs at least " +
                                                 std::to_string(2 * n_ctx));
  const int max_chunks = static_cast<int>(tokens.size() / n_ctx);
  const int n_chunk = options.chunks < 0 ? max_chunks : std::min(options.chunks, max_chunks);

  EngineOptions eo;
  eo.max_context = n_ctx;
  eo.max_batch_tokens = n_ctx;
  eo.max_seqs = 1;
  eo.n_threads = options.threads;
  Engine engine(model, eo);
  BlockPool pool(engine.n_kv_blocks());
  std::vector<int32_t> table;
  if (!pool.allocate((n_ctx + kKvBlock - 1) / kKvBlock, table))
    throw Error(ErrorCode::invalid_argument, "perplexity: the KV cache cannot hold " + std::to_string(n_ctx) + " positions");

  const int first = n_ctx / 2;
  const int64_t n_vocab = model.config().n_vocab;
  std::vector<float> logits(static_cast<size_t>(n_ctx - first) * n_vocab);
  PerplexityResult r;
  r.n_ctx = n_ctx;
  r.chunks = n_chunk;
  r.text_tokens = static_cast<int64_t>(tokens.size());
  double nll = 0, nll2 = 0;
  for (int c = 0; c < n_chunk; ++c) {
    std::span<TokenId> chunk(tokens.data() + int64_t{c} * n_ctx, static_cast<size_t>(n_ctx));
    if (add_bos) chunk[0] = tok.bos();
    SequenceInput in{chunk, 0, table, true};
    in.logits_from = first;
    engine.forward({&in, 1}, logits.data());
    // Row j holds the logits at position first + j, which predict the token after it.
    for (int j = 0; j + first < n_ctx - 1; ++j) {
      const float* row = logits.data() + int64_t{j} * n_vocab;
      const float max = *std::max_element(row, row + n_vocab);
      double sum = 0;
      for (int64_t v = 0; v < n_vocab; ++v) sum += std::exp(double(row[v]) - max);
      const double v = -(double(row[chunk[first + j + 1]]) - max - std::log(sum));
      nll += v;
      nll2 += v * v;
      ++r.scored;
    }
    r.running.push_back(std::exp(nll / static_cast<double>(r.scored)));
    if (progress) progress(c + 1, n_chunk, r.running.back());
  }
  const double mean = nll / static_cast<double>(r.scored);
  r.ppl = std::exp(mean);
  const double var = nll2 / static_cast<double>(r.scored) - mean * mean;
  r.ppl_error = var > 0 && r.scored > 1 ? std::sqrt(var / static_cast<double>(r.scored - 1)) * r.ppl : 0;
  return r;
}

}  // namespace celer
