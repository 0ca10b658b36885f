// The sampler: each filter does what it says, seeds reproduce, and a sequence's tokens do not
// depend on what else shares its batch.
#include <catch2/catch.hpp>

#include <cmath>
#include <map>
#include <set>

#include "runtime/block_pool.hpp"
#include "runtime/engine.hpp"
#include "runtime/error.hpp"
#include "runtime/model.hpp"
#include "runtime/protocol.hpp"
#include "runtime/sampler.hpp"

using namespace celer;

namespace {

SamplingParams plain(float temperature, uint64_t seed = 1) {
  SamplingParams p;
  p.temperature = temperature;
  p.top_k = 0;
  p.top_p = 1.0f;
  p.min_p = 0.0f;
  p.seed = seed;
  return p;
}

// Logits whose softmax is {0.5, 0.25, 0.125, 0.0625, ...}.
std::vector<float> halving_logits(int n) {
  std::vector<float> l(n);
  for (int i = 0; i < n; ++i) l[i] = -static_cast<float>(i) * std::log(2.0f);
  return l;
}

std::map<TokenId, int> histogram(Sampler& s, const std::vector<float>& logits, int draws) {
  std::map<TokenId, int> h;
  for (int i = 0; i < draws; ++i) ++h[s.sample(logits, {}, i)];
  return h;
}

}  // namespace

TEST_CASE("greedy picks the first maximum", "[sampler]") {
  Sampler s(plain(0), 5);
  CHECK(s.sample(std::vector<float>{0.1f, 3.0f, -1.0f, 3.0f, 2.9f}, {}, 0) == 1);
}

TEST_CASE("temperature sampling follows the distribution and the seed", "[sampler]") {
  const auto logits = halving_logits(8);
  Sampler a(plain(1.0f, 42), 8), b(plain(1.0f, 42), 8), c(plain(1.0f, 43), 8);
  std::vector<TokenId> ta, tb, tc;
  for (int i = 0; i < 200; ++i) {
    ta.push_back(a.sample(logits, {}, i));
    tb.push_back(b.sample(logits, {}, i));
    tc.push_back(c.sample(logits, {}, i));
  }
  CHECK(ta == tb);
  CHECK(ta != tc);
  Sampler d(plain(1.0f, 7), 8);
  const auto h = histogram(d, logits, 20000);
  CHECK(h.at(0) / 20000.0 == Approx(0.5).margin(0.02));
  CHECK(h.at(1) / 20000.0 == Approx(0.25).margin(0.02));
  // Low temperature sharpens: token 0 dominates.
  Sampler cold(plain(0.1f, 7), 8);
  CHECK(histogram(cold, logits, 2000).at(0) > 1990);
}

TEST_CASE("a draw depends only on the seed and the position", "[sampler]") {
  const auto logits = halving_logits(8);
  Sampler a(plain(1.0f, 9), 8), b(plain(1.0f, 9), 8);
  for (int i = 0; i < 50; ++i) a.sample(logits, {}, 1000 + i);  // a has drawn before, b has not
  for (uint64_t pos : {0u, 7u, 123u})
    CHECK(a.sample(logits, {}, pos) == b.sample(logits, {}, pos));
}

TEST_CASE("top-k, top-p and min-p keep exactly the tokens they should", "[sampler]") {
  const auto logits = halving_logits(8);
  auto support = [&](SamplingParams p) {
    Sampler s(p, 8);
    std::set<TokenId> seen;
    for (const auto& [tok, n] : histogram(s, logits, 4000)) seen.insert(tok);
    return seen;
  };
  SamplingParams p = plain(1.0f);
  p.top_k = 3;
  CHECK(support(p) == std::set<TokenId>{0, 1, 2});
  p = plain(1.0f);
  p.top_p = 0.8f;  // 0.5 + 0.25 = 0.75 < 0.8, + 0.125 reaches it
  CHECK(support(p) == std::set<TokenId>{0, 1, 2});
  p = plain(1.0f);
  p.min_p = 0.2f;  // keeps p >= 0.1: tokens 0, 1, 2
  CHECK(support(p) == std::set<TokenId>{0, 1, 2});
  p = plain(1.0f);
  p.top_k = 1;
  CHECK(support(p) == std::set<TokenId>{0});
}

TEST_CASE("repetition penalty pushes recent tokens down", "[sampler]") {
  std::vector<float> logits{2.0f, 1.9f, -1.0f};
  Sampler greedy(plain(0), 3);
  CHECK(greedy.sample(logits, std::vector<TokenId>{0}, 1) == 0);
  SamplingParams p = plain(0);
  p.repeat_penalty = 1.5f;
  Sampler penalised(p, 3);
  CHECK(penalised.sample(logits, std::vector<TokenId>{0}, 1) == 1);       // 2.0 / 1.5 < 1.9
  CHECK(penalised.sample(logits, std::vector<TokenId>{0, 1}, 2) == 0);    // both penalised: 1.33 > 1.27
  p.repeat_last_n = 1;
  Sampler short_window(p, 3);
  CHECK(short_window.sample(logits, std::vector<TokenId>{0, 2}, 2) == 0);  // token 0 is outside the window
}

