// Loading and checking tokenizer metadata, cutting special tokens out of the input, dispatching
// to the SPM or byte-level BPE merge, and turning ids back into text.
// Metadata keys: https://github.com/ggml-org/ggml/blob/master/docs/gguf.md#tokenizer
#include "runtime/tokenizer.hpp"

#include <algorithm>
#include <bitset>
#include <cctype>
#include <cstdio>
#include <limits>
#include <type_traits>
#include <variant>

#include "runtime/error.hpp"
#include "runtime/gguf.hpp"
#include "runtime/tokenizer_internal.hpp"
#include "runtime/tokenizer_utf8.hpp"

namespace celer {
namespace {

using detail::Model;
using detail::TokenizerData;
using detail::VocabEntry;

const std::string kModelKey = "tokenizer.ggml.model";
const std::string kPreKey = "tokenizer.ggml.pre";
const std::string kTokensKey = "tokenizer.ggml.tokens";
const std::string kScoresKey = "tokenizer.ggml.scores";
const std::string kTypesKey = "tokenizer.ggml.token_type";
const std::string kMergesKey = "tokenizer.ggml.merges";

constexpr std::string_view kSpmSpace = "\xE2\x96\x81";  // U+2581, SentencePiece's visible space

// Texts llama.cpp treats as end of generation whatever their declared type (and forces to
// control, so that plain text never produces them).
constexpr std::string_view kEndOfGenerationTexts[] = {
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<|return|>",
    "<|call|>",
    "<|endoftext|>",
    "<|eom_id|>",
    "<end_of_turn>",
    "<EOT>",
    "_<EOT>",
    "<|end_of_text|>",
    "<end_of_utterance>",
    "<\357\275\234end\342\226\201of\342\226\201sentence\357\275\234>",  // DeepSeek's <｜end▁of▁sentence｜>
};

[[noreturn]] void fail_key(const TokenizerData& d, const std::string& key, const std::string& what) {
  throw Error(ErrorCode::invalid_file, d.path + ": metadata key '" + key + "' " + what);
}

// The array under `key`, which must hold one entry per token.
const GgufValue& per_token_array(const GgufFile& f, const TokenizerData& d, const std::string& key) {
  const GgufValue* v = f.find(key);
  if (v->type != GgufType::array) fail_key(d, key, std::string("should be an array but is ") + to_string(v->type));
  if (v->array.size() != d.vocab.size())
    fail_key(d, key,
             "has " + std::to_string(v->array.size()) + " entries but " + kTokensKey + " has " +
                 std::to_string(d.vocab.size()));
  return *v;
}

// A numeric array element of any width as double; false for strings and bools.
bool number_of(const GgufScalar& s, double* out) {
  return std::visit(
      [&](const auto& x) {
        using T = std::decay_t<decltype(x)>;
        if constexpr (std::is_arithmetic_v<T> && !std::is_same_v<T, bool>) {
          *out = static_cast<double>(x);
          return true;
        } else {
          return false;
        }
      },
      s);
}

void load_vocab(const GgufFile& f, TokenizerData& d) {
  const GgufValue& tokens = f.get_array(kTokensKey, GgufType::string);
  if (tokens.array.empty()) fail_key(d, kTokensKey, "is empty");
  if (tokens.array.size() > static_cast<size_t>(std::numeric_limits<TokenId>::max()))
    fail_key(d, kTokensKey, "has more tokens than a 32-bit id can name");
  d.vocab.resize(tokens.array.size());
  for (size_t i = 0; i < d.vocab.size(); ++i) d.vocab[i].text = std::get<std::string>(tokens.array[i]);

  if (f.has(kScoresKey)) {
    const GgufValue& scores = per_token_array(f, d, kScoresKey);
    for (size_t i = 0; i < d.vocab.size(); ++i) {
      double v = 0;
      if (!number_of(scores.array[i], &v)) fail_key(d, kScoresKey, "should hold numbers");
      d.vocab[i].score = static_cast<float>(v);
    }
  }
  if (f.has(kTypesKey)) {
    const GgufValue& types = per_token_array(f, d, kTypesKey);
    for (size_t i = 0; i < d.vocab.size(); ++i) {
      double v = 0;
      if (!number_of(types.array[i], &v) || v < 0 || v > 6 || v != static_cast<int>(v))
        fail_key(d, kTypesKey, "entry " + std::to_string(i) + " is not a token type (0 to 6)");
      // 0 is llama.cpp's "undefined"; such tokens behave as normal ones here.
      d.vocab[i].kind = v == 0 ? TokenKind::normal : static_cast<TokenKind>(static_cast<int>(v));
    }
  }

  d.index.reserve(d.vocab.size());
  for (size_t i = 0; i < d.vocab.size(); ++i) {
    // An empty text can be neither looked up nor cut out of the input.
    if (!d.vocab[i].text.empty()) d.index.insert_or_assign(d.vocab[i].text, static_cast<TokenId>(i));
  }
}

TokenId read_special_id(const GgufFile& f, const TokenizerData& d, const std::string& key) {
  if (!f.has(key)) return -1;
  const int64_t id = f.get_int(key);
  // Writers store "none" as -1, which a uint32 field holds as 0xFFFFFFFF.
  if (id == -1 || id == 0xFFFFFFFFll) return -1;
  if (id < 0 || id >= static_cast<int64_t>(d.vocab.size()))
    fail_key(d, key, "is " + std::to_string(id) + " but the vocab has " + std::to_string(d.vocab.size()) + " tokens");
  return static_cast<TokenId>(id);
}

void load_special_ids(const GgufFile& f, TokenizerData& d) {
  d.bos = read_special_id(f, d, "tokenizer.ggml.bos_token_id");
  d.eos = read_special_id(f, d, "tokenizer.ggml.eos_token_id");
  d.eot = read_special_id(f, d, "tokenizer.ggml.eot_token_id");
  d.eom = read_special_id(f, d, "tokenizer.ggml.eom_token_id");
  d.unk = read_special_id(f, d, "tokenizer.ggml.unknown_token_id");
  d.pad = read_special_id(f, d, "tokenizer.ggml.padding_token_id");
  d.sep = read_special_id(f, d, "tokenizer.ggml.seperator_token_id");  // sic: the GGUF key's spelling
  const bool spm = d.model == Model::spm;
  d.add_bos = f.get_bool("tokenizer.ggml.add_bos_token", spm);
  // Only SentencePiece adds the prefix; byte-level BPE encodes spaces like any other byte.
  d.add_space_prefix = spm && f.get_bool("tokenizer.ggml.add_space_prefix", true);
}

void load_byte_tokens(TokenizerData& d) {
  for (int b = 0; b < 256; ++b) {
    std::string text;
    if (d.model == Model::spm) {
      char buf[8];
      std::snprintf(buf, sizeof(buf), "<0x%02X>", b);
      text = buf;
    } else {
      text = utf8::byte_to_unicode(static_cast<uint8_t>(b));
    }
    const auto it = d.index.find(text);
    d.byte_tokens[b] = it == d.index.end() ? -1 : it->second;
  }
}

void load_merges(const GgufFile& f, TokenizerData& d) {
  const GgufValue& merges = f.get_array(kMergesKey, GgufType::string);
  if (merges.array.size() > static_cast<size_t>(std::numeric_limits<int32_t>::max()))
    fail_key(d, kMergesKey, "has too many entries");
  d.merges.reserve(merges.array.size());
  std::string joined;
  for (size_t i = 0; i < merges.array.size(); ++i) {
    const auto& m = std::get<std::string>(merges.array[i]);
    const auto where = [&] { return "entry " + std::to_string(i) + " ('" + m + "')"; };
    // Split at the first space after the first byte, as llama.cpp does.
    const size_t space = m.find(' ', 1);
    if (space == std::string::npos) fail_key(d, kMergesKey, where() + " is not two tokens separated by a space");
    const std::string_view left = std::string_view(m).substr(0, space), right = std::string_view(m).substr(space + 1);
    joined.assign(left).append(right);
    const auto l = d.index.find(left), r = d.index.find(right), res = d.index.find(joined);
    if (l == d.index.end() || r == d.index.end() || res == d.index.end())
      fail_key(d, kMergesKey,
               where() + " names an unknown token '" +
                   std::string(l == d.index.end()   ? left
                               : r == d.index.end() ? right
                                                    : std::string_view(joined)) +
                   "'");
    // The first of duplicate merges keeps its rank.
    d.merges.emplace(detail::merge_key(l->second, r->second), detail::BpeMerge{static_cast<int32_t>(i), res->second});
  }
}

// Token roles llama.cpp derives from texts and from the model name (GGUF stores neither).
void mark_special_tokens(const GgufFile& f, TokenizerData& d) {
  const auto n = static_cast<TokenId>(d.vocab.size());
  d.end_of_generation.assign(d.vocab.size(), false);
  for (const std::string_view text : kEndOfGenerationTexts) {
    const auto it = d.index.find(text);
    if (it == d.index.end()) continue;
    d.vocab[it->second].kind = TokenKind::control;
    d.end_of_generation[it->second] = true;
  }
  for (const TokenId id : {d.eos, d.eot, d.eom})
    if (id >= 0) d.end_of_generation[id] = true;

  for (TokenId id = 0; id < n; ++id) {
    const VocabEntry& e = d.vocab[id];
    const bool special =
        e.kind == TokenKind::control || e.kind == TokenKind::user_defined || e.kind == TokenKind::unknown;
    if (special && !e.text.empty()) d.special_tokens.push_back(id);
  }
  std::stable_sort(d.special_tokens.begin(), d.special_tokens.end(),
                   [&](TokenId a, TokenId b) { return d.vocab[a].text.size() > d.vocab[b].text.size(); });

  // Phi-3's added tokens swallow the whitespace after them (rstrip in its tokenizer.json);
  // llama.cpp applies this to every special token of the family except these three.
  std::string name = f.get_string("general.name", "");
  std::transform(name.begin(), name.end(), name.begin(), [](unsigned char c) { return std::tolower(c); });
  if (name.find("phi-3") != std::string::npos || name.find("phi3") != std::string::npos) {
    for (const TokenId id : d.special_tokens) d.vocab[id].rstrip = true;
    const auto set_rstrip = [&](std::string_view text, bool value) {
      if (const auto it = d.index.find(text); it != d.index.end()) d.vocab[it->second].rstrip = value;
    };
    set_rstrip("</s>", true);
    for (const std::string_view text : {"<unk>", "<s>", "<|endoftext|>"}) set_rstrip(text, false);
  }
}

// A run of raw input text [offset, offset + length), or a special token cut out of it.
struct Fragment {
  TokenId token;  // -1 for text
  size_t offset;
  size_t length;
};

bool is_space(char c) { return std::isspace(static_cast<unsigned char>(c)) != 0; }

// Which bytes and pairs of adjacent bytes occur in a text. A token holding a pair the text lacks
// cannot occur in it: this rules out most of a long added-token list (thousands of [PAD...] or
// <unused...> tokens) in O(token length) each instead of one scan of the text per token.
class BytePairs {
 public:
  explicit BytePairs(std::string_view text) {
    for (size_t i = 0; i < text.size(); ++i) {
      bytes_.set(static_cast<uint8_t>(text[i]));
      if (i + 1 < text.size()) pairs_.set(pair(text[i], text[i + 1]));
    }
  }
  bool may_contain(std::string_view s) const {
    if (s.size() == 1) return bytes_.test(static_cast<uint8_t>(s[0]));
    for (size_t i = 0; i + 1 < s.size(); ++i)
      if (!pairs_.test(pair(s[i], s[i + 1]))) return false;
    return true;
  }

