// Tokenizer tests: llama.cpp's tokenizer test vectors (tests/data/vocab, one vocab-only GGUF per
// model family with inputs and the ids Hugging Face / SentencePiece produce), streaming decode,
// special tokens, and malformed metadata written byte by byte.
#include "runtime/tokenizer.hpp"

#include <catch2/catch.hpp>
#include <chrono>
#include <cstring>
#include <fstream>
#include <sstream>

#include "runtime/conversation_memory.hpp"
#include "runtime/error.hpp"
#include "runtime/gguf.hpp"
#include "runtime/tokenizer_internal.hpp"
#include "tests/test_util.hpp"

namespace celer {
namespace {

const std::string kData = CELER_TEST_DATA;

std::string vocab_path(const std::string& name) { return kData + "/vocab/ggml-vocab-" + name + ".gguf"; }

std::string slurp(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  REQUIRE(in.good());
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

// The .inp format: each input followed by a line holding only __ggml_vocab_test__.
std::vector<std::string> read_inputs(const std::string& path) {
  const std::string text = slurp(path);
  const std::string sep = "\n__ggml_vocab_test__\n";
  std::vector<std::string> inputs;
  size_t pos = 0;
  for (size_t at; (at = text.find(sep, pos)) != std::string::npos; pos = at + sep.size())
    inputs.push_back(text.substr(pos, at - pos));
  return inputs;
}

// The .out format: one line of space-separated ids per input.
std::vector<std::vector<TokenId>> read_expected(const std::string& path) {
  std::istringstream in(slurp(path));
  std::vector<std::vector<TokenId>> out;
  for (std::string line; std::getline(in, line);) {
    std::istringstream ids(line);
    out.emplace_back();
    for (TokenId id; ids >> id;) out.back().push_back(id);
  }
  return out;
}

std::string show(const std::vector<TokenId>& ids) {
  std::string s = "[";
  for (size_t i = 0; i < ids.size(); ++i) {
    if (i) s += ' ';
    s += std::to_string(ids[i]);
  }
  return s + "]";
}

std::string escape(const std::string& s) {
  std::string out;
  for (const char c : s) {
    if (c == '\n') {
      out += "\\n";
    } else if (c == '\t') {
      out += "\\t";
    } else {
      out += c;
    }
  }
  return "\"" + out + "\"";
}

// Written independently of the tokenizer's own UTF-8 code (RFC 3629 table 3-7).
bool valid_utf8(const std::string& s) {
  size_t i = 0;
  while (i < s.size()) {
    const auto b = [&](size_t k) { return static_cast<unsigned char>(s[i + k]); };
    size_t n;
    unsigned char lo = 0x80, hi = 0xBF;
    if (b(0) < 0x80) {
      n = 1;
    } else if (b(0) >= 0xC2 && b(0) <= 0xDF) {
      n = 2;
    } else if (b(0) >= 0xE0 && b(0) <= 0xEF) {
      n = 3;
      lo = b(0) == 0xE0 ? 0xA0 : 0x80;
      hi = b(0) == 0xED ? 0x9F : 0xBF;
    } else if (b(0) >= 0xF0 && b(0) <= 0xF4) {
      n = 4;
      lo = b(0) == 0xF0 ? 0x90 : 0x80;
      hi = b(0) == 0xF4 ? 0x8F : 0xBF;
    } else {
      return false;
    }
    if (i + n > s.size()) return false;
    for (size_t k = 1; k < n; ++k) {
      const unsigned char l = k == 1 ? lo : 0x80, h = k == 1 ? hi : 0xBF;
      if (b(k) < l || b(k) > h) return false;
    }
    i += n;
  }
  return true;
}

const char* const kVocabs[] = {"llama-spm", "phi-3", "gpt-2",  "deepseek-llm", "deepseek-coder",
                               "falcon",    "mpt",   "refact", "starcoder"};

}  // namespace

TEST_CASE("tokenizer reproduces llama.cpp's test vectors", "[tokenizer]") {
  const std::string name = GENERATE(from_range(std::begin(kVocabs), std::end(kVocabs)));
  const std::string path = vocab_path(name);
  GgufFile file(path);
  Tokenizer tok(file);
  const auto inputs = read_inputs(path + ".inp");
  const auto expected = read_expected(path + ".out");
  REQUIRE(inputs.size() == expected.size());
  REQUIRE(inputs.size() > 40);

  size_t mismatches = 0;
  for (size_t i = 0; i < inputs.size(); ++i) {
    const std::vector<TokenId> got = tok.encode(inputs[i], false, false);
    if (got == expected[i]) continue;
    ++mismatches;
    UNSCOPED_INFO("vocab " << name << ", input " << i << " " << escape(inputs[i]) << "\n  expected "
                           << show(expected[i]) << "\n  got      " << show(got));
  }
  CHECK(mismatches == 0);
}

TEST_CASE("streaming decode reproduces every test input", "[tokenizer]") {
  const std::string name = GENERATE(from_range(std::begin(kVocabs), std::end(kVocabs)));
  const std::string path = vocab_path(name);
  GgufFile file(path);
  Tokenizer tok(file);
  // Every test input round-trips on every family: SentencePiece keeps unknown characters through
  // byte fallback and byte-level BPE encodes every byte, and no vocab here normalises text. The
  // one transformation, SPM's space prefix, is undone by strip_leading_space.
  for (const std::string& input : read_inputs(path + ".inp")) {
    INFO("vocab " << name << ", input " << escape(input));
    const std::vector<TokenId> ids = tok.encode(input, false, false);
    StreamDecoder stream(tok, tok.add_space_prefix());
    std::string text;
    for (const TokenId id : ids) {
      const std::string part = stream.push(id);
      CHECK(valid_utf8(part));
      text += part;
    }
    const std::string rest = stream.flush();
    CHECK(rest.empty());
    text += rest;
    CHECK(text == input);
    CHECK(tok.decode(ids) == input);
  }
}

TEST_CASE("llama-spm: BOS, special-token parsing and pieces", "[tokenizer]") {
  GgufFile file(vocab_path("llama-spm"));
  Tokenizer tok(file);
  REQUIRE(tok.model_name() == "llama");
  REQUIRE(tok.bos() == 1);
  REQUIRE(tok.eos() == 2);
  CHECK(tok.add_bos_default());
  CHECK(tok.n_vocab() == 32000);

  const auto plain = tok.encode("Hello world", false);
  auto with_bos = plain;
  with_bos.insert(with_bos.begin(), 1);
  CHECK(tok.encode("Hello world", true) == with_bos);
  CHECK(tok.encode("", true) == std::vector<TokenId>{1});
  CHECK(tok.encode("", false).empty());

  // "<s>" is BOS only when special tokens are parsed; as plain text it is "▁<", "s", ">".
  CHECK(tok.encode("<s>", false, true) == std::vector<TokenId>{1});
  const auto as_text = tok.encode("<s>", false, false);
  CHECK(std::find(as_text.begin(), as_text.end(), 1) == as_text.end());
  // After a special token, SPM prefixes the next run with a space again (as llama.cpp).
  CHECK(tok.encode("<s>Hello world", false, true) == with_bos);
  CHECK(tok.encode("Hello world</s>", false, true).back() == 2);

  CHECK(tok.token_to_piece(13) == "\n");  // <0x0A>
  CHECK(tok.token_text(13) == "<0x0A>");
  CHECK(tok.token_kind(13) == TokenKind::byte);
  CHECK(tok.token_to_piece(1).empty());
  CHECK(tok.token_to_piece(1, true) == "<s>");
  CHECK(tok.token_to_piece(15043) == " Hello");
  CHECK(tok.decode(with_bos) == "Hello world");
  CHECK(tok.is_end_of_generation(2));
  CHECK_FALSE(tok.is_end_of_generation(15043));
  CHECK_FALSE(tok.is_end_of_generation(-1));
  CHECK_THROWS_AS(tok.token_to_piece(32000), Error);
  CHECK_THROWS_AS(tok.token_text(-1), Error);
}

TEST_CASE("stories260K tokenizes with BOS like llama.cpp", "[tokenizer]") {
  GgufFile file(kData + "/stories260K.gguf");
  Tokenizer tok(file);
  CHECK(tok.n_vocab() == 512);
  CHECK(tok.encode("Once upon a time", true) == std::vector<TokenId>{1, 403, 407, 261, 378});
  CHECK(tok.decode({1, 403, 407, 261, 378}) == "Once upon a time");
}

TEST_CASE("byte-level BPE vocab roles", "[tokenizer]") {
  GgufFile gpt2_file(vocab_path("gpt-2"));
  Tokenizer gpt2(gpt2_file);
  CHECK(gpt2.model_name() == "gpt2");
  CHECK(gpt2.pre_name() == "gpt-2");
  CHECK_FALSE(gpt2.add_bos_default());
  CHECK_FALSE(gpt2.add_space_prefix());
  CHECK(gpt2.is_end_of_generation(50256));
  CHECK(gpt2.encode("<|endoftext|>", false, true) == std::vector<TokenId>{50256});
  CHECK(gpt2.encode("<|endoftext|>", false, false).size() > 1);
  CHECK(gpt2.token_to_piece(50256).empty());
  CHECK(gpt2.token_to_piece(50256, true) == "<|endoftext|>");
  CHECK(gpt2.token_to_piece(220) == " ");   // "Ġ"
  CHECK(gpt2.token_to_piece(198) == "\n");  // "Ċ"

  GgufFile phi3_file(vocab_path("phi-3"));
  Tokenizer phi3(phi3_file);
  CHECK(phi3.eos() == 32000);
  CHECK(phi3.is_end_of_generation(32000));        // <|endoftext|>
  CHECK(phi3.is_end_of_generation(32007));        // <|end|>
  CHECK_FALSE(phi3.is_end_of_generation(32010));  // <|user|>
  // Phi-3's special tokens strip the whitespace after them.
  const auto ids = phi3.encode("<|user|>\nHi<|end|>", false, true);
  REQUIRE(ids.size() >= 3);
  CHECK(ids.front() == 32010);
  CHECK(ids.back() == 32007);
  CHECK(phi3.encode("<|user|>\nHi", false, true) == phi3.encode("<|user|>Hi", false, true));

  // MPT's runs of spaces are user-defined tokens: cut out even without special-token parsing.
  GgufFile mpt_file(vocab_path("mpt"));
  Tokenizer mpt(mpt_file);
  CHECK(mpt.encode("a  b", false) == std::vector<TokenId>{66, 50276, 67});
}

TEST_CASE("pre-tokenizers without a test vocab split as their regexes say", "[tokenizer]") {
  const auto split = [](std::string_view pre_name, std::string_view text) {
    const auto pre = detail::PreTokenizer::create(pre_name);
    REQUIRE(pre);
    std::vector<std::string_view> views;
    pre->split(text, views);
    return std::vector<std::string>(views.begin(), views.end());
  };
  const std::string text = "Hello world's 12345!!\n\n  x";
  using Pieces = std::vector<std::string>;
  CHECK(split("llama3", text) == Pieces{"Hello", " world", "'s", " ", "123", "45", "!!\n\n", " ", " x"});
  CHECK(split("llama-bpe", "I'VE") == Pieces{"I", "'VE"});  // case-insensitive contractions
  CHECK(split("qwen2", text) == Pieces{"Hello", " world", "'s", " ", "1", "2", "3", "4", "5", "!!\n\n", " ", " x"});
  CHECK(split("gpt-2", "I'VE") == Pieces{"I", "'", "VE"});
  CHECK(split("default", "a+b=12345") == Pieces{"a", "+", "b", "=", "123", "45"});
  CHECK(detail::PreTokenizer::create("no-such-pre") == nullptr);
  CHECK(split("chatglm-bpe", text) == split("llama3", text));  // GLM-4 splits as Llama 3 does
  for (const char* name : {"default", "gpt-2", "mpt", "llama3", "llama-bpe", "qwen2", "deepseek-llm", "deepseek-coder",
                           "falcon", "starcoder", "refact", "chatglm-bpe"}) {
    // Pieces cover the text exactly, in order.
    const std::string mixed = "x = f(42)  # \xE4\xBD\xA0\xE5\xA5\xBD\r\n\t\xF0\x9F\xA6\x99 don't";
    std::string joined;
    for (const auto& piece : split(name, mixed)) {
      CHECK_FALSE(piece.empty());
      joined += piece;
    }
    CHECK(joined == mixed);
  }
}

TEST_CASE("long degenerate inputs encode quickly and losslessly", "[tokenizer]") {
  const std::vector<std::string> inputs = {
      std::string(100000, ' '),
      std::string(100000, '\n'),
      std::string(100000, 'a'),
      std::string(100000, '7'),
      std::string(100000, '!'),
      [] {
        std::string s;
        while (s.size() < 100000) s += "\xE4\xBD\xA0";  // one CJK character repeated
        return s;
      }(),
      [] {
        std::string s;
        while (s.size() < 100000) s += " \t\n";
        return s;
      }(),
  };
  for (const char* name : {"gpt-2", "llama-spm", "deepseek-coder", "falcon", "mpt"}) {
    GgufFile file(vocab_path(name));
    Tokenizer tok(file);
    for (const std::string& input : inputs) {
      INFO(name << ": " << escape(input.substr(0, 8)) << "...");
      const auto t0 = std::chrono::steady_clock::now();
      const auto ids = tok.encode(input, false);
      const double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
      CHECK(ms < 2000);
      CHECK(tok.decode(ids) == input);
    }
  }
}

TEST_CASE("StreamDecoder holds back partial characters and replaces invalid bytes", "[tokenizer]") {
  GgufFile file(vocab_path("llama-spm"));
  Tokenizer tok(file);
  const auto byte = [](int b) { return static_cast<TokenId>(3 + b); };  // <0x00> is id 3
  REQUIRE(tok.token_text(byte(0xF0)) == "<0xF0>");

  StreamDecoder llama(tok);  // U+1F999 as byte-fallback tokens
  CHECK(llama.push(byte(0xF0)).empty());
  CHECK(llama.push(byte(0x9F)).empty());
  CHECK(llama.push(byte(0xA6)).empty());
  CHECK(llama.push(byte(0x99)) == "\xF0\x9F\xA6\x99");
  CHECK(llama.flush().empty());

  StreamDecoder invalid(tok);
  CHECK(invalid.push(byte(0xFF)) == "\xEF\xBF\xBD");  // can never start a character
  CHECK(invalid.push(byte(0xE2)).empty());
  CHECK(invalid.push(byte(0x41)) == "\357\277\275A");  // E2 cut short by 'A'
  CHECK(invalid.push(byte(0xE2)).empty());
  CHECK(invalid.flush() == "\xEF\xBF\xBD");
  CHECK(invalid.flush().empty());

  // The space prefix is stripped from the first non-empty piece only, after an empty BOS.
  StreamDecoder stripped(tok, true);
  std::string text;
  for (const TokenId id : tok.encode("Hi there", true)) text += stripped.push(id);
  CHECK(text == "Hi there");
}

TEST_CASE("invalid UTF-8 input never throws", "[tokenizer]") {
  for (const char* name : {"llama-spm", "gpt-2", "deepseek-llm"}) {
    GgufFile file(vocab_path(name));
    Tokenizer tok(file);
    const std::string bad = "a\xFF\xC3 b\xE2\x82";
    std::vector<TokenId> ids;
    REQUIRE_NOTHROW(ids = tok.encode(bad, false));
    CHECK_FALSE(ids.empty());
    if (tok.model_name() == "llama") CHECK(tok.decode(ids) == bad);  // byte fallback keeps the bytes
  }
}

namespace {

// Writes GGUF v3 metadata-only files byte by byte (the format of ggml's docs/gguf.md).
class GgufBytes {
 public:
  GgufBytes& str(const std::string& key, const std::string& v) {
    kv(key, 8);
    put_string(v);
    return *this;
  }
  GgufBytes& u32(const std::string& key, uint32_t v) {
    kv(key, 4);
    put(v);
    return *this;
  }
  GgufBytes& strings(const std::string& key, const std::vector<std::string>& v) {
    array(key, 8, v.size());
    for (const auto& s : v) put_string(s);
    return *this;
  }
  GgufBytes& floats(const std::string& key, const std::vector<float>& v) {
    array(key, 6, v.size());
    for (const float x : v) put(x);
    return *this;
  }
  GgufBytes& ints(const std::string& key, const std::vector<int32_t>& v) {
    array(key, 5, v.size());
    for (const int32_t x : v) put(x);
    return *this;
  }
  GgufBytes& u32s(const std::string& key, const std::vector<uint32_t>& v) {
    array(key, 4, v.size());
    for (const uint32_t x : v) put(x);
    return *this;
  }
  std::string write(const TempDir& dir, const std::string& name) const {
    std::string bytes = "GGUF";
    append(bytes, uint32_t{3});
    append(bytes, uint64_t{0});  // tensors
    append(bytes, n_kv_);
    bytes += body_;
    const std::string path = dir.path() + "/" + name;
    write_file(path, bytes.data(), bytes.size());
    return path;
  }

