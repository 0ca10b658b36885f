// celer perplexity --model F --file TEXT [-c 512] [--chunks N]: perplexity as llama-perplexity
// computes it (runtime/perplexity.hpp), so the two numbers compare.
#include <cstdio>
#include <fstream>
#include <sstream>
#include <thread>
#include <string>

#include "cluster/cli/commands.hpp"
#include "runtime/error.hpp"
#include "runtime/perplexity.hpp"

namespace celer::cli {

Command add_perplexity(CLI::App& app) {
  auto model = std::make_shared<std::string>();
  auto file = std::make_shared<std::string>();
  auto o = std::make_shared<PerplexityOptions>();
  o->threads = 0;
  CLI::App* c = app.add_subcommand("perplexity", "Perplexity of a model on a text, computed as llama-perplexity does");
  c->add_option("-m,--model", *model, "GGUF model")->required();
  c->add_option("-f,--file", *file, "Text file")->required();
  c->add_option("-c,--ctx-size", o->n_ctx, "Tokens per chunk (the second half of each is scored)");
  c->add_option("--chunks", o->chunks, "At most this many chunks (default: all)");
  c->add_option("-t,--threads", o->threads, "Compute threads (default: every core)");
  return [model, file, o] {
    std::ifstream in(*file, std::ios::binary);
    if (!in) throw Error(ErrorCode::io, *file + ": cannot be read");
    std::stringstream text;
    text << in.rdbuf();
    if (o->threads <= 0) o->threads = std::max(1u, std::thread::hardware_concurrency());
    const Model m(*model);
    std::fprintf(stderr, "perplexity of %s on %s, %d tokens per chunk\n", model->c_str(), file->c_str(), o->n_ctx);
    const PerplexityResult r = perplexity(m, text.str(), *o, [](int done, int total, double ppl) {
      const int width = 30, filled = width * done / total;
      std::fprintf(stderr, "\r[%s%s] chunk %d/%d  PPL %.4f", std::string(filled, '#').c_str(), std::string(width - filled, ' ').c_str(),
                   done, total, ppl);
      if (done == total) std::fprintf(stderr, "\n");
    });
    for (size_t i = 0; i < r.running.size(); ++i) std::printf("[%zu]%.4f,", i + 1, r.running[i]);
    std::printf("\nFinal estimate: PPL = %.4f +/- %.5f (%d chunks of %d tokens, %lld scored, %lld in the text)\n", r.ppl,
                r.ppl_error, r.chunks, r.n_ctx, static_cast<long long>(r.scored), static_cast<long long>(r.text_tokens));
    return 0;
  };
}

}  // namespace celer::cli
