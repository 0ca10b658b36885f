// Tensor parallelism on CPU: the in-process all-reduce, the slicing of a model over ranks, and
// engines of TP = 2 and 4 (one thread each) giving the logits and greedy tokens of TP = 1.
#include <catch2/catch.hpp>
#include <nlohmann/json.hpp>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <exception>
#include <fstream>
#include <memory>
#include <thread>

#include "runtime/block_pool.hpp"
#include "runtime/engine.hpp"
#include "runtime/error.hpp"
#include "runtime/generation.hpp"
#include "runtime/model.hpp"
#include "runtime/model_maker.hpp"
#include "runtime/tensor_parallel.hpp"
#include "test_util.hpp"

using namespace celer;

namespace {

const std::string kStories = std::string(CELER_TEST_DATA) + "/stories260K.gguf";

struct Reference {
  std::string prompt;
  std::vector<TokenId> prompt_tokens, generated;
};

std::vector<Reference> load_reference() {
  std::ifstream in(std::string(CELER_TEST_DATA) + "/stories260K.reference.json");
  REQUIRE(in.good());
  const nlohmann::json j = nlohmann::json::parse(in);
  std::vector<Reference> out;
  for (const auto& r : j.at("results")) out.push_back({r.at("prompt"), r.at("prompt_tokens"), r.at("generated_tokens")});
  return out;
}

// Runs fn(rank) on one thread per rank and waits for all. A rank that throws aborts the group
// (so its peers do not wait in an all-reduce forever); the first exception is rethrown here.
template <typename F>
void on_ranks(LocalAllReduceGroup& group, F fn) {
  std::vector<std::exception_ptr> errors(group.size());
  std::vector<std::thread> threads;
  for (int r = 0; r < group.size(); ++r)
    threads.emplace_back([&, r] {
      try {
        fn(r);
      } catch (...) {
        errors[r] = std::current_exception();
        group.abort();
      }
    });
  for (auto& t : threads) t.join();
  for (auto& e : errors)
    if (e) std::rethrow_exception(e);
}

// tp engines on one model, rank r on its own thread in every call.
class TpEngines {
 public:
  TpEngines(const Model& model, int tp, EngineOptions eo) : group_(tp) {
    for (int r = 0; r < tp; ++r) {
      eo.tp_rank = r;
      eo.tp_size = tp;
      eo.all_reduce = tp > 1 ? &group_.rank(r) : nullptr;
      engines_.push_back(std::make_unique<Engine>(model, eo));
    }
  }
  int size() const { return group_.size(); }
  Engine& rank(int r) { return *engines_[r]; }
  const Model& model() const { return engines_[0]->model(); }

  // One step on every rank. Returns rank 0's logits ([n_wanted, n_vocab]); every rank's are
  // checked to be the same bits.
  std::vector<float> forward(std::span<const SequenceInput> batch) {
    size_t n_wanted = 0;
    for (const SequenceInput& in : batch) n_wanted += in.want_logits;
    std::vector<std::vector<float>> logits(size(), std::vector<float>(n_wanted * model().config().n_vocab));
    on_ranks(group_, [&](int r) { engines_[r]->forward(batch, logits[r].data()); });
    for (int r = 1; r < size(); ++r)
      CHECK(std::memcmp(logits[r].data(), logits[0].data(), logits[0].size() * sizeof(float)) == 0);
    return logits[0];
  }

  // generate() run by every rank on its own thread (greedy: every rank samples the same token
  // from the same logits, so they stay in lock-step). Returns each rank's tokens.
  std::vector<std::vector<TokenId>> generate_greedy(std::span<const TokenId> prompt, int32_t n) {
    GenerateOptions go;
    go.max_tokens = n;
    go.sampling.temperature = 0;
    go.ignore_eos = true;
    std::vector<std::vector<TokenId>> out(size());
    on_ranks(group_, [&](int r) {
      generate(*engines_[r], prompt, go, [&, r](TokenId t) {
        out[r].push_back(t);
        return true;
      });
    });
    return out;
  }

