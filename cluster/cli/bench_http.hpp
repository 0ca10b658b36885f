// celer bench's HTTP transport: one streamed POST /v1/completions per request against celer's
// OpenAI-compatible gateway (or any server that speaks the same SSE), with the prompt as token
// ids or, for servers that cannot take them or return them (bench --tokenizer), as text, the way
// vLLM's `bench serve` sends it. celer's gateway also returns each chunk's token ids and the request's stage times when
// asked (return_token_ids, return_stage_times: docs/http.md), which multi-turn sessions and the
// latency breakdown need; other servers' chunks count one token each.
#pragma once

#include <chrono>
#include <cstdint>
#include <string>
#include <vector>

#include "celer/client.hpp"
#include "runtime/protocol.hpp"
#include "runtime/workload.hpp"

namespace celer::cli {

struct HttpTarget {
  std::string host;
  std::string port;
  std::string path = "/v1/completions";
  std::string model;  // "" leaves the field out (celer serves one model)
};

// Parses http://HOST:PORT[/v1] (the /v1 prefix, if given, is kept in front of /completions).
HttpTarget parse_url(const std::string& url);

// A prompt of token ids, or of text when `is_text`.
struct HttpPrompt {
  std::vector<TokenId> tokens;
  std::string text;
  bool is_text = false;
};

// Sends one request (of `options`: max_tokens, temperature, seed, ignore_eos, session_id) and
// records, like the client-library path, the send and end times, each
// token's arrival, the counts, the stage times and the error (the HTTP status and OpenAI error
// code). `output` receives the generated token ids (empty when the server does not send them),
// `output_text` the generated text. Times are seconds since `start`.
workload::RequestRecord http_stream(const HttpTarget& target, const HttpPrompt& prompt, const RequestOptions& options,
                                    std::chrono::steady_clock::time_point start, std::vector<TokenId>& output,
                                    std::string& output_text);

}  // namespace celer::cli
