// Byte-level BPE ("gpt2" tokenizer model): the pre-tokenizer regexes of each model family and
// the rank-ordered merge, as Hugging Face tokenizers' BPE model and llama.cpp's
// llm_tokenizer_bpe do it.
//
// Each pre-tokenizer piece is merged on its own: its bytes start as the tokens of their GPT-2
// characters, and the adjacent pair with the lowest merge rank (leftmost on ties) merges until
// no pair is in tokenizer.ggml.merges. Merges are looked up by the pair of token ids, so the hot
// loop builds no strings. Cost per piece: O(k log k) in its bytes.
#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

#include <algorithm>

#include "runtime/error.hpp"
#include "runtime/tokenizer_internal.hpp"
#include "runtime/tokenizer_utf8.hpp"

namespace celer::detail {
namespace {

// The regexes are llama.cpp's (llm_tokenizer_bpe, per tokenizer.ggml.pre), which transcribe the
// Split pre-tokenizers of each family's tokenizer.json. Raw strings: the regex engine reads the
// escapes. Code points above ASCII are written as \x{...} so that no editor or tool can
// normalise them (NFC would rewrite U+1F7D, U+1FBE, U+1FD3, U+1FDB, U+2126 and U+212A).

// GPT-2 (OpenAI's encoder.py). Also MPT, OLMo, Jais.
constexpr const char* kGpt2 = R"re('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S))re";

// Llama 3 (tiktoken cl100k). The original's case-insensitive group (?i:'s|...) is spelled out.
constexpr const char* kLlama3 =
    R"re((?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)re";

// Qwen2: Llama 3's, with single digits.
constexpr const char* kQwen2 =
    R"re((?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)re";

constexpr const char* kNewlines = R"re([\r\n])re";
constexpr const char* kCjk = R"re([\x{4E00}-\x{9FA5}\x{0800}-\x{4E00}\x{AC00}-\x{D7FF}]+)re";

// DeepSeek LLM: an enumerated set of cased letters (not \p{L}: other scripts fall through).
constexpr const char* kDeepseekLlmLetters =
    R"re(\s?[A-Za-z\x{B5}\x{C0}-\x{D6}\x{D8}-\x{F6}\x{F8}-\x{1BA}\x{1BC}-\x{1BF}\x{1C4}-\x{293})re"
    R"re(\x{295}-\x{2AF}\x{370}-\x{373}\x{376}\x{377}\x{37B}-\x{37D}\x{37F}\x{386}\x{388}-\x{38A}\x{38C})re"
    R"re(\x{38E}-\x{3A1}\x{3A3}-\x{3F5}\x{3F7}-\x{481}\x{48A}-\x{52F}\x{531}-\x{556}\x{10A0}-\x{10C5})re"
    R"re(\x{13A0}-\x{13F5}\x{13F8}-\x{13FD}\x{1C90}-\x{1CBA}\x{1CBD}-\x{1CBF}\x{1D00}-\x{1D2B})re"
    R"re(\x{1D6B}-\x{1D77}\x{1D79}-\x{1D9A}\x{1E00}-\x{1F15}\x{1F18}-\x{1F1D}\x{1F20}-\x{1F45})re"
    R"re(\x{1F48}-\x{1F4D}\x{1F50}-\x{1F57}\x{1F59}\x{1F5B}\x{1F5D}\x{1F5F}-\x{1F7D}\x{1F80}-\x{1FB4})re"
    R"re(\x{1FB6}-\x{1FBC}\x{1FBE}\x{1FC2}-\x{1FC4}\x{1FC6}-\x{1FCC}\x{1FD0}-\x{1FD3}\x{1FD6}-\x{1FDB})re"
    R"re(\x{1FE0}-\x{1FEC}\x{1FF2}-\x{1FF4}\x{1FF6}-\x{1FFC}\x{2102}\x{2107}\x{210A}-\x{2113}\x{2115})re"
    R"re(\x{2119}-\x{211D}\x{2124}\x{2126}\x{2128}\x{212A}-\x{212D}\x{212F}-\x{2134}\x{2139})re"
    R"re(\x{213C}-\x{213F}\x{2145}-\x{2149}\x{214E}\x{2183}\x{2184}\x{2C00}-\x{2C7B}\x{2C7E}-\x{2CE4})re"
    R"re(\x{2CEB}-\x{2CEE}\x{2CF2}\x{2CF3}\x{A640}-\x{A66D}\x{A680}-\x{A69B}\x{A722}-\x{A76F})re"
    R"re(\x{A771}-\x{A787}\x{A78B}-\x{A78E}\x{AB70}-\x{ABBF}\x{FB00}-\x{FB06}\x{FB13}-\x{FB17})re"
    R"re(\x{FF21}-\x{FF3A}\x{FF41}-\x{FF5A}\x{10400}-\x{1044F}\x{104B0}-\x{104D3}\x{104D8}-\x{104FB})re"
    R"re(\x{10C80}-\x{10CB2}\x{10CC0}-\x{10CF2}\x{118A0}-\x{118DF}\x{1E900}-\x{1E943}]+)re";
// ASCII punctuation and symbols (the range :-~ also covers letters, which the previous pass
// has already cut out), fullwidth forms, curly quotes and CJK punctuation.
constexpr const char* kDeepseekLlmPunct =
    R"re(\s?[!-/:-~\x{FF01}-\x{FF0F}\x{FF1A}-\x{FF5E}\x{2018}-\x{201F}\x{3000}-\x{3002}]+)re";

struct PreSpec {
  std::vector<std::string_view> names;
  std::vector<const char*> regexes;
  bool ignore_merges;
};

const std::vector<PreSpec>& pre_specs() {
  static const std::vector<PreSpec> specs = {
      // llama.cpp's fallback for BPE vocabs without a known pre-tokenizer.
      {{"default"}, {R"re([\p{P}\$\+<=>\^~\|]+)re", kGpt2, R"re(\p{N}+)re", R"re([0-9][0-9][0-9])re"}, false},
      {{"gpt-2", "phi-2", "mpt", "olmo", "jais"}, {kGpt2}, false},
      {{"llama3", "llama-v3", "llama-bpe", "falcon3"}, {kLlama3}, true},
      {{"dbrx", "smaug-bpe", "chatglm-bpe"}, {kLlama3}, false},  // chatglm-bpe: GLM-4
      {{"qwen2", "deepseek-r1-qwen", "stablelm2"}, {kQwen2}, false},
      {{"deepseek-llm"},
       {kNewlines, kDeepseekLlmLetters, kDeepseekLlmPunct, R"re(\s+$)re", kCjk, R"re(\p{N}+)re"},
       false},
      {{"deepseek-coder"}, {kNewlines, R"re(\s?\p{L}+)re", R"re(\s?\p{P}+)re", kCjk, R"re(\p{N})re"}, false},
      {{"falcon"}, {R"re([\p{P}\$\+<=>\^~\|`]+)re", kGpt2, R"re([0-9][0-9][0-9])re"}, false},
      {{"starcoder", "refact", "smollm", "command-r"}, {R"re(\p{N})re", kGpt2}, false},
  };
  return specs;
}

struct MatchDataDeleter {
  void operator()(pcre2_match_data* md) const { pcre2_match_data_free(md); }
};
using MatchData = std::unique_ptr<pcre2_match_data, MatchDataDeleter>;

std::string pcre2_message(int code) {
  PCRE2_UCHAR buf[256];
  pcre2_get_error_message(code, buf, sizeof(buf));
  return reinterpret_cast<const char*>(buf);
}

}  // namespace

struct PreTokenizer::Regex {
  pcre2_code* code = nullptr;
  ~Regex() { pcre2_code_free(code); }
};

PreTokenizer::~PreTokenizer() = default;

std::unique_ptr<PreTokenizer> PreTokenizer::create(std::string_view name) {
  for (const PreSpec& spec : pre_specs()) {
    if (std::find(spec.names.begin(), spec.names.end(), name) == spec.names.end()) continue;
    std::unique_ptr<PreTokenizer> pre(new PreTokenizer());
    pre->ignore_merges_ = spec.ignore_merges;
    for (const char* pattern : spec.regexes) {
      auto regex = std::make_unique<Regex>();
      int err = 0;
      PCRE2_SIZE err_offset = 0;
      // UCP: \s, \p{..} follow Unicode properties. DOLLAR_ENDONLY: `$` is the end of the piece
      // (std::regex and Oniguruma semantics for these patterns), not also before a final "\n".
      regex->code = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(pattern), PCRE2_ZERO_TERMINATED,
                                  PCRE2_UTF | PCRE2_UCP | PCRE2_DOLLAR_ENDONLY, &err, &err_offset, nullptr);
      if (!regex->code)
        throw Error(ErrorCode::unsupported, "pre-tokenizer '" + std::string(name) + "': regex does not compile at " +
                                                std::to_string(err_offset) + ": " + pcre2_message(err));
      // JIT-compiled matching is faster; where JIT is unavailable this fails and the interpreter runs.
      pcre2_jit_compile(regex->code, PCRE2_JIT_COMPLETE);
      pre->passes_.push_back(std::move(regex));
    }
    return pre;
  }
  return nullptr;
}

