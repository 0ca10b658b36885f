// celer bench: drive a running `celer serve` like vLLM's `vllm bench serve` (DESIGN.md §9),
// through the client library (--connect) or the OpenAI HTTP API (--url, cluster/cli/bench_http.*).
// Open-loop Poisson arrivals at --request-rate, optionally capped at --max-concurrency requests
// in flight, over a synthetic dataset of token-id prompts (sent as text decoded with --tokenizer's
// vocabulary to servers that take no token ids, multi-turn sessions then re-sending the answers'
// text as chat clients do); reports TTFT, TPOT, ITL and
// end-to-end latency, throughput and the prefix-cache hit rate, on stdout and as JSON.
//
// Threads: worker threads share one Client (it is thread-safe). Each worker takes the next job
// in arrival order, sleeps until the job's arrival time and runs it: a job is one request, or
// for multi-turn one session whose turns run back to back. So at most `workers` requests (or
// sessions) are in flight: --max-concurrency of them, or one per job when unlimited. Each job
// writes only its own records; the main thread draws the progress bar and joins the workers
// before it reads them.
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <thread>
#include <vector>

#include "celer/client.hpp"
#include "cluster/cli/bench_http.hpp"
#include "cluster/cli/commands.hpp"
#include "runtime/error.hpp"
#include "runtime/gguf.hpp"
#include "runtime/tokenizer.hpp"
#include "runtime/workload.hpp"

namespace celer::cli {
namespace {

using clock_type = std::chrono::steady_clock;
namespace wl = celer::workload;

// One thread per in-flight request: "unlimited" concurrency still stops here.
constexpr size_t kMaxWorkers = 1024;

struct BenchArgs {
  std::string connect;  // HOST:PORT (client library)
  std::string url;      // http://HOST:PORT (OpenAI HTTP API)
  std::string model;    // --url: the request's model field
  std::string tokenizer;  // --url: a GGUF whose vocabulary turns the prompts into text; "": token ids
  std::string request_rate = "inf";
  int max_concurrency = 0;
  std::string dataset = "random";
  wl::DatasetOptions data;
  bool ignore_eos = true;
  float temperature = 0;
  std::string json;
  std::string label;
  std::vector<std::string> goodput;  // --goodput KEY:MS items, read into objectives
  wl::GoodputObjectives objectives;
  bool vocab_size_given = false;  // --vocab-size on the command line; else the served model's
  int32_t context = 0;            // the served model's context (with --connect)
};

std::string rate_text(double rate) {
  if (std::isinf(rate)) return "inf";
  char buf[32];
  std::snprintf(buf, sizeof buf, "%g", rate);
  return buf;
}

double seconds_since(clock_type::time_point start) {
  return std::chrono::duration<double>(clock_type::now() - start).count();
}

struct Runner {
  Client* client;           // --connect
  const HttpTarget* http;   // --url
  const Tokenizer* text;    // --url --tokenizer: prompts are sent as text
  const wl::Dataset& data;
  const std::vector<double>& arrivals;  // [jobs]: seconds after start
  RequestOptions options;               // max_tokens and session_id are set per request
  uint64_t seed = 0;
  clock_type::time_point start;
  std::vector<std::vector<wl::RequestRecord>> records;  // [jobs][requests of the job]
  std::atomic<size_t> next_job{0};
  std::atomic<size_t> finished{0};
  std::atomic<size_t> failed{0};

  void work() {
    for (size_t j = next_job++; j < data.jobs.size(); j = next_job++) {
      std::this_thread::sleep_until(
          start + std::chrono::duration_cast<clock_type::duration>(std::chrono::duration<double>(arrivals[j])));
      run_job(j);
    }
  }

