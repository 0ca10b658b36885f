// The OpenAI API mapping (runtime/openai_api.*) and the chat templates (runtime/chat_template.*):
// fields, defaults, type errors naming the field, error JSON, SSE chunk format, every chat form.
#include <catch2/catch.hpp>

#include <nlohmann/json.hpp>

#include "runtime/chat_template.hpp"
#include "runtime/openai_api.hpp"

using namespace celer;
using namespace celer::openai;
using json = nlohmann::json;

namespace {

ApiRequest ok(Endpoint e, const std::string& body) {
  auto r = parse_request(e, body);
  if (auto* err = std::get_if<ApiError>(&r)) FAIL(err->message);
  return std::get<ApiRequest>(r);
}

ApiError bad(Endpoint e, const std::string& body) {
  auto r = parse_request(e, body);
  REQUIRE(std::holds_alternative<ApiError>(r));
  return std::get<ApiError>(r);
}

json sse_json(const std::string& event) {
  REQUIRE(event.rfind("data: ", 0) == 0);
  REQUIRE(event.size() >= 8);
  REQUIRE(event.substr(event.size() - 2) == "\n\n");
  return json::parse(event.substr(6, event.size() - 8));
}

}  // namespace

TEST_CASE("openai: completions defaults follow OpenAI, not celer", "[openai]") {
  ApiRequest r = ok(Endpoint::completions, R"({"model":"m","prompt":"Once"})");
  CHECK(r.model == "m");
  CHECK(r.prompt_text == "Once");
  CHECK_FALSE(r.prompt_is_tokens);
  CHECK(r.generate.max_tokens == 0);  // not given: the gateway applies the endpoint default
  CHECK(default_max_tokens(Endpoint::completions) == 16);
  CHECK(default_max_tokens(Endpoint::chat) == kMaxMaxTokens);
  CHECK(r.generate.sampling.temperature == 1.0f);
  CHECK(r.generate.sampling.top_p == 1.0f);
  CHECK(r.generate.sampling.top_k == 0);
  CHECK(r.generate.sampling.min_p == 0.0f);
  CHECK_FALSE(r.seed_given);
  CHECK(r.n == 1);
  CHECK_FALSE(r.stream);
  CHECK(r.logprobs == -1);
  CHECK(r.generate.logprobs == -1);
  CHECK(r.generate.priority == Priority::normal);
  CHECK_FALSE(r.generate.priority_given);  // the replica's priorities.default applies
}

TEST_CASE("openai: every field maps to the GenerateRequest", "[openai]") {
  ApiRequest r = ok(Endpoint::completions, R"({"model":"m","prompt":"x","max_tokens":7,"temperature":0,"top_p":0.5,
      "min_p":0.1,"top_k":5,"seed":-3,"stop":["a","b"],"n":3,"stream":true,"stream_options":{"include_usage":true},
      "logprobs":2,"user":"alice","priority":"batch","session_id":"s1","ignore_eos":true,"repetition_penalty":1.1,
      "frequency_penalty":0,"unknown_field":{"x":1}})");
  CHECK(r.generate.max_tokens == 7);
  CHECK(r.generate.sampling.temperature == 0.0f);
  CHECK(r.generate.sampling.top_p == 0.5f);
  CHECK(r.generate.sampling.min_p == Approx(0.1f));
  CHECK(r.generate.sampling.top_k == 5);
  CHECK(r.generate.sampling.seed == static_cast<uint64_t>(int64_t{-3}));
  CHECK(r.seed_given);
  CHECK(r.generate.stop == std::vector<std::string>{"a", "b"});
  CHECK(r.n == 3);
  CHECK(r.stream);
  CHECK(r.include_usage);
  CHECK(r.logprobs == 2);
  CHECK(r.generate.logprobs == 2);
  CHECK(r.generate.tenant == "alice");
  CHECK(r.generate.priority == Priority::batch);
  CHECK(r.generate.priority_given);
  CHECK(r.generate.session_id == "s1");
  CHECK(r.generate.ignore_eos);
  CHECK(r.generate.sampling.repeat_penalty == Approx(1.1f));

  CHECK(ok(Endpoint::completions, R"({"prompt":"x","stop":"end"})").generate.stop == std::vector<std::string>{"end"});
  CHECK(ok(Endpoint::completions, R"({"prompt":"x","priority":0})").generate.priority == Priority::interactive);
  CHECK(ok(Endpoint::completions, R"({"prompt":"x","max_tokens":16.0})").generate.max_tokens == 16);
  CHECK(ok(Endpoint::completions, R"({"prompt":"x","max_tokens":99999999999})").generate.max_tokens == kMaxMaxTokens);
  CHECK(ok(Endpoint::completions, R"({"prompt":"x","top_k":-1})").generate.sampling.top_k == 0);
  CHECK(ok(Endpoint::completions, R"({"prompt":"x","temperature":null,"seed":null})").generate.sampling.temperature == 1.0f);
  CHECK(ok(Endpoint::chat, R"({"messages":[{"role":"user","content":"x"}],"max_completion_tokens":9})").generate.max_tokens == 9);
}

