// The replica's actors in one process: a client (a scoped actor) streams requests through the
// scheduler, request and shard actors and gets exactly the tokens of a solo run; malformed
// messages are answered with errors; cancel and admission errors reach the client.
#include <catch2/catch.hpp>

#include <functional>

#include <caf/all.hpp>
#include <caf/io/all.hpp>

#include "actors/collective.hpp"
#include "actors/replica.hpp"
#include "actors/scheduler_actor.hpp"
#include "actors/shard_actor.hpp"
#include "actors/supervisor_actor.hpp"
#include "actors/wire.hpp"
#include "runtime/error.hpp"
#include "runtime/generation.hpp"

using namespace celer;

namespace {

struct Replica {
  explicit Replica(int tp = 1, const std::function<void(ReplicaSetup&)>& adjust = {}) : sys(make_config()) {
    model = std::make_shared<Model>(std::string(CELER_TEST_DATA) + "/stories260K.gguf");
    EngineOptions eo;
    eo.max_seqs = 8;
    eo.max_batch_tokens = 64;
    eo.max_context = 256;
    eo.n_kv_blocks = 64;
    eo.n_threads = 1;
    eo.tp_size = tp;
    ReplicaSetup setup;
    setup.model = model;
    setup.engine = eo;
    setup.scheduler.max_batch_size = 8;
    setup.scheduler.max_batch_tokens = 64;
    setup.scheduler.max_context = 256;
    setup.scheduler.max_queue = 4;
    setup.kv_blocks = 64;
    setup.response_cache_entries = 16;
    if (adjust) adjust(setup);
    scheduler = sys.spawn(supervisor_actor, setup);  // the replica's entry point
  }
  ~Replica() { caf::anon_send_exit(scheduler, caf::exit_reason::user_shutdown); }
  CacheActor current_cache() {
    caf::scoped_actor probe{sys};
    CacheActor out;
    probe->request(scheduler, std::chrono::seconds(5), cache_atom::value)
        .receive([&](const CacheActor& a) { out = a; }, [&](caf::error&) { FAIL("no cache"); });
    return out;
  }
  ShardActor current_shard() {
    caf::scoped_actor probe{sys};
    ShardActor out;
    probe->request(scheduler, std::chrono::seconds(5), shard_atom::value)
        .receive([&](const ShardActor& a) { out = a; }, [&](caf::error&) { FAIL("no shard"); });
    return out;
  }
  ReplicaStats stats() {
    caf::scoped_actor probe{sys};
    ReplicaStats out;
    probe->request(scheduler, std::chrono::seconds(5), stats_atom::value)
        .receive([&](const WireMessage& wm) { out = std::get<ReplicaStats>(*decode(wm).message); },
                 [&](caf::error&) { FAIL("no stats"); });
    return out;
  }
  static caf::actor_system_config& make_config() {
    static caf::actor_system_config cfg;
    static bool done = false;
    if (!done) {
      add_message_types(cfg);
      cfg.set("scheduler.max-threads", 2);
      done = true;
    }
    return cfg;
  }

  struct Outcome {
    std::vector<TokenId> tokens;
    std::string text;
    std::vector<TokenLogprob> logprobs;
    std::optional<Finished> finished;
    std::optional<ErrorReply> error;
    int ended_as = -1;  // 0 for the first request to end, 1 for the next, ...
  };
  // Sends the requests from one client and collects every stream until each has ended.
  // on_chunk(id, tokens so far, client) runs after each chunk: tests cancel or kill from it.
  using Hook = std::function<void(RequestId, size_t, caf::scoped_actor&)>;
  std::map<RequestId, Outcome> run(const std::vector<GenerateRequest>& reqs, const Hook& on_chunk = {}) {
    caf::scoped_actor client{sys};
    for (const auto& r : reqs) client->send(scheduler, generate_atom::value, encode(r));
    std::map<RequestId, Outcome> out;
    size_t ended = 0;
    while (ended < reqs.size()) {
      client->receive(
          [&](event_atom, const WireMessage& wm) {
            DecodeResult d = decode(wm);
            REQUIRE(d.message);
            if (auto* c = std::get_if<TokenChunk>(&*d.message)) {
              Outcome& o = out[c->id];
              REQUIRE(c->first_index == static_cast<int32_t>(o.tokens.size()));
              o.tokens.insert(o.tokens.end(), c->tokens.begin(), c->tokens.end());
              o.text += c->text;
              o.logprobs.insert(o.logprobs.end(), c->logprobs.begin(), c->logprobs.end());
              if (on_chunk) on_chunk(c->id, o.tokens.size(), client);
            } else if (auto* f = std::get_if<Finished>(&*d.message)) {
              out[f->id].finished = *f;
              out[f->id].ended_as = static_cast<int>(ended++);
            } else if (auto* e = std::get_if<ErrorReply>(&*d.message)) {
              out[e->id].error = *e;
              out[e->id].ended_as = static_cast<int>(ended++);
            }
          },
          caf::after(std::chrono::seconds(30)) >> [&] { FAIL("no answer within 30 s"); });
    }
    return out;
  }