  // One request: its timings, counts and outcome. `output` receives the generated tokens (and
  // `output_text` their text, over HTTP).
  wl::RequestRecord send(const wl::BenchRequest& r, HttpPrompt prompt, size_t index, std::vector<TokenId>& output,
                         std::string& output_text) {
    RequestOptions o = options;
    o.max_tokens = r.output_len;
    o.sampling.seed = seed + index;  // reproducible draws when --temperature > 0
    // Routing affinity: the turns of one session go to the replica that holds their prefix.
    if (r.session >= 0) o.session_id = "bench-" + std::to_string(seed) + "-" + std::to_string(r.session);
    if (http) {
      wl::RequestRecord hr = http_stream(*http, prompt, o, start, output, output_text);
      hr.session = r.session;
      hr.turn = r.turn;
      return hr;
    }
    wl::RequestRecord rec;
    rec.session = r.session;
    rec.turn = r.turn;
    rec.send_s = seconds_since(start);
    Client::Stream stream = client->stream_tokens(std::move(prompt.tokens), o);
    while (auto chunk = stream.next()) {
      const double t = seconds_since(start);
      rec.token_times_s.insert(rec.token_times_s.end(), chunk->tokens.size(), t);
    }
    rec.end_s = seconds_since(start);
    const GenerateOutcome& out = stream.result();
    if (const auto* err = std::get_if<ClientError>(&out)) {
      rec.error = to_string(err->kind);
      rec.error_message = err->message;
      return rec;
    }
    const Completion& c = std::get<Completion>(out);
    rec.ok = true;
    rec.prompt_tokens = c.prompt_tokens;
    rec.completion_tokens = c.completion_tokens;
    rec.cached_tokens = c.cached_tokens;
    rec.times = c.times;
    output = c.tokens;
    return rec;
  }