TEST_CASE("openai: prompt forms", "[openai]") {
  ApiRequest tokens = ok(Endpoint::completions, R"({"prompt":[1,2,3]})");
  CHECK(tokens.prompt_is_tokens);
  CHECK(tokens.prompt_tokens == std::vector<TokenId>{1, 2, 3});
  CHECK(ok(Endpoint::completions, R"({"prompt":["one"]})").prompt_text == "one");
  CHECK(ok(Endpoint::completions, R"({"prompt":[[4,5]]})").prompt_tokens == std::vector<TokenId>{4, 5});
  CHECK(bad(Endpoint::completions, R"({"prompt":["a","b"]})").param == "prompt");
  CHECK(bad(Endpoint::completions, R"({"prompt":[1,"b"]})").param == "prompt");
  CHECK(bad(Endpoint::completions, R"({"prompt":[-1]})").param == "prompt");
  CHECK(bad(Endpoint::completions, R"({"prompt":[]})").param == "prompt");
  CHECK(bad(Endpoint::completions, R"({"prompt":5})").param == "prompt");
  CHECK(bad(Endpoint::completions, R"({"model":"m"})").param == "prompt");
}

TEST_CASE("openai: chat messages and logprobs", "[openai]") {
  ApiRequest r = ok(Endpoint::chat, R"({"messages":[{"role":"developer","content":"be brief"},
      {"role":"user","content":[{"type":"text","text":"he"},{"type":"text","text":"llo"}]},
      {"role":"assistant","content":null}],"logprobs":true,"top_logprobs":3})");
  REQUIRE(r.messages.size() == 3);
  CHECK(r.messages[0].role == "system");
  CHECK(r.messages[1].content == "hello");
  CHECK(r.messages[2].content.empty());
  CHECK(r.logprobs == 3);
  CHECK(ok(Endpoint::chat, R"({"messages":[{"role":"user","content":"x"}],"logprobs":true})").logprobs == 0);
  CHECK(ok(Endpoint::chat, R"({"messages":[{"role":"user","content":"x"}],"logprobs":false})").logprobs == -1);
  CHECK(bad(Endpoint::chat, R"({"messages":[{"role":"user","content":"x"}],"top_logprobs":2})").param == "top_logprobs");
  CHECK(bad(Endpoint::chat, R"({"messages":[{"role":"user","content":"x"}],"logprobs":2})").param == "logprobs");
  CHECK(bad(Endpoint::chat, R"({"messages":[]})").param == "messages");
  CHECK(bad(Endpoint::chat, R"({"messages":"hi"})").param == "messages");
  CHECK(bad(Endpoint::chat, R"({"messages":[{"role":"tool","content":"x"}]})").param == "messages[0].role");
  CHECK(bad(Endpoint::chat, R"({"messages":[{"content":"x"}]})").param == "messages[0].role");
  CHECK(bad(Endpoint::chat, R"({"messages":[{"role":"user","content":[{"type":"image_url"}]}]})").param ==
        "messages[0].content");
  CHECK(bad(Endpoint::completions, R"({"prompt":"x","logprobs":true})").param == "logprobs");
  CHECK(bad(Endpoint::completions, R"({"prompt":"x","logprobs":21})").param == "logprobs");
}

TEST_CASE("openai: wrong types and ranges name the field", "[openai]") {
  const std::vector<std::pair<std::string, std::string>> cases = {
      {R"("max_tokens":"ten")", "max_tokens"},     {R"("max_tokens":0)", "max_tokens"},
      {R"("max_tokens":1.5)", "max_tokens"},       {R"("temperature":"hot")", "temperature"},
      {R"("temperature":3)", "temperature"},       {R"("top_p":0)", "top_p"},
      {R"("top_p":1.5)", "top_p"},                 {R"("min_p":-0.1)", "min_p"},
      {R"("seed":"x")", "seed"},                   {R"("stop":5)", "stop"},
      {R"("stop":["a",1])", "stop"},               {R"("stop":["a","b","c","d","e","f","g","h","i"])", "stop"},
      {R"("n":0)", "n"},                           {R"("n":17)", "n"},
      {R"("stream":"yes")", "stream"},             {R"("stream_options":{"include_usage":1})", "stream_options.include_usage"},
      {R"("user":5)", "user"},                     {R"("priority":"urgent")", "priority"},
      {R"("priority":3)", "priority"},             {R"("ignore_eos":1)", "ignore_eos"},
      {R"("model":1)", "model"},                   {R"("echo":true)", "echo"},
      {R"("repetition_penalty":0)", "repetition_penalty"}};
  for (const auto& [field, param] : cases) {
    INFO(field);
    ApiError e = bad(Endpoint::completions, R"({"prompt":"x",)" + field + "}");
    CHECK(e.status == 400);
    CHECK(e.type == "invalid_request_error");
    CHECK(e.param == param);
    CHECK(e.message.find(param) != std::string::npos);
  }
}

