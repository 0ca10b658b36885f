#include "runtime/conversation_memory.hpp"

#include <algorithm>

namespace celer {
namespace {

constexpr uint64_t kFnvPrime = 0x100000001b3ull;

uint64_t fnv(uint64_t h, std::string_view bytes) {
  for (unsigned char c : bytes) {
    h ^= c;
    h *= kFnvPrime;
  }
  return h;
}

bool is_continuation_byte(char c) { return (static_cast<unsigned char>(c) & 0xC0) == 0x80; }

}  // namespace

ConversationMemory::ConversationMemory(Limits limits) : limits_(limits) {}

uint64_t ConversationMemory::seed(std::string_view session, bool add_bos, bool parse_special) {
  uint64_t h = fnv(0xcbf29ce484222325ull, session);
  // The session's end and the flags: "ab" + flags never hashes as "a" + "b...".
  const char tail[3] = {'\0', static_cast<char>(add_bos), static_cast<char>(parse_special)};
  return fnv(h, std::string_view(tail, sizeof tail));
}

std::vector<TokenId> ConversationMemory::tokenize(const Tokenizer& tok, const GenerateRequest& r) {
  const bool add_bos = r.add_bos && tok.add_bos_default();
  const std::string_view text = r.prompt_text;
  std::vector<TokenId> ids;
  size_t best_bytes = 0;
  {
    std::lock_guard lock(mu_);
    ++stats_.lookups;
    List::iterator best = lru_.end();
    size_t best_ids = 0;
    // The prefix hash of the text at each length some remembered prompt has: one pass.
    uint64_t h = seed(r.session_id, add_bos, r.parse_special);
    size_t hashed = 0;
    for (const auto& [length, count] : prompt_lengths_) {
      if (length > text.size()) break;
      h = fnv(h, text.substr(hashed, length - hashed));
      hashed = length;
      auto [first, last] = by_key_.equal_range(h);
      for (auto it = first; it != last; ++it) {
        const Entry& e = *it->second;
        if (e.prompt_bytes != length || e.session != r.session_id || e.add_bos != add_bos || e.parse_special != r.parse_special ||
            text.compare(0, length, e.text, 0, length) != 0)
          continue;
        // How far the text repeats the answer, then the answer ids whose pieces end there,
        // cut back to a character boundary of the text so that the rest encodes whole
        // characters.
        const size_t limit = std::min(text.size(), e.text.size());
        size_t same = length;
        while (same < limit && text[same] == e.text[same]) ++same;
        size_t n = static_cast<size_t>(std::upper_bound(e.ends.begin(), e.ends.end(), same) - e.ends.begin());
        while (n > 0 && e.ends[n - 1] < text.size() && is_continuation_byte(text[e.ends[n - 1]])) --n;
        const size_t bytes = n > 0 ? e.ends[n - 1] : length;
        if (best == lru_.end() || bytes > best_bytes) {
          best = it->second;
          best_bytes = bytes;
          best_ids = e.prompt_ids + n;
        }
      }
    }
    if (best != lru_.end()) {
      ++stats_.hits;
      stats_.reused_tokens += best_ids;
      ids.assign(best->ids.begin(), best->ids.begin() + static_cast<std::ptrdiff_t>(best_ids));
      lru_.splice(lru_.begin(), lru_, best);  // used: to the front (iterators stay valid)
    }
  }
  if (ids.empty()) return tok.encode(text, add_bos, r.parse_special);
  // The rest, outside the lock.
  const std::vector<TokenId> rest = tok.encode(text.substr(best_bytes), false, r.parse_special, true);
  ids.insert(ids.end(), rest.begin(), rest.end());
  return ids;
}

void ConversationMemory::remember(const Tokenizer& tok, const GenerateRequest& r, const std::vector<TokenId>& generated) {
  if (r.prompt_text.empty() || r.prompt_tokens.empty() || limits_.max_entries == 0) return;
  Entry e;
  e.session = r.session_id;
  e.add_bos = r.add_bos && tok.add_bos_default();
  e.parse_special = r.parse_special;
  e.key = fnv(seed(e.session, e.add_bos, e.parse_special), r.prompt_text);
  e.text = r.prompt_text;
  e.prompt_bytes = e.text.size();
  e.ids = r.prompt_tokens;
  e.prompt_ids = e.ids.size();
  for (TokenId id : generated) {
    if (id < 0 || id >= tok.n_vocab() || tok.is_end_of_generation(id) || tok.token_kind(id) == TokenKind::control) break;
    e.text += tok.token_to_piece(id);
    e.ids.push_back(id);
    e.ends.push_back(e.text.size());
  }
  if (e.ids.size() > limits_.max_tokens) return;

  std::lock_guard lock(mu_);
  // The same prompt and answer again (a repeated request): keep one.
  auto [first, last] = by_key_.equal_range(e.key);
  for (auto it = first; it != last; ++it)
    if (it->second->text == e.text && it->second->ids == e.ids && it->second->session == e.session) {
      lru_.splice(lru_.begin(), lru_, it->second);
      return;
    }
  tokens_ += e.ids.size();
  ++prompt_lengths_[e.prompt_bytes];
  lru_.push_front(std::move(e));
  by_key_.emplace(lru_.front().key, lru_.begin());
  while (lru_.size() > limits_.max_entries || tokens_ > limits_.max_tokens) forget(std::prev(lru_.end()));
}

void ConversationMemory::forget(List::iterator it) {
  auto [first, last] = by_key_.equal_range(it->key);
  for (auto k = first; k != last; ++k)
    if (k->second == it) {
      by_key_.erase(k);
      break;
    }
  if (--prompt_lengths_[it->prompt_bytes] == 0) prompt_lengths_.erase(it->prompt_bytes);
  tokens_ -= it->ids.size();
  lru_.erase(it);
}

std::vector<TokenId> tokenize_prompt(const Tokenizer& tok, const GenerateRequest& r, ConversationMemory* memory) {
  if (memory) return memory->tokenize(tok, r);
  return tok.encode(r.prompt_text, r.add_bos && tok.add_bos_default(), r.parse_special);
}

ConversationMemory::Stats ConversationMemory::stats() const {
  std::lock_guard lock(mu_);
  Stats s = stats_;
  s.entries = lru_.size();
  s.tokens = tokens_;
  return s;
}

}  // namespace celer