void PreTokenizer::split(std::string_view text, std::vector<std::string_view>& pieces) const {
  if (text.empty()) return;
  std::vector<std::string_view> current{text}, next;
  MatchData md(pcre2_match_data_create(1, nullptr));
  if (!md) throw Error(ErrorCode::out_of_memory, "pre-tokenizer: no memory for PCRE2 match data");
  for (const auto& pass : passes_) {
    next.clear();
    for (const std::string_view piece : current) {
      const auto subject = reinterpret_cast<PCRE2_SPTR>(piece.data());
      size_t pos = 0;
      size_t gap = 0;  // start of the text not yet emitted
      while (pos < piece.size()) {
        int rc = pcre2_match(pass->code, subject, piece.size(), pos, PCRE2_NO_UTF_CHECK, md.get(), nullptr);
        // The JIT stack is small (32 KiB); the interpreter keeps its backtracking on the heap.
        if (rc == PCRE2_ERROR_JIT_STACKLIMIT)
          rc =
              pcre2_match(pass->code, subject, piece.size(), pos, PCRE2_NO_UTF_CHECK | PCRE2_NO_JIT, md.get(), nullptr);
        if (rc == PCRE2_ERROR_NOMATCH) break;
        if (rc < 0) throw Error(ErrorCode::invalid_argument, "pre-tokenizer: regex match failed: " + pcre2_message(rc));
        const PCRE2_SIZE* ov = pcre2_get_ovector_pointer(md.get());
        const size_t start = ov[0], end = ov[1];
        if (end == start) {  // no pattern here matches empty text; step over it all the same
          pos = start + utf8::lead_length(static_cast<uint8_t>(piece[start]));
          continue;
        }
        if (start > gap) next.push_back(piece.substr(gap, start - gap));
        next.push_back(piece.substr(start, end - start));
        pos = gap = end;
      }
      if (gap < piece.size()) next.push_back(piece.substr(gap));
    }
    current.swap(next);
  }
  pieces.insert(pieces.end(), current.begin(), current.end());
}

