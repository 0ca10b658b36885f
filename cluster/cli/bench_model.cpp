// celer bench-model: raw forward speed of a model, in the manner of llama-bench: prompt
// processing (pp: one sequence of p tokens in one step) and text generation (tg: n steps of one
// token each), mean ± standard deviation over repetitions, both after `depth` positions already
// in the KV cache (llama-bench's -d). Generation is memory-bound, so its line also gives the
// weight bytes streamed per second, beside the machine's copy bandwidth.
#include <nlohmann/json.hpp>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include <caf/all.hpp>

#include "actors/scheduler_actor.hpp"
#include "actors/wire.hpp"
#include "cluster/cli/commands.hpp"
#include "runtime/block_pool.hpp"
#include "runtime/engine.hpp"
#include "runtime/error.hpp"
#include "runtime/model.hpp"
#include "runtime/sampler.hpp"

namespace celer::cli {
namespace {

using clock_type = std::chrono::steady_clock;

struct BenchArgs {
  std::string model;
  int p = 512;
  int n = 128;
  int depth = 0;
  int reps = 5;
  int threads = 0;
  std::string json;
  std::string q8 = "int8";
  std::string kv_type = "auto";
  bool actors = false;
};

// Decodes through the actor runtime in this process (scheduler, cache, request and shard
// actors, Cap'n Proto messages, a scoped actor as the client), one request at a time.
class ActorDecoder {
 public:
  ActorDecoder(std::shared_ptr<const Model> shared, const EngineOptions& eo) : sys_(configured(cfg_)) {
    ReplicaSetup setup;
    setup.model = std::move(shared);
    setup.engine = eo;
    setup.scheduler.max_batch_size = 1;
    setup.scheduler.max_batch_tokens = eo.max_batch_tokens;
    setup.scheduler.max_context = eo.max_context;
    setup.kv_blocks = (eo.max_context + kKvBlock - 1) / kKvBlock;
    setup.engine.n_kv_blocks = setup.kv_blocks;
    replica_ = sys_.spawn(scheduler_actor, setup, SupervisorActor{});
  }
  ~ActorDecoder() { caf::anon_send_exit(replica_, caf::exit_reason::user_shutdown); }

  // Seconds per generated token after the first, for one request of n tokens.
  double seconds_per_token(int n) {
    caf::scoped_actor client{sys_};
    GenerateRequest req;
    req.id = ++next_id_;
    req.prompt_tokens = {1, 2, 3, 4, 5, 6, 7, 8};
    req.max_tokens = n;
    req.ignore_eos = true;
    req.sampling.temperature = 0;
    client->send(replica_, generate_atom::value, encode(req));
    std::vector<clock_type::time_point> arrivals;
    bool done = false;
    while (!done)
      client->receive([&](event_atom, const WireMessage& wm) {
        const DecodeResult d = decode(wm);
        if (!d.message || !std::holds_alternative<TokenChunk>(*d.message)) {
          done = true;
          return;
        }
        for (size_t i = 0; i < std::get<TokenChunk>(*d.message).tokens.size(); ++i) arrivals.push_back(clock_type::now());
      });
    if (arrivals.size() < 2) throw Error(ErrorCode::invalid_argument, "the actor runtime produced fewer than 2 tokens");
    return std::chrono::duration<double>(arrivals.back() - arrivals.front()).count() / static_cast<double>(arrivals.size() - 1);
  }