 private:
  LocalAllReduceGroup group_;
  std::vector<std::unique_ptr<Engine>> engines_;
};

// Greedy decoding of several sequences in lock-step batches (as model_test's): prompts in chunks
// of prefill_chunk, so prefill rows of some sequences share steps with decode rows of others.
// Returns the tokens and every step's logits.
std::vector<std::vector<TokenId>> greedy_batched(TpEngines& tp, const std::vector<std::vector<TokenId>>& prompts,
                                                 int n_new, int prefill_chunk,
                                                 std::vector<std::vector<float>>* step_logits = nullptr) {
  const int32_t n_vocab = tp.model().config().n_vocab;
  const int bs = tp.rank(0).block_size();
  BlockPool pool(tp.rank(0).n_kv_blocks());  // the same block ids on every rank
  const size_t S = prompts.size();
  std::vector<std::vector<int32_t>> tables(S);
  std::vector<std::vector<TokenId>> seq = prompts, out(S);
  std::vector<int32_t> n_past(S, 0);
  for (;;) {
    std::vector<SequenceInput> batch;
    std::vector<size_t> who;
    for (size_t s = 0; s < S; ++s) {
      if (static_cast<int>(out[s].size()) == n_new) continue;
      const int32_t pending = static_cast<int32_t>(seq[s].size()) - n_past[s];
      const int32_t n = std::min(pending, prefill_chunk);
      const int64_t need = (n_past[s] + n + bs - 1) / bs - static_cast<int64_t>(tables[s].size());
      if (need > 0) REQUIRE(pool.allocate(static_cast<int32_t>(need), tables[s]));
      batch.push_back({std::span<const TokenId>(seq[s]).subspan(n_past[s], n), n_past[s], tables[s], n == pending});
      who.push_back(s);
    }
    if (batch.empty()) break;
    const std::vector<float> logits = tp.forward(batch);
    if (step_logits) step_logits->push_back(logits);
    size_t row = 0;
    for (size_t i = 0; i < batch.size(); ++i) {
      const size_t s = who[i];
      n_past[s] += static_cast<int32_t>(batch[i].tokens.size());
      if (!batch[i].want_logits) continue;
      const float* l = logits.data() + row++ * n_vocab;
      const TokenId next = static_cast<TokenId>(std::max_element(l, l + n_vocab) - l);
      out[s].push_back(next);
      seq[s].push_back(next);
    }
  }
  return out;
}

// |a - b| <= rel * max |b| over each row of n_vocab logits: the sums of a TP run come in another
// order, so agreement is relative to the row's scale (a logit near 0 has no relative precision).
void check_logits_close(const std::vector<std::vector<float>>& a, const std::vector<std::vector<float>>& b, int n_vocab,
                        double rel) {
  REQUIRE(a.size() == b.size());
  double worst = 0;
  for (size_t s = 0; s < a.size(); ++s) {
    REQUIRE(a[s].size() == b[s].size());
    for (size_t r = 0; r < a[s].size() / n_vocab; ++r) {
      const float* x = a[s].data() + r * n_vocab;
      const float* y = b[s].data() + r * n_vocab;
      double scale = 0;
      for (int i = 0; i < n_vocab; ++i) scale = std::max(scale, std::fabs(double(y[i])));
      for (int i = 0; i < n_vocab; ++i) worst = std::max(worst, std::fabs(double(x[i]) - y[i]) / scale);
    }
  }
  INFO("worst relative difference " << worst);
  CHECK(worst <= rel);
  CHECK(worst > 0.0);  // not trivially the same computation  (TP changes the summation order)
}

std::vector<std::vector<TokenId>> reference_prompts() {
  std::vector<std::vector<TokenId>> prompts;
  for (const Reference& ref : load_reference()) prompts.push_back(ref.prompt_tokens);
  return prompts;
}

ModelSpec random_spec(const std::string& arch, TensorType type) {
  ModelSpec spec;
  spec.arch = arch;
  spec.type = type;
  spec.dim = 256;
  spec.layers = 2;
  spec.heads = 8;
  spec.kv_heads = 4;
  spec.ffn = 512;
  spec.context = 256;
  spec.vocab_path = kStories;  // its 512-token vocabulary keeps the output matrix small
  spec.seed = 11;
  return spec;
}

template <typename F>
std::string error_of(F f, ErrorCode* code = nullptr) {
  try {
    f();
  } catch (const Error& e) {
    if (code) *code = e.code();
    return e.what();
  }
  return "";
}

}  // namespace