namespace {

class BpeSession {
 public:
  explicit BpeSession(const TokenizerData& d) : d_(d) {}

  void encode_piece(std::string_view piece, std::vector<TokenId>& out) {
    if (d_.pre->ignore_merges() && piece.size() > 1) {
      std::string chars;
      for (const char c : piece) chars += utf8::byte_to_unicode(static_cast<uint8_t>(c));
      if (const auto it = d_.index.find(chars); it != d_.index.end()) {
        out.push_back(it->second);
        return;
      }
    }
    symbols_.clear();
    heap_.clear();
    for (size_t i = 0; i < piece.size(); ++i) {
      const auto index = static_cast<int32_t>(i);
      const TokenId id = d_.byte_tokens[static_cast<uint8_t>(piece[i])];
      symbols_.push_back({id, index - 1, i + 1 == piece.size() ? -1 : index + 1, static_cast<uint8_t>(piece[i])});
    }
    for (size_t i = 1; i < symbols_.size(); ++i) try_pair(static_cast<int32_t>(i - 1), static_cast<int32_t>(i));
    if (symbols_.empty()) return;
    merge();
    for (int32_t i = 0; i != -1; i = symbols_[i].next) emit(symbols_[i], out);
  }

 private:
  struct Symbol {
    TokenId id;  // -1 once merged into its left neighbour, or for a byte the vocab lacks
    int32_t prev;
    int32_t next;  // -1 at the ends
    uint8_t byte;  // the first byte, for the fallback of a byte without a token
  };
  struct Candidate {
    int32_t rank;
    int32_t left;
    int32_t right;
    TokenId left_id;  // the ids the pair had when queued; a change later means stale
    TokenId right_id;
    TokenId result;
  };
  // std heap "less": the top is the lowest rank, then the leftmost pair.
  struct CandidateLess {
    bool operator()(const Candidate& a, const Candidate& b) const {
      return a.rank > b.rank || (a.rank == b.rank && a.left > b.left);
    }
  };

