#include "runtime/response_cache.hpp"

#include <cstring>

namespace celer {

ResponseCache::ResponseCache(size_t max_entries, int64_t ttl_ms) : max_entries_(max_entries), ttl_ms_(ttl_ms) {}

std::string ResponseCache::key_of(const GenerateRequest& r) {
  std::string k;
  auto put = [&](const void* p, size_t n) { k.append(static_cast<const char*>(p), n); };
  const SamplingParams& s = r.sampling;
  put(&s.temperature, sizeof s.temperature);
  put(&s.top_k, sizeof s.top_k);
  put(&s.top_p, sizeof s.top_p);
  put(&s.min_p, sizeof s.min_p);
  put(&s.repeat_penalty, sizeof s.repeat_penalty);
  put(&s.repeat_last_n, sizeof s.repeat_last_n);
  put(&s.seed, sizeof s.seed);
  put(&r.max_tokens, sizeof r.max_tokens);
  const char eos = r.ignore_eos ? 1 : 0;
  put(&eos, 1);
  const uint64_t n_stop = r.stop.size();
  put(&n_stop, sizeof n_stop);
  for (const std::string& stop : r.stop) {
    const uint64_t n = stop.size();
    put(&n, sizeof n);
    k += stop;
  }
  put(r.prompt_tokens.data(), r.prompt_tokens.size() * sizeof(TokenId));
  return k;
}

std::optional<ResponseCache::Answer> ResponseCache::lookup(const GenerateRequest& request, int64_t now_ms) {
  if (max_entries_ == 0) return std::nullopt;
  auto it = map_.find(key_of(request));
  if (it == map_.end() || it->second->expires_ms <= now_ms) {
    if (it != map_.end()) {
      lru_.erase(it->second);
      map_.erase(it);
    }
    ++misses_;
    return std::nullopt;
  }
  lru_.splice(lru_.begin(), lru_, it->second);
  ++hits_;
  return it->second->answer;
}

void ResponseCache::insert(const GenerateRequest& request, Answer answer, int64_t now_ms) {
  if (max_entries_ == 0 || answer.reason == FinishReason::cancelled) return;
  std::string key = key_of(request);
  if (auto it = map_.find(key); it != map_.end()) {
    lru_.erase(it->second);
    map_.erase(it);
  }
  lru_.push_front(Entry{key, std::move(answer), now_ms + ttl_ms_});
  map_[std::move(key)] = lru_.begin();
  while (map_.size() > max_entries_) {
    map_.erase(lru_.back().key);
    lru_.pop_back();
  }
}

}  // namespace celer
