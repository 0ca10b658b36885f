// Answers repeated identical requests without running the model. Sampling is a pure function of
// (logits, seed, position), so a request with the same prompt tokens, sampling parameters,
// limits and stop strings produces the same tokens every time: the cache keeps those tokens for
// ttl, at most max_entries of them, evicting the least recently used. Keys are the exact bytes
// of those fields (no hash collisions); a cached answer is replayed as the same token stream.
#pragma once

#include <cstdint>
#include <list>
#include <optional>
#include <string>
#include <unordered_map>
#include <vector>

#include "runtime/protocol.hpp"

namespace celer {

class ResponseCache {
 public:
  struct Answer {
    std::vector<TokenId> tokens;
    FinishReason reason = FinishReason::stop;
  };

  ResponseCache(size_t max_entries, int64_t ttl_ms);

  std::optional<Answer> lookup(const GenerateRequest& request, int64_t now_ms);
  // Only complete answers (stop or length) are stored; a cancelled one is not an answer.
  void insert(const GenerateRequest& request, Answer answer, int64_t now_ms);

  size_t size() const { return map_.size(); }
  uint64_t hits() const { return hits_; }
  uint64_t misses() const { return misses_; }

 private:
  struct Entry {
    std::string key;
    Answer answer;
    int64_t expires_ms;
  };
  static std::string key_of(const GenerateRequest& request);

  size_t max_entries_;
  int64_t ttl_ms_;
  std::list<Entry> lru_;  // most recently used first
  std::unordered_map<std::string, std::list<Entry>::iterator> map_;
  uint64_t hits_ = 0, misses_ = 0;
};

}  // namespace celer
