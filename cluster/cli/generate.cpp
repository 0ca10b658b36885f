// celer generate: stream a completion of a prompt from a local model.
#include <algorithm>
#include <cstdio>
#include <string>
#include <thread>

#include "cluster/cli/commands.hpp"
#include "runtime/engine.hpp"
#include "runtime/error.hpp"
#include "runtime/generation.hpp"
#include "runtime/model.hpp"

namespace celer::cli {
namespace {

struct GenerateArgs {
  std::string model;
  std::string prompt;
  int n = 128;
  SamplingParams sampling;
  int threads = 0;
  int context = 0;
  bool ignore_eos = false;
  std::string q8 = "f32";
};

int run_generate(const GenerateArgs& a) {
  validate(a.sampling);
  Model model(a.model);
  EngineOptions eo;
  eo.n_threads = a.threads > 0 ? a.threads : static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  // Like llama.cpp: at most 4096 positions unless asked, so a 128k-context model does not
  // reserve gigabytes of KV memory for a short prompt.
  eo.max_context = a.context > 0 ? a.context : std::min(model.config().n_ctx_train, 4096);
  eo.max_seqs = 1;
  eo.q8 = parse_q8(a.q8);
  Engine engine(model, eo);

  const Tokenizer& tok = model.tokenizer();
  const std::vector<TokenId> prompt = tok.encode(a.prompt, tok.add_bos_default(), true);
  if (static_cast<int32_t>(prompt.size()) >= eo.max_context)
    throw Error(ErrorCode::context_overflow, "the prompt has " + std::to_string(prompt.size()) + " tokens but the context holds " +
                                                 std::to_string(eo.max_context) + " (see --context)");
  std::fputs(a.prompt.c_str(), stdout);
  std::fflush(stdout);

  GenerateOptions go;
  go.max_tokens = a.n;
  go.sampling = a.sampling;
  go.ignore_eos = a.ignore_eos;
  StreamDecoder decoder(tok);
  const GenerateStats s = generate(engine, prompt, go, [&](TokenId id) {
    const std::string text = decoder.push(id);
    std::fwrite(text.data(), 1, text.size(), stdout);
    std::fflush(stdout);
    return true;
  });
  const std::string rest = decoder.flush();
  std::fwrite(rest.data(), 1, rest.size(), stdout);
  std::fputc('\n', stdout);
  std::fflush(stdout);

  const double decode_tps = s.n_generated > 1 ? (s.n_generated - 1) / s.decode_seconds : 0.0;
  std::fprintf(stderr,
               "\n[celer] %s: prompt %d tokens, TTFT %.1f ms (%.1f tokens/s prefill), generated %d tokens, "
               "%.1f tokens/s, %d threads, %s kernels; stopped: %s\n",
               model.name().c_str(), s.n_prompt, s.prompt_seconds * 1e3, s.n_prompt / s.prompt_seconds,
               s.n_generated, decode_tps, eo.n_threads, engine.kernels().name, to_string(s.stop));
  return 0;
}

}  // namespace

Command add_generate(CLI::App& app) {
  auto a = std::make_shared<GenerateArgs>();
  CLI::App* c = app.add_subcommand("generate", "Stream a completion of a prompt from a local GGUF model");
  c->add_option("--model,-m", a->model, "GGUF model file")->required();
  c->add_option("--prompt,-p", a->prompt, "Prompt text")->required();
  c->add_option("-n,--max-tokens", a->n, "Tokens to generate")->check(CLI::Range(1, 1 << 20));
  c->add_option("--temperature,--temp", a->sampling.temperature, "Sampling temperature; 0 is greedy");
  c->add_option("--top-k", a->sampling.top_k, "Keep the k most likely tokens (0: off)");
  c->add_option("--top-p", a->sampling.top_p, "Nucleus sampling threshold (1: off)");
  c->add_option("--min-p", a->sampling.min_p, "Drop tokens below min_p times the best (0: off)");
  c->add_option("--repeat-penalty", a->sampling.repeat_penalty, "Penalty for the last 64 tokens (1: off)");
  c->add_option("--repeat-last-n", a->sampling.repeat_last_n, "Tokens the repeat penalty looks back over");
  c->add_option("--seed,-s", a->sampling.seed, "Random seed");
  c->add_option("--threads,-t", a->threads, "Threads (default: all cores)");
  c->add_option("--context,-c", a->context, "Context length (default: the model's)");
  c->add_flag("--ignore-eos", a->ignore_eos, "Keep generating past end-of-sequence tokens");
  c->add_option("--q8-activations", a->q8, "Q8_0 weights meet f32 activations (widened weights) or int8 ones")
      ->check(CLI::IsMember({"f32", "int8"}));
  return [a] { return run_generate(*a); };
}

}  // namespace celer::cli