// A value beyond 64 bits is parsed by nlohmann as a float (1e+23) or a uint64: it is out of range,
// and the message says so with the range, not "must be an integer, not number".
TEST_CASE("openai: an integer beyond 64 bits is out of range and the message gives the range", "[openai]") {
  const std::string big = "99999999999999999999999";
  struct Case {
    Endpoint endpoint;
    std::string fields;  // after {"prompt":"x", or {"messages":[...],
    std::string param;
    std::string range;
  };
  const std::string max_tokens = "1..9223372036854775807", seed = "-9223372036854775808..9223372036854775807";
  const std::vector<Case> cases = {
      {Endpoint::completions, R"("max_tokens":)" + big, "max_tokens", max_tokens},
      {Endpoint::completions, R"("max_tokens":-)" + big, "max_tokens", max_tokens},
      {Endpoint::chat, R"("max_completion_tokens":)" + big, "max_completion_tokens", max_tokens},
      {Endpoint::chat, R"("max_completion_tokens":-)" + big, "max_completion_tokens", max_tokens},
      {Endpoint::completions, R"("seed":)" + big, "seed", seed},
      {Endpoint::completions, R"("seed":-)" + big, "seed", seed},
      {Endpoint::completions, R"("seed":18446744073709551615)", "seed", seed},  // a uint64, past int64
      {Endpoint::completions, R"("seed":9223372036854775808)", "seed", seed},
      {Endpoint::completions, R"("seed":-9223372036854775809)", "seed", seed},  // a float that rounds to -2^63
      {Endpoint::completions, R"("n":)" + big, "n", "1..16"},
      {Endpoint::completions, R"("n":-)" + big, "n", "1..16"},
      {Endpoint::completions, R"("top_k":)" + big, "top_k", "-1..2147483647"},
      {Endpoint::completions, R"("top_k":-)" + big, "top_k", "-1..2147483647"},
      {Endpoint::completions, R"("logprobs":)" + big, "logprobs", "0..20"},
      {Endpoint::chat, R"("logprobs":true,"top_logprobs":)" + big, "top_logprobs", "0..20"},
      {Endpoint::chat, R"("logprobs":true,"top_logprobs":-)" + big, "top_logprobs", "0..20"},
      {Endpoint::completions, R"("priority":)" + big, "priority", "0..2"},
      {Endpoint::completions, R"("best_of":)" + big, "best_of", "1..16"},
  };
  for (const auto& c : cases) {
    INFO(c.fields);
    const std::string head =
        c.endpoint == Endpoint::completions ? R"({"prompt":"x",)" : R"({"messages":[{"role":"user","content":"x"}],)";
    ApiError e = bad(c.endpoint, head + c.fields + "}");
    INFO(e.message);
    CHECK(e.param == c.param);
    CHECK(e.message.find("'" + c.param + "'") != std::string::npos);
    CHECK(e.message.find("out of range") != std::string::npos);
    CHECK(e.message.find(c.range) != std::string::npos);
    CHECK(e.message.find("must be an integer, not") == std::string::npos);
  }
}

TEST_CASE("openai: a token id beyond 64 bits is out of range and the message names the token", "[openai]") {
  const std::vector<std::pair<std::string, std::string>> cases = {
      {R"([1,99999999999999999999999])", "prompt[1]"},
      {R"([-99999999999999999999999])", "prompt[0]"},
      {R"([[1,2,99999999999999999999999]])", "prompt[0][2]"},
      {R"([[-99999999999999999999999]])", "prompt[0][0]"},
      {R"([18446744073709551615])", "prompt[0]"},
      {R"([2147483648])", "prompt[0]"},
      {R"([-1])", "prompt[0]"}};
  for (const auto& [prompt, name] : cases) {
    INFO(prompt);
    ApiError e = bad(Endpoint::completions, R"({"prompt":)" + prompt + "}");
    INFO(e.message);
    CHECK(e.param == "prompt");
    CHECK(e.message.find("'" + name + "'") != std::string::npos);
    CHECK(e.message.find("out of range") != std::string::npos);
    CHECK(e.message.find("0..2147483647") != std::string::npos);
  }
  CHECK(ok(Endpoint::completions, R"({"prompt":[0,2147483647]})").prompt_tokens == std::vector<TokenId>{0, 2147483647});
}

