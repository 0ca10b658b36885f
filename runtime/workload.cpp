#include "runtime/workload.hpp"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <limits>

#include "runtime/error.hpp"

namespace celer::workload {
namespace {

// mt19937_64's output is fixed by the standard; these conversions are ours so that the same seed
// gives the same numbers with every standard library.
class Rng {
 public:
  explicit Rng(uint64_t seed) : engine_(seed) {}

  // Uniform in [lo, hi), hi > lo, by rejection (no modulo bias).
  int32_t uniform_int(int32_t lo, int32_t hi) {
    const uint64_t range = static_cast<uint64_t>(hi) - static_cast<uint64_t>(lo);
    const uint64_t limit = std::numeric_limits<uint64_t>::max() - std::numeric_limits<uint64_t>::max() % range;
    uint64_t x = engine_();
    while (x >= limit) x = engine_();
    return lo + static_cast<int32_t>(x % range);
  }

  // Uniform in [0, 1) with 53 random bits.
  double uniform01() { return static_cast<double>(engine_() >> 11) * 0x1.0p-53; }

  std::vector<TokenId> tokens(int32_t n, int32_t vocab_size) {
    std::vector<TokenId> t(static_cast<size_t>(n));
    for (TokenId& id : t) id = uniform_int(kFirstTokenId, vocab_size);
    return t;
  }