 private:
  static size_t pair(char a, char b) {
    return static_cast<size_t>(static_cast<uint8_t>(a)) << 8 | static_cast<uint8_t>(b);
  }
  std::bitset<256> bytes_;
  std::bitset<65536> pairs_;  // 8 KiB
};

// Cuts the text of special tokens out of `text`, longest token first, each at every
// non-overlapping occurrence left to right (llama.cpp's tokenizer_st_partition, which follows
// Hugging Face's added-token splitting). User-defined tokens are always cut; control and unknown
// ones only with parse_special.
std::vector<Fragment> partition(const TokenizerData& d, std::string_view text, bool parse_special) {
  std::vector<Fragment> fragments{{-1, 0, text.size()}}, next;
  const BytePairs pairs(text);
  for (const TokenId id : d.special_tokens) {
    const VocabEntry& e = d.vocab[id];
    if (!parse_special && e.kind != TokenKind::user_defined) continue;
    // Most special tokens are absent from most texts: test before rebuilding the list.
    if (!pairs.may_contain(e.text) || text.find(e.text) == std::string_view::npos) continue;
    next.clear();
    for (const Fragment& frag : fragments) {
      if (frag.token >= 0) {
        next.push_back(frag);
        continue;
      }
      const size_t end = frag.offset + frag.length;
      const std::string_view window = text.substr(0, end);
      size_t pos = frag.offset;
      for (size_t match; (match = window.find(e.text, pos)) != std::string_view::npos;) {
        size_t left_length = match - pos;
        if (e.lstrip)
          while (left_length > 0 && is_space(text[pos + left_length - 1])) --left_length;
        if (left_length > 0) next.push_back({-1, pos, left_length});
        next.push_back({id, 0, 0});
        pos = match + e.text.size();
        if (e.rstrip)
          while (pos < end && is_space(text[pos])) ++pos;
      }
      if (pos < end) next.push_back({-1, pos, end - pos});
    }
    fragments.swap(next);
  }
  return fragments;
}

void spm_encode_run(const TokenizerData& d, std::string_view run, bool prefix, std::vector<TokenId>& out) {
  std::string escaped;
  escaped.reserve(run.size() + 3 * (prefix ? 1 : 0) + 16);
  if (prefix) escaped += kSpmSpace;
  for (const char c : run) {
    if (c == ' ') {
      escaped += kSpmSpace;
    } else {
      escaped += c;
    }
  }
  detail::spm_tokenize(d, escaped, out);
}

// The bytes of a normal byte-level BPE token: each character back to the byte it stands for.
std::string bpe_token_bytes(std::string_view text) {
  std::string out;
  out.reserve(text.size());
  size_t i = 0;
  while (i < text.size()) {
    const utf8::Seq q = utf8::check(text, i);
    const size_t len = q.status == utf8::SeqStatus::valid ? q.length : 1;
    const int b = q.status == utf8::SeqStatus::valid ? utf8::unicode_to_byte(utf8::decode(text.data() + i, len)) : -1;
    if (b >= 0) {
      out += static_cast<char>(b);
    } else {
      out.append(text.substr(i, len));  // not a byte-level character: keep it as written
    }
    i += len;
  }
  return out;
}

// The byte of a "<0xNN>" token, or -1.
int byte_token_value(std::string_view text) {
  if (text.size() != 6 || text.substr(0, 3) != "<0x" || text[5] != '>') return -1;
  int value = 0;
  for (const char c : text.substr(3, 2)) {
    const int digit = c >= '0' && c <= '9'   ? c - '0'
                      : c >= 'A' && c <= 'F' ? c - 'A' + 10
                      : c >= 'a' && c <= 'f' ? c - 'a' + 10
                                             : -1;
    if (digit < 0) return -1;
    value = value * 16 + digit;
  }
  return value;
}

}  // namespace

Tokenizer::Tokenizer(const GgufFile& file) {
  auto d = std::make_unique<TokenizerData>();
  d->path = file.path();
  const std::string model = file.get_string(kModelKey);
  if (model == "llama") {
    d->model = Model::spm;
  } else if (model == "gpt2") {
    d->model = Model::bpe;
  } else {
    throw Error(ErrorCode::unsupported,
                d->path + ": tokenizer model '" + model + "' (" + kModelKey + ") not supported");
  }
  d->pre_name = file.get_string(kPreKey, "default");
  if (d->model == Model::bpe) {
    d->pre = detail::PreTokenizer::create(d->pre_name);
    if (!d->pre)
      throw Error(ErrorCode::unsupported,
                  d->path + ": tokenizer pre-tokenizer '" + d->pre_name + "' (" + kPreKey + ") not supported");
  }
  load_vocab(file, *d);
  load_special_ids(file, *d);
  load_byte_tokens(*d);
  if (d->model == Model::bpe) load_merges(file, *d);
  mark_special_tokens(file, *d);
  d_ = std::move(d);
}

Tokenizer::~Tokenizer() = default;
Tokenizer::Tokenizer(Tokenizer&&) noexcept = default;
Tokenizer& Tokenizer::operator=(Tokenizer&&) noexcept = default;

std::vector<TokenId> Tokenizer::encode(std::string_view text, bool add_bos, bool parse_special, bool continues) const {
  std::vector<TokenId> out;
  out.reserve(text.size() / 3 + 2);
  if (add_bos && d_->bos >= 0) out.push_back(d_->bos);
  if (text.empty()) return out;
  // SPM prefixes a space to the start and to each run after a special token, as llama.cpp does.
  bool after_special = !continues;
  for (const Fragment& frag : partition(*d_, text, parse_special)) {
    if (frag.token >= 0) {
      out.push_back(frag.token);
      after_special = true;
      continue;
    }
    const std::string_view run = text.substr(frag.offset, frag.length);
    if (d_->model == Model::spm) {
      spm_encode_run(*d_, run, d_->add_space_prefix && after_special, out);
    } else {
      detail::bpe_tokenize(*d_, run, out);
    }
    after_special = false;
  }
  return out;
}

std::string Tokenizer::token_to_piece(TokenId id, bool render_special) const {
  token_text(id);  // range check
  const VocabEntry& e = d_->vocab[static_cast<size_t>(id)];
  switch (e.kind) {
    case TokenKind::control:
    case TokenKind::unknown: return render_special ? e.text : std::string();
    case TokenKind::user_defined: return e.text;
    case TokenKind::unused: return {};
    case TokenKind::byte: {
      const int b = byte_token_value(e.text);
      return b < 0 ? std::string() : std::string(1, static_cast<char>(b));
    }
    case TokenKind::normal: break;
  }
  if (d_->model == Model::bpe) return bpe_token_bytes(e.text);
  std::string out;
  out.reserve(e.text.size());
  for (size_t i = 0; i < e.text.size();) {
    if (e.text.compare(i, kSpmSpace.size(), kSpmSpace) == 0) {
      out += ' ';
      i += kSpmSpace.size();
    } else {
      out += e.text[i++];
    }
  }
  return out;
}

std::string Tokenizer::decode(const std::vector<TokenId>& ids) const {
  std::string out;
  bool strip = d_->add_space_prefix;
  for (const TokenId id : ids) {
    std::string piece = token_to_piece(id);
    if (strip && !piece.empty()) {
      if (piece[0] == ' ') piece.erase(0, 1);
      strip = false;
    }
    out += piece;
  }
  return out;
}

int32_t Tokenizer::n_vocab() const { return static_cast<int32_t>(d_->vocab.size()); }
TokenId Tokenizer::bos() const { return d_->bos; }
TokenId Tokenizer::eos() const { return d_->eos; }
TokenId Tokenizer::eot() const { return d_->eot; }
TokenId Tokenizer::unk() const { return d_->unk; }
bool Tokenizer::add_bos_default() const { return d_->add_bos; }
bool Tokenizer::add_space_prefix() const { return d_->add_space_prefix; }

bool Tokenizer::is_end_of_generation(TokenId id) const {
  return id >= 0 && id < n_vocab() && d_->end_of_generation[static_cast<size_t>(id)];
}

const std::string& Tokenizer::token_text(TokenId id) const {
  if (id < 0 || id >= n_vocab())
    throw Error(ErrorCode::invalid_argument,
                "token id " + std::to_string(id) + " is outside the vocab [0, " + std::to_string(n_vocab()) + ")");
  return d_->vocab[static_cast<size_t>(id)].text;
}

TokenKind Tokenizer::token_kind(TokenId id) const {
  token_text(id);  // range check
  return d_->vocab[static_cast<size_t>(id)].kind;
}

std::string Tokenizer::model_name() const { return d_->model == Model::spm ? "llama" : "gpt2"; }
std::string Tokenizer::pre_name() const { return d_->pre_name; }

StreamDecoder::StreamDecoder(const Tokenizer& tok, bool strip_leading_space)
    : tok_(tok), strip_pending_(strip_leading_space) {}

std::string StreamDecoder::push(TokenId id) {
  std::string piece = tok_.token_to_piece(id);
  if (strip_pending_ && !piece.empty()) {
    if (piece[0] == ' ') piece.erase(0, 1);
    strip_pending_ = false;
  }
  pending_ += piece;
  std::string out;
  size_t i = 0;
  while (i < pending_.size()) {
    const utf8::Seq q = utf8::check(pending_, i);
    if (q.status == utf8::SeqStatus::incomplete) break;  // wait for the rest of the character
    if (q.status == utf8::SeqStatus::valid) {
      out.append(pending_, i, q.length);
    } else {
      out += utf8::kReplacement;  // can never become valid: one U+FFFD per maximal subpart
    }
    i += q.length;
  }
  pending_.erase(0, i);
  return out;
}

std::string StreamDecoder::flush() {
  std::string out = pending_.empty() ? std::string() : std::string(utf8::kReplacement);
  pending_.clear();
  return out;
}

}  // namespace celer