TEST_CASE("LocalAllReduceGroup: every rank holds the rank-order sum, bit for bit", "[tp]") {
  for (int size : {1, 2, 3, 4}) {
    LocalAllReduceGroup group(size);
    REQUIRE(group.size() == size);
    for (int r = 0; r < size; ++r) {
      CHECK(group.rank(r).rank() == r);
      CHECK(group.rank(r).size() == size);
    }
    // Lengths around the 16-float slices, values whose sum depends on the order.
    const std::vector<int64_t> lengths{0, 1, 7, 16, 17, 33, 100, 1000, 4099};
    std::vector<std::vector<std::vector<float>>> got(lengths.size(), std::vector<std::vector<float>>(size));
    auto value = [](size_t call, int r, int64_t i) {
      return std::ldexp(float((call * 131 + i * 7 + r * 3) % 97) - 48.5f, int((i + r) % 41) - 20);
    };
    on_ranks(group, [&](int r) {
      for (int repeat = 0; repeat < 50; ++repeat)
        for (size_t call = 0; call < lengths.size(); ++call) {
          std::vector<float>& b = got[call][r];
          b.resize(lengths[call]);
          for (int64_t i = 0; i < lengths[call]; ++i) b[i] = value(call, r, i);
          group.rank(r).sum(b.data(), lengths[call]);
        }
    });
    for (size_t call = 0; call < lengths.size(); ++call) {
      std::vector<float> want(lengths[call]);
      for (int64_t i = 0; i < lengths[call]; ++i) {
        float s = value(call, 0, i);
        for (int r = 1; r < size; ++r) s += value(call, r, i);
        want[i] = s;
      }
      for (int r = 0; r < size; ++r) {
        INFO("size " << size << " length " << lengths[call] << " rank " << r);
        CHECK(std::memcmp(got[call][r].data(), want.data(), want.size() * sizeof(float)) == 0);
      }
    }
  }
}

TEST_CASE("LocalAllReduceGroup: abort wakes a waiting rank; mismatched lengths fail every rank", "[tp]") {
  {
    LocalAllReduceGroup group(2);
    std::vector<float> b(8, 1.0f);
    std::string error;
    std::thread waiter([&] { error = error_of([&] { group.rank(0).sum(b.data(), 8); }); });
    std::this_thread::sleep_for(std::chrono::milliseconds(20));  // past the spin, asleep
    group.abort();
    waiter.join();
    CHECK(error.find("aborted") != std::string::npos);
    CHECK(error_of([&] { group.rank(1).sum(b.data(), 8); }).find("aborted") != std::string::npos);
  }
  {
    LocalAllReduceGroup group(2);
    std::vector<float> a(8), b(9);
    std::string ea, eb;
    std::thread t([&] { ea = error_of([&] { group.rank(0).sum(a.data(), 8); }); });
    eb = error_of([&] { group.rank(1).sum(b.data(), 9); });
    t.join();
    CHECK(!ea.empty());
    CHECK(!eb.empty());
  }
  CHECK_THROWS_AS(LocalAllReduceGroup(0), Error);
  LocalAllReduceGroup g(2);
  CHECK_THROWS_AS(g.rank(2), Error);
}