// An integer field takes a whole number however it is written (16, 16.0, 1.6e1), token ids too; a
// fraction is "must be an integer", with the value.
TEST_CASE("openai: a fraction is not an integer; a whole number written as a float is", "[openai]") {
  CHECK(ok(Endpoint::completions, R"({"prompt":"x","max_tokens":16.0})").generate.max_tokens == 16);
  CHECK(ok(Endpoint::completions, R"({"prompt":"x","n":1.6e1})").n == 16);
  CHECK(ok(Endpoint::completions, R"({"prompt":"x","seed":-3.0})").generate.sampling.seed ==
        static_cast<uint64_t>(int64_t{-3}));
  CHECK(ok(Endpoint::completions, R"({"prompt":[1.0,2]})").prompt_tokens == std::vector<TokenId>{1, 2});
  // Past 2^20 a max_tokens is clamped, up to the largest int64 (and a float that rounds below 2^63).
  CHECK(ok(Endpoint::completions, R"({"prompt":"x","max_tokens":9223372036854775807})").generate.max_tokens ==
        kMaxMaxTokens);
  CHECK(ok(Endpoint::completions, R"({"prompt":"x","max_tokens":1e18})").generate.max_tokens == kMaxMaxTokens);
  const std::vector<std::pair<std::string, std::string>> fractions = {
      {R"("max_tokens":3.5)", "max_tokens"}, {R"("seed":-0.5)", "seed"},        {R"("n":1.5)", "n"},
      {R"("top_k":2.25)", "top_k"},          {R"("logprobs":1.5)", "logprobs"}, {R"("priority":0.5)", "priority"}};
  for (const auto& [field, param] : fractions) {
    INFO(field);
    ApiError e = bad(Endpoint::completions, R"({"prompt":"x",)" + field + "}");
    INFO(e.message);
    CHECK(e.param == param);
    CHECK(e.message.find("'" + param + "' must be an integer") != std::string::npos);
    CHECK(e.message.find("out of range") == std::string::npos);
  }
  ApiError e = bad(Endpoint::completions, R"({"prompt":"x","max_tokens":3.5})");
  CHECK(e.message.find("3.5") != std::string::npos);
  e = bad(Endpoint::completions, R"({"prompt":[1,2.5]})");
  CHECK(e.message.find("'prompt[1]' must be an integer") != std::string::npos);
  e = bad(Endpoint::completions, R"({"prompt":"x","n":17.0})");
  CHECK(e.message.find("out of range") != std::string::npos);
  CHECK(e.message.find("1..16") != std::string::npos);
  CHECK(bad(Endpoint::completions, R"({"prompt":"x","max_tokens":"ten"})").message ==
        "'max_tokens' must be an integer, not string");
}

