// celer generate: stream a completion of a prompt from a local model.
#include <algorithm>
#include <cstdio>
#include <string>
#include <chrono>
#include <thread>

#include "celer/client.hpp"

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
  std::string q8 = "int8";
  std::string kv_type = "auto";
  std::string connect;  // HOST:PORT of a celer server; empty: run the model here
  std::vector<std::string> stop;
};

int run_remote(const GenerateArgs& a) {
  const auto [host, port] = parse_host_port(a.connect);
  auto connected = Client::connect(host, port);
  if (auto* err = std::get_if<ClientError>(&connected)) throw Error(ErrorCode::io, err->message);
  Client& client = *std::get<std::unique_ptr<Client>>(connected);
  RequestOptions o;
  o.sampling = a.sampling;
  o.max_tokens = a.n;
  o.ignore_eos = a.ignore_eos;
  o.stop = a.stop;
  std::fputs(a.prompt.c_str(), stdout);
  std::fflush(stdout);
  const auto t0 = std::chrono::steady_clock::now();
  double ttft = 0;
  GenerateOutcome out = client.generate(a.prompt, o, [&](const TokenChunk& c) {
    if (ttft == 0) ttft = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    std::fwrite(c.text.data(), 1, c.text.size(), stdout);
    std::fflush(stdout);
    return true;
  });
  std::fputc('\n', stdout);
  if (auto* err = std::get_if<ClientError>(&out))
    throw Error(ErrorCode::io, std::string("the server answered ") + to_string(err->kind) + ": " + err->message);
  const Completion& c = std::get<Completion>(out);
  const double total = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::fprintf(stderr, "\n[celer] %s: prompt %d tokens (%d from the prefix cache), TTFT %.1f ms, generated %d tokens, %.1f tokens/s; stopped: %s\n",
               a.connect.c_str(), c.prompt_tokens, c.cached_tokens, ttft * 1e3, c.completion_tokens,
               c.completion_tokens > 1 ? (c.completion_tokens - 1) / (total - ttft) : 0.0,
               c.reason == FinishReason::length ? "max tokens reached" : c.reason == FinishReason::stop ? "stop" : "cancelled");
  return 0;
}

int run_generate(const GenerateArgs& a) {
  validate(a.sampling);
  if (!a.connect.empty()) return run_remote(a);
  if (a.model.empty()) throw Error(ErrorCode::invalid_argument, "--model (or --connect) is required");
  Model model(a.model);
  EngineOptions eo;
  eo.n_threads = a.threads > 0 ? a.threads : static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  // Like llama.cpp: at most 4096 positions unless asked, so a 128k-context model does not
  // reserve gigabytes of KV memory for a short prompt.
  eo.max_context = a.context > 0 ? a.context : std::min(model.config().n_ctx_train, 4096);
  eo.max_seqs = 1;
  eo.q8 = parse_q8(a.q8);
  eo.kv_type = parse_kv_type(a.kv_type);
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
  // Text is held back only as long as it could still be the start of a stop string.
  std::string pending;
  size_t reach = 0;
  for (const auto& stop : a.stop) reach = std::max(reach, stop.size());
  bool stopped = false;
  auto out = [&](const std::string& text, bool final) {
    pending += text;
    size_t cut = std::string::npos;
    for (const auto& stop : a.stop)
      if (!stop.empty()) cut = std::min(cut, pending.find(stop));
    if (cut != std::string::npos) {
      pending.resize(cut);
      stopped = true;
    }
    const size_t keep = stopped || final || reach == 0 ? 0 : std::min(pending.size(), reach - 1);
    std::fwrite(pending.data(), 1, pending.size() - keep, stdout);
    std::fflush(stdout);
    pending.erase(0, pending.size() - keep);
  };
  const GenerateStats s = generate(engine, prompt, go, [&](TokenId id) {
    out(decoder.push(id), false);
    return !stopped;
  });
  if (!stopped) out(decoder.flush(), true);
  std::fputc('\n', stdout);
  std::fflush(stdout);

  const double decode_tps = s.n_generated > 1 ? (s.n_generated - 1) / s.decode_seconds : 0.0;
  std::fprintf(stderr,
               "\n[celer] %s: prompt %d tokens, TTFT %.1f ms (%.1f tokens/s prefill), generated %d tokens, "
               "%.1f tokens/s, %d threads, %s kernels; stopped: %s\n",
               model.name().c_str(), s.n_prompt, s.prompt_seconds * 1e3, s.n_prompt / s.prompt_seconds,
               s.n_generated, decode_tps, eo.n_threads, engine.kernels().name, stopped ? "stop string" : to_string(s.stop));
  return 0;
}

}  // namespace

Command add_generate(CLI::App& app) {
  auto a = std::make_shared<GenerateArgs>();
  CLI::App* c = app.add_subcommand("generate", "Stream a completion of a prompt from a local GGUF model");
  c->add_option("--model,-m", a->model, "GGUF model file (not with --connect)");
  c->add_option("--connect", a->connect, "HOST:PORT of a running `celer serve`: generate there");
  c->add_option("--stop", a->stop, "Stop string, not printed (repeatable)");
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
  add_engine_options(c, a->q8, a->kv_type);
  return [a] { return run_generate(*a); };
}

}  // namespace celer::cli