  caf::actor_system sys;
  std::shared_ptr<Model> model;
  SupervisorActor scheduler;  // the replica's entry point
};

GenerateRequest text_request(RequestId id, const std::string& prompt, int n, float temperature = 0) {
  GenerateRequest r;
  r.id = id;
  r.prompt_text = prompt;
  r.max_tokens = n;
  r.sampling.temperature = temperature;
  r.sampling.seed = id;
  r.ignore_eos = true;
  return r;
}

std::vector<TokenId> solo(const Model& m, const GenerateRequest& r) {
  EngineOptions eo;
  eo.max_seqs = 1;
  eo.max_context = 256;
  Engine e(m, eo);
  GenerateOptions go;
  go.max_tokens = r.max_tokens;
  go.sampling = r.sampling;
  go.ignore_eos = true;
  std::vector<TokenId> out;
  generate(e, m.tokenizer().encode(r.prompt_text, true), go, [&](TokenId t) {
    out.push_back(t);
    return true;
  });
  return out;
}

}  // namespace

TEST_CASE("replica setup: the KV element type follows the model or the config, and is checked", "[actors]") {
  auto model = std::make_shared<Model>(std::string(CELER_TEST_DATA) + "/stories260K.gguf");  // F32, head size 8
  ClusterConfig c = parse_config("kv_cache_memory: 16MiB", "t.yaml");
  const ReplicaSetup f32 = replica_setup(c, model);
  CHECK(f32.engine.kv_type == TensorType::f32);
  c.kv_cache_dtype = TensorType::f16;
  const ReplicaSetup f16 = replica_setup(c, model);
  CHECK(f16.engine.kv_type == TensorType::f16);
  CHECK(f16.kv_blocks == 2 * f32.kv_blocks);  // the same memory holds twice the blocks
  c.kv_cache_dtype = TensorType::q8_0;
  try {
    replica_setup(c, model);
    FAIL("q8_0 accepted for a head size of 8");
  } catch (const Error& e) {
    CHECK(std::string(e.what()).find("multiple of 32") != std::string::npos);
  }
}

TEST_CASE("replica setup: a dtype other than the stored one is refused, not ignored", "[actors]") {
  auto model = std::make_shared<Model>(std::string(CELER_TEST_DATA) + "/stories260K.gguf");  // F32
  for (const char* as_stored : {"dtype: auto", "dtype: f32"}) {
    ClusterConfig c = parse_config(std::string("kv_cache_memory: 16MiB\n") + as_stored, "t.yaml");
    CHECK_NOTHROW(replica_setup(c, model));
  }
  ClusterConfig c = parse_config("kv_cache_memory: 16MiB\ndtype: bf16", "t.yaml");
  try {
    replica_setup(c, model);
    FAIL("dtype bf16 accepted for an F32 file");
  } catch (const Error& e) {
    CHECK_THAT(e.what(), Catch::Contains("dtype: bf16") && Catch::Contains("stored as f32"));
  }
}