// docs/http.md states each range in the same words (a..b closed, (a, b] open below); a change to
// a range changes both.
TEST_CASE("openai: each range check's message states the range the code enforces", "[openai]") {
  struct Case {
    Endpoint endpoint;
    std::string fields;
    std::string param;
    std::string range;  // as the message (and docs/http.md) states it
  };
  const std::vector<Case> cases = {
      {Endpoint::completions, R"("temperature":2.5)", "temperature", "a number in 0..2"},
      {Endpoint::completions, R"("temperature":-0.1)", "temperature", "a number in 0..2"},
      {Endpoint::completions, R"("top_p":0)", "top_p", "a number in (0, 1]"},
      {Endpoint::completions, R"("top_p":1.5)", "top_p", "a number in (0, 1]"},
      {Endpoint::completions, R"("top_p":1e-50)", "top_p", "a number in (0, 1]"},  // 0 as a float
      {Endpoint::completions, R"("min_p":-0.1)", "min_p", "a number in 0..1"},
      {Endpoint::completions, R"("min_p":1.1)", "min_p", "a number in 0..1"},
      {Endpoint::completions, R"("repetition_penalty":0)", "repetition_penalty", "a number in (0, 100]"},
      {Endpoint::completions, R"("repetition_penalty":100.5)", "repetition_penalty", "a number in (0, 100]"},
      {Endpoint::completions, R"("repetition_penalty":1e-50)", "repetition_penalty", "a number in (0, 100]"},
      {Endpoint::completions, R"("temperature":1e300)", "temperature", "a number in 0..2"},  // inf as a float
      {Endpoint::completions, R"("top_k":-2)", "top_k", "an integer in -1..2147483647"},
      {Endpoint::completions, R"("top_k":2147483648)", "top_k", "an integer in -1..2147483647"},
      {Endpoint::completions, R"("seed":9223372036854775808)", "seed",
       "an integer in -9223372036854775808..9223372036854775807"},
      {Endpoint::completions, R"("n":0)", "n", "an integer in 1..16"},
      {Endpoint::completions, R"("n":17)", "n", "an integer in 1..16"},
      {Endpoint::completions, R"("best_of":17)", "best_of", "an integer in 1..16"},
      {Endpoint::completions, R"("max_tokens":0)", "max_tokens", "an integer in 1..9223372036854775807"},
      {Endpoint::chat, R"("max_completion_tokens":-1)", "max_completion_tokens",
       "an integer in 1..9223372036854775807"},
      {Endpoint::completions, R"("logprobs":21)", "logprobs", "an integer in 0..20"},
      {Endpoint::completions, R"("logprobs":-1)", "logprobs", "an integer in 0..20"},
      {Endpoint::chat, R"("logprobs":true,"top_logprobs":21)", "top_logprobs", "an integer in 0..20"},
      {Endpoint::completions, R"("priority":3)", "priority", "an integer in 0..2"},
      {Endpoint::completions, R"("priority":-1)", "priority", "an integer in 0..2"},
      {Endpoint::completions, R"("stop":["a","b","c","d","e","f","g","h","i"])", "stop", "at most 8 strings"},
  };
  for (const auto& c : cases) {
    INFO(c.fields);
    const std::string head =
        c.endpoint == Endpoint::completions ? R"({"prompt":"x",)" : R"({"messages":[{"role":"user","content":"x"}],)";
    ApiError e = bad(c.endpoint, head + c.fields + "}");
    INFO(e.message);
    CHECK(e.param == c.param);
    CHECK(e.message.find("'" + c.param + "'") != std::string::npos);
    CHECK(e.message.find(c.range) != std::string::npos);
  }
  // The bounds themselves are accepted: the stated range is the enforced one.
  ApiRequest lo =
      ok(Endpoint::completions, R"({"prompt":"x","temperature":0,"top_p":1e-9,"min_p":0,"repetition_penalty":1e-9,
      "top_k":-1,"seed":-9223372036854775808,"n":1,"best_of":1,"max_tokens":1,"logprobs":0,"priority":0})");
  CHECK(lo.generate.sampling.top_k == 0);
  CHECK(lo.generate.sampling.seed == uint64_t{1} << 63);
  CHECK(lo.generate.max_tokens == 1);
  ApiRequest hi =
      ok(Endpoint::completions, R"({"prompt":"x","temperature":2,"top_p":1,"min_p":1,"repetition_penalty":100,
      "top_k":2147483647,"seed":9223372036854775807,"n":16,"best_of":16,"max_tokens":9223372036854775807,"logprobs":20,
      "priority":2,"stop":["a","b","c","d","e","f","g","h"]})");
  CHECK(hi.generate.sampling.top_k == 2147483647);
  CHECK(hi.n == 16);
  CHECK(hi.logprobs == 20);
  CHECK(hi.generate.stop.size() == 8);
  CHECK(ok(Endpoint::chat, R"({"messages":[{"role":"user","content":"x"}],"logprobs":true,"top_logprobs":20})")
            .logprobs == 20);
}

TEST_CASE("openai: malformed bodies are 400s, never exceptions", "[openai]") {
  for (const std::string body : {"", "{", "[1,2]", "\"x\"", "{\"prompt\":\"\xff\"}", "null", "{\"prompt\":\"x\"} trailing"}) {
    INFO(body);
    CHECK(bad(Endpoint::completions, body).status == 400);
  }
  CHECK(bad(Endpoint::completions, "{bad").code == "invalid_json");
  std::string deep(100000, '[');
  CHECK(bad(Endpoint::completions, deep).status == 400);
  std::string deep_obj = R"({"prompt":"x","a":)" + std::string(65, '[') + std::string(65, ']') + "}";
  CHECK(bad(Endpoint::completions, deep_obj).status == 400);
  // Brackets inside strings do not count as nesting.
  CHECK(ok(Endpoint::completions, R"({"prompt":")" + std::string(200, '[') + R"("})").prompt_text.size() == 200);
}

