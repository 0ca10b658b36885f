// The tokenizer's state and the two merge algorithms, shared by tokenizer.cpp (loading, special
// tokens, decoding), tokenizer_spm.cpp and tokenizer_bpe.cpp. Not part of the public interface.
#pragma once

#include <array>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "runtime/tokenizer.hpp"

namespace celer::detail {

struct VocabEntry {
  std::string text;
  float score = 0.0f;  // SPM: higher merges first
  TokenKind kind = TokenKind::normal;
  // When this token's text is cut out of the input, also drop the whitespace before (lstrip) or
  // after (rstrip) it. llama.cpp sets these per model family (Phi-3); GGUF does not store them.
  bool lstrip = false;
  bool rstrip = false;
};

// Heterogeneous lookup: SPM looks up spans of the input without building strings.
struct StringHash {
  using is_transparent = void;
  size_t operator()(std::string_view s) const { return std::hash<std::string_view>{}(s); }
};
using TokenIndex = std::unordered_map<std::string, TokenId, StringHash, std::equal_to<>>;

enum class Model { spm, bpe };

struct BpeMerge {
  int32_t rank;    // position in tokenizer.ggml.merges; lower merges first
  TokenId result;  // the token the pair forms
};
inline uint64_t merge_key(TokenId left, TokenId right) {
  return (static_cast<uint64_t>(static_cast<uint32_t>(left)) << 32) | static_cast<uint32_t>(right);
}

// A byte-level BPE pre-tokenizer: a list of regexes (PCRE2, UTF + UCP), each applied to every
// piece the previous one produced. Matches and the text between matches both become pieces, as
// in llama.cpp's unicode_regex_split and Hugging Face's Split(behavior="isolated").
class PreTokenizer {
 public:
  // nullptr when `name` (tokenizer.ggml.pre) is not one this code implements.
  static std::unique_ptr<PreTokenizer> create(std::string_view name);
  ~PreTokenizer();
  PreTokenizer(const PreTokenizer&) = delete;
  PreTokenizer& operator=(const PreTokenizer&) = delete;

  // Splits valid UTF-8 text into pieces that view it, in order, covering it exactly.
  void split(std::string_view text, std::vector<std::string_view>& pieces) const;
  // Llama 3: a piece that is a token as a whole is emitted without merging (HF ignore_merges).
  bool ignore_merges() const { return ignore_merges_; }

 private:
  struct Regex;
  PreTokenizer() = default;
  std::vector<std::unique_ptr<Regex>> passes_;
  bool ignore_merges_ = false;
};

struct TokenizerData {
  std::string path;  // for error messages
  Model model = Model::spm;
  std::string pre_name;
  std::vector<VocabEntry> vocab;  // [n_vocab]
  TokenIndex index;               // text -> id; for duplicate texts the last id wins (as llama.cpp)
  // SPM: the <0xNN> token of each byte (byte fallback). BPE: the token of the one character that
  // stands for the byte. -1 where the vocab has none.
  std::array<TokenId, 256> byte_tokens{};
  std::unordered_map<uint64_t, BpeMerge> merges;  // BPE: merge_key(left, right) -> merge
  std::unique_ptr<PreTokenizer> pre;              // BPE only
  // Tokens whose text is cut out of the input before merging: control, user-defined and unknown
  // tokens, longest text first (ties by id, so the order is deterministic).
  std::vector<TokenId> special_tokens;
  std::vector<bool> end_of_generation;  // [n_vocab]
  TokenId bos = -1, eos = -1, eot = -1, eom = -1, unk = -1, pad = -1, sep = -1;
  bool add_bos = true;
  bool add_space_prefix = true;
};

// SentencePiece BPE over one run of text already escaped (spaces as U+2581, prefix added).
void spm_tokenize(const TokenizerData& d, std::string_view escaped, std::vector<TokenId>& out);

// Byte-level BPE over one run of raw text (any bytes; invalid UTF-8 is read as U+FFFD).
void bpe_tokenize(const TokenizerData& d, std::string_view text, std::vector<TokenId>& out);

}  // namespace celer::detail