TEST_CASE("ModelShard: slices are views of the model's rows, column slices gathered copies", "[tp]") {
  Model model(kStories);
  const ModelConfig& c = model.config();
  const ModelShard whole(model, 0, 1);
  CHECK(&whole.layers() == &model.layers());  // TP = 1: the model's own views, nothing copied
  CHECK(whole.owned_bytes() == 0);
  CHECK(whole.n_head() == c.n_head);

  const int hd = c.head_dim;
  for (int tp : {2, 4}) {
    for (int r = 0; r < tp; ++r) {
      const ModelShard s(model, r, tp);
      CHECK(s.n_head() == c.n_head / tp);
      CHECK(s.n_head_kv() == c.n_head_kv / tp);
      CHECK(s.n_ff() == c.n_ff / tp);
      CHECK(s.owned_bytes() > 0);
      for (int il = 0; il < c.n_layer; ++il) {
        const LayerWeights& m = model.layers()[il];
        const LayerWeights& l = s.layers()[il];
        CHECK(l.wq.data == m.wq.row(int64_t{r} * s.n_head() * hd));
        CHECK(l.wq.rows == int64_t{s.n_head()} * hd);
        CHECK(l.wk.data == m.wk.row(int64_t{r} * s.n_head_kv() * hd));
        CHECK(l.wv.data == m.wv.row(int64_t{r} * s.n_head_kv() * hd));
        CHECK(l.w_gate.data == m.w_gate.row(int64_t{r} * s.n_ff()));
        CHECK(l.w_up.data == m.w_up.row(int64_t{r} * s.n_ff()));
        REQUIRE(l.wo.rows == c.n_embd);
        REQUIRE(l.wo.cols == int64_t{s.n_head()} * hd);
        REQUIRE(l.w_down.cols == s.n_ff());
        const auto* wo = static_cast<const float*>(m.wo.data);
        const auto* down = static_cast<const float*>(m.w_down.data);
        for (int64_t row = 0; row < c.n_embd; ++row) {
          CHECK(std::memcmp(l.wo.row(row), wo + row * m.wo.cols + l.wo.cols * r, l.wo.cols * 4) == 0);
          CHECK(std::memcmp(l.w_down.row(row), down + row * m.w_down.cols + l.w_down.cols * r, l.w_down.cols * 4) == 0);
        }
      }
    }
  }
}

TEST_CASE("tensor-parallel sizes that do not divide the model are refused by name", "[tp]") {
  Model stories(kStories);  // 8 heads, 4 KV heads, n_ff 172
  ErrorCode code = ErrorCode::io;
  std::string e = error_of([&] { ModelShard(stories, 0, 3); }, &code);
  CHECK(code == ErrorCode::unsupported);
  CHECK(e.find("tensor-parallel size 3") != std::string::npos);
  CHECK(e.find("8 attention heads") != std::string::npos);
  e = error_of([&] { ModelShard(stories, 0, 8); });
  CHECK(e.find("tensor-parallel size 8") != std::string::npos);
  CHECK(e.find("4 KV heads") != std::string::npos);
  CHECK(error_of([&] { ModelShard(stories, 2, 2); }, &code).find("out of range") != std::string::npos);
  CHECK(code == ErrorCode::invalid_argument);

  TempDir dir;
  auto build = [&](TensorType type, int dim, int heads, int ffn) {
    ModelSpec spec = random_spec("llama", type);
    spec.dim = dim;
    spec.heads = heads;
    spec.kv_heads = heads;
    spec.ffn = ffn;
    spec.layers = 1;
    const std::string path = dir.path() + "/m-" + std::to_string(dim) + "-" + std::to_string(ffn) + ".gguf";
    make_model(spec, path);
    return std::make_unique<Model>(path);
  };
  // n_ff 130 over 4 ranks.
  auto f32 = build(TensorType::f32, 128, 4, 130);
  e = error_of([&] { ModelShard(*f32, 0, 4); });
  CHECK(e.find("tensor-parallel size 4") != std::string::npos);
  CHECK(e.find("130 feed-forward rows (feed_forward_length)") != std::string::npos);
  CHECK_NOTHROW(ModelShard(*f32, 1, 2));
  // Q8_0 with head size 16: 8 ranks would cut attn_output into slices of 16 columns, half a block.
  auto q8 = build(TensorType::q8_0, 128, 8, 256);
  e = error_of([&] { ModelShard(*q8, 0, 8); }, &code);
  CHECK(code == ErrorCode::unsupported);
  CHECK(e.find("tensor-parallel size 8") != std::string::npos);
  CHECK(e.find("'blk.0.attn_output.weight'") != std::string::npos);
  CHECK_NOTHROW(ModelShard(*q8, 3, 4));
  // Q8_0 with n_ff 192: 4 ranks would give ffn_down slices of 48 columns.
  auto q8ff = build(TensorType::q8_0, 128, 4, 192);
  e = error_of([&] { ModelShard(*q8ff, 0, 4); });
  CHECK(e.find("tensor-parallel size 4") != std::string::npos);
  CHECK(e.find("'blk.0.ffn_down.weight'") != std::string::npos);
  CHECK_NOTHROW(ModelShard(*q8ff, 0, 2));  // 96 columns: 3 blocks

  // The engine refuses the same, and a TP engine without a matching all-reduce.
  EngineOptions eo;
  eo.max_context = 64;
  eo.max_seqs = 1;
  eo.tp_size = 3;
  LocalAllReduceGroup g3(3);
  eo.all_reduce = &g3.rank(0);
  CHECK(error_of([&] { Engine(stories, eo); }).find("8 attention heads") != std::string::npos);
  eo.tp_size = 2;
  eo.all_reduce = nullptr;
  CHECK(error_of([&] { Engine(stories, eo); }, &code).find("needs an all-reduce") != std::string::npos);
  CHECK(code == ErrorCode::invalid_argument);
  eo.all_reduce = &g3.rank(1);
  CHECK(error_of([&] { Engine(stories, eo); }).find("all-reduce handle is rank 1 of 3") != std::string::npos);
}