TEST_CASE("logprobs are the log-softmax of the raw logits, top ones most likely first", "[sampler]") {
  const std::vector<float> logits = {1.0f, 3.0f, -2.0f, 3.0f, 0.5f};
  double z = 0;
  for (float l : logits) z += std::exp(static_cast<double>(l));
  auto expected = [&](int i) { return static_cast<float>(logits[i] - std::log(z)); };
  Sampler sampler(static_cast<int32_t>(logits.size()));
  TokenLogprob lp;
  sampler.logprobs(logits, 4, 3, lp);
  CHECK(lp.token == 4);
  CHECK(lp.logprob == Approx(expected(4)).margin(1e-6));
  REQUIRE(lp.top_tokens == std::vector<TokenId>{1, 3, 0});  // the tie 1/3 goes to the lower id
  for (size_t i = 0; i < lp.top_tokens.size(); ++i) CHECK(lp.top_logprobs[i] == Approx(expected(lp.top_tokens[i])).margin(1e-6));
  double total = 0;
  for (size_t i = 0; i < logits.size(); ++i) {
    sampler.logprobs(logits, static_cast<TokenId>(i), 0, lp);
    CHECK(lp.top_tokens.empty());
    total += std::exp(static_cast<double>(lp.logprob));
  }
  CHECK(total == Approx(1.0).margin(1e-6));
  sampler.logprobs(logits, 0, 50, lp);  // k beyond the vocabulary: all of it
  CHECK(lp.top_tokens.size() == logits.size());
}

TEST_CASE("bad sampling parameters are named", "[sampler]") {
  SamplingParams p;
  p.temperature = -1;
  CHECK_THROWS_WITH(validate(p), Catch::Contains("temperature"));
  p = SamplingParams{};
  p.top_p = 0;
  CHECK_THROWS_WITH(validate(p), Catch::Contains("top_p"));
  p = SamplingParams{};
  p.min_p = 2;
  CHECK_THROWS_WITH(validate(p), Catch::Contains("min_p"));
  p = SamplingParams{};
  p.top_k = -3;
  CHECK_THROWS_WITH(validate(p), Catch::Contains("top_k"));
  p = SamplingParams{};
  p.repeat_penalty = 0;
  CHECK_THROWS_WITH(validate(p), Catch::Contains("repeat_penalty"));
}

TEST_CASE("a seeded sequence samples the same tokens alone and in a batch", "[sampler][model]") {
  Model model(std::string(CELER_TEST_DATA) + "/stories260K.gguf");
  EngineOptions eo;
  eo.max_seqs = 4;
  eo.max_context = 96;
  Engine engine(model, eo);
  const int32_t V = model.config().n_vocab;
  SamplingParams params;
  params.temperature = 1.0f;
  params.top_k = 0;
  params.top_p = 0.95f;
  params.min_p = 0.0f;

  // Runs the given prompts in lock-step, each with its own seed; returns each one's 30 tokens.
  auto run = [&](const std::vector<std::vector<TokenId>>& prompts, const std::vector<uint64_t>& seeds) {
    BlockPool pool(engine.n_kv_blocks());
    const size_t S = prompts.size();
    std::vector<std::vector<int32_t>> tables(S);
    std::vector<std::vector<TokenId>> seq = prompts, out(S);
    std::vector<Sampler> samplers;
    for (size_t s = 0; s < S; ++s) {
      SamplingParams p = params;
      p.seed = seeds[s];
      samplers.emplace_back(p, V);
      REQUIRE(pool.allocate(6, tables[s]));
    }
    std::vector<int32_t> n_past(S, 0);
    std::vector<float> logits(S * V);
    for (int step = 0; step < 30; ++step) {
      std::vector<SequenceInput> batch;
      for (size_t s = 0; s < S; ++s)
        batch.push_back({std::span<const TokenId>(seq[s]).subspan(n_past[s]), n_past[s], tables[s], true});
      engine.forward(batch, logits.data());
      for (size_t s = 0; s < S; ++s) {
        n_past[s] = static_cast<int32_t>(seq[s].size());
        const TokenId t = samplers[s].sample({logits.data() + s * V, static_cast<size_t>(V)}, seq[s], seq[s].size());
        seq[s].push_back(t);
        out[s].push_back(t);
      }
    }
    return out;
  };
  const std::vector<TokenId> a{1, 403, 407, 261, 378}, b{1, 291, 400, 428}, c{1, 317, 269, 274, 287};
  const auto alone = run({a}, {99})[0];
  const auto batched = run({b, a, c}, {5, 99, 6});
  CHECK(batched[1] == alone);
  CHECK(run({c, b, a}, {1, 2, 99})[2] == alone);
  CHECK(run({a}, {100})[0] != alone);  // another seed, another story
}
