#include "runtime/openai_api.hpp"

#include <cmath>
#include <limits>

#include <nlohmann/json.hpp>

namespace celer::openai {

using json = nlohmann::ordered_json;  // fields in the order OpenAI writes them

namespace {

// Generated text and token pieces may end inside a UTF-8 character or hold invalid bytes:
// writing JSON must replace them (U+FFFD), never throw.
std::string dump(const json& j) { return j.dump(-1, ' ', false, json::error_handler_t::replace); }

// Deeper nesting than any valid request has is refused before parsing, so a body of a million
// '[' costs one scan and no recursion.
constexpr int kMaxJsonDepth = 64;

bool too_deep(std::string_view s) {
  int depth = 0;
  bool in_string = false;
  for (size_t i = 0; i < s.size(); ++i) {
    const char c = s[i];
    if (in_string) {
      if (c == '\\') ++i;
      else if (c == '"') in_string = false;
    } else if (c == '"') {
      in_string = true;
    } else if (c == '[' || c == '{') {
      if (++depth > kMaxJsonDepth) return true;
    } else if (c == ']' || c == '}') {
      --depth;
    }
  }
  return false;
}

// A field of the wrong type or value: thrown inside the parser, turned into an ApiError.
struct FieldError {
  std::string param;
  std::string message;
};

[[noreturn]] void fail(const std::string& param, const std::string& message) { throw FieldError{param, message}; }

const char* type_name(const json& v) {
  if (v.is_number_integer()) return "integer";
  return v.type_name();
}

// Present and not null: OpenAI clients send null for "not given".
const json* field(const json& body, const char* name) {
  auto it = body.find(name);
  if (it == body.end() || it->is_null()) return nullptr;
  return &*it;
}

// A bound as docs/http.md writes it: 2, not 2.0.
std::string bound_text(double d) {
  return std::trunc(d) == d && std::abs(d) < 1e15 ? std::to_string(static_cast<int64_t>(d)) : dump(json(d));
}

// `range` is said as docs/http.md says it ("an integer in 1..16"); the value is shown as parsed
// (17, 1e+23: nlohmann keeps no text of a number).
[[noreturn]] void out_of_range(const std::string& param, const std::string& name, const std::string& range,
                               const json& v) {
  fail(param, "'" + name + "' is out of range: it must be " + range + ", got " + dump(v));
}

// An integer in [lo, hi], named `name` in the message (default: param). A whole number written as
// a float (16.0, 1e3) is an integer; a fraction is not. A value past 64 bits arrives from nlohmann
// as a uint64 or a float (1e+23): out of range like any other, not "not an integer".
int64_t get_int(const json& v, const std::string& param, int64_t lo, int64_t hi, const std::string& name = {}) {
  const std::string& shown = name.empty() ? param : name;
  const std::string range = "an integer in " + std::to_string(lo) + ".." + std::to_string(hi);
  if (!v.is_number()) fail(param, "'" + shown + "' must be an integer, not " + type_name(v));
  int64_t x = 0;
  if (v.is_number_unsigned()) {
    if (v.get<uint64_t>() > static_cast<uint64_t>(std::numeric_limits<int64_t>::max()))
      out_of_range(param, shown, range, v);
    x = v.get<int64_t>();
  } else if (v.is_number_integer()) {
    x = v.get<int64_t>();
  } else {
    const double d = v.get<double>();
    if (std::trunc(d) != d) fail(param, "'" + shown + "' must be an integer, not " + dump(v));
    // (-2^63, 2^63): doubles that convert to an int64. -2^63 itself is left out: as a float it is
    // what a literal just below int64's range (-9223372036854775809) rounds to; the int64 literal
    // -9223372036854775808 arrives as an integer.
    if (!(d > -0x1p63 && d < 0x1p63)) out_of_range(param, shown, range, v);
    x = static_cast<int64_t>(d);
  }
  if (x < lo || x > hi) out_of_range(param, shown, range, v);
  return x;
}

// A number in [lo, hi], or (lo, hi] when lo_open (written so in the message, as docs/http.md does).
// Checked as the float the sampler gets: 1e-50 for top_p would be 0 there, so it is out of range.
float get_float(const json& v, const std::string& param, double lo, double hi, bool lo_open = false) {
  if (!v.is_number()) fail(param, "'" + param + "' must be a number, not " + type_name(v));
  const float x = static_cast<float>(v.get<double>());
  if (!((lo_open ? x > lo : x >= lo) && x <= hi)) {
    // Appended, not "(" + ...: GCC 12 warns falsely (-Wrestrict) on a literal prepended to a string.
    std::string range = lo_open ? "a number in (" : "a number in ";
    range += bound_text(lo);
    range += lo_open ? ", " : "..";
    range += bound_text(hi);
    if (lo_open) range += "]";
    out_of_range(param, param, range, v);
  }
  return x;
}

bool get_bool(const json& v, const std::string& param) {
  if (!v.is_boolean()) fail(param, "'" + param + "' must be a boolean, not " + type_name(v));
  return v.get<bool>();
}

std::string get_string(const json& v, const std::string& param) {
  if (!v.is_string()) fail(param, "'" + param + "' must be a string, not " + type_name(v));
  return v.get<std::string>();
}

// `at` is the array's place in the request ("prompt", "prompt[0]"); a bad id's message names its
// own ("prompt[0][2]"), the error's param stays `param`.
std::vector<TokenId> get_tokens(const json& v, const std::string& param, const std::string& at) {
  std::vector<TokenId> out;
  out.reserve(v.size());
  for (size_t i = 0; i < v.size(); ++i)
    out.push_back(static_cast<TokenId>(
        get_int(v[i], param, 0, std::numeric_limits<TokenId>::max(), at + "[" + std::to_string(i) + "]")));
  return out;
}

void read_prompt(const json& body, ApiRequest& r) {
  const json* p = field(body, "prompt");
  if (!p) fail("prompt", "'prompt' is required");
  if (p->is_string()) {
    r.prompt_text = p->get<std::string>();
    return;
  }
  if (!p->is_array()) fail("prompt", "'prompt' must be a string, an array of token ids or an array of one string");
  if (p->empty()) fail("prompt", "'prompt' must not be empty");
  if ((*p)[0].is_number()) {
    r.prompt_tokens = get_tokens(*p, "prompt", "prompt");
    r.prompt_is_tokens = true;
    return;
  }
  // A batch of prompts: one is served; several would be n separate requests the client can send.
  if (p->size() > 1) fail("prompt", "several prompts in one request are not supported: send one request per prompt");
  const json& one = (*p)[0];
  if (one.is_string()) {
    r.prompt_text = one.get<std::string>();
  } else if (one.is_array()) {
    if (one.empty()) fail("prompt", "'prompt' must not be empty");
    r.prompt_tokens = get_tokens(one, "prompt", "prompt[0]");
    r.prompt_is_tokens = true;
  } else {
    fail("prompt", "'prompt' must be a string, an array of token ids or an array of one string");
  }
}

// Content is a string or, as newer clients send it, an array of {"type": "text", "text": ...}.
std::string read_content(const json& m, size_t i) {
  const std::string param = "messages[" + std::to_string(i) + "].content";
  const json* c = field(m, "content");
  if (!c) return "";  // an assistant turn that only called tools
  if (c->is_string()) return c->get<std::string>();
  if (!c->is_array()) fail(param, "'" + param + "' must be a string or an array of text parts");
  std::string out;
  for (const auto& part : *c) {
    if (!part.is_object() || part.value("type", "") != "text" || !part.contains("text") || !part["text"].is_string())
      fail(param, "'" + param + "': only parts of type \"text\" are supported");
    out += part["text"].get<std::string>();
  }
  return out;
}

void read_messages(const json& body, ApiRequest& r) {
  const json* ms = field(body, "messages");
  if (!ms) fail("messages", "'messages' is required");
  if (!ms->is_array()) fail("messages", "'messages' must be an array, not " + std::string(type_name(*ms)));
  if (ms->empty()) fail("messages", "'messages' must not be empty");
  for (size_t i = 0; i < ms->size(); ++i) {
    const json& m = (*ms)[i];
    const std::string at = "messages[" + std::to_string(i) + "]";
    if (!m.is_object()) fail(at, "'" + at + "' must be an object");
    const json* role = field(m, "role");
    if (!role) fail(at + ".role", "'" + at + ".role' is required");
    const std::string rs = get_string(*role, at + ".role");
    if (rs != "system" && rs != "developer" && rs != "user" && rs != "assistant")
      fail(at + ".role", "'" + at + ".role' must be system, developer, user or assistant, not '" + rs + "'");
    r.messages.push_back({rs == "developer" ? "system" : rs, read_content(m, i)});
  }
}

void read_stop(const json& body, ApiRequest& r) {
  const json* s = field(body, "stop");
  if (!s) return;
  std::vector<std::string> stops;
  if (s->is_string()) {
    stops.push_back(s->get<std::string>());
  } else if (s->is_array()) {
    if (s->size() > static_cast<size_t>(kMaxStopStrings))
      fail("stop",
           "'stop' holds at most " + std::to_string(kMaxStopStrings) + " strings, got " + std::to_string(s->size()));
    for (const auto& x : *s) stops.push_back(get_string(x, "stop"));
  } else {
    fail("stop", "'stop' must be a string or an array of strings, not " + std::string(type_name(*s)));
  }
  for (auto& x : stops)
    if (!x.empty()) r.generate.stop.push_back(std::move(x));  // "" would stop at once: ignored
}

void read_priority(const json& v, GenerateRequest& g) {
  g.priority_given = true;
  if (v.is_string()) {
    const std::string s = v.get<std::string>();
    if (s == "interactive") g.priority = Priority::interactive;
    else if (s == "normal") g.priority = Priority::normal;
    else if (s == "batch") g.priority = Priority::batch;
    else fail("priority", "'priority' must be \"interactive\", \"normal\", \"batch\" or 0..2");
    return;
  }
  if (!v.is_number()) fail("priority", "'priority' must be \"interactive\", \"normal\", \"batch\" or 0..2");
  g.priority = static_cast<Priority>(get_int(v, "priority", 0, kPriorityClasses - 1));
}

void read_logprobs(const json& body, ApiRequest& r) {
  if (r.endpoint == Endpoint::completions) {
    // Legacy completions: logprobs is the number of alternatives (0 = the chosen token's only).
    if (const json* lp = field(body, "logprobs")) r.logprobs = static_cast<int32_t>(get_int(*lp, "logprobs", 0, kMaxTopLogprobs));
    return;
  }
  // Chat: logprobs is a switch, top_logprobs the number of alternatives (needs logprobs).
  bool on = false;
  if (const json* lp = field(body, "logprobs")) on = get_bool(*lp, "logprobs");
  int32_t k = 0;
  if (const json* top = field(body, "top_logprobs")) {
    k = static_cast<int32_t>(get_int(*top, "top_logprobs", 0, kMaxTopLogprobs));
    if (!on && k > 0) fail("top_logprobs", "'top_logprobs' needs 'logprobs': true");
  }
  if (on) r.logprobs = k;
}

// OpenAI's defaults, not celer's: temperature 1, top_p 1, no top-k or min-p.
SamplingParams openai_sampling_defaults() {
  SamplingParams p;
  p.temperature = 1.0f;
  p.top_k = 0;
  p.top_p = 1.0f;
  p.min_p = 0.0f;
  p.repeat_penalty = 1.0f;
  return p;
}

void read_sampling(const json& body, ApiRequest& r) {
  SamplingParams& p = r.generate.sampling;
  p = openai_sampling_defaults();
  if (const json* v = field(body, "temperature")) p.temperature = get_float(*v, "temperature", 0, 2);
  if (const json* v = field(body, "top_p")) p.top_p = get_float(*v, "top_p", 0, 1, /*lo_open=*/true);
  if (const json* v = field(body, "min_p")) p.min_p = get_float(*v, "min_p", 0, 1);
  if (const json* v = field(body, "top_k")) {
    // -1 means "off" in vLLM's API; 0 means off in celer's.
    const int64_t k = get_int(*v, "top_k", -1, std::numeric_limits<int32_t>::max());
    p.top_k = k < 0 ? 0 : static_cast<int32_t>(k);
  }
  // (0, 100]: the sampler takes any finite value > 0; 100 is this API's sanity bound.
  if (const json* v = field(body, "repetition_penalty"))
    p.repeat_penalty = get_float(*v, "repetition_penalty", 0, 100, /*lo_open=*/true);
  if (const json* v = field(body, "seed")) {
    // OpenAI's seed is a signed 64-bit integer; celer's a uint64: the bits are kept.
    p.seed = static_cast<uint64_t>(get_int(*v, "seed", std::numeric_limits<int64_t>::min(), std::numeric_limits<int64_t>::max()));
    r.seed_given = true;
  }
}

void read_fields(const json& body, ApiRequest& r) {
  if (const json* v = field(body, "model")) r.model = get_string(*v, "model");
  if (r.endpoint == Endpoint::completions) read_prompt(body, r);
  else read_messages(body, r);
  read_sampling(body, r);

  GenerateRequest& g = r.generate;
  g.max_tokens = 0;
  // max_completion_tokens is the newer name for chat; when both are given it wins.
  for (const char* name : {"max_tokens", "max_completion_tokens"})
    if (const json* v = field(body, name))
      g.max_tokens = static_cast<int32_t>(std::min<int64_t>(get_int(*v, name, 1, std::numeric_limits<int64_t>::max()), kMaxMaxTokens));
  read_stop(body, r);
  if (const json* v = field(body, "n")) r.n = static_cast<int>(get_int(*v, "n", 1, kMaxChoices));
  if (const json* v = field(body, "stream")) r.stream = get_bool(*v, "stream");
  if (const json* v = field(body, "stream_options")) {
    if (!v->is_object()) fail("stream_options", "'stream_options' must be an object, not " + std::string(type_name(*v)));
    if (const json* u = field(*v, "include_usage")) r.include_usage = get_bool(*u, "stream_options.include_usage");
  }
  read_logprobs(body, r);
  if (const json* v = field(body, "user")) g.tenant = get_string(*v, "user");
  if (const json* v = field(body, "priority")) read_priority(*v, g);
  if (const json* v = field(body, "session_id")) g.session_id = get_string(*v, "session_id");
  if (const json* v = field(body, "ignore_eos")) g.ignore_eos = get_bool(*v, "ignore_eos");
  if (const json* v = field(body, "return_token_ids")) r.return_token_ids = get_bool(*v, "return_token_ids");
  if (const json* v = field(body, "return_stage_times")) r.return_stage_times = get_bool(*v, "return_stage_times");
  if (const json* v = field(body, "echo"); v && get_bool(*v, "echo"))
    fail("echo", "'echo' is not supported");
  if (const json* v = field(body, "best_of"); v && get_int(*v, "best_of", 1, kMaxChoices) != r.n)
    fail("best_of", "'best_of' other than n is not supported");
  g.logprobs = r.logprobs;
}

}  // namespace

std::variant<ApiRequest, ApiError> parse_request(Endpoint endpoint, std::string_view body) {
  if (too_deep(body)) return invalid_request("the request body nests deeper than " + std::to_string(kMaxJsonDepth) + " levels");
  json doc = json::parse(body, nullptr, /*allow_exceptions=*/false);
  if (doc.is_discarded())
    return invalid_request("the request body is not valid JSON", "", "invalid_json");
  if (!doc.is_object()) return invalid_request("the request body must be a JSON object");
  ApiRequest r;
  r.endpoint = endpoint;
  try {
    read_fields(doc, r);
  } catch (const FieldError& e) {
    return invalid_request(e.message, e.param);
  } catch (const json::exception& e) {  // a defensive net: a type check missed above
    return invalid_request(std::string("malformed request: ") + e.what());
  }
  return r;
}

int32_t default_max_tokens(Endpoint endpoint) {
  return endpoint == Endpoint::completions ? kDefaultCompletionTokens : kMaxMaxTokens;
}

ApiError invalid_request(std::string message, std::string param, std::string code) {
  return ApiError{400, std::move(message), "invalid_request_error", std::move(param), std::move(code)};
}

std::string error_body(const ApiError& e) {
  json j = {{"error",
             {{"message", e.message},
              {"type", e.type},
              {"param", e.param.empty() ? json(nullptr) : json(e.param)},
              {"code", e.code.empty() ? json(nullptr) : json(e.code)}}}};
  return dump(j);
}

ApiError error_from(ErrorKind kind, const std::string& message) {
  switch (kind) {
    case ErrorKind::invalid_request: return {400, message, "invalid_request_error", "", ""};
    case ErrorKind::prompt_too_long: return {400, message, "invalid_request_error", "messages", "context_length_exceeded"};
    case ErrorKind::rate_limited: return {429, message, "rate_limit_exceeded", "", "rate_limit_exceeded"};
    case ErrorKind::queue_full: return {503, message, "server_overloaded", "", "queue_full"};
    case ErrorKind::unavailable: return {503, message, "server_unavailable", "", "unavailable"};
    case ErrorKind::slo_unattainable: return {503, message, "server_overloaded", "", "slo_unattainable"};
    // 504: the server (not the client) ran out of time before it could answer.
    case ErrorKind::deadline_exceeded: return {504, message, "timeout", "", "deadline_exceeded"};
    case ErrorKind::internal: return {500, message, "server_error", "", "internal_error"};
  }
  return {500, message, "server_error", "", "internal_error"};
}

std::optional<ErrorKind> error_kind_of_code(std::string_view code) {
  if (code.empty()) return std::nullopt;
  for (int k = 0; k <= static_cast<int>(ErrorKind::slo_unattainable); ++k)
    if (error_from(static_cast<ErrorKind>(k), "").code == code) return static_cast<ErrorKind>(k);
  return std::nullopt;
}

const char* finish_reason_name(FinishReason reason) {
  switch (reason) {
    case FinishReason::stop: return "stop";
    case FinishReason::length: return "length";
    case FinishReason::cancelled: return "abort";  // as vLLM; only a client that left could see it
  }
  return "stop";
}

namespace {

const char* object_name(Endpoint e, bool chunk) {
  if (e == Endpoint::completions) return "text_completion";
  return chunk ? "chat.completion.chunk" : "chat.completion";
}

json bytes_of(const std::string& s) {
  json b = json::array();
  for (unsigned char c : s) b.push_back(static_cast<int>(c));
  return b;
}

// Chat's shape: {"content": [{"token", "logprob", "bytes", "top_logprobs": [...]}]}.
json chat_logprobs(const std::vector<LogprobEntry>& entries) {
  json content = json::array();
  for (const auto& e : entries) {
    json top = json::array();
    for (const auto& [tok, lp] : e.top) top.push_back({{"token", tok}, {"logprob", lp}, {"bytes", bytes_of(tok)}});
    content.push_back({{"token", e.token}, {"logprob", e.logprob}, {"bytes", bytes_of(e.token)}, {"top_logprobs", top}});
  }
  return {{"content", content}, {"refusal", nullptr}};
}

// Legacy completions' shape: parallel arrays, alternatives as {token: logprob} maps.
json completion_logprobs(const std::vector<LogprobEntry>& entries, int64_t text_offset) {
  json tokens = json::array(), lps = json::array(), tops = json::array(), offsets = json::array();
  for (const auto& e : entries) {
    tokens.push_back(e.token);
    lps.push_back(e.logprob);
    json top = json::object();
    for (const auto& [tok, lp] : e.top) top[tok] = lp;
    tops.push_back(top);
    offsets.push_back(text_offset);
    text_offset += static_cast<int64_t>(e.token.size());
  }
  return {{"tokens", tokens}, {"token_logprobs", lps}, {"top_logprobs", tops}, {"text_offset", offsets}};
}

json usage_json(const Usage& u) {
  return {{"prompt_tokens", u.prompt_tokens},
          {"completion_tokens", u.completion_tokens},
          {"total_tokens", u.prompt_tokens + u.completion_tokens},
          {"prompt_tokens_details", {{"cached_tokens", u.cached_tokens}}}};
}

json stage_times_json(const StageTimes& t) {
  json j = json::object();
  for (const auto& [name, field] : kStageTimeFields) j[name] = t.*field;
  return j;
}

json envelope(const ResponseMeta& m, bool chunk) {
  return {{"id", m.id}, {"object", object_name(m.endpoint, chunk)}, {"created", m.created}, {"model", m.model}};
}

std::string sse(const json& j) { return "data: " + dump(j) + "\n\n"; }

}  // namespace

std::string response_body(const ResponseMeta& meta, const std::vector<Choice>& choices, const Usage& usage) {
  json j = envelope(meta, false);
  json cs = json::array();
  for (size_t i = 0; i < choices.size(); ++i) {
    const Choice& c = choices[i];
    json choice = {{"index", i}, {"finish_reason", finish_reason_name(c.reason)}};
    if (meta.endpoint == Endpoint::completions) {
      choice["text"] = c.text;
      choice["logprobs"] = c.with_logprobs ? completion_logprobs(c.logprobs, 0) : json(nullptr);
    } else {
      choice["message"] = {{"role", "assistant"}, {"content", c.text}};
      choice["logprobs"] = c.with_logprobs ? chat_logprobs(c.logprobs) : json(nullptr);
    }
    if (c.token_ids) choice["token_ids"] = *c.token_ids;
    if (c.times) choice["stage_times"] = stage_times_json(*c.times);
    cs.push_back(std::move(choice));
  }
  j["choices"] = std::move(cs);
  j["usage"] = usage_json(usage);
  return dump(j);
}

std::string sse_role_chunk(const ResponseMeta& meta, int index) {
  json j = envelope(meta, true);
  j["choices"] = json::array(
      {{{"index", index}, {"delta", {{"role", "assistant"}, {"content", ""}}}, {"logprobs", nullptr}, {"finish_reason", nullptr}}});
  return sse(j);
}

std::string sse_content_chunk(const ResponseMeta& meta, int index, const std::string& text, bool with_logprobs,
                              const std::vector<LogprobEntry>& logprobs, int64_t text_offset,
                              const std::vector<TokenId>* token_ids) {
  json j = envelope(meta, true);
  json choice = {{"index", index}, {"finish_reason", nullptr}};
  if (meta.endpoint == Endpoint::completions) {
    choice["text"] = text;
    choice["logprobs"] = with_logprobs ? completion_logprobs(logprobs, text_offset) : json(nullptr);
  } else {
    choice["delta"] = {{"content", text}};
    choice["logprobs"] = with_logprobs ? chat_logprobs(logprobs) : json(nullptr);
  }
  if (token_ids) choice["token_ids"] = *token_ids;
  j["choices"] = json::array({std::move(choice)});
  return sse(j);
}

std::string sse_finish_chunk(const ResponseMeta& meta, int index, FinishReason reason, const StageTimes* times) {
  json j = envelope(meta, true);
  json choice = {{"index", index}, {"logprobs", nullptr}, {"finish_reason", finish_reason_name(reason)}};
  if (meta.endpoint == Endpoint::completions) choice["text"] = "";
  else choice["delta"] = json::object();
  j["choices"] = json::array({std::move(choice)});
  if (times) j["stage_times"] = stage_times_json(*times);
  return sse(j);
}

std::string sse_usage_chunk(const ResponseMeta& meta, const Usage& usage) {
  json j = envelope(meta, true);
  j["choices"] = json::array();
  j["usage"] = usage_json(usage);
  return sse(j);
}

std::string sse_error_event(const ApiError& e) { return "data: " + error_body(e) + "\n\n"; }

std::string sse_done_event() { return "data: [DONE]\n\n"; }

std::string models_body(const std::vector<std::string>& ids, int64_t created, int32_t max_model_len) {
  json data = json::array();
  for (const auto& id : ids)
    data.push_back({{"id", id}, {"object", "model"}, {"created", created}, {"owned_by", "celer"}, {"max_model_len", max_model_len}});
  return dump({{"object", "list"}, {"data", data}});
}

}  // namespace celer::openai
