#include "cluster/cli/bench_http.hpp"

#include <boost/asio/connect.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <limits>
#include <nlohmann/json.hpp>

#include "runtime/error.hpp"
#include "runtime/openai_api.hpp"

namespace celer::cli {
namespace {

namespace beast = boost::beast;
namespace http = beast::http;
namespace asio = boost::asio;
using tcp = asio::ip::tcp;
using json = nlohmann::json;

double seconds_since(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

// An OpenAI error body's code (or type) as celer names errors, so a run's failures read the same
// whichever transport carried them. `status` is the HTTP status, 200 for an error event inside a
// stream (then only the body tells).
std::string error_name(int status, const json& body) {
  const json* e = body.is_object() && body.contains("error") && body["error"].is_object() ? &body["error"] : nullptr;
  auto text = [&](const char* key) {
    return e && e->contains(key) && (*e)[key].is_string() ? (*e)[key].get<std::string>() : std::string();
  };
  const std::string code = text("code"), type = text("type");
  if (auto kind = openai::error_kind_of_code(code)) return to_string(*kind);
  if (!code.empty()) return code;  // the gateway's own (model_not_found, invalid_json, ...)
  if (status == 429) return to_string(ErrorKind::rate_limited);
  if (status == 503) return to_string(ErrorKind::unavailable);
  if (type == "invalid_request_error") return to_string(ErrorKind::invalid_request);
  if (status != 200) return "http_" + std::to_string(status);
  return type.empty() ? to_string(ErrorKind::internal) : type;
}

std::string error_message(const json& body, const std::string& fallback) {
  if (body.is_object() && body.contains("error") && body["error"].contains("message") && body["error"]["message"].is_string())
    return body["error"]["message"];
  return fallback;
}

// A missing or non-integer field reads as 0 (the stage was not reported).
StageTimes stage_times(const json& t) {
  StageTimes s;
  for (const auto& [name, field] : kStageTimeFields)
    if (t.contains(name) && t[name].is_number_integer()) s.*field = t[name].get<int64_t>();
  return s;
}

}  // namespace

HttpTarget parse_url(const std::string& url) {
  const std::string scheme = "http://";
  if (url.rfind(scheme, 0) != 0) throw Error(ErrorCode::invalid_argument, "--url wants http://HOST:PORT, not '" + url + "'");
  std::string rest = url.substr(scheme.size());
  std::string prefix;
  if (const auto slash = rest.find('/'); slash != std::string::npos) {
    prefix = rest.substr(slash);
    rest = rest.substr(0, slash);
    while (!prefix.empty() && prefix.back() == '/') prefix.pop_back();
  }
  const auto colon = rest.rfind(':');
  if (colon == std::string::npos || colon + 1 == rest.size() || colon == 0)
    throw Error(ErrorCode::invalid_argument, "--url: give HOST:PORT in '" + url + "'");
  HttpTarget t;
  t.host = rest.substr(0, colon);
  t.port = rest.substr(colon + 1);
  if (t.port.find_first_not_of("0123456789") != std::string::npos)
    throw Error(ErrorCode::invalid_argument, "--url: bad port in '" + url + "'");
  t.path = (prefix.empty() ? std::string("/v1") : prefix) + "/completions";
  return t;
}

workload::RequestRecord http_stream(const HttpTarget& target, const HttpPrompt& prompt, const RequestOptions& o,
                                    std::chrono::steady_clock::time_point start, std::vector<TokenId>& output,
                                    std::string& output_text) {
  workload::RequestRecord rec;
  json body = {{"prompt", prompt.is_text ? json(prompt.text) : json(prompt.tokens)},
               {"max_tokens", o.max_tokens},
               {"temperature", o.sampling.temperature},
               {"seed", o.sampling.seed},
               {"ignore_eos", o.ignore_eos},
               {"stream", true},
               {"stream_options", {{"include_usage", true}}},
               {"return_token_ids", true},
               {"return_stage_times", true}};
  if (!target.model.empty()) body["model"] = target.model;
  if (!o.session_id.empty()) body["session_id"] = o.session_id;
  rec.send_s = seconds_since(start);
  try {
    asio::io_context io;
    tcp::resolver resolver(io);
    beast::tcp_stream stream(io);
    stream.connect(resolver.resolve(target.host, target.port));
    http::request<http::string_body> req{http::verb::post, target.path, 11};
    req.set(http::field::host, target.host);
    req.set(http::field::content_type, "application/json");
    req.set(http::field::accept, "text/event-stream");
    // Text decoded from random ids may end inside a character: invalid UTF-8 is sent as U+FFFD.
    req.body() = body.dump(-1, ' ', false, json::error_handler_t::replace);
    req.prepare_payload();
    http::write(stream, req);

    beast::flat_buffer buffer;
    http::response_parser<http::buffer_body> parser;
    // A limit that no answer reaches: Boost 1.74 treats an unset limit (boost::none) as smaller
    // than any Content-Length and refuses every such body.
    parser.body_limit(std::numeric_limits<std::uint64_t>::max());
    http::read_header(stream, buffer, parser);
    const int status = static_cast<int>(parser.get().result_int());
    std::string pending;  // bytes of SSE not yet ending in a blank line
    std::string error_body;
    bool done = false;
    char chunk[8192];
    auto on_event = [&](const std::string& data) {
      if (data == "[DONE]") {
        done = true;
        return;
      }
      const json ev = json::parse(data, nullptr, false);
      if (ev.is_discarded()) return;
      if (ev.contains("error")) {
        rec.error = error_name(status, ev);
        rec.error_message = error_message(ev, "error event in the stream");
        return;
      }
      const double t = seconds_since(start);
      if (ev.contains("choices") && ev["choices"].is_array())
        for (const json& c : ev["choices"]) {
          size_t n = 0;
          if (c.contains("text") && c["text"].is_string()) output_text += c["text"].get<std::string>();
          if (c.contains("token_ids") && c["token_ids"].is_array()) {
            for (const json& id : c["token_ids"]) output.push_back(id.get<TokenId>());
            n = c["token_ids"].size();
          } else if (c.contains("text") && c["text"].is_string() && !c["text"].get<std::string>().empty()) {
            n = 1;  // a server that does not report token ids: one token per chunk
          }
          rec.token_times_s.insert(rec.token_times_s.end(), n, t);
        }
      if (ev.contains("usage") && ev["usage"].is_object()) {
        const json& u = ev["usage"];
        rec.prompt_tokens = u.value("prompt_tokens", 0);
        rec.completion_tokens = u.value("completion_tokens", 0);
        if (u.contains("prompt_tokens_details") && u["prompt_tokens_details"].is_object())
          rec.cached_tokens = u["prompt_tokens_details"].value("cached_tokens", 0);
      }
      if (ev.contains("stage_times") && ev["stage_times"].is_object()) rec.times = stage_times(ev["stage_times"]);
    };
    while (!parser.is_done()) {
      parser.get().body().data = chunk;
      parser.get().body().size = sizeof chunk;
      beast::error_code ec;
      http::read_some(stream, buffer, parser, ec);  // returns as soon as some body arrived
      if (ec == http::error::need_buffer) ec = {};
      if (ec) throw beast::system_error(ec);
      const size_t n = sizeof chunk - parser.get().body().size;
      if (status != 200) {
        error_body.append(chunk, n);
        continue;
      }
      // SSE lines end in LF or CRLF; an event ends at a blank line; "data:" may omit its space.
      for (size_t i = 0; i < n; ++i)
        if (chunk[i] != '\r') pending += chunk[i];
      for (size_t end; (end = pending.find("\n\n")) != std::string::npos;) {
        const std::string event = pending.substr(0, end);
        pending.erase(0, end + 2);
        if (event.rfind("data:", 0) == 0) on_event(event.substr(event.size() > 5 && event[5] == ' ' ? 6 : 5));
      }
    }
    rec.end_s = seconds_since(start);
    beast::error_code ignored;
    stream.socket().shutdown(tcp::socket::shutdown_both, ignored);
    if (status != 200) {
      const json e = json::parse(error_body, nullptr, false);
      rec.error = error_name(status, e);
      rec.error_message = error_message(e, "HTTP " + std::to_string(status));
      return rec;
    }
    if (!rec.error.empty()) return rec;
    if (!done) {
      rec.error = "unavailable";
      rec.error_message = "the stream ended without [DONE]";
      return rec;
    }
    if (rec.completion_tokens == 0) rec.completion_tokens = static_cast<int32_t>(rec.token_times_s.size());
    rec.ok = true;
  } catch (const std::exception& e) {
    rec.end_s = seconds_since(start);
    rec.error = "unavailable";
    rec.error_message = std::string("HTTP: ") + e.what();
  }
  return rec;
}

}  // namespace celer::cli
