// The OpenAI HTTP API as plain functions: request JSON -> a validated ApiRequest (what celer's
// GenerateRequest needs, plus the HTTP-only fields: n, stream, logprobs shape), ErrorKind ->
// status and error JSON, and the response bodies and SSE chunks OpenAI clients parse. No I/O, no
// CAF: the gateway (actors/gateway.*) calls these from its I/O thread; tests call them directly.
// docs/http.md documents every field, default and status.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <variant>
#include <vector>

#include "runtime/chat_template.hpp"
#include "runtime/protocol.hpp"

namespace celer::openai {

enum class Endpoint { completions, chat };

// An error as OpenAI reports it: {"error": {"message", "type", "param", "code"}} with a status.
struct ApiError {
  int status = 400;
  std::string message;
  std::string type = "invalid_request_error";
  std::string param;  // "" is written as null
  std::string code;   // "" is written as null
};

// A 400 invalid_request_error.
ApiError invalid_request(std::string message, std::string param = {}, std::string code = {});

std::string error_body(const ApiError& e);

// The status and type a replica's error gets (docs/http.md has the table).
ApiError error_from(ErrorKind kind, const std::string& message);
// The other way, for clients reading an error back: the ErrorKind whose error_from() carries
// `code`; nullopt for a code it does not produce (invalid_request has none: its type tells).
std::optional<ErrorKind> error_kind_of_code(std::string_view code);

// Bounds on what one request may ask for (defaults documented in docs/http.md).
constexpr int kMaxChoices = 16;          // n
constexpr int kMaxStopStrings = 8;       // the client's stop strings (OpenAI allows 4)
constexpr int32_t kMaxMaxTokens = 1 << 20;  // larger values are clamped (the replica caps at the context anyway)
constexpr int kDefaultCompletionTokens = 16;  // /v1/completions without max_tokens (OpenAI's legacy default)

struct ApiRequest {
  Endpoint endpoint = Endpoint::completions;
  std::string model;                  // "" when not given (accepted: the one served model)
  // /v1/completions: text, or token ids when prompt_is_tokens.
  std::string prompt_text;
  std::vector<TokenId> prompt_tokens;
  bool prompt_is_tokens = false;
  // /v1/chat/completions.
  std::vector<ChatMessage> messages;
  // Everything GenerateRequest carries except the prompt and the id. max_tokens is 0 when the
  // request gave none (the gateway picks the endpoint's default, see default_max_tokens).
  GenerateRequest generate;
  bool seed_given = false;            // else the gateway draws a fresh seed per choice
  int n = 1;
  bool stream = false;
  bool include_usage = false;         // stream_options.include_usage
  int32_t logprobs = -1;              // -1: none; k: each token's logprob and the k most likely
  bool return_token_ids = false;      // extension: each chunk / choice also carries its token ids
  bool return_stage_times = false;    // extension: each choice's StageTimes (for celer bench)
};

// Parses and validates a request body. Unknown fields are ignored (clients send many optional
// ones); a known field of the wrong type or out of range is an ApiError naming it in `param`,
// whose message states the allowed range as docs/http.md does ("an integer in 1..16").
std::variant<ApiRequest, ApiError> parse_request(Endpoint endpoint, std::string_view body);

// max_tokens when the request gave none: 16 for completions; for chat, "until the end of the
// context" (kMaxMaxTokens, which the replica caps at the context left after the prompt).
int32_t default_max_tokens(Endpoint endpoint);

// One generated token as the API shows it: its text and log-probability, and the alternatives.
struct LogprobEntry {
  std::string token;
  float logprob = 0;
  std::vector<std::pair<std::string, float>> top;  // most likely first
};

struct Choice {
  std::string text;
  FinishReason reason = FinishReason::stop;
  bool with_logprobs = false;
  std::vector<LogprobEntry> logprobs;  // one per token when with_logprobs
  std::optional<std::vector<TokenId>> token_ids;  // when the request asked (return_token_ids)
  std::optional<StageTimes> times;                // when the request asked (return_stage_times)
};

struct Usage {
  int64_t prompt_tokens = 0;
  int64_t completion_tokens = 0;
  int64_t cached_tokens = 0;
};

// What every response and chunk of one request repeats.
struct ResponseMeta {
  Endpoint endpoint = Endpoint::completions;
  std::string id;      // "cmpl-..." or "chatcmpl-..."
  int64_t created = 0; // seconds since the Unix epoch
  std::string model;
};

const char* finish_reason_name(FinishReason reason);

// The whole response of a non-streamed request.
std::string response_body(const ResponseMeta& meta, const std::vector<Choice>& choices, const Usage& usage);

// SSE events ("data: {...}\n\n"). A content chunk carries new text (and its logprobs) of one
// choice; chat's first chunk per choice is role_chunk. The final chunk of a choice has empty
// text and its finish_reason. usage_chunk (choices: []) comes after every choice ended, when the
// client asked for it, then done_event.
std::string sse_role_chunk(const ResponseMeta& meta, int index);
// token_ids (may be null) and times (may be null) are the extensions return_token_ids and
// return_stage_times: "token_ids" in the choice, "stage_times" beside "choices".
std::string sse_content_chunk(const ResponseMeta& meta, int index, const std::string& text, bool with_logprobs,
                              const std::vector<LogprobEntry>& logprobs, int64_t text_offset,
                              const std::vector<TokenId>* token_ids = nullptr);
std::string sse_finish_chunk(const ResponseMeta& meta, int index, FinishReason reason, const StageTimes* times = nullptr);
std::string sse_usage_chunk(const ResponseMeta& meta, const Usage& usage);
std::string sse_error_event(const ApiError& e);
std::string sse_done_event();

// GET /v1/models.
std::string models_body(const std::vector<std::string>& ids, int64_t created, int32_t max_model_len);

}  // namespace celer::openai