TEST_CASE("actors: concurrent streams get their solo tokens and text", "[actors]") {
  Replica r;
  std::vector<GenerateRequest> reqs{text_request(1, "Once upon a time", 40), text_request(2, "The dog", 30, 0.8f),
                                    text_request(3, "Lily and Tom", 35, 1.0f)};
  auto out = r.run(reqs);
  for (const auto& q : reqs) {
    INFO("request " << q.id);
    const auto expected = solo(*r.model, q);
    CHECK(out[q.id].tokens == expected);
    REQUIRE(out[q.id].finished);
    CHECK(out[q.id].finished->reason == FinishReason::length);
    CHECK(out[q.id].finished->completion_tokens == q.max_tokens);
    std::string text;
    StreamDecoder dec(r.model->tokenizer());
    for (TokenId t : expected) text += dec.push(t);
    CHECK(out[q.id].text == text + dec.flush());
  }
  // The same request again: answered from the response cache, the same stream.
  auto again = r.run({reqs[0]});
  CHECK(again[1].tokens == out[1].tokens);
  caf::scoped_actor probe{r.sys};
  probe->request(r.scheduler, std::chrono::seconds(5), stats_atom::value)
      .receive([&](const WireMessage& wm) { CHECK(std::get<ReplicaStats>(*decode(wm).message).response_cache_hits == 1); },
               [&](caf::error&) { FAIL("no stats"); });
}

TEST_CASE("actors: priorities.default is the class of requests that give none", "[actors]") {
  // One sequence at a time: the queue's order is the order they end in.
  Replica r(1, [](ReplicaSetup& s) {
    s.default_priority = Priority::batch;
    s.scheduler.max_batch_size = 1;
    s.engine.max_seqs = 1;
  });
  GenerateRequest first = text_request(1, "Once upon a time", 200);  // running while the others queue
  GenerateRequest unstated = text_request(2, "The dog", 20);  // priority_given false: batch here
  GenerateRequest normal = text_request(3, "Lily and Tom", 20);
  normal.priority = Priority::normal;
  normal.priority_given = true;
  auto out = r.run({first, unstated, normal});
  REQUIRE(out[2].finished);
  REQUIRE(out[3].finished);
  // The later request of the higher class runs first.
  CHECK(out[3].ended_as < out[2].ended_as);
}

TEST_CASE("actors: logprobs and stage times reach the client", "[actors]") {
  Replica r;
  GenerateRequest q = text_request(1, "Once upon a time", 12);
  q.logprobs = 3;
  auto out = r.run({q});
  const auto& o = out[1];
  CHECK(o.tokens == solo(*r.model, q));
  REQUIRE(o.logprobs.size() == o.tokens.size());
  for (size_t i = 0; i < o.tokens.size(); ++i) {
    INFO("token " << i);
    const TokenLogprob& lp = o.logprobs[i];
    CHECK(lp.token == o.tokens[i]);
    CHECK(lp.logprob <= 0.0f);
    REQUIRE(lp.top_tokens.size() == 3);
    CHECK(lp.top_tokens[0] == o.tokens[i]);  // greedy: the sampled token is the most likely
    CHECK(lp.top_logprobs[0] == lp.logprob);
    CHECK(lp.top_logprobs[0] >= lp.top_logprobs[1]);
    CHECK(lp.top_logprobs[1] >= lp.top_logprobs[2]);
  }
  REQUIRE(o.finished);
  const StageTimes& t = o.finished->times;
  CHECK(t.received_us > 0);
  CHECK(t.received_us <= t.queued_us);
  CHECK(t.queued_us <= t.admitted_us);
  CHECK(t.admitted_us <= t.prefill_done_us);
  CHECK(t.prefill_done_us <= t.first_token_us);
  CHECK(t.first_token_us <= t.last_token_us);
  CHECK(t.last_token_us <= t.finished_us);
  // Stored answers carry no logprobs: the same request runs again (no response-cache hit) and
  // gets the same numbers.
  auto again = r.run({q});
  CHECK(again[1].tokens == o.tokens);
  CHECK(again[1].logprobs == o.logprobs);
  caf::scoped_actor probe{r.sys};
  probe->request(r.scheduler, std::chrono::seconds(5), stats_atom::value)
      .receive([&](const WireMessage& wm) { CHECK(std::get<ReplicaStats>(*decode(wm).message).response_cache_hits == 0); },
               [&](caf::error&) { FAIL("no stats"); });
}