 private:
  std::mt19937_64 engine_;
};

// Separate streams for the arrivals and for each kind of dataset: changing --request-rate keeps
// the prompts, and two datasets of one seed share no prompt prefix (which would turn into
// prefix-cache hits when both run against one server).
constexpr uint64_t kArrivalStream = 0x9E3779B97F4A7C15ull;
uint64_t dataset_stream(DatasetKind kind) {
  return 0xD1B54A32D192ED03ull * (static_cast<uint64_t>(kind) + 1);
}

void require(bool ok, const std::string& what) {
  if (!ok) throw Error(ErrorCode::invalid_argument, what);
}

std::vector<TokenId> concat(std::vector<TokenId> a, const std::vector<TokenId>& b) {
  a.insert(a.end(), b.begin(), b.end());
  return a;
}

// The prefixes of distinct groups start with distinct tokens, so no two groups share even one
// KV block however small the vocabulary.
std::vector<std::vector<TokenId>> group_prefixes(const DatasetOptions& o, Rng& rng) {
  std::vector<std::vector<TokenId>> prefixes;
  std::vector<bool> first_used(static_cast<size_t>(o.vocab_size), false);
  for (int32_t g = 0; g < o.prefix_groups; ++g) {
    std::vector<TokenId> p = rng.tokens(o.prefix_len, o.vocab_size);
    while (first_used[static_cast<size_t>(p[0])]) p[0] = rng.uniform_int(kFirstTokenId, o.vocab_size);
    first_used[static_cast<size_t>(p[0])] = true;
    prefixes.push_back(std::move(p));
  }
  return prefixes;
}

}  // namespace

const char* to_string(DatasetKind kind) {
  switch (kind) {
    case DatasetKind::random:
      return "random";
    case DatasetKind::shared_prefix:
      return "shared-prefix";
    case DatasetKind::multi_turn:
      return "multi-turn";
  }
  return "?";
}

std::optional<DatasetKind> parse_dataset(std::string_view name) {
  for (DatasetKind k : {DatasetKind::random, DatasetKind::shared_prefix, DatasetKind::multi_turn})
    if (name == to_string(k)) return k;
  return std::nullopt;
}

void validate(const DatasetOptions& o) {
  require(o.vocab_size > kFirstTokenId, "--vocab-size must be greater than " + std::to_string(kFirstTokenId) +
                                            " (prompt ids are drawn from [3, vocab size))");
  switch (o.kind) {
    case DatasetKind::random:
      require(o.num_prompts >= 1, "--num-prompts must be at least 1");
      require(o.random_input_len >= 1, "--random-input-len must be at least 1");
      require(o.random_output_len >= 1, "--random-output-len must be at least 1");
      break;
    case DatasetKind::shared_prefix:
      require(o.num_prompts >= 1, "--num-prompts must be at least 1");
      require(o.prefix_groups >= 1, "--prefix-groups must be at least 1");
      require(o.prefix_groups <= o.vocab_size - kFirstTokenId,
              "--prefix-groups must not exceed the usable vocabulary (" + std::to_string(o.vocab_size - kFirstTokenId) +
                  " ids): each group's prefix starts with its own token");
      require(o.prefix_len >= 1, "--prefix-len must be at least 1");
      require(o.suffix_len >= 0, "--suffix-len must not be negative");
      require(o.output_len >= 1, "--output-len must be at least 1");
      break;
    case DatasetKind::multi_turn:
      require(o.sessions >= 1, "--sessions must be at least 1");
      require(o.turns >= 1, "--turns must be at least 1");
      require(o.turn_input_len >= 1, "--turn-input-len must be at least 1");
      require(o.output_len >= 1, "--output-len must be at least 1");
      break;
  }
}

size_t Dataset::num_requests() const {
  size_t n = 0;
  for (const Job& j : jobs) n += j.requests.size();
  return n;
}

Dataset make_dataset(const DatasetOptions& o) {
  validate(o);
  Rng rng(o.seed ^ dataset_stream(o.kind));
  Dataset d;
  d.kind = o.kind;
  switch (o.kind) {
    case DatasetKind::random:
      for (int32_t i = 0; i < o.num_prompts; ++i) {
        BenchRequest r;
        r.prompt = rng.tokens(o.random_input_len, o.vocab_size);
        r.output_len = o.random_output_len;
        d.jobs.push_back(Job{{std::move(r)}});
      }
      break;
    case DatasetKind::shared_prefix: {
      const auto prefixes = group_prefixes(o, rng);
      // Groups interleave (request i belongs to group i mod G), so every group is busy at once.
      for (int32_t i = 0; i < o.num_prompts; ++i) {
        BenchRequest r;
        r.group = i % o.prefix_groups;
        r.prompt = concat(prefixes[static_cast<size_t>(r.group)], rng.tokens(o.suffix_len, o.vocab_size));
        r.output_len = o.output_len;
        d.jobs.push_back(Job{{std::move(r)}});
      }
      break;
    }
    case DatasetKind::multi_turn:
      for (int32_t s = 0; s < o.sessions; ++s) {
        Job job;
        for (int32_t t = 0; t < o.turns; ++t) {
          BenchRequest r;
          r.prompt = rng.tokens(o.turn_input_len, o.vocab_size);
          r.output_len = o.output_len;
          r.session = s;
          r.turn = t;
          job.requests.push_back(std::move(r));
        }
        d.jobs.push_back(std::move(job));
      }
      break;
  }
  return d;
}

std::vector<TokenId> Conversation::next_prompt(const std::vector<TokenId>& user_tokens) const {
  return concat(history_, user_tokens);
}

void Conversation::add_turn(const std::vector<TokenId>& prompt, const std::vector<TokenId>& output) {
  history_ = concat(prompt, output);
}

std::vector<double> arrival_times(size_t n, double rate, uint64_t seed) {
  require(!std::isnan(rate) && rate > 0, "--request-rate must be a positive number or inf");
  std::vector<double> t(n, 0.0);
  if (std::isinf(rate)) return t;
  Rng rng(seed ^ kArrivalStream);
  for (size_t i = 1; i < n; ++i) {
    // Inverse CDF of the exponential distribution; 1 - u lies in (0, 1], so the log is finite.
    t[i] = t[i - 1] - std::log(1.0 - rng.uniform01()) / rate;
  }
  return t;
}

double percentile(std::vector<double> values, double q) {
  if (values.empty()) return 0;
  std::sort(values.begin(), values.end());
  const double rank = std::clamp(q, 0.0, 100.0) / 100.0 * static_cast<double>(values.size() - 1);
  const size_t lo = static_cast<size_t>(std::floor(rank));
  const size_t hi = std::min(lo + 1, values.size() - 1);
  return values[lo] + (values[hi] - values[lo]) * (rank - static_cast<double>(lo));
}

Distribution distribution_ms(const std::vector<double>& seconds) {
  Distribution d;
  d.count = seconds.size();
  if (seconds.empty()) return d;
  std::vector<double> ms(seconds.size());
  for (size_t i = 0; i < seconds.size(); ++i) ms[i] = seconds[i] * 1e3;
  double sum = 0;
  for (double x : ms) sum += x;
  d.mean = sum / static_cast<double>(ms.size());
  std::sort(ms.begin(), ms.end());
  d.p50 = percentile(ms, 50);
  d.p90 = percentile(ms, 90);
  d.p99 = percentile(ms, 99);
  return d;
}

GoodputObjectives parse_goodput(const std::vector<std::string>& items) {
  GoodputObjectives o;
  for (const std::string& item : items) {
    const auto colon = item.find(':');
    const std::string key = item.substr(0, colon);
    char* end = nullptr;
    const double ms = colon == std::string::npos ? 0 : std::strtod(item.c_str() + colon + 1, &end);
    double* field = key == "ttft" ? &o.ttft_ms : key == "tpot" ? &o.tpot_ms : key == "e2el" ? &o.e2el_ms : key == "itl" ? &o.itl_ms : nullptr;
    if (!field || colon == std::string::npos || end == item.c_str() + colon + 1 || *end != '\0' || !(ms > 0) || std::isinf(ms))
      throw Error(ErrorCode::invalid_argument,
                  "--goodput wants KEY:MS items with KEY one of ttft, tpot, e2el, itl and MS a positive number, not '" + item + "'");
    *field = ms;
  }
  return o;
}

Summary summarize(const std::vector<RequestRecord>& records, double duration_s, const GoodputObjectives& objectives) {
  Summary s;
  size_t gaps_over = 0;
  s.duration_s = duration_s;
  std::vector<double> ttft, tpot, itl, e2el;
  std::vector<double> stage[std::size(kStageNames)];
  // Every turn index that was sent has an entry, even one whose turns all failed (mean 0).
  int32_t turns = 0;
  for (const RequestRecord& r : records) turns = std::max(turns, r.turn + 1);
  std::vector<double> turn_sum(static_cast<size_t>(turns), 0.0);
  std::vector<size_t> turn_count(static_cast<size_t>(turns), 0);
  for (const RequestRecord& r : records) {
    if (!r.ok) {
      ++s.failed;
      ++s.failures[r.error];
      continue;
    }
    ++s.completed;
    s.prompt_tokens += r.prompt_tokens;
    s.completion_tokens += r.completion_tokens;
    s.cached_tokens += r.cached_tokens;
    const double e2e = r.end_s - r.send_s;
    e2el.push_back(e2e);
    const StageTimes& t = r.times;
    // Only requests that went through every stage (not response-cache hits, whose spans would
    // read as zero).
    if (t.received_us > 0 && t.queued_us > 0 && t.admitted_us >= t.queued_us && t.prefill_done_us >= t.admitted_us &&
        t.first_token_us >= t.prefill_done_us && t.last_token_us >= t.first_token_us && t.finished_us >= t.received_us) {
      const double server = (t.finished_us - t.received_us) * 1e-6;
      const double spans[] = {(t.admitted_us - t.queued_us) * 1e-6,       (t.prefill_done_us - t.admitted_us) * 1e-6,
                              (t.first_token_us - t.prefill_done_us) * 1e-6, (t.last_token_us - t.first_token_us) * 1e-6,
                              server,                                       std::max(0.0, e2e - server)};
      for (size_t k = 0; k < std::size(kStageNames); ++k) stage[k].push_back(spans[k]);
    }
    auto meets = [](double objective_ms, double seconds) { return objective_ms == 0 || seconds * 1e3 <= objective_ms; };
    if (r.token_times_s.empty()) {  // no token: only an end-to-end objective can be met
      if (objectives.any() && objectives.ttft_ms == 0 && objectives.tpot_ms == 0 && meets(objectives.e2el_ms, e2e)) ++s.good_requests;
      continue;
    }
    const double first = r.token_times_s.front() - r.send_s;
    ttft.push_back(first);
    const double per_token = r.completion_tokens > 1 ? (e2e - first) / (r.completion_tokens - 1) : 0;
    if (r.completion_tokens > 1) tpot.push_back(per_token);
    for (size_t i = 1; i < r.token_times_s.size(); ++i) {
      itl.push_back(r.token_times_s[i] - r.token_times_s[i - 1]);
      if (objectives.itl_ms > 0 && itl.back() * 1e3 > objectives.itl_ms) ++gaps_over;
    }
    if (objectives.any() && meets(objectives.ttft_ms, first) && meets(objectives.tpot_ms, per_token) &&
        meets(objectives.e2el_ms, e2e))
      ++s.good_requests;
    if (r.turn >= 0) {
      turn_sum[static_cast<size_t>(r.turn)] += first;
      ++turn_count[static_cast<size_t>(r.turn)];
    }
  }
  if (duration_s > 0) {
    s.request_throughput = static_cast<double>(s.completed) / duration_s;
    s.output_throughput = static_cast<double>(s.completion_tokens) / duration_s;
    s.total_token_throughput = static_cast<double>(s.prompt_tokens + s.completion_tokens) / duration_s;
    s.goodput = static_cast<double>(s.good_requests) / duration_s;
  }
  if (!itl.empty()) s.itl_over_share = static_cast<double>(gaps_over) / static_cast<double>(itl.size());
  if (s.prompt_tokens > 0)
    s.prefix_cache_hit_rate = static_cast<double>(s.cached_tokens) / static_cast<double>(s.prompt_tokens);
  s.ttft = distribution_ms(ttft);
  s.tpot = distribution_ms(tpot);
  s.itl = distribution_ms(itl);
  s.e2el = distribution_ms(e2el);
  if (!stage[0].empty())
    for (size_t k = 0; k < std::size(kStageNames); ++k) s.stages.emplace_back(kStageNames[k], distribution_ms(stage[k]));
  for (size_t t = 0; t < turn_sum.size(); ++t)
    s.mean_ttft_ms_by_turn.push_back(turn_count[t] ? turn_sum[t] / static_cast<double>(turn_count[t]) * 1e3 : 0.0);
  return s;
}

}  // namespace celer::workload