  void try_pair(int32_t left, int32_t right) {
    if (left < 0 || right < 0) return;
    const TokenId l = symbols_[left].id, r = symbols_[right].id;
    if (l < 0 || r < 0) return;
    const auto it = d_.merges.find(merge_key(l, r));
    if (it == d_.merges.end()) return;
    heap_.push_back({it->second.rank, left, right, l, r, it->second.result});
    std::push_heap(heap_.begin(), heap_.end(), CandidateLess{});
  }

  void merge() {
    while (!heap_.empty()) {
      std::pop_heap(heap_.begin(), heap_.end(), CandidateLess{});
      const Candidate c = heap_.back();
      heap_.pop_back();
      Symbol& left = symbols_[c.left];
      Symbol& right = symbols_[c.right];
      // A symbol changes only by absorbing its right neighbour (which then dies), and a merge
      // always changes the id, so equal ids on two linked symbols mean the queued pair is intact.
      if (left.next != c.right || left.id != c.left_id || right.id != c.right_id) continue;
      left.id = c.result;
      right.id = -1;
      left.next = right.next;
      right.prev = right.next = -1;
      if (left.next >= 0) symbols_[left.next].prev = c.left;
      try_pair(left.prev, c.left);
      try_pair(c.left, left.next);
    }
  }

  void emit(const Symbol& s, std::vector<TokenId>& out) const {
    if (s.id >= 0) {
      out.push_back(s.id);
      return;
    }
    // A byte whose character is not in the vocab: llama.cpp then looks up each byte of the
    // character's UTF-8 as a one-byte token and drops those that are not tokens either.
    for (const char c : utf8::byte_to_unicode(s.byte)) {
      if (const auto it = d_.index.find(std::string_view(&c, 1)); it != d_.index.end()) out.push_back(it->second);
    }
  }

  const TokenizerData& d_;
  std::vector<Symbol> symbols_;
  std::vector<Candidate> heap_;
};

}  // namespace

void bpe_tokenize(const TokenizerData& d, std::string_view text, std::vector<TokenId>& out) {
  std::string sanitized;
  if (!utf8::is_valid(text)) {
    sanitized = utf8::replace_invalid_bytes(text);
    text = sanitized;
  }
  std::vector<std::string_view> pieces;
  d.pre->split(text, pieces);
  BpeSession session(d);
  for (const std::string_view piece : pieces) session.encode_piece(piece, out);
}

}  // namespace celer::detail