TEST_CASE("openai: error JSON and the ErrorKind mapping", "[openai]") {
  json j = json::parse(error_body(ApiError{404, "no such model", "invalid_request_error", "model", "model_not_found"}));
  CHECK(j["error"]["message"] == "no such model");
  CHECK(j["error"]["type"] == "invalid_request_error");
  CHECK(j["error"]["param"] == "model");
  CHECK(j["error"]["code"] == "model_not_found");
  json n = json::parse(error_body(invalid_request("x")));
  CHECK(n["error"]["param"].is_null());
  CHECK(n["error"]["code"].is_null());

  CHECK(error_from(ErrorKind::invalid_request, "m").status == 400);
  CHECK(error_from(ErrorKind::prompt_too_long, "m").status == 400);
  CHECK(error_from(ErrorKind::prompt_too_long, "m").code == "context_length_exceeded");
  CHECK(error_from(ErrorKind::rate_limited, "m").status == 429);
  CHECK(error_from(ErrorKind::queue_full, "m").status == 503);
  CHECK(error_from(ErrorKind::unavailable, "m").status == 503);
  CHECK(error_from(ErrorKind::deadline_exceeded, "m").status == 504);
  CHECK(error_from(ErrorKind::internal, "m").status == 500);
  CHECK(error_from(ErrorKind::internal, "boom").message == "boom");
}

TEST_CASE("openai: response bodies", "[openai]") {
  ResponseMeta meta{Endpoint::completions, "cmpl-1", 123, "m"};
  Choice c{"hello", FinishReason::length, true, {{"he", -0.5f, {{"he", -0.5f}, {"ha", -1.5f}}}, {"llo", -0.25f, {}}}, {}, {}};
  json j = json::parse(response_body(meta, {c}, Usage{5, 2, 4}));
  CHECK(j["id"] == "cmpl-1");
  CHECK(j["object"] == "text_completion");
  CHECK(j["created"] == 123);
  CHECK(j["model"] == "m");
  CHECK(j["choices"][0]["index"] == 0);
  CHECK(j["choices"][0]["text"] == "hello");
  CHECK(j["choices"][0]["finish_reason"] == "length");
  CHECK(j["choices"][0]["logprobs"]["tokens"] == json({"he", "llo"}));
  CHECK(j["choices"][0]["logprobs"]["token_logprobs"][1] == -0.25);
  CHECK(j["choices"][0]["logprobs"]["top_logprobs"][0]["ha"] == -1.5);
  CHECK(j["choices"][0]["logprobs"]["text_offset"] == json({0, 2}));
  CHECK(j["usage"]["prompt_tokens"] == 5);
  CHECK(j["usage"]["completion_tokens"] == 2);
  CHECK(j["usage"]["total_tokens"] == 7);
  CHECK(j["usage"]["prompt_tokens_details"]["cached_tokens"] == 4);

  meta.endpoint = Endpoint::chat;
  json chat = json::parse(response_body(meta, {c, Choice{"x", FinishReason::stop, false, {}, {}, {}}}, Usage{}));
  CHECK(chat["object"] == "chat.completion");
  CHECK(chat["choices"][0]["message"]["role"] == "assistant");
  CHECK(chat["choices"][0]["message"]["content"] == "hello");
  CHECK(chat["choices"][0]["logprobs"]["content"][0]["token"] == "he");
  CHECK(chat["choices"][0]["logprobs"]["content"][0]["bytes"] == json({104, 101}));
  CHECK(chat["choices"][0]["logprobs"]["content"][0]["top_logprobs"][1]["token"] == "ha");
  CHECK(chat["choices"][1]["index"] == 1);
  CHECK(chat["choices"][1]["logprobs"].is_null());
  CHECK(chat["choices"][1]["finish_reason"] == "stop");

  // Invalid UTF-8 in generated text is replaced, never thrown on.
  json broken = json::parse(response_body(meta, {Choice{"a\xff", FinishReason::stop, false, {}, {}, {}}}, Usage{}));
  CHECK(broken["choices"][0]["message"]["content"] == "a\xEF\xBF\xBD");
}