 private:
  template <typename T>
  static void append(std::string& s, T v) {
    char buf[sizeof(T)];
    std::memcpy(buf, &v, sizeof(T));
    s.append(buf, sizeof(T));
  }
  template <typename T>
  void put(T v) {
    append(body_, v);
  }
  void put_string(const std::string& s) {
    put(uint64_t{s.size()});
    body_ += s;
  }
  void kv(const std::string& key, uint32_t type) {
    put_string(key);
    put(type);
    ++n_kv_;
  }
  void array(const std::string& key, uint32_t elem_type, size_t n) {
    kv(key, 9);
    put(elem_type);
    put(uint64_t{n});
  }

  std::string body_;
  uint64_t n_kv_ = 0;
};

// Octal escapes: a hex escape would swallow the letter after it.
const std::vector<std::string> kSpmTokens = {"<unk>", "<s>", "</s>", "\342\226\201a", "a", "\342\226\201"};  // U+2581
const std::vector<std::string> kBpeTokens = {"a", "b", "ab", "\304\240", "\304\240ab"};  // U+0120 "Ġ" stands for ' '

GgufBytes spm_base() {
  GgufBytes g;
  g.str("tokenizer.ggml.model", "llama").strings("tokenizer.ggml.tokens", kSpmTokens);
  return g;
}

GgufBytes bpe_base() {
  GgufBytes g;
  g.str("tokenizer.ggml.model", "gpt2").str("tokenizer.ggml.pre", "gpt-2").strings("tokenizer.ggml.tokens", kBpeTokens);
  return g;
}

// Constructing a tokenizer from `path` throws Error with `code` and a message naming `needle`.
void expect_error(const std::string& path, ErrorCode code, const std::string& needle) {
  INFO(path);
  try {
    GgufFile file(path);
    Tokenizer tok(file);
    FAIL("no error");
  } catch (const Error& e) {
    INFO(e.what());
    CHECK(e.code() == code);
    CHECK(std::string(e.what()).find(needle) != std::string::npos);
    CHECK(std::string(e.what()).find(path) != std::string::npos);
  }
}

}  // namespace

TEST_CASE("hand-written minimal vocabs work", "[tokenizer]") {
  TempDir dir;
  {
    const std::string path = spm_base()
                                 .floats("tokenizer.ggml.scores", {0, 0, 0, -1, -2, -3})
                                 .ints("tokenizer.ggml.token_type", {2, 3, 3, 1, 1, 1})
                                 .u32("tokenizer.ggml.bos_token_id", 1)
                                 .u32("tokenizer.ggml.eos_token_id", 2)
                                 .u32("tokenizer.ggml.unknown_token_id", 0)
                                 .u32("tokenizer.ggml.padding_token_id", 0xFFFFFFFFu)  // "none"
                                 .write(dir, "spm.gguf");
    GgufFile file(path);
    Tokenizer tok(file);
    CHECK(tok.encode("a a", true) == std::vector<TokenId>{1, 3, 3});
    // No byte tokens: unknown characters fall back to <unk>.
    CHECK(tok.encode("b", false) == std::vector<TokenId>{5, 0});
  }
  {
    const std::string path = bpe_base().strings("tokenizer.ggml.merges", {"a b", "\xC4\xA0 ab"}).write(dir, "bpe.gguf");
    GgufFile file(path);
    Tokenizer tok(file);
    CHECK(tok.encode("ab ab", false) == std::vector<TokenId>{2, 4});
    CHECK(tok.bos() == -1);
    CHECK(tok.decode({2, 4}) == "ab ab");
  }
}

TEST_CASE("malformed tokenizer metadata is an Error, not a crash", "[tokenizer]") {
  TempDir dir;
  const std::string merges = "tokenizer.ggml.merges";
  expect_error(GgufBytes().str("tokenizer.ggml.model", "llama").write(dir, "no_tokens.gguf"), ErrorCode::invalid_file,
               "tokenizer.ggml.tokens");
  expect_error(GgufBytes().strings("tokenizer.ggml.tokens", kSpmTokens).write(dir, "no_model.gguf"),
               ErrorCode::invalid_file, "tokenizer.ggml.model");
  expect_error(GgufBytes()
                   .str("tokenizer.ggml.model", "llama")
                   .u32s("tokenizer.ggml.tokens", {1, 2})
                   .write(dir, "int_tokens.gguf"),
               ErrorCode::invalid_file, "tokenizer.ggml.tokens");
  expect_error(
      GgufBytes().str("tokenizer.ggml.model", "llama").strings("tokenizer.ggml.tokens", {}).write(dir, "empty.gguf"),
      ErrorCode::invalid_file, "tokenizer.ggml.tokens");
  expect_error(spm_base().floats("tokenizer.ggml.scores", {0, 0, 0}).write(dir, "short_scores.gguf"),
               ErrorCode::invalid_file, "tokenizer.ggml.scores");
  expect_error(spm_base().ints("tokenizer.ggml.token_type", {1, 1, 1, 1, 1, 1, 1}).write(dir, "long_types.gguf"),
               ErrorCode::invalid_file, "tokenizer.ggml.token_type");
  expect_error(spm_base().ints("tokenizer.ggml.token_type", {1, 1, 1, 1, 1, 9}).write(dir, "bad_type.gguf"),
               ErrorCode::invalid_file, "tokenizer.ggml.token_type");
  expect_error(
      spm_base().strings("tokenizer.ggml.scores", {"a", "b", "c", "d", "e", "f"}).write(dir, "str_scores.gguf"),
      ErrorCode::invalid_file, "tokenizer.ggml.scores");
  expect_error(spm_base().u32("tokenizer.ggml.bos_token_id", 6).write(dir, "bos_range.gguf"), ErrorCode::invalid_file,
               "tokenizer.ggml.bos_token_id");
  expect_error(spm_base().u32("tokenizer.ggml.eos_token_id", 1000000).write(dir, "eos_range.gguf"),
               ErrorCode::invalid_file, "tokenizer.ggml.eos_token_id");
  expect_error(spm_base().str("tokenizer.ggml.bos_token_id", "1").write(dir, "bos_type.gguf"), ErrorCode::invalid_file,
               "tokenizer.ggml.bos_token_id");
  expect_error(bpe_base().write(dir, "no_merges.gguf"), ErrorCode::invalid_file, merges);
  expect_error(bpe_base().strings(merges, {"a b", "a c"}).write(dir, "merge_unknown.gguf"), ErrorCode::invalid_file,
               merges);
  expect_error(bpe_base().strings(merges, {"b a"}).write(dir, "merge_result.gguf"), ErrorCode::invalid_file, merges);
  expect_error(bpe_base().strings(merges, {"ab"}).write(dir, "merge_space.gguf"), ErrorCode::invalid_file, merges);
  expect_error(GgufBytes()
                   .str("tokenizer.ggml.model", "bert")
                   .strings("tokenizer.ggml.tokens", kSpmTokens)
                   .write(dir, "bert.gguf"),
               ErrorCode::unsupported, "not supported");
  expect_error(GgufBytes()
                   .str("tokenizer.ggml.model", "gpt2")
                   .str("tokenizer.ggml.pre", "no-such-pre")
                   .strings("tokenizer.ggml.tokens", kBpeTokens)
                   .write(dir, "pre.gguf"),
               ErrorCode::unsupported, "no-such-pre");
}

TEST_CASE("encode speed", "[tokenizer][speed]") {
  // ~10 KB of mixed text: prose, code, numbers, non-Latin scripts.
  std::string text;
  const std::string block =
      "The quick brown fox jumps over the lazy dog. It's 2024-05-17 and we've got 3,141,592 reasons "
      "to write code:\n    for (int i = 0; i < n; ++i) { sum += a[i] * b[i]; }\n"
      "Привет, мир! 你好，世界。 こんにちは 🦙🚀 — «quotes» and \"more\".\n\n";
  while (text.size() < 10000) text += block;
  for (const char* name : {"gpt-2", "llama-spm", "deepseek-llm"}) {
    const auto t0 = std::chrono::steady_clock::now();
    GgufFile file(vocab_path(name));
    const auto t1 = std::chrono::steady_clock::now();
    Tokenizer tok(file);
    const auto t2 = std::chrono::steady_clock::now();
    std::vector<TokenId> ids;
    const int reps = 20;
    for (int r = 0; r < reps; ++r) ids = tok.encode(text, false);
    const auto t3 = std::chrono::steady_clock::now();
    const auto ms = [](auto a, auto b) { return std::chrono::duration<double, std::milli>(b - a).count(); };
    WARN(name << ": GGUF read " << ms(t0, t1) << " ms, Tokenizer(" << tok.n_vocab() << " tokens) " << ms(t1, t2)
              << " ms, encode " << text.size() << " bytes -> " << ids.size() << " tokens " << ms(t2, t3) / reps
              << " ms");
    CHECK(ms(t1, t2) < 1000);
    CHECK(ms(t2, t3) / reps < 100);
    CHECK(tok.decode(ids) == text);
  }
}


namespace {
std::vector<TokenId> concat(std::vector<TokenId> a, const std::vector<TokenId>& b) {
  a.insert(a.end(), b.begin(), b.end());
  return a;
}
}  // namespace

TEST_CASE("conversation memory: a re-sent answer keeps the ids that were generated", "[tokenizer][conversation]") {
  GgufFile file(vocab_path("llama-spm"));
  Tokenizer tok(file);
  ConversationMemory memory({16, 1 << 16});
  GenerateRequest turn1;
  turn1.prompt_text = "Hello world";
  turn1.session_id = "s";
  CHECK(memory.tokenize(tok, turn1) == tok.encode("Hello world", true));  // nothing remembered yet
  turn1.prompt_tokens = memory.tokenize(tok, turn1);
  // The model wrote " world" as " wor" + "ld", which re-tokenizing would not give back; then
  // an end of generation.
  const auto wor = tok.encode(" wor", false, false, true), ld = tok.encode("ld", false, false, true);
  const auto answer = concat(wor, ld);
  REQUIRE(answer != tok.encode(" world", false, false, true));
  memory.remember(tok, turn1, concat(answer, {tok.eos()}));

  GenerateRequest turn2 = turn1;
  turn2.prompt_tokens.clear();
  turn2.prompt_text = "Hello world world again";
  CHECK(memory.tokenize(tok, turn2) == concat(concat(turn1.prompt_tokens, answer), tok.encode(" again", false, false, true)));
  CHECK(memory.tokenize(tok, turn2) != tok.encode(turn2.prompt_text, true));
  // A text that repeats only part of the answer (a stop string cut it) reuses that part's ids.
  turn2.prompt_text = "Hello world work";
  CHECK(memory.tokenize(tok, turn2) == concat(concat(turn1.prompt_tokens, wor), tok.encode("k", false, false, true)));
  // Another session, or none, does not see this one's entries; other flags are other entries.
  turn2.prompt_text = "Hello world world again";
  GenerateRequest other = turn2;
  other.session_id = "t";
  CHECK(memory.tokenize(tok, other) == tok.encode(other.prompt_text, true));
  other.session_id.clear();
  CHECK(memory.tokenize(tok, other) == tok.encode(other.prompt_text, true));
  other = turn2;
  other.parse_special = true;
  CHECK(memory.tokenize(tok, other) == tok.encode(other.prompt_text, true, true));
  // A text that diverges inside the prompt finds nothing.
  other = turn2;
  other.prompt_text = "Hello there world world";
  CHECK(memory.tokenize(tok, other) == tok.encode(other.prompt_text, true));
  const auto stats = memory.stats();
  CHECK(stats.entries == 1);
  CHECK(stats.hits == 3);
}

TEST_CASE("conversation memory: bounded, least recently used forgotten first", "[tokenizer][conversation]") {
  GgufFile file(vocab_path("llama-spm"));
  Tokenizer tok(file);
  ConversationMemory memory({2, 1 << 16});
  auto remember = [&](const std::string& prompt) {
    GenerateRequest r;
    r.prompt_text = prompt;
    r.prompt_tokens = tok.encode(prompt, true);
    memory.remember(tok, r, concat(tok.encode(" wor", false, false, true), tok.encode("ld", false, false, true)));
  };
  auto reused = [&](const std::string& prompt) {
    GenerateRequest r;
    r.prompt_text = prompt + " world";
    return memory.tokenize(tok, r) != tok.encode(r.prompt_text, true);
  };
  remember("One");
  remember("Two");
  CHECK(reused("One"));  // One is now the most recently used
  remember("Three");     // forgets Two
  CHECK(memory.stats().entries == 2);
  CHECK(reused("One"));
  CHECK(reused("Three"));
  CHECK_FALSE(reused("Two"));
  remember("Three");  // the same prompt and answer again: one entry
  CHECK(memory.stats().entries == 2);
  // The token bound: an entry over it is not kept, and the total stays within it.
  ConversationMemory small({16, 8});
  GenerateRequest r;
  r.prompt_text = "A long prompt of many more than eight tokens, surely";
  r.prompt_tokens = tok.encode(r.prompt_text, true);
  small.remember(tok, r, {});
  CHECK(small.stats().entries == 0);
}

}  // namespace celer