TEST_CASE("stories260K: TP = 2 and 4 give the logits of TP = 1 and the reference's greedy tokens", "[tp]") {
  Model model(kStories);
  const auto refs = load_reference();
  const auto prompts = reference_prompts();
  EngineOptions eo;
  eo.n_threads = 1;  // one thread per rank: the ranks are the parallelism here
  eo.max_seqs = 3;
  eo.max_context = 128;

  TpEngines tp1(model, 1, eo);
  std::vector<std::vector<float>> logits1;
  const auto tokens1 = greedy_batched(tp1, prompts, 40, 3, &logits1);
  for (int tp : {2, 4}) {
    INFO("tp " << tp);
    TpEngines group(model, tp, eo);
    CHECK(group.rank(tp - 1).shard().n_head_kv() == model.config().n_head_kv / tp);
    CHECK(group.rank(tp - 1).shard().n_ff() == model.config().n_ff / tp);
    // Batched: prompts in chunks of 3 next to decode rows, every step's logits against TP = 1.
    std::vector<std::vector<float>> logits;
    const auto tokens = greedy_batched(group, prompts, 40, 3, &logits);
    check_logits_close(logits, logits1, model.config().n_vocab, 1e-4);
    CHECK(tokens == tokens1);
    // One prompt at a time through generate() on every rank: the reference's 40 tokens.
    for (const Reference& ref : refs) {
      INFO("prompt: " << ref.prompt);
      const auto got = group.generate_greedy(ref.prompt_tokens, 40);
      const std::vector<TokenId> want(ref.generated.begin(), ref.generated.begin() + 40);
      for (int r = 0; r < tp; ++r) CHECK(got[r] == want);
    }
  }
  for (size_t i = 0; i < refs.size(); ++i)
    CHECK(std::vector<TokenId>(refs[i].generated.begin(), refs[i].generated.begin() + 40) == tokens1[i]);
}