TEST_CASE("openai: SSE chunks", "[openai]") {
  ResponseMeta chat{Endpoint::chat, "chatcmpl-1", 9, "m"};
  json role = sse_json(sse_role_chunk(chat, 0));
  CHECK(role["object"] == "chat.completion.chunk");
  CHECK(role["choices"][0]["delta"]["role"] == "assistant");
  CHECK(role["choices"][0]["delta"]["content"] == "");
  CHECK(role["choices"][0]["finish_reason"].is_null());
  json content = sse_json(sse_content_chunk(chat, 1, "tok", false, {}, 0));
  CHECK(content["choices"][0]["index"] == 1);
  CHECK(content["choices"][0]["delta"]["content"] == "tok");
  CHECK(content["choices"][0]["logprobs"].is_null());
  json fin = sse_json(sse_finish_chunk(chat, 0, FinishReason::stop));
  CHECK(fin["choices"][0]["delta"] == json::object());
  CHECK(fin["choices"][0]["finish_reason"] == "stop");
  json usage = sse_json(sse_usage_chunk(chat, Usage{3, 4, 0}));
  CHECK(usage["choices"] == json::array());
  CHECK(usage["usage"]["total_tokens"] == 7);
  CHECK(sse_done_event() == "data: [DONE]\n\n");
  json err = sse_json(sse_error_event(error_from(ErrorKind::internal, "lost")));
  CHECK(err["error"]["message"] == "lost");

  ResponseMeta cmpl{Endpoint::completions, "cmpl-1", 9, "m"};
  json c = sse_json(sse_content_chunk(cmpl, 0, "ab", true, {{"ab", -1.0f, {}}}, 10));
  CHECK(c["object"] == "text_completion");
  CHECK(c["choices"][0]["text"] == "ab");
  CHECK(c["choices"][0]["logprobs"]["text_offset"] == json({10}));
  CHECK(sse_json(sse_finish_chunk(cmpl, 0, FinishReason::length))["choices"][0]["text"] == "");
}

TEST_CASE("openai: the token id and stage time extensions", "[openai]") {
  ApiRequest r = ok(Endpoint::completions, R"({"prompt":"x","return_token_ids":true,"return_stage_times":true})");
  CHECK(r.return_token_ids);
  CHECK(r.return_stage_times);
  CHECK(bad(Endpoint::completions, R"({"prompt":"x","return_token_ids":1})").param == "return_token_ids");
  ResponseMeta meta{Endpoint::completions, "cmpl-1", 9, "m"};
  const std::vector<TokenId> ids{7, 8};
  CHECK(sse_json(sse_content_chunk(meta, 0, "", false, {}, 0, &ids))["choices"][0]["token_ids"] == json({7, 8}));
  CHECK_FALSE(sse_json(sse_content_chunk(meta, 0, "a", false, {}, 0))["choices"][0].contains("token_ids"));
  StageTimes t;
  t.queued_us = 5;
  t.first_token_us = 9;
  json fin = sse_json(sse_finish_chunk(meta, 0, FinishReason::stop, &t));
  CHECK(fin["stage_times"]["queued_us"] == 5);
  CHECK(fin["stage_times"]["first_token_us"] == 9);
  Choice c{"x", FinishReason::stop, false, {}, std::vector<TokenId>{3}, t};
  json body = json::parse(response_body(meta, {c}, Usage{}));
  CHECK(body["choices"][0]["token_ids"] == json({3}));
  CHECK(body["choices"][0]["stage_times"]["queued_us"] == 5);
}

TEST_CASE("openai: models list", "[openai]") {
  json j = json::parse(models_body({"stories"}, 5, 2048));
  CHECK(j["object"] == "list");
  CHECK(j["data"][0]["id"] == "stories");
  CHECK(j["data"][0]["object"] == "model");
  CHECK(j["data"][0]["max_model_len"] == 2048);
}

