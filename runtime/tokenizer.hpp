// Text <-> token ids from a GGUF file's `tokenizer.ggml.*` metadata, reproducing llama.cpp's
// tokenizer (and so the Hugging Face / SentencePiece tokenizers its test vectors come from).
//
// Two models are supported:
//  - "llama": SentencePiece BPE. Spaces become U+2581, a space is prepended to each text run that
//    follows the start or a special token (tokenizer.ggml.add_space_prefix), adjacent symbols merge
//    by the score of the token they form, and symbols that form no token fall back to <0xNN> tokens.
//  - "gpt2": byte-level BPE. Text is split by the pre-tokenizer regexes named in
//    tokenizer.ggml.pre (PCRE2, UTF + UCP), each piece's bytes map to GPT-2's printable characters
//    and merge in the rank order of tokenizer.ggml.merges.
// Before either, the text of special tokens is cut out of the input (longest first): user-defined
// tokens always, control and unknown tokens only when parse_special is set.
//
// A Tokenizer is immutable after construction; encode/decode may run on several threads at once.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

namespace celer {

class GgufFile;

using TokenId = int32_t;

// The values of tokenizer.ggml.token_type (llama.cpp's llama_token_type).
enum class TokenKind : uint8_t {
  normal = 1,
  unknown = 2,
  control = 3,
  user_defined = 4,
  unused = 5,
  byte = 6,
};

namespace detail {
struct TokenizerData;
}

class Tokenizer {
 public:
  // Reads and checks the tokenizer metadata. Throws Error(invalid_file) for malformed metadata
  // and Error(unsupported) for a model or pre-tokenizer this code does not implement; both name
  // the file and the key.
  explicit Tokenizer(const GgufFile& file);
  ~Tokenizer();
  Tokenizer(Tokenizer&&) noexcept;
  Tokenizer& operator=(Tokenizer&&) noexcept;
  Tokenizer(const Tokenizer&) = delete;
  Tokenizer& operator=(const Tokenizer&) = delete;

  // Encode text. add_bos prepends BOS (when the vocab has one); parse_special recognises the text
  // of control and unknown special tokens (e.g. "<s>", "<|endoftext|>") as those tokens.
  // Invalid UTF-8 never throws: SPM encodes its bytes through byte fallback, byte-level BPE reads
  // each invalid byte as U+FFFD (as llama.cpp does). `continues`: the text goes on from text
  // already encoded (ConversationMemory): SPM adds no space prefix to its first run.
  std::vector<TokenId> encode(std::string_view text, bool add_bos, bool parse_special = false, bool continues = false) const;

  // The bytes a token stands for in output text: SPM U+2581 -> ' ', <0x0A> -> byte 0x0A; gpt2
  // byte-level characters mapped back to bytes; user-defined tokens as written; control, unknown
  // and unused tokens as "" unless render_special (then their text). Throws
  // Error(invalid_argument) for an id outside [0, n_vocab).
  std::string token_to_piece(TokenId id, bool render_special = false) const;
  // The whole text of ids, without special tokens, with the space prefix SPM encoding added
  // removed from the first piece. The bytes are returned as they are (they may be invalid UTF-8
  // when ids end inside a character); StreamDecoder is the UTF-8-safe streaming form.
  std::string decode(const std::vector<TokenId>& ids) const;

  int32_t n_vocab() const;
  TokenId bos() const;            // -1 when absent
  TokenId eos() const;            // -1 when absent
  TokenId eot() const;            // tokenizer.ggml.eot_token_id, -1 when absent
  TokenId unk() const;            // -1 when absent
  bool add_bos_default() const;   // tokenizer.ggml.add_bos_token (SPM default true, gpt2 false)
  bool add_space_prefix() const;  // tokenizer.ggml.add_space_prefix (SPM default true, gpt2 false)
  // eos, eot, eom and the end-of-turn tokens llama.cpp recognises by text (<|endoftext|>,
  // <|im_end|>, <|eot_id|>, <|end|>, <end_of_turn>, ...) present in the vocab.
  bool is_end_of_generation(TokenId id) const;
  const std::string& token_text(TokenId id) const;  // raw vocab string; throws like token_to_piece
  TokenKind token_kind(TokenId id) const;           // throws like token_to_piece
  std::string model_name() const;                   // "llama" or "gpt2"
  std::string pre_name() const;                     // tokenizer.ggml.pre as read ("default" if absent)

 private:
  std::unique_ptr<const detail::TokenizerData> d_;
};

// Incremental detokenization for streaming: push one token at a time, get back only complete
// UTF-8 text (never half a multi-byte character); bytes that can never become valid UTF-8 come
// out as U+FFFD at once. flush() returns what is left (an incomplete character as U+FFFD).
// Holds a reference to the tokenizer, which must outlive it.
class StreamDecoder {
 public:
  // strip_leading_space removes the SPM space prefix: one ' ' at the start of the first
  // non-empty piece.
  explicit StreamDecoder(const Tokenizer& tok, bool strip_leading_space = false);
  std::string push(TokenId id);
  std::string flush();

 private:
  const Tokenizer& tok_;
  bool strip_pending_;
  std::string pending_;  // bytes of an incomplete UTF-8 character (at most 3)
};

}  // namespace celer