  void run_job(size_t j) {
    const wl::Job& job = data.jobs[j];
    std::vector<wl::RequestRecord>& out = records[j];
    wl::Conversation conversation;  // multi-turn only
    std::string history;            // multi-turn with text prompts: the conversation so far
    for (const wl::BenchRequest& r : job.requests) {
      if (!out.empty() && !out.back().ok) {
        // A later turn cannot be built without the earlier turns' outputs.
        wl::RequestRecord skipped;
        skipped.session = r.session;
        skipped.turn = r.turn;
        skipped.error = "session_aborted";
        skipped.error_message = "an earlier turn of the session failed";
        out.push_back(std::move(skipped));
      } else {
        HttpPrompt prompt;
        if (text) {
          // The first turn's text as decoded; a later turn's new words go on after the answer.
          prompt.is_text = true;
          if (r.turn > 0) {
            prompt.text = history;
            for (TokenId id : r.prompt) prompt.text += text->token_to_piece(id);
          } else {
            prompt.text = text->decode(r.prompt);
          }
        } else {
          prompt.tokens = r.session >= 0 ? conversation.next_prompt(r.prompt) : r.prompt;
        }
        std::vector<TokenId> generated;
        std::string answer;
        out.push_back(send(r, prompt, j * job.requests.size() + out.size(), generated, answer));
        if (out.back().ok) {
          if (text) history = prompt.text + answer;
          else conversation.add_turn(prompt.tokens, generated);
        }
      }
      if (!out.back().ok) ++failed;
      ++finished;
    }
  }
};

void draw_progress(size_t done, size_t failed, size_t total, double elapsed, bool last) {
  constexpr int kWidth = 40;
  const int filled = total ? static_cast<int>(static_cast<double>(done) / static_cast<double>(total) * kWidth) : kWidth;
  std::string bar(static_cast<size_t>(filled), '#');
  bar.resize(kWidth, '.');
  std::fprintf(stderr, "\r[%s] %zu/%zu requests, %zu failed, %.1f s", bar.c_str(), done, total, failed, elapsed);
  if (last) std::fputc('\n', stderr);
  std::fflush(stderr);
}

void print_distribution(const char* title, const char* name, const wl::Distribution& d) {
  std::printf("%s\n", title);
  std::printf("%-40s %.2f\n", (std::string("Mean ") + name + " (ms):").c_str(), d.mean);
  std::printf("%-40s %.2f\n", (std::string("Median ") + name + " (ms):").c_str(), d.p50);
  std::printf("%-40s %.2f\n", (std::string("P90 ") + name + " (ms):").c_str(), d.p90);
  std::printf("%-40s %.2f\n", (std::string("P99 ") + name + " (ms):").c_str(), d.p99);
}

// The first message seen for each failure reason, so a report of failures says why.
std::map<std::string, std::string> first_messages(const std::vector<std::vector<wl::RequestRecord>>& records) {
  std::map<std::string, std::string> m;
  for (const auto& job : records)
    for (const wl::RequestRecord& r : job)
      if (!r.ok) m.emplace(r.error, r.error_message);
  return m;
}

void print_summary(const BenchArgs& a, double rate, const wl::Summary& s,
                   const std::vector<std::vector<wl::RequestRecord>>& records) {
  std::printf("%s\n", "============ Serving Benchmark Result ============");
  if (!a.label.empty()) std::printf("%-40s %s\n", "Label:", a.label.c_str());
  std::printf("%-40s %s\n", "Dataset:", a.dataset.c_str());
  std::printf("%-40s %s\n", "Traffic request rate (req/s):", rate_text(rate).c_str());
  std::printf("%-40s %s\n", "Maximum request concurrency:",
              a.max_concurrency > 0 ? std::to_string(a.max_concurrency).c_str() : "unlimited");
  std::printf("%-40s %zu\n", "Successful requests:", s.completed);
  std::printf("%-40s %zu\n", "Failed requests:", s.failed);
  const auto why = first_messages(records);
  for (const auto& [reason, n] : s.failures)
    std::printf("  %-38s %zu (e.g. %s)\n", (reason + ":").c_str(), n, why.at(reason).c_str());
  std::printf("%-40s %.2f\n", "Benchmark duration (s):", s.duration_s);
  std::printf("%-40s %lld\n", "Total input tokens:", static_cast<long long>(s.prompt_tokens));
  std::printf("%-40s %lld\n", "Total generated tokens:", static_cast<long long>(s.completion_tokens));
  std::printf("%-40s %lld\n", "Prefix-cached input tokens:", static_cast<long long>(s.cached_tokens));
  std::printf("%-40s %.2f\n", "Prefix cache hit rate (%):", s.prefix_cache_hit_rate * 100);
  std::printf("%-40s %.2f\n", "Request throughput (req/s):", s.request_throughput);
  std::printf("%-40s %.2f\n", "Output token throughput (tok/s):", s.output_throughput);
  std::printf("%-40s %.2f\n", "Total token throughput (tok/s):", s.total_token_throughput);
  if (!a.goodput.empty()) {
    std::printf("%-40s %.2f (%zu requests)\n", "Request goodput (req/s):", s.goodput, s.good_requests);
    std::printf("%-40s %.2f\n", "Token gaps over the ITL objective (%):", s.itl_over_share * 100);
  }
  print_distribution("---------------Time to First Token----------------", "TTFT", s.ttft);
  print_distribution("-----Time per Output Token (excl. 1st token)------", "TPOT", s.tpot);
  print_distribution("---------------Inter-token Latency----------------", "ITL", s.itl);
  print_distribution("----------------End-to-end Latency----------------", "E2EL", s.e2el);
  if (!s.mean_ttft_ms_by_turn.empty()) {
    std::printf("%s\n", "--------------Mean TTFT per Turn------------------");
    for (size_t t = 0; t < s.mean_ttft_ms_by_turn.size(); ++t)
      std::printf("%-40s %.2f\n", ("Turn " + std::to_string(t + 1) + " (ms):").c_str(), s.mean_ttft_ms_by_turn[t]);
  }
  if (!s.stages.empty()) {
    std::printf("%s\n", "-------Latency by Stage (mean / p50 / p99 ms)-----");
    for (const auto& [name, d] : s.stages)
      std::printf("%-40s %.2f / %.2f / %.2f\n", (name + ":").c_str(), d.mean, d.p50, d.p99);
  }
  std::printf("%s\n", "==================================================");
  std::fflush(stdout);
}

void add_distribution(nlohmann::json& j, const std::string& name, const wl::Distribution& d) {
  j["mean_" + name + "_ms"] = d.mean;
  j["median_" + name + "_ms"] = d.p50;
  j["p90_" + name + "_ms"] = d.p90;
  j["p99_" + name + "_ms"] = d.p99;
}

nlohmann::json to_json(const BenchArgs& a, double rate, const wl::Summary& s,
                       const std::vector<std::vector<wl::RequestRecord>>& records) {
  const wl::DatasetOptions& d = a.data;
  nlohmann::json j;
  j["label"] = a.label;
  j["server"] = a.url.empty() ? a.connect : a.url;
  j["transport"] = a.url.empty() ? "client-library" : "http";
  j["prompts"] = a.tokenizer.empty() ? "token ids" : "text";
  j["dataset"] = a.dataset;
  j["request_rate"] = std::isinf(rate) ? nlohmann::json("inf") : nlohmann::json(rate);
  j["max_concurrency"] = a.max_concurrency;
  j["seed"] = d.seed;
  j["vocab_size"] = d.vocab_size;
  j["ignore_eos"] = a.ignore_eos;
  j["temperature"] = a.temperature;
  switch (d.kind) {
    case wl::DatasetKind::random:
      j["dataset_options"] = {
          {"num_prompts", d.num_prompts}, {"input_len", d.random_input_len}, {"output_len", d.random_output_len}};
      break;
    case wl::DatasetKind::shared_prefix:
      j["dataset_options"] = {{"num_prompts", d.num_prompts},
                              {"prefix_groups", d.prefix_groups},
                              {"prefix_len", d.prefix_len},
                              {"suffix_len", d.suffix_len},
                              {"output_len", d.output_len}};
      break;
    case wl::DatasetKind::multi_turn:
      j["dataset_options"] = {{"sessions", d.sessions},
                              {"turns", d.turns},
                              {"turn_input_len", d.turn_input_len},
                              {"output_len", d.output_len}};
      break;
  }
  j["completed"] = s.completed;
  j["failed"] = s.failed;
  j["failures"] = s.failures;
  j["duration_s"] = s.duration_s;
  j["total_input_tokens"] = s.prompt_tokens;
  j["total_output_tokens"] = s.completion_tokens;
  j["cached_input_tokens"] = s.cached_tokens;
  j["prefix_cache_hit_rate"] = s.prefix_cache_hit_rate;
  j["request_throughput"] = s.request_throughput;
  j["output_throughput"] = s.output_throughput;
  j["total_token_throughput"] = s.total_token_throughput;
  if (!a.goodput.empty()) {
    const wl::GoodputObjectives& o = a.objectives;
    j["goodput_objectives_ms"] = {{"ttft", o.ttft_ms}, {"tpot", o.tpot_ms}, {"e2el", o.e2el_ms}, {"itl", o.itl_ms}};
    j["goodput"] = s.goodput;
    j["good_requests"] = s.good_requests;
    j["itl_over_objective_share"] = s.itl_over_share;
  }
  add_distribution(j, "ttft", s.ttft);
  add_distribution(j, "tpot", s.tpot);
  add_distribution(j, "itl", s.itl);
  add_distribution(j, "e2el", s.e2el);
  if (!s.mean_ttft_ms_by_turn.empty()) j["mean_ttft_ms_by_turn"] = s.mean_ttft_ms_by_turn;
  for (const auto& [name, d] : s.stages) add_distribution(j["stages"], name, d);
  nlohmann::json requests = nlohmann::json::array();
  for (const auto& job : records)
    for (const wl::RequestRecord& r : job) {
      nlohmann::json q = {{"ok", r.ok},
                          {"send_s", r.send_s},
                          {"e2el_ms", (r.end_s - r.send_s) * 1e3},
                          {"prompt_tokens", r.prompt_tokens},
                          {"completion_tokens", r.completion_tokens},
                          {"cached_tokens", r.cached_tokens}};
      if (!r.token_times_s.empty()) q["ttft_ms"] = (r.token_times_s.front() - r.send_s) * 1e3;
      if (r.session >= 0) {
        q["session"] = r.session;
        q["turn"] = r.turn;
      }
      if (!r.ok) {
        q["error"] = r.error;
        q["error_message"] = r.error_message;
      }
      requests.push_back(std::move(q));
    }
  j["requests"] = std::move(requests);
  return j;
}

int run_bench(BenchArgs& a) {
  const auto kind = wl::parse_dataset(a.dataset);
  if (!kind)
    throw Error(ErrorCode::invalid_argument,
                "--dataset must be random, shared-prefix or multi-turn, not '" + a.dataset + "'");
  a.data.kind = *kind;
  const double rate = parse_rate(a.request_rate);
  a.objectives = wl::parse_goodput(a.goodput);  // refused before anything is sent
  if (a.max_concurrency < 0)
    throw Error(ErrorCode::invalid_argument, "--max-concurrency must be 0 (unlimited) or more");
  if (a.temperature < 0) throw Error(ErrorCode::invalid_argument, "--temperature must not be negative");
  if (a.connect.empty() == a.url.empty()) throw Error(ErrorCode::invalid_argument, "give one of --connect HOST:PORT and --url URL");
  HttpTarget http;
  if (!a.url.empty()) {
    http = parse_url(a.url);
    http.model = a.model;
  }
  std::unique_ptr<Tokenizer> text;
  if (!a.tokenizer.empty()) {
    if (a.url.empty()) throw Error(ErrorCode::invalid_argument, "--tokenizer sends text prompts over HTTP: give --url");
    text = std::make_unique<Tokenizer>(GgufFile(a.tokenizer));
    if (!a.vocab_size_given) a.data.vocab_size = text->n_vocab();
    else if (a.data.vocab_size > text->n_vocab())
      throw Error(ErrorCode::invalid_argument, "--vocab-size " + std::to_string(a.data.vocab_size) + " is larger than the " +
                                                   std::to_string(text->n_vocab()) + " tokens of " + a.tokenizer);
  }
  const auto [host, port] = a.url.empty() ? parse_host_port(a.connect) : std::pair<std::string, uint16_t>{};
  std::unique_ptr<Client> client;
  if (a.url.empty()) {
    auto connected = Client::connect(host, port);
    if (auto* err = std::get_if<ClientError>(&connected)) throw Error(ErrorCode::io, err->message);
    client = std::move(std::get<std::unique_ptr<Client>>(connected));
    // Prompts are drawn from the served model's vocabulary, and must fit its context.
    auto info = client->model_info();
    if (auto* err = std::get_if<ClientError>(&info)) throw Error(ErrorCode::io, err->message);
    const ModelInfo& m = std::get<ModelInfo>(info);
    if (!a.vocab_size_given) a.data.vocab_size = m.n_vocab;
    else if (a.data.vocab_size > m.n_vocab)
      throw Error(ErrorCode::invalid_argument, "--vocab-size " + std::to_string(a.data.vocab_size) + " is larger than the " +
                                                   std::to_string(m.n_vocab) + " tokens of the served model (" + m.name +
                                                   "): its prompts would be refused");
    a.context = m.max_context;
  }
  const wl::Dataset data = wl::make_dataset(a.data);  // validates the dataset options
  if (a.context > 0)
    for (const wl::Job& job : data.jobs) {
      int64_t history = 0;  // multi-turn: the earlier turns' prompts and outputs are re-sent
      for (const wl::BenchRequest& r : job.requests) {
        const int64_t prompt = history + static_cast<int64_t>(r.prompt.size());
        if (prompt + r.output_len > a.context)
          throw Error(ErrorCode::invalid_argument,
                      "a request of " + std::to_string(prompt) + " prompt and " + std::to_string(r.output_len) +
                          " output tokens does not fit the served model's context of " + std::to_string(a.context) +
                          " tokens: shorten the lengths (or the turns)");
        history = prompt + r.output_len;
      }
    }
  const std::vector<double> arrivals = wl::arrival_times(data.jobs.size(), rate, a.data.seed);

  RequestOptions options;
  options.sampling = SamplingParams{};
  options.sampling.temperature = a.temperature;
  options.ignore_eos = a.ignore_eos;
  Runner runner{client.get(), a.url.empty() ? nullptr : &http, text.get(), data, arrivals, options, a.data.seed, {}, {}};
  runner.records.resize(data.jobs.size());
  const size_t limit = a.max_concurrency > 0 ? static_cast<size_t>(a.max_concurrency) : kMaxWorkers;
  const size_t n_workers = std::min(data.jobs.size(), limit);
  if (a.max_concurrency == 0 && data.jobs.size() > kMaxWorkers)
    std::fprintf(stderr, "celer bench: unlimited concurrency runs at most %zu requests at once (one thread each)\n",
                 kMaxWorkers);
  const size_t total = data.num_requests();
  std::fprintf(stderr, "celer bench: %zu requests (%s) to %s, request rate %s, max concurrency %s\n", total,
               a.dataset.c_str(), (a.url.empty() ? a.connect : a.url).c_str(), rate_text(rate).c_str(),
               a.max_concurrency > 0 ? std::to_string(a.max_concurrency).c_str() : "unlimited");

  runner.start = clock_type::now();
  std::vector<std::thread> workers;
  for (size_t i = 0; i < n_workers; ++i) workers.emplace_back([&runner] { runner.work(); });
  // A terminal gets a redraw every 100 ms; a log file only one line per tenth of the run.
  const bool tty = isatty(fileno(stderr)) != 0;
  size_t drawn = SIZE_MAX;
  while (runner.finished.load() < total) {
    const size_t done = runner.finished.load();
    if (tty || drawn == SIZE_MAX || done * 10 / total != drawn * 10 / total) {
      draw_progress(done, runner.failed.load(), total, seconds_since(runner.start), false);
      drawn = done;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  for (std::thread& t : workers) t.join();
  const double duration = seconds_since(runner.start);
  draw_progress(total, runner.failed.load(), total, duration, true);

  std::vector<wl::RequestRecord> all;
  for (const auto& job : runner.records) all.insert(all.end(), job.begin(), job.end());
  const wl::Summary summary = wl::summarize(all, duration, a.objectives);
  print_summary(a, rate, summary, runner.records);
  if (!a.json.empty()) {
    std::ofstream f(a.json);
    if (!f) throw Error(ErrorCode::io, "cannot write " + a.json);
    f << to_json(a, rate, summary, runner.records).dump(2) << '\n';
    if (!f) throw Error(ErrorCode::io, "cannot write " + a.json);
  }
  return 0;
}

}  // namespace

// A positive number of requests per second, or inf (also "infinity").
double parse_rate(const std::string& s) {
  char* end = nullptr;
  const double r = std::strtod(s.c_str(), &end);
  if (s.empty() || *end != '\0' || std::isnan(r) || r <= 0)
    throw Error(ErrorCode::invalid_argument,
                "--request-rate must be a positive number of requests/s or inf, not '" + s + "'");
  return r;
}

Command add_bench(CLI::App& app) {
  auto a = std::make_shared<BenchArgs>();
  wl::DatasetOptions& d = a->data;
  CLI::App* c = app.add_subcommand("bench", "Benchmark a running `celer serve` (like `vllm bench serve`)");
  auto* connect = c->add_option("--connect", a->connect, "HOST:PORT of the server (through the client library)");
  auto* url = c->add_option("--url", a->url, "http://HOST:PORT of an OpenAI-compatible server (celer's gateway)");
  connect->excludes(url);
  c->add_option("--model", a->model, "With --url: the model field of each request (celer needs none)");
  c->add_option("--tokenizer", a->tokenizer,
                "With --url: send prompts as text, decoded with this GGUF's vocabulary (for servers that take no token "
                "ids or return none); multi-turn sessions re-send the answers' text");
  c->add_option("--request-rate", a->request_rate,
                "Requests per second, Poisson arrivals (multi-turn: session starts); inf sends all at once")
      ->capture_default_str();
  c->add_option("--max-concurrency", a->max_concurrency,
                "At most this many requests (multi-turn: sessions) in flight; 0 is unlimited")
      ->capture_default_str();
  c->add_option("--num-prompts", d.num_prompts, "Requests to send (random and shared-prefix)")->capture_default_str();
  c->add_option("--seed", d.seed, "Seed of the prompts and arrival times: the same seed gives the same workload")
      ->capture_default_str();
  c->add_option("--dataset", a->dataset, "random, shared-prefix or multi-turn")->capture_default_str();
  c->add_option("--vocab-size", d.vocab_size,
                "Prompt token ids are drawn from [3, this); default with --connect: the served model's vocabulary "
                "(a larger value is refused), with --url: 32000")
      ->each([a](const std::string&) { a->vocab_size_given = true; });
  c->add_option("--random-input-len", d.random_input_len, "random: prompt tokens per request")->capture_default_str();
  c->add_option("--random-output-len", d.random_output_len, "random: tokens to generate per request")
      ->capture_default_str();
  c->add_option("--prefix-groups", d.prefix_groups, "shared-prefix: groups, each with its own system prompt")
      ->capture_default_str();
  c->add_option("--prefix-len", d.prefix_len, "shared-prefix: tokens of each group's system prompt")
      ->capture_default_str();
  c->add_option("--suffix-len", d.suffix_len, "shared-prefix: distinct tokens each request adds")
      ->capture_default_str();
  c->add_option("--sessions", d.sessions, "multi-turn: conversations")->capture_default_str();
  c->add_option("--turns", d.turns, "multi-turn: requests per conversation, one after another")->capture_default_str();
  c->add_option("--turn-input-len", d.turn_input_len, "multi-turn: new user tokens per turn")->capture_default_str();
  c->add_option("--output-len", d.output_len, "shared-prefix and multi-turn: tokens to generate per request")
      ->capture_default_str();
  c->add_flag("--ignore-eos,!--no-ignore-eos", a->ignore_eos,
              "Generate exactly the output length, past end-of-sequence tokens (default on)");
  c->add_option("--goodput", a->goodput,
                "Objectives for goodput, as KEY:MS (ttft, tpot, e2el, itl): requests/s that met them all (DistServe), and the "
                "share of token gaps over itl");
  c->add_option("--temperature", a->temperature, "Sampling temperature; 0 is greedy")->capture_default_str();
  c->add_option("--json", a->json, "Write the results (summary and per-request records) to this JSON file");
  c->add_option("--label", a->label, "A name for this run, in the report and the JSON");
  return [a] { return run_bench(*a); };
}

}  // namespace celer::cli
