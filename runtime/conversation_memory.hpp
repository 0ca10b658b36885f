// The token ids of recent text prompts and of the answers generated for them, so that a
// conversation re-sent as text tokenizes to the ids the model read and wrote the turn before,
// and the prefix cache finds its KV blocks. Chat clients send the whole history every turn;
// re-tokenizing an earlier answer rarely gives the ids that were sampled (a model may write
// " wor" + "ld" where the tokenizer writes " world"), and the cached blocks stop matching at
// the first answer.
//
// tokenize() looks for a remembered prompt that the new text starts with (among the entries of
// the request's session_id when it has one, else among those without one), goes on over the
// longest part of that prompt's answer the new text repeats, token by token, and encodes only
// the text after it. Any text tokenizes: what is not found is encoded as before.
//
// Bounded: at most max_entries answers and max_tokens ids in all, the least recently used
// forgotten first. Shared by the actors of one process that tokenize prompts and the request
// actors that see the answers, so it has its own lock (held for one lookup or one insert).
#pragma once

#include <cstdint>
#include <list>
#include <map>
#include <mutex>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "runtime/protocol.hpp"
#include "runtime/tokenizer.hpp"

namespace celer {

class ConversationMemory {
 public:
  struct Limits {
    size_t max_entries = 1024;
    size_t max_tokens = size_t{1} << 20;
  };
  struct Stats {
    uint64_t lookups = 0;       // text prompts tokenized
    uint64_t hits = 0;          // ... that started with a remembered prompt
    uint64_t reused_tokens = 0; // ids taken from memory instead of encoded
    size_t entries = 0;
    size_t tokens = 0;
  };

  explicit ConversationMemory(Limits limits);

  // The ids of request.prompt_text, as Tokenizer::encode with the request's add_bos (and the
  // model's add_bos default) and parse_special would give them, except where the text repeats a
  // remembered prompt and answer: there the remembered ids.
  std::vector<TokenId> tokenize(const Tokenizer& tok, const GenerateRequest& request);
  // A finished text request: its prompt text and ids, and the ids it generated. The answer is
  // kept up to its first control token (an end of turn the next prompt writes as text).
  void remember(const Tokenizer& tok, const GenerateRequest& request, const std::vector<TokenId>& generated);

  Stats stats() const;

 private:
  struct Entry {
    uint64_t key = 0;          // hash of the prompt text, the session and the flags
    std::string session;
    bool add_bos = false;
    bool parse_special = false;
    std::string text;          // the prompt text, then the answer's pieces
    size_t prompt_bytes = 0;
    std::vector<TokenId> ids;  // the prompt's ids, then the answer's
    size_t prompt_ids = 0;
    std::vector<size_t> ends;  // for each answer id, where its piece ends in text
  };
  using List = std::list<Entry>;

  static uint64_t seed(std::string_view session, bool add_bos, bool parse_special);
  void forget(List::iterator it);

  Limits limits_;
  mutable std::mutex mu_;
  List lru_;  // most recently used first
  std::unordered_multimap<uint64_t, List::iterator> by_key_;
  std::map<size_t, size_t> prompt_lengths_;  // prompt_bytes -> entries with it
  size_t tokens_ = 0;
  Stats stats_;
};

// A request's prompt text as ids: through `memory` when there is one, else Tokenizer::encode.
std::vector<TokenId> tokenize_prompt(const Tokenizer& tok, const GenerateRequest& request, ConversationMemory* memory);

}  // namespace celer