TEST_CASE("actors: stop strings, cancel and admission errors reach the client", "[actors]") {
  Replica r;
  auto stop = text_request(1, "Once upon a time", 60);
  stop.stop = {"Lily"};  // the greedy story names Lily early
  auto cancel = text_request(2, "The dog", 200);
  auto too_long = text_request(3, std::string(2000, 'a'), 10);
  bool cancelled = false;
  auto out = r.run({stop, cancel, too_long}, [&](RequestId id, size_t n, caf::scoped_actor& client) {
    if (id == 2 && n >= 5 && !cancelled) {
      client->send(caf::actor_cast<caf::actor>(client->current_sender()), cancel_atom::value);
      cancelled = true;
    }
  });
  REQUIRE(out[1].finished);
  CHECK(out[1].finished->reason == FinishReason::stop);
  CHECK(out[1].text.find("Lily") == std::string::npos);
  CHECK(out[1].tokens.size() < 60);
  REQUIRE(out[2].finished);
  CHECK(out[2].finished->reason == FinishReason::cancelled);
  CHECK(out[2].tokens.size() < 200);
  REQUIRE(out[3].error);
  CHECK(out[3].error->kind == ErrorKind::prompt_too_long);
}

TEST_CASE("actors: malformed messages are refused with an error and harm nobody", "[actors]") {
  Replica r;
  caf::scoped_actor client{r.sys};
  // Garbage words, a truncated message and a message of the wrong kind.
  client->send(r.scheduler, generate_atom::value, WireMessage{{0xdeadbeefULL, 42, 7}});
  WireMessage good = encode(text_request(1, "Once upon a time", 5));
  WireMessage cut{std::vector<uint64_t>(good.words.begin(), good.words.begin() + good.words.size() / 2)};
  client->send(r.scheduler, generate_atom::value, cut);
  client->send(r.scheduler, generate_atom::value, encode(Cancel{5}));
  for (int i = 0; i < 3; ++i)
    client->receive([&](event_atom, const WireMessage& wm) {
      auto d = decode(wm);
      REQUIRE(d.message);
      REQUIRE(std::holds_alternative<ErrorReply>(*d.message));
      CHECK(std::get<ErrorReply>(*d.message).kind == ErrorKind::invalid_request);
    });
  // The shard refuses a bad step but keeps serving.
  client->request(r.current_shard(), std::chrono::seconds(5), step_atom::value, WireMessage{{1, 2, 3}})
      .receive([&](const WireMessage& wm) { CHECK(std::holds_alternative<ErrorReply>(*decode(wm).message)); },
               [&](caf::error&) { FAIL("shard did not answer"); });
  // The cache refuses bad plans and lookups (garbage, the wrong kind, and a well-formed plan that
  // contradicts what it knows) and keeps its state.
  const CacheActor cache = r.current_cache();
  auto refused = [&](auto atom, const WireMessage& wm) {
    client->request(cache, std::chrono::seconds(5), atom, wm)
        .receive([&](const WireMessage& reply) { CHECK(std::holds_alternative<ErrorReply>(*decode(reply).message)); },
                 [&](caf::error&) { FAIL("cache did not answer"); });
  };
  refused(plan_atom::value, WireMessage{{0xdeadbeefULL, 1, 2}});
  refused(plan_atom::value, encode(Cancel{1}));
  BlockPlanRequest lie;
  lie.plan_id = 1;
  lie.max_batch_tokens = 16;
  lie.max_batch_size = 4;
  lie.candidates.push_back(BlockCandidate{424242, {}, 30, true, 10, true, Priority::normal});  // tokens never sent
  refused(plan_atom::value, encode(lie));
  refused(lookup_atom::value, WireMessage{{3, 3, 3}});
  client->send(cache, store_atom::value, WireMessage{{4, 4}});
  auto out = r.run({text_request(7, "Once upon a time", 20)});
  CHECK(out[7].tokens == solo(*r.model, text_request(7, "Once upon a time", 20)));
  CHECK(r.current_cache() == cache);  // refused, not crashed

  // A request actor fed garbage in the middle of its stream ignores it and finishes normally.
  client->send(r.scheduler, generate_atom::value, encode(text_request(8, "Once upon a time", 20)));
  std::vector<TokenId> got;
  bool finished = false, poked = false;
  while (!finished)
    client->receive([&](event_atom, const WireMessage& wm) {
      if (!poked) {
        auto request_actor = caf::actor_cast<RequestActor>(client->current_sender());
        client->send(request_actor, event_atom::value, WireMessage{{7, 7, 7}});
        client->send(request_actor, event_atom::value, encode(Step{}));
        poked = true;
      }
      auto d = decode(wm);
      REQUIRE(d.message);
      if (auto* c = std::get_if<TokenChunk>(&*d.message)) got.insert(got.end(), c->tokens.begin(), c->tokens.end());
      finished = std::holds_alternative<Finished>(*d.message);
    });
  CHECK(got == out[7].tokens);
}

