#include "runtime/scheduler.hpp"

#include <algorithm>
#include <cmath>
#include <utility>
#include <string>

#include "runtime/error.hpp"

namespace celer {
namespace {

// The least prefill a step gives the first waiting prompt while streams run: prompts always
// progress, even when the streams alone fill the objective.
constexpr int32_t kMinPrefillTokens = 16;

}  // namespace

Scheduler::Scheduler(const SchedulerConfig& config, std::function<bool(TokenId)> is_eog)
    : config_(config), is_eog_(std::move(is_eog)) {
  if (config_.max_batch_size < 1 || config_.max_batch_tokens < 1 || config_.max_queue < 0 || config_.max_context < 2)
    throw Error(ErrorCode::invalid_argument, "scheduler limits must be positive");
  for (const Objective& o : config_.slo) has_slo_ = has_slo_ || o.ttft_ms > 0 || o.itl_ms > 0;
  budget_ = config_.max_batch_tokens;
}

Scheduler::Scheduler(const SchedulerConfig& config, KvBlockManager& blocks, std::function<bool(TokenId)> is_eog)
    : Scheduler(config, std::move(is_eog)) {
  planner_ = std::make_unique<BlockPlanner>(blocks);
}

int32_t Scheduler::n_waiting() const {
  int32_t n = 0;
  for (const auto& q : waiting_) n += static_cast<int32_t>(q.size());
  return n;
}

std::optional<int32_t> Scheduler::generated_tokens(RequestId id) const {
  auto it = seqs_.find(id);
  if (it == seqs_.end()) return std::nullopt;
  return static_cast<int32_t>(it->second.tokens.size()) - it->second.n_prompt;
}

int64_t Scheduler::outstanding_tokens() const {
  int64_t n = 0;
  for (const auto& [id, s] : seqs_) {
    const auto generated = static_cast<int32_t>(s.tokens.size()) - s.n_prompt;
    n += std::max(0, static_cast<int32_t>(s.tokens.size()) - s.n_computed) +
         std::max(0, s.request.max_tokens - generated);
  }
  return n;
}

bool Scheduler::before(const Sequence& a, const Sequence& b) {
  if (a.request.priority != b.request.priority) return a.request.priority < b.request.priority;
  return a.arrival < b.arrival;
}

bool Scheduler::take_tokens(const std::string& tenant, double amount, int64_t now_ms) {
  auto rate_it = config_.tenant_rates.find(tenant);
  const RateLimit& rate = rate_it != config_.tenant_rates.end() ? rate_it->second : config_.default_rate;
  if (rate.tokens_per_second <= 0) return true;
  const double burst = rate.burst > 0 ? rate.burst : rate.tokens_per_second;
  Bucket& b = buckets_[tenant];
  if (!b.primed) {
    b.tokens = burst;
    b.last_ms = now_ms;
    b.primed = true;
  }
  b.tokens = std::min(burst, b.tokens + std::max<int64_t>(0, now_ms - b.last_ms) * rate.tokens_per_second / 1000.0);
  b.last_ms = now_ms;
  if (b.tokens < amount) return false;
  b.tokens -= amount;
  return true;
}

std::optional<ErrorReply> Scheduler::admit(const GenerateRequest& request, int64_t now_ms) {
  auto reject = [&](ErrorKind kind, const std::string& message) { return ErrorReply{request.id, kind, message}; };
  if (seqs_.count(request.id)) return reject(ErrorKind::invalid_request, "request id " + std::to_string(request.id) + " is already in use");
  const auto n_prompt = static_cast<int32_t>(request.prompt_tokens.size());
  if (n_prompt == 0) return reject(ErrorKind::invalid_request, "the prompt is empty");
  if (request.max_tokens < 1) return reject(ErrorKind::invalid_request, "max_tokens must be at least 1");
  if (n_prompt + 1 > config_.max_context)
    return reject(ErrorKind::prompt_too_long, "the prompt has " + std::to_string(n_prompt) + " tokens; the context holds " +
                                                  std::to_string(config_.max_context) + " including at least one generated token");
  if (request.deadline_ms != 0 && now_ms >= request.deadline_ms)
    return reject(ErrorKind::deadline_exceeded, "the deadline passed before the request was admitted");
  // Requests the batch can still take do not count as queued: max_queue 0 means "run now or
  // refuse".
  if (n_waiting() >= config_.max_queue && n_running() + n_waiting() >= config_.max_batch_size)
    return reject(ErrorKind::queue_full, "the waiting queue is full (" + std::to_string(config_.max_queue) + " requests)");
  const int32_t max_tokens = std::min(request.max_tokens, config_.max_context - n_prompt);
  const Objective& o = config_.slo[static_cast<size_t>(request.priority)];
  if (config_.refuse_late && o.ttft_ms > 0) {
    const double eta = predicted_ttft_ms(request.priority, n_prompt);
    if (eta > static_cast<double>(o.ttft_ms)) {
      ++slo_.refused;
      return reject(ErrorKind::slo_unattainable, "the request cannot meet its TTFT objective of " + std::to_string(o.ttft_ms) +
                                                     " ms: the prompts queued ahead of it and its own need about " +
                                                     std::to_string(static_cast<int64_t>(eta)) + " ms of prefill");
    }
  }
  if (!take_tokens(request.tenant, n_prompt + max_tokens, now_ms))
    return reject(ErrorKind::rate_limited, "tenant '" + request.tenant + "' is over its token rate limit");

  Sequence& s = seqs_[request.id];
  s.request = request;
  s.request.max_tokens = max_tokens;
  s.tokens = std::move(s.request.prompt_tokens);
  s.request.prompt_tokens.clear();
  s.n_prompt = n_prompt;
  s.arrival = next_arrival_++;
  s.admitted_ms = now_ms;
  s.n_cached = -1;  // set on first start
  s.times.queued_us = unix_us();
  waiting_[static_cast<int>(request.priority)].push_back(request.id);
  return std::nullopt;
}

void Scheduler::cancel(RequestId id, FinishReason reason) {
  auto it = seqs_.find(id);
  if (it == seqs_.end() || it->second.cancelled) return;
  it->second.cancelled = true;
  it->second.cancel_reason = reason;
}

void Scheduler::remove(RequestId id) {
  auto it = seqs_.find(id);
  if (it == seqs_.end()) return;
  auto& q = waiting_[static_cast<int>(it->second.request.priority)];
  q.erase(std::remove(q.begin(), q.end(), id), q.end());
  running_.erase(std::remove(running_.begin(), running_.end(), id), running_.end());
  seqs_.erase(it);
}

void Scheduler::preempt(Sequence& s) {
  s.table.clear();
  s.n_computed = 0;
  if (s.running) {
    s.running = false;
    running_.erase(std::remove(running_.begin(), running_.end(), s.request.id), running_.end());
    waiting_[static_cast<int>(s.request.priority)].push_front(s.request.id);
    ++preemptions_;
  }
}

double Scheduler::prefill_us(const StepShape& decode, int64_t tokens, int32_t n_past, int32_t chunk) const {
  double us = 0;
  for (int64_t done = 0; done < tokens; done += chunk) {
    StepShape s = decode;
    s.add(n_past + static_cast<int32_t>(done), static_cast<int32_t>(std::min<int64_t>(chunk, tokens - done)));
    us += step_times_.predict_us(s);
  }
  return us;
}

// The prefill that the prompts waiting ahead of (or with) a new one of class p and its own need
// before its first token: at the pace the streams' ITL objectives allow when a stream of its
// class or a higher one sets it, else in the largest chunks.
double Scheduler::predicted_ttft_ms(Priority p, int32_t n_prompt) const {
  if (!step_times_.ready()) return -1;
  StepShape decode;
  int64_t ahead = n_prompt;
  bool paced = false;  // a stream of this class or a higher one sets the pace of prefill
  for (const auto& [id, s] : seqs_) {
    const int32_t left = static_cast<int32_t>(s.tokens.size()) - s.n_computed;
    if (s.running && left == 1) {
      decode.add(s.n_computed, 1);
      paced = paced || (s.request.priority <= p && objective(s).itl_ms > 0);
    } else if (s.request.priority <= p && s.n_computed < s.n_prompt) {
      ahead += s.n_prompt - s.n_computed;
    }
  }
  const int32_t room = std::max(1, config_.max_batch_tokens - decode.tokens);
  const int32_t chunk = paced ? std::min(room, std::max(kMinPrefillTokens, budget_ - decode.tokens)) : room;
  return prefill_us(decode, ahead, 0, chunk) / 1000.0;
}

int32_t Scheduler::compute_budget(int64_t now_ms) {
  tightest_itl_ms_ = 0;
  const int32_t cap = config_.max_batch_tokens;
  if (!has_slo_ || !step_times_.ready()) return cap;
  auto left = [](const Sequence& s) { return static_cast<int32_t>(s.tokens.size()) - s.n_computed; };
  // The streams in decode, the tightest ITL objective among them, and its class.
  StepShape decode;
  Priority tight = Priority::batch;
  const Sequence* prompt = nullptr;  // the first prompt the walk reaches
  for (RequestId id : running_) {
    const Sequence& s = seqs_.at(id);
    if (left(s) > 1) {
      if (!prompt || before(s, *prompt)) prompt = &s;
      continue;
    }
    decode.add(s.n_computed, 1);
    const int64_t itl = objective(s).itl_ms;
    if (itl > 0 && s.times.first_token_us != 0 && (tightest_itl_ms_ == 0 || itl < tightest_itl_ms_)) {
      tightest_itl_ms_ = itl;
      tight = s.request.priority;
    }
  }
  for (const auto& q : waiting_)
    if (!q.empty()) {
      const Sequence& s = seqs_.at(q.front());
      if (!prompt || s.request.priority < prompt->request.priority) prompt = &s;
      break;
    }
  const int32_t room = cap - decode.tokens;
  if (!prompt || tightest_itl_ms_ == 0 || room <= 0) return cap;

  // Aimed short of the objective by the headroom (the time around a step) and by how much
  // longer than predicted the recent sized steps ran.
  const double aim = kItlHeadroom / step_times_.slow_ratio();
  int32_t p = step_times_.max_new_tokens(decode, prompt->n_computed, tightest_itl_ms_ * 1000.0 * aim, room);
  // Chunks grow at most twofold a step past what the model has seen, so that a fit that has
  // forgotten what prefill costs learns it again with a small step rather than a long one.
  p = std::min(p, std::max(kMinPrefillTokens, 2 * step_times_.largest_chunk_seen()));
  // A prompt of a higher class than the stream that sets the objective, which would miss its
  // own TTFT objective at that pace, gets the chunks that meet it instead (the stream's ITL
  // misses are counted).
  const Objective& po = objective(*prompt);
  const int32_t prompt_left = left(*prompt);
  if (po.ttft_ms > 0 && prompt->request.priority < tight && prompt->times.first_token_us == 0) {
    // Aimed a little early: the model's error and the time between steps.
    const double time_left_us = static_cast<double>(prompt->admitted_ms + po.ttft_ms - now_ms) * 1000.0 * aim;
    auto eta_us = [&](int32_t q) { return prefill_us(decode, prompt_left, prompt->n_computed, q); };
    if (p == 0 || eta_us(p) > time_left_us) {
      int32_t lo = std::max(p, 1), hi = std::max(lo, std::min(room, prompt_left));
      if (eta_us(hi) <= time_left_us) {
        while (lo < hi) {  // the smallest chunk that meets it
          const int32_t mid = lo + (hi - lo) / 2;
          if (eta_us(mid) <= time_left_us) hi = mid;
          else lo = mid + 1;
        }
      }
      p = hi;
    }
  }
  p = std::max(p, std::min(room, kMinPrefillTokens));
  return std::min(cap, decode.tokens + p);
}

void Scheduler::finish(Sequence& s, FinishReason reason, std::vector<SchedulerEvent>& events) {
  // Goodput: a request that met its objectives (DistServe: TTFT, and the mean time per output
  // token after the first against the ITL objective).
  const Objective& o = objective(s);
  const int32_t n_out = static_cast<int32_t>(s.tokens.size()) - s.n_prompt;
  if (n_out > 0) {
    ++slo_.finished;
    const bool ttft_ok = o.ttft_ms == 0 || s.times.first_token_us - s.times.queued_us <= o.ttft_ms * 1000;
    const bool tpot_ok = o.itl_ms == 0 || n_out < 2 ||
                         (s.times.last_token_us - s.times.first_token_us) / (n_out - 1) <= o.itl_ms * 1000;
    if (ttft_ok && tpot_ok) ++slo_.met;
  }
  SchedulerEvent e;
  e.kind = SchedulerEvent::Kind::finished;
  e.id = s.request.id;
  e.finished = Finished{s.request.id, reason, s.n_prompt, static_cast<int32_t>(s.tokens.size()) - s.n_prompt,
                        std::max(0, s.n_cached), s.times};
  events.push_back(std::move(e));
  if (s.n_sent > 0) ended_.push_back(s.request.id);
  remove(s.request.id);
}

void Scheduler::fail(Sequence& s, ErrorKind kind, const std::string& message, std::vector<SchedulerEvent>& events) {
  SchedulerEvent e;
  e.kind = SchedulerEvent::Kind::error;
  e.id = s.request.id;
  e.error = ErrorReply{s.request.id, kind, message};
  events.push_back(std::move(e));
  if (s.n_sent > 0) ended_.push_back(s.request.id);
  remove(s.request.id);
}

std::vector<RequestId> Scheduler::running_in_order() const {
  std::vector<RequestId> order = running_;
  std::sort(order.begin(), order.end(), [&](RequestId a, RequestId b) { return before(seqs_.at(a), seqs_.at(b)); });
  return order;
}

// The walk of BlockPlanner::plan over the running sequences, when nothing waits, nothing must be
// freed and no sequence needs a block it does not hold: the same choice, with no block change.
std::optional<BlockPlan> Scheduler::plan_locally(const std::vector<RequestId>& running) const {
  if (reset_pending_ || !ended_.empty() || n_waiting() > 0 || running_.empty()) return std::nullopt;
  BlockPlan plan;
  int32_t budget = budget_;
  auto left = [&](const Sequence& s) { return static_cast<int32_t>(s.tokens.size()) - s.n_computed; };
  int32_t decoding_after = 0;
  for (RequestId id : running) decoding_after += left(seqs_.at(id)) == 1 ? 1 : 0;
  for (RequestId id : running) {
    const Sequence& s = seqs_.at(id);
    const bool decoding = left(s) == 1;
    decoding_after -= decoding ? 1 : 0;
    if (static_cast<int32_t>(plan.chosen.size()) == config_.max_batch_size || budget == 0) break;
    if (!s.started()) return std::nullopt;
    const int32_t n = tokens_to_run(left(s), decoding, budget, decoding_after);
    if (n == 0) continue;
    const int32_t positions = s.n_computed + n;
    if (positions > static_cast<int32_t>(s.table.size()) * kKvBlock) return std::nullopt;
    PlannedSequence& p = plan.chosen.emplace_back();
    p.id = s.request.id;
    p.n_computed = s.n_computed;
    p.n_new = n;
    p.block_table.assign(s.table.begin(), s.table.begin() + (positions + kKvBlock - 1) / kKvBlock);
    budget -= n;
  }
  return plan;
}

std::variant<BlockPlan, BlockPlanRequest> Scheduler::prepare(int64_t now_ms, std::vector<SchedulerEvent>& events) {
  // Cancels and deadlines first: they free blocks for the others.
  std::vector<RequestId> ids;
  ids.reserve(seqs_.size());
  for (const auto& [id, s] : seqs_) ids.push_back(id);
  std::sort(ids.begin(), ids.end());
  for (RequestId id : ids) {
    Sequence& s = seqs_.at(id);
    if (s.cancelled) finish(s, s.cancel_reason, events);
    else if (s.request.deadline_ms != 0 && now_ms >= s.request.deadline_ms)
      fail(s, ErrorKind::deadline_exceeded, "the deadline passed after " + std::to_string(s.tokens.size() - s.n_prompt) +
                                                " generated tokens", events);
  }

  budget_ = compute_budget(now_ms);
  const std::vector<RequestId> running = running_in_order();
  if (std::optional<BlockPlan> local = plan_locally(running)) {
    ++local_plans_;
    return std::move(*local);
  }
  BlockPlanRequest r;
  r.plan_id = next_plan_++;
  r.reset = std::exchange(reset_pending_, false);
  r.commits = std::move(commits_);
  r.ended = std::move(ended_);
  commits_.clear();
  ended_.clear();
  r.max_batch_tokens = budget_;
  r.max_batch_size = config_.max_batch_size;
  // Candidates in order: per class, running (by arrival) then waiting (queue order). Every
  // running one (a possible victim), but no more waiting ones than a step can take: the walk
  // stops at the first waiting sequence that does not fit.
  int32_t waiting_left = config_.max_batch_size;
  auto add = [&](Sequence& s) {
    BlockCandidate& c = r.candidates.emplace_back();
    c.id = s.request.id;
    c.new_tokens.assign(s.tokens.begin() + s.n_sent, s.tokens.end());
    s.n_sent = static_cast<int32_t>(s.tokens.size());
    c.n_tokens = s.n_sent;
    c.started = s.started();
    c.n_computed = s.n_computed;
    c.running = s.running;
    c.priority = s.request.priority;
  };
  size_t next = 0;
  for (int c = 0; c < kPriorityClasses; ++c) {
    for (; next < running.size() && static_cast<int>(seqs_.at(running[next]).request.priority) == c; ++next)
      add(seqs_.at(running[next]));
    for (RequestId id : waiting_[c]) {
      if (waiting_left-- <= 0) break;
      add(seqs_.at(id));
    }
  }
  return r;
}

Step Scheduler::apply(const BlockPlan& plan) {
  for (RequestId id : plan.preempted) {
    auto it = seqs_.find(id);
    if (it != seqs_.end()) preempt(it->second);
  }
  Step step;
  step.copies = plan.copies;
  const int64_t now_us = unix_us();
  for (const PlannedSequence& p : plan.chosen) {
    auto it = seqs_.find(p.id);
    // Ended while the plan was on its way (failed when a child died): the next request tells
    // the cache to free its blocks.
    if (it == seqs_.end()) continue;
    Sequence& s = it->second;
    if (p.n_computed + p.n_new > static_cast<int32_t>(s.tokens.size()))
      throw Error(ErrorCode::invalid_argument, "block plan runs sequence " + std::to_string(p.id) + " past its tokens");
    s.n_computed = p.n_computed;
    // The planner cut the table at the last block these positions reach, which is the last
    // block the sequence holds (reserve() grows it no further).
    s.table = p.block_table;
    if (s.n_cached < 0) s.n_cached = s.n_computed;
    if (!s.running) {
      auto& q = waiting_[static_cast<int>(s.request.priority)];
      q.erase(std::remove(q.begin(), q.end(), s.request.id), q.end());
      running_.push_back(s.request.id);
      s.running = true;
      if (s.times.admitted_us == 0) s.times.admitted_us = now_us;
    }
    StepSequence ss;
    ss.id = s.request.id;
    ss.tokens.assign(s.tokens.begin() + s.n_computed, s.tokens.begin() + s.n_computed + p.n_new);
    ss.n_past = s.n_computed;
    ss.block_table = p.block_table;
    ss.sample = s.n_computed + p.n_new == static_cast<int32_t>(s.tokens.size());
    if (ss.sample) {
      ss.sampling = s.request.sampling;
      const size_t tail = std::min<size_t>(s.tokens.size(), static_cast<size_t>(std::max(0, s.request.sampling.repeat_last_n)));
      ss.recent.assign(s.tokens.end() - static_cast<std::ptrdiff_t>(tail), s.tokens.end());
      ss.logprobs = s.request.logprobs;
    }
    step.sequences.push_back(std::move(ss));
  }
  if (step.sequences.empty()) return Step{};
  step.step_id = next_step_++;
  return step;
}

Step Scheduler::schedule(int64_t now_ms, std::vector<SchedulerEvent>& events) {
  if (!planner_) throw Error(ErrorCode::invalid_argument, "Scheduler::schedule needs a block manager (see prepare/apply)");
  auto prepared = prepare(now_ms, events);
  if (auto* local = std::get_if<BlockPlan>(&prepared)) return apply(*local);
  return apply(planner_->plan(std::get<BlockPlanRequest>(prepared)));
}

void Scheduler::update(const Step& step, const StepResult& result, std::vector<SchedulerEvent>& events) {
  const int64_t now_us = unix_us();
  if (result.step_us > 0) step_times_.observe(shape_of(step), static_cast<double>(result.step_us));
  bool itl_step = false, itl_step_over = false;
  for (const StepSequence& ss : step.sequences) {
    auto it = seqs_.find(ss.id);
    // Gone (finished) or preempted since the step was built: its results no longer apply.
    if (it == seqs_.end() || !it->second.started() || it->second.n_computed != ss.n_past) continue;
    Sequence& s = it->second;
    s.n_computed += static_cast<int32_t>(ss.tokens.size());
    // One commit per sequence is enough (a later one covers an earlier one); it brings the
    // computed tokens the cache was not sent, which locally planned steps produce.
    auto c = std::find_if(commits_.begin(), commits_.end(), [&](const BlockCommit& x) { return x.id == s.request.id; });
    if (c == commits_.end()) c = commits_.insert(commits_.end(), BlockCommit{s.request.id, 0, {}});
    c->n_computed = s.n_computed;
    if (s.n_computed > s.n_sent) {
      c->new_tokens.insert(c->new_tokens.end(), s.tokens.begin() + s.n_sent, s.tokens.begin() + s.n_computed);
      s.n_sent = s.n_computed;
    }
    if (s.times.prefill_done_us == 0 && s.n_computed >= s.n_prompt) s.times.prefill_done_us = now_us;
  }
  for (const SampledToken& st : result.tokens) {
    auto it = seqs_.find(st.id);
    if (it == seqs_.end() || !it->second.started()) continue;
    Sequence& s = it->second;
    if (s.n_computed != static_cast<int32_t>(s.tokens.size())) continue;  // not a sampling point
    s.tokens.push_back(st.token);
    const int32_t completion = static_cast<int32_t>(s.tokens.size()) - s.n_prompt;
    SchedulerEvent e;
    e.kind = SchedulerEvent::Kind::token;
    e.id = st.id;
    e.token = st.token;
    e.index = completion - 1;
    e.has_logprob = st.has_logprob;
    if (st.has_logprob) e.logprob = st.logprob;
    events.push_back(std::move(e));
    const Objective& o = objective(s);
    if (s.times.first_token_us == 0) {
      s.times.first_token_us = now_us;
      if (o.ttft_ms > 0 && now_us - s.times.queued_us > o.ttft_ms * 1000) ++slo_.ttft_missed;
    } else if (o.itl_ms > 0) {
      itl_step = true;
      ++slo_.itl_tokens;
      if (now_us - s.times.last_token_us > o.itl_ms * 1000) {
        ++slo_.itl_tokens_over;
        itl_step_over = true;
      }
    }
    s.times.last_token_us = now_us;
    if (!s.request.ignore_eos && is_eog_ && is_eog_(st.token)) finish(s, FinishReason::stop, events);
    else if (completion >= s.request.max_tokens) finish(s, FinishReason::length, events);
  }
  if (itl_step) ++slo_.itl_steps;
  if (itl_step_over) ++slo_.itl_steps_over;
}

void Scheduler::fail_all(ErrorKind kind, const std::string& message, std::vector<SchedulerEvent>& events) {
  std::vector<RequestId> ids;
  for (const auto& [id, s] : seqs_) ids.push_back(id);
  std::sort(ids.begin(), ids.end());
  for (RequestId id : ids) fail(seqs_.at(id), kind, message, events);
}

void Scheduler::reset_kv() {
  const std::vector<RequestId> running = running_;
  for (RequestId id : running) preempt(seqs_.at(id));
  for (auto& [id, s] : seqs_) {
    if (s.started()) preempt(s);
    s.n_sent = 0;  // the cache starts over: every token is sent again
  }
  commits_.clear();
  ended_.clear();
  reset_pending_ = true;
  ++kv_epoch_;
}

}  // namespace celer
