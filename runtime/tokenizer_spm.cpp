// SentencePiece BPE ("llama" tokenizer model), as SentencePiece's bpe_model.cc and llama.cpp's
// llm_tokenizer_spm do it: start from UTF-8 characters, repeatedly merge the adjacent pair whose
// concatenation is the vocab token with the highest score (leftmost first on ties), then emit
// each final symbol as its token or, when it is none, as <0xNN> byte tokens.
//
// Cost: O(n log n) in the characters of the run. Symbols are a doubly linked list in a vector;
// candidate pairs sit in a binary heap and go stale instead of being removed.
#include <algorithm>

#include "runtime/tokenizer_internal.hpp"
#include "runtime/tokenizer_utf8.hpp"

namespace celer::detail {
namespace {

struct Symbol {
  int32_t prev;
  int32_t next;  // -1 at the ends
  uint32_t start;
  uint32_t len;  // 0 once merged into its left neighbour
};

struct Bigram {
  float score;
  int32_t left;
  int32_t right;
  uint32_t len;  // bytes of both symbols when the pair was made; a mismatch later means stale
};

// std heap "less": the top is the highest score, then the leftmost pair.
struct BigramLess {
  bool operator()(const Bigram& a, const Bigram& b) const {
    return a.score < b.score || (a.score == b.score && a.left > b.left);
  }
};

class SpmSession {
 public:
  SpmSession(const TokenizerData& d, std::string_view text) : d_(d), text_(text) {}

  void run(std::vector<TokenId>& out) {
    split_characters();
    for (size_t i = 1; i < symbols_.size(); ++i) try_pair(static_cast<int32_t>(i - 1), static_cast<int32_t>(i));
    while (!heap_.empty()) {
      std::pop_heap(heap_.begin(), heap_.end(), BigramLess{});
      const Bigram b = heap_.back();
      heap_.pop_back();
      Symbol& left = symbols_[b.left];
      Symbol& right = symbols_[b.right];
      // A symbol only grows by absorbing its right neighbour, so a pair whose two symbols are
      // alive and still sum to the recorded length is exactly the pair that was queued.
      if (left.len == 0 || right.len == 0 || left.len + right.len != b.len) continue;
      left.len += right.len;
      right.len = 0;
      left.next = right.next;
      if (right.next >= 0) symbols_[right.next].prev = b.left;
      try_pair(left.prev, b.left);
      try_pair(b.left, left.next);
    }
    if (symbols_.empty()) return;
    for (int32_t i = 0; i != -1; i = symbols_[i].next) emit(symbols_[i], out);
  }

 private:
  void split_characters() {
    symbols_.reserve(text_.size());
    uint32_t offset = 0;
    while (offset < text_.size()) {
      // A valid character is one symbol. Each byte of invalid UTF-8 is a symbol of its own (and
      // ends as a byte token): llama.cpp would take a stray lead byte together with the bytes
      // after it, which can swallow part of a following U+2581 and lose the space it stands for.
      const utf8::Seq seq = utf8::check(text_, offset);
      const auto len = static_cast<uint32_t>(seq.status == utf8::SeqStatus::valid ? seq.length : 1);
      const auto index = static_cast<int32_t>(symbols_.size());
      symbols_.push_back({index - 1, offset + len == text_.size() ? -1 : index + 1, offset, len});
      offset += len;
    }
  }

  void try_pair(int32_t left, int32_t right) {
    if (left < 0 || right < 0) return;
    const uint32_t len = symbols_[left].len + symbols_[right].len;
    const auto it = d_.index.find(text_.substr(symbols_[left].start, len));
    if (it == d_.index.end()) return;
    heap_.push_back({d_.vocab[it->second].score, left, right, len});
    std::push_heap(heap_.begin(), heap_.end(), BigramLess{});
  }

  void emit(const Symbol& s, std::vector<TokenId>& out) const {
    const std::string_view piece = text_.substr(s.start, s.len);
    if (const auto it = d_.index.find(piece); it != d_.index.end()) {
      out.push_back(it->second);
      return;
    }
    // Byte fallback. A vocab without <0xNN> tokens gets <unk> for the byte, as SentencePiece
    // without byte_fallback does (llama.cpp would abort here).
    for (const char c : piece) {
      const TokenId id = d_.byte_tokens[static_cast<uint8_t>(c)];
      if (id >= 0) {
        out.push_back(id);
      } else if (d_.unk >= 0) {
        out.push_back(d_.unk);
      }
    }
  }

  const TokenizerData& d_;
  std::string_view text_;
  std::vector<Symbol> symbols_;
  std::vector<Bigram> heap_;
};

}  // namespace

void spm_tokenize(const TokenizerData& d, std::string_view escaped, std::vector<TokenId>& out) {
  SpmSession(d, escaped).run(out);
}

}  // namespace celer::detail