// Three streams (greedy and sampled); `victim()` is killed twice while they run. Every request
// must still end with exactly its solo tokens: run() checks there is no gap and no duplicate.
template <class Victim>
static void kill_twice_mid_stream(Replica& r, const Victim& victim) {
  std::vector<GenerateRequest> reqs{text_request(1, "Once upon a time", 60), text_request(2, "The dog", 60, 0.9f),
                                    text_request(3, "Lily and Tom", 60, 1.0f)};
  int kills = 0;
  auto out = r.run(reqs, [&](RequestId id, size_t n, caf::scoped_actor&) {
    if (id == 1 && ((n == 10 && kills == 0) || (n == 35 && kills == 1))) {
      caf::anon_send_exit(victim(), caf::exit_reason::kill);
      ++kills;
    }
  });
  CHECK(kills == 2);
  for (const auto& q : reqs) {
    REQUIRE(out[q.id].finished);
    CHECK(out[q.id].finished->reason == FinishReason::length);
    CHECK(out[q.id].tokens == solo(*r.model, q));
  }
}

TEST_CASE("actors: killing the shard mid-stream loses no token and duplicates none", "[actors][faults]") {
  Replica r;
  kill_twice_mid_stream(r, [&] { return r.current_shard(); });
  const ReplicaStats stats = r.stats();
  CHECK(stats.shard_restarts == 2);
  CHECK(stats.scheduler_restarts == 0);
}

TEST_CASE("actors: killing the cache mid-stream: it is restarted and every request completes with its solo tokens",
          "[actors][faults]") {
  Replica r;
  kill_twice_mid_stream(r, [&] { return r.current_cache(); });
  const ReplicaStats stats = r.stats();
  CHECK(stats.cache_restarts == 2);
  CHECK(stats.shard_restarts == 0);
  CHECK(stats.running == 0);
  CHECK(stats.kv_blocks_free + stats.kv_blocks_used == 64);
}

TEST_CASE("actors: a tensor-parallel replica (TP = 2) streams the tokens of TP = 1, and survives losing a rank", "[actors][tp]") {
  Replica r(2);
  std::vector<GenerateRequest> reqs{text_request(1, "Once upon a time", 40), text_request(2, "The dog", 30)};
  auto out = r.run(reqs);
  for (const auto& q : reqs) CHECK(out[q.id].tokens == solo(*r.model, q));
  // Rank 0 timed its steps and its all-reduces: two per layer per step, inside the step's time.
  const ReplicaStats stats = r.stats();
  CHECK(stats.steps > 0);
  CHECK(stats.allreduce_calls == stats.steps * 2 * static_cast<uint64_t>(r.model->config().n_layer));
  CHECK(stats.allreduce_us <= stats.step_us);
  CHECK(stats.step_us > 0);
  // Kill the group's rank 0 before a request: the group is respawned and the request completes.
  caf::anon_send_exit(r.current_shard(), caf::exit_reason::kill);
  auto after = r.run({text_request(3, "Lily and Tom", 30)});
  CHECK(after[3].tokens == solo(*r.model, text_request(3, "Lily and Tom", 30)));
}