TEST_CASE("chat templates: each family is recognised and rendered", "[chat_template]") {
  const std::vector<ChatMessage> conv = {{"system", "S"}, {"user", "U1"}, {"assistant", "A1"}, {"user", "U2"}};
  CHECK(detect_chat_format("{% for m in messages %}{{'<|im_start|>' + m['role']}}") == ChatFormat::chatml);
  CHECK(render_chat(ChatFormat::chatml, conv) ==
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU1<|im_end|>\n<|im_start|>assistant\nA1<|im_end|>\n"
        "<|im_start|>user\nU2<|im_end|>\n<|im_start|>assistant\n");

  CHECK(detect_chat_format("{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>' }}") == ChatFormat::llama3);
  CHECK(render_chat(ChatFormat::llama3, {{"user", "U"}}) ==
        "<|start_header_id|>user<|end_header_id|>\n\nU<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n");

  CHECK(detect_chat_format("[INST] <<SYS>>\\n' + system + '\\n<</SYS>>") == ChatFormat::llama2);
  CHECK(render_chat(ChatFormat::llama2, conv) == "[INST] <<SYS>>\nS\n<</SYS>>\n\nU1 [/INST] A1 </s><s>[INST] U2 [/INST]");

  CHECK(detect_chat_format("{{ '[INST] ' + message['content'] + ' [/INST]' }}") == ChatFormat::mistral);
  CHECK(render_chat(ChatFormat::mistral, conv) == "[INST] S\n\nU1 [/INST]A1</s>[INST] U2 [/INST]");

  CHECK(detect_chat_format("{{ '<|user|>\\n' + message['content'] + eos_token }}") == ChatFormat::zephyr);
  CHECK(render_chat(ChatFormat::zephyr, {{"system", "S"}, {"user", "U"}}) == "<|system|>\nS</s>\n<|user|>\nU</s>\n<|assistant|>\n");

  CHECK(detect_chat_format("{{'<|user|>' + '\\n' + message['content'] + '<|end|>'}}") == ChatFormat::phi3);
  CHECK(render_chat(ChatFormat::phi3, {{"user", "U"}}) == "<|user|>\nU<|end|>\n<|assistant|>\n");

  CHECK(detect_chat_format("{{ '<start_of_turn>' + role + '\\n' }}") == ChatFormat::gemma);
  CHECK(render_chat(ChatFormat::gemma, conv) ==
        "<start_of_turn>user\nS\n\nU1<end_of_turn>\n<start_of_turn>model\nA1<end_of_turn>\n<start_of_turn>user\nU2<end_of_turn>\n"
        "<start_of_turn>model\n");

  // GLM writes <|user|> too, so its [gMASK] prefix must win over Zephyr's marker.
  CHECK(detect_chat_format("[gMASK]<sop>{% for m in messages %}{{ '<|user|>' }}") == ChatFormat::chatglm4);
  CHECK(render_chat(ChatFormat::chatglm4, conv) == "[gMASK]<sop><|system|>\nS<|user|>\nU1<|assistant|>\nA1<|user|>\nU2<|assistant|>");
  CHECK(detect_chat_format("{{ '[gMASK]sop' }}{{ '<|user|>' }}") == ChatFormat::chatglm3);
  CHECK(render_chat(ChatFormat::chatglm3, {{"user", "U"}}) == "[gMASK]sop<|user|>\n U<|assistant|>");
  CHECK(chat_stop_strings(ChatFormat::chatglm4) == std::vector<std::string>{"<|user|>", "<|observation|>"});
}

TEST_CASE("chat templates: the fallback", "[chat_template]") {
  CHECK(detect_chat_format("") == ChatFormat::fallback);
  CHECK(detect_chat_format("{{ something unknown }}") == ChatFormat::fallback);
  CHECK(render_chat(ChatFormat::fallback, {{"system", "Be kind."}, {"user", "Hi"}, {"assistant", "Hello"}, {"user", "Story?"}}) ==
        "System: Be kind.\nUser: Hi\nAssistant:Hello\nUser: Story?\nAssistant:");
  // An answer renders as the prompt it came from followed by it, so the next turn's prompt starts
  // with both; llama-2's and GLM's separators are not doubled when the answer begins with them.
  const std::string prompt = render_chat(ChatFormat::fallback, {{"user", "Hi"}});
  CHECK(render_chat(ChatFormat::fallback, {{"user", "Hi"}, {"assistant", " Hello"}, {"user", "Story?"}}).rfind(prompt + " Hello\n", 0) == 0);
  CHECK(render_chat(ChatFormat::llama2, {{"user", "U"}, {"assistant", " A"}}) == "[INST] U [/INST] A </s>");
  CHECK(render_chat(ChatFormat::chatglm4, {{"user", "U"}, {"assistant", "\nA"}}) == "[gMASK]<sop><|user|>\nU<|assistant|>\nA<|assistant|>");
  CHECK(chat_stop_strings(ChatFormat::fallback) == std::vector<std::string>{"\nUser:"});
  CHECK(chat_stop_strings(ChatFormat::chatml) == std::vector<std::string>{"<|im_end|>"});
  CHECK(std::string(to_string(ChatFormat::gemma)) == "gemma");
}

TEST_CASE("openai: an error code reads back as the ErrorKind that produced it", "[openai]") {
  for (int k = 0; k <= static_cast<int>(ErrorKind::slo_unattainable); ++k) {
    const auto kind = static_cast<ErrorKind>(k);
    const std::string code = openai::error_from(kind, "x").code;
    INFO(to_string(kind) << " -> '" << code << "'");
    if (code.empty()) CHECK(kind == ErrorKind::invalid_request);  // told by its type instead
    else CHECK(openai::error_kind_of_code(code) == kind);
  }
  CHECK(!openai::error_kind_of_code("model_not_found"));
  CHECK(!openai::error_kind_of_code(""));
}