TEST_CASE("random llama, qwen2 and chatglm models, F32, Q8_0, Q4_0 and Q5_1: TP = 2 and 4 agree with TP = 1", "[tp]") {
  TempDir dir;
  const auto prompts = reference_prompts();
  // chatglm: the shards slice views of its fused QKV and gate-and-up matrices.
  for (const std::string arch : {"llama", "qwen2", "chatglm"})
    // Q4_0 and Q5_1: the packed 4- and 5-bit kernels on row and column slices (the K-quants'
    // 256-wide blocks do not divide this model's slices).
    for (TensorType type : {TensorType::f32, TensorType::q8_0, TensorType::q4_0, TensorType::q5_1}) {
      const std::string path = dir.path() + "/" + arch + "-" + to_string(type) + ".gguf";
      make_model(random_spec(arch, type), path);
      Model model(path);
      for (Q8Activations q8 : {Q8Activations::f32, Q8Activations::int8}) {
        if (q8 == Q8Activations::int8 && type == TensorType::f32) continue;
        INFO(arch << " " << to_string(type) << " q8 activations " << to_string(q8));
        EngineOptions eo;
        eo.n_threads = 1;
        eo.max_seqs = 3;
        eo.max_context = 128;
        eo.q8 = q8;
        TpEngines tp1(model, 1, eo);
        std::vector<std::vector<float>> logits1;
        const auto tokens1 = greedy_batched(tp1, prompts, 24, 4, &logits1);
        for (int tp : {2, 4}) {
          INFO("tp " << tp);
          TpEngines group(model, tp, eo);
          std::vector<std::vector<float>> logits;
          const auto tokens = greedy_batched(group, prompts, 24, 4, &logits);
          // int8 activations quantize each 32-block of a row to its own scale: a last-bit
          // difference from the all-reduce's order can move a value across a rounding step
          // (1/254 of the block's largest), so that mode agrees only to quantization precision.
          check_logits_close(logits, logits1, model.config().n_vocab, q8 == Q8Activations::int8 ? 2e-2 : 1e-4);
          CHECK(tokens == tokens1);
          const auto got = group.generate_greedy(prompts[0], 16);
          CHECK(got[0] == std::vector<TokenId>(tokens1[0].begin(), tokens1[0].begin() + 16));
        }
      }
    }
}

// Informational: forward time of TP = 1 vs TP = 2 (one thread per rank) on a random 256-dim
// model, for a 64-token prefill and for decode. Run with: tensor_parallel_test "[.bench]"
TEST_CASE("bench: TP = 1 vs TP = 2 forward time", "[.bench]") {
  TempDir dir;
  ModelSpec spec = random_spec("llama", TensorType::f32);
  spec.layers = 8;
  spec.ffn = 768;
  const char* env_threads = std::getenv("CELER_TP_BENCH_THREADS");
  const int threads = env_threads ? std::atoi(env_threads) : 1;
  for (TensorType type : {TensorType::f32, TensorType::q8_0}) {
    spec.type = type;
    const std::string path = dir.path() + "/bench-" + to_string(type) + ".gguf";
    make_model(spec, path);
    Model model(path);
    std::vector<TokenId> prompt(64);
    for (int i = 0; i < 64; ++i) prompt[i] = 1 + (i * 37) % 500;
    for (int tp : {1, 2}) {
      EngineOptions eo;
      eo.n_threads = threads;
      eo.max_seqs = 1;
      eo.max_context = 256;
      TpEngines group(model, tp, eo);
      BlockPool pool(group.rank(0).n_kv_blocks());
      std::vector<int32_t> table;
      REQUIRE(pool.allocate(256 / kKvBlock, table));
      using clock = std::chrono::steady_clock;
      double prefill = 1e30, decode = 1e30;
      for (int rep = 0; rep < 5; ++rep) {
        SequenceInput in{prompt, 0, table, true};
        auto t0 = clock::now();
        group.forward({&in, 1});
        prefill = std::min(prefill, std::chrono::duration<double>(clock::now() - t0).count());
        // 32 decode steps, timed as one run on the ranks' threads (thread start excluded).
        std::vector<double> per_rank(tp);
        LocalAllReduceGroup dummy(tp);
        on_ranks(dummy, [&](int r) {
          std::vector<float> logits(model.config().n_vocab);
          std::vector<TokenId> tok{prompt[0]};
          auto d0 = clock::now();
          for (int s = 0; s < 32; ++s) {
            SequenceInput d{tok, 64 + s, table, true};
            group.rank(r).forward({&d, 1}, logits.data());
          }
          per_rank[r] = std::chrono::duration<double>(clock::now() - d0).count() / 32;
        });
        decode = std::min(decode, per_rank[0]);
      }
      std::printf("%-5s tp=%d threads/rank=%d: prefill 64 tokens %.3f ms, decode %.1f us/token\n", to_string(type), tp,
                  threads, prefill * 1e3, decode * 1e6);
    }
  }
}