TEST_CASE("actors: killing the scheduler mid-stream: the supervisor restarts it and every request resumes", "[actors][faults]") {
  Replica r;
  std::vector<GenerateRequest> reqs{text_request(1, "Once upon a time", 50), text_request(2, "The dog", 50, 0.9f),
                                    text_request(3, "Lily and Tom", 50, 1.0f)};
  bool killed = false;
  auto out = r.run(reqs, [&](RequestId id, size_t n, caf::scoped_actor&) {
    if (id != 1 || n != 12 || killed) return;
    caf::scoped_actor probe{r.sys};
    probe->request(r.scheduler, std::chrono::seconds(5), sched_atom::value)
        .receive([&](const SchedulerActor& s) { caf::anon_send_exit(s, caf::exit_reason::kill); },
                 [&](caf::error&) { FAIL("no scheduler"); });
    killed = true;
  });
  CHECK(killed);
  for (const auto& q : reqs) {
    REQUIRE(out[q.id].finished);
    CHECK(out[q.id].finished->reason == FinishReason::length);
    CHECK(out[q.id].finished->completion_tokens == 50);
    CHECK(out[q.id].tokens == solo(*r.model, q));
  }
  CHECK(r.stats().scheduler_restarts == 1);
}

TEST_CASE("a network all-reduce sums call after call and refuses a peer's stale, repeated or early parts", "[actors][tp]") {
  caf::actor_system sys{Replica::make_config()};
  constexpr int64_t n = 1000;
  auto run = [&](auto&& check_after) {
    NetworkAllReduce a(sys, 0, 2, std::chrono::seconds(5)), b(sys, 1, 2, std::chrono::seconds(5));
    a.connect({a.endpoint(), b.endpoint()});
    b.connect({a.endpoint(), b.endpoint()});
    // 50 calls, rank 1 in its own thread: each rank ends with the same sums.
    std::vector<float> xa(n), xb(n);
    std::thread other([&] {
      for (int call = 1; call <= 50; ++call) {
        for (int64_t i = 0; i < n; ++i) xb[i] = static_cast<float>(call * i);
        b.sum(xb.data(), n);
      }
    });
    bool same = true;
    for (int call = 1; call <= 50; ++call) {
      for (int64_t i = 0; i < n; ++i) xa[i] = 1.0f + static_cast<float>(i);
      a.sum(xa.data(), n);
      for (int64_t i = 0; i < n; i += 97) same = same && xa[i] == 1.0f + static_cast<float>(i) + static_cast<float>(call * i);
    }
    other.join();
    CHECK(same);
    CHECK(xa == xb);
    check_after(a, b);
  };
  // A part as rank 1 would send it: its checksum over its bytes.
  auto part = [&](uint64_t call) {
    ReducePart p{call, 1, std::vector<uint8_t>(4 * n), 0};
    p.check = wire_checksum(p.bytes.data(), p.bytes.size());
    return p;
  };
  // A part from rank 1's endpoint for a call rank 0 has summed already, or one far ahead of it,
  // or one whose bytes changed on the way: rank 0's next sum fails and says which.
  for (const auto& [call, why] : {std::pair<uint64_t, const char*>{50, "after it was summed"}, {60, "too far ahead"},
                                  {0, "arrived corrupted"}}) {
    run([&, call = call, why = why](NetworkAllReduce& a, NetworkAllReduce& b) {
      ReducePart p = part(call == 0 ? 51 : call);
      if (call == 0) p.bytes[7] ^= 0x10;
      caf::send_as(b.endpoint(), a.endpoint(), reduce_atom::value, std::move(p));
      std::vector<float> x(n);
      CHECK_THROWS_WITH(a.sum(x.data(), n), Catch::Contains(why));
    });
  }
  // The same call's part twice.
  run([&](NetworkAllReduce& a, NetworkAllReduce& b) {
    for (int k = 0; k < 2; ++k)
      caf::send_as(b.endpoint(), a.endpoint(), reduce_atom::value, part(51));
    std::this_thread::sleep_for(std::chrono::milliseconds(200));
    std::vector<float> x(n);
    CHECK_THROWS_WITH(a.sum(x.data(), n), Catch::Contains("twice"));
  });
}