 private:
  static caf::actor_system_config& configured(caf::actor_system_config& c) {
    configure_serving_node(c);
    return c;
  }
  caf::actor_system_config cfg_;  // before sys_, which keeps a reference to it
  caf::actor_system sys_;
  SchedulerActor replica_;
  RequestId next_id_ = 0;
};

struct Summary {
  double mean = 0, sd = 0;
};

Summary summarize(const std::vector<double>& v) {
  Summary s;
  for (double x : v) s.mean += x;
  s.mean /= static_cast<double>(v.size());
  for (double x : v) s.sd += (x - s.mean) * (x - s.mean);
  s.sd = v.size() > 1 ? std::sqrt(s.sd / static_cast<double>(v.size() - 1)) : 0.0;
  return s;
}

// Copy bandwidth of this machine (read + write bytes / s) on a buffer far larger than any cache,
// with as many threads as the benchmark uses.
double copy_bandwidth_gbs(int threads) {
  const size_t bytes = size_t{256} << 20;
  std::vector<char> a(bytes, 1), b(bytes, 2);
  double best = 0;
  for (int rep = 0; rep < 3; ++rep) {
    const auto t0 = clock_type::now();
    std::vector<std::thread> ts;
    for (int t = 0; t < threads; ++t)
      ts.emplace_back([&, t] {
        const size_t chunk = bytes / threads;
        std::memcpy(b.data() + t * chunk, a.data() + t * chunk, chunk);
      });
    for (auto& t : ts) t.join();
    const double s = std::chrono::duration<double>(clock_type::now() - t0).count();
    best = std::max(best, 2.0 * bytes / s / 1e9);
  }
  return best;
}

int run_bench(const BenchArgs& a) {
  const auto shared = std::make_shared<Model>(a.model);
  const Model& model = *shared;
  const ModelConfig& c = model.config();
  if (a.p < 1 || a.n < 1 || a.reps < 1) throw Error(ErrorCode::invalid_argument, "-p, -n and -r must be positive");
  EngineOptions eo;
  eo.n_threads = a.threads > 0 ? a.threads : static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  if (a.depth < 0) throw Error(ErrorCode::invalid_argument, "-d must not be negative");
  eo.max_context = a.depth + std::max(a.p, a.n) + 1;
  eo.max_batch_tokens = a.p;
  eo.max_seqs = 1;
  eo.q8 = parse_q8(a.q8);
  eo.kv_type = parse_kv_type(a.kv_type);
  Engine engine(model, eo);
  BlockPool pool(engine.n_kv_blocks());
  std::vector<int32_t> table;
  pool.allocate(engine.n_kv_blocks(), table);
  std::vector<float> logits(c.n_vocab);
  std::mt19937 rng(42);
  std::uniform_int_distribution<TokenId> any_token(0, c.n_vocab - 1);

  // Positions [0, depth) are filled once, in chunks of at most p; pp and tg then overwrite only
  // positions from depth on.
  for (int done = 0; done < a.depth;) {
    std::vector<TokenId> chunk(std::min(a.p, a.depth - done));
    for (auto& t : chunk) t = any_token(rng);
    SequenceInput in{chunk, done, table, true};
    engine.forward({&in, 1}, logits.data());
    done += static_cast<int>(chunk.size());
  }
  auto run_pp = [&](int p) {
    std::vector<TokenId> tokens(p);
    for (auto& t : tokens) t = any_token(rng);
    SequenceInput in{tokens, a.depth, table, true};
    const auto t0 = clock_type::now();
    engine.forward({&in, 1}, logits.data());
    return std::chrono::duration<double>(clock_type::now() - t0).count();
  };
  // n steps of one token each. tg feeds the next token id along, as llama-bench does; with
  // `sample` each token is sampled (greedy) from the logits, as a server decodes.
  Sampler sampler(c.n_vocab);
  SamplingParams greedy;
  greedy.temperature = 0;
  auto run_tg = [&](int n, bool sample = false) {
    TokenId tok = any_token(rng);
    const auto t0 = clock_type::now();
    for (int i = 0; i < n; ++i) {
      SequenceInput in{std::span<const TokenId>(&tok, 1), a.depth + i, table, true};
      engine.forward({&in, 1}, logits.data());
      tok = sample ? sampler.sample(greedy, logits, {}, static_cast<uint64_t>(a.depth + i + 1))
                   : static_cast<TokenId>((tok + 1) % c.n_vocab);
    }
    return std::chrono::duration<double>(clock_type::now() - t0).count();
  };

  run_pp(std::min(a.p, 32));  // warm-up: page in the weights, spin up the pool
  run_tg(4);
  std::vector<double> pp, tg;
  for (int r = 0; r < a.reps; ++r) pp.push_back(a.p / run_pp(a.p));
  for (int r = 0; r < a.reps; ++r) tg.push_back(a.n / run_tg(a.n));
  const Summary spp = summarize(pp), stg = summarize(tg);
  const double gb_per_token = static_cast<double>(engine.weight_bytes_per_token()) / 1e9;
  const double bw = copy_bandwidth_gbs(eo.n_threads);

  // "q3_k as q8_0" for a file whose matrices are converted when it loads.
  const std::string type_name = model.stored_type() == model.main_type()
                                    ? to_string(model.main_type())
                                    : std::string(to_string(model.stored_type())) + " as " + to_string(model.main_type());
  const char* type = type_name.c_str();
  std::printf("| model | type | params | threads | kernels | test | t/s | weight GB/s |\n");
  std::printf("|---|---|---|---|---|---|---|---|\n");
  const std::string at = a.depth > 0 ? " @ d" + std::to_string(a.depth) : "";
  std::printf("| %s | %s | %.1fM | %d | %s | pp%d%s | %.1f ± %.1f | |\n", model.name().c_str(), type,
              model.n_params() / 1e6, eo.n_threads, engine.kernels().name, a.p, at.c_str(), spp.mean, spp.sd);
  std::printf("| %s | %s | %.1fM | %d | %s | tg%d%s | %.1f ± %.1f | %.1f |\n", model.name().c_str(), type,
              model.n_params() / 1e6, eo.n_threads, engine.kernels().name, a.n, at.c_str(), stg.mean, stg.sd,
              stg.mean * gb_per_token);
  if (model.main_type() == TensorType::q8_0) std::printf("Q8_0 activations: %s\n", to_string(eo.q8));
  std::printf("KV cache: %s\n", to_string(*engine.options().kv_type));
  double overhead = 0;
  if (a.actors) {
    // The same greedy decode (forward pass and sampling) directly and through the actors,
    // alternately, so that both see the same machine; the overhead, what messaging and
    // scheduling add to an iteration, is the median over rounds of one's time over the other's
    // (a single comparison on this noisy VM moves by 10%).
    ActorDecoder actors(shared, eo);
    actors.seconds_per_token(4);  // warm-up
    std::vector<double> ratios;
    double direct_sum = 0, through_sum = 0;
    for (int r = 0; r < a.reps; ++r) {
      const double direct = run_tg(a.n, true) / a.n;
      const double through = actors.seconds_per_token(a.n);
      ratios.push_back(through / direct);
      direct_sum += direct;
      through_sum += through;
    }
    std::sort(ratios.begin(), ratios.end());
    const size_t n = ratios.size();
    overhead = (n % 2 ? ratios[n / 2] : (ratios[n / 2 - 1] + ratios[n / 2]) / 2) - 1.0;
    std::printf("decode through the actor runtime: %.3f ms/token vs %.3f ms/token direct (means of %d alternating runs): "
                "actor overhead %.1f%% (median of the %d ratios)\n",
                through_sum / a.reps * 1e3, direct_sum / a.reps * 1e3, a.reps, overhead * 100, a.reps);
  }
  std::printf("machine copy bandwidth (memcpy, %d threads): %.1f GB/s\n", eo.n_threads, bw);

  if (!a.json.empty()) {
    nlohmann::json j = {
        {"model", model.name()}, {"file", a.model}, {"type", to_string(model.main_type())}, {"file_type", to_string(model.stored_type())}, {"params", model.n_params()},
        {"threads", eo.n_threads}, {"kernels", engine.kernels().name}, {"q8_activations", to_string(eo.q8)},
        {"kv_cache_dtype", to_string(*engine.options().kv_type)}, {"depth", a.depth}, {"repetitions", a.reps},
        {"pp", {{"tokens", a.p}, {"tokens_per_second_mean", spp.mean}, {"tokens_per_second_sd", spp.sd}, {"samples", pp}}},
        {"tg", {{"tokens", a.n}, {"tokens_per_second_mean", stg.mean}, {"tokens_per_second_sd", stg.sd},
                {"weight_gb_per_second", stg.mean * gb_per_token}, {"samples", tg}}},
        {"weight_bytes_per_token", engine.weight_bytes_per_token()}, {"file_weight_bytes_per_token", model.weight_bytes_per_token()},
        {"copy_bandwidth_gb_per_second", bw}};
    if (a.actors) j["actor_overhead"] = overhead;
    std::ofstream out(a.json);
    if (!out) throw Error(ErrorCode::io, a.json + ": cannot write");
    out << j.dump(2) << "\n";
  }
  return 0;
}

}  // namespace

Command add_bench_model(CLI::App& app) {
  auto a = std::make_shared<BenchArgs>();
  CLI::App* c = app.add_subcommand("bench-model", "Measure prompt processing and generation speed (like llama-bench)");
  c->add_option("--model,-m", a->model, "GGUF model file")->required();
  c->add_option("-p,--n-prompt", a->p, "Prompt tokens processed in one step");
  c->add_option("-n,--n-gen", a->n, "Tokens generated one step at a time");
  c->add_option("-d,--depth", a->depth, "Positions already in the KV cache before each test (default 0)");
  c->add_option("-r,--repetitions", a->reps, "Repetitions of each test");
  c->add_option("--threads,-t", a->threads, "Threads (default: all cores)");
  c->add_option("--json", a->json, "Also write the results as JSON to this file");
  add_engine_options(c, a->q8, a->kv_type);
  c->add_flag("--actors", a->actors, "Also decode through the in-process actor runtime and report its overhead");
  return [a] { return run_bench(*a); };
}

}  // namespace celer::cli
