// UTF-8 helpers for the tokenizer: sequence checks (RFC 3629), U+FFFD substitution and GPT-2's
// byte <-> printable-character mapping used by byte-level BPE vocabularies.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

namespace celer::utf8 {

// The length a lead byte announces (1 for ASCII and for bytes that cannot lead a sequence);
// only meaningful on text already known to be valid.
inline size_t lead_length(uint8_t b) {
  static constexpr uint8_t kLen[16] = {1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 3, 4};
  return kLen[b >> 4];
}

enum class SeqStatus { valid, incomplete, invalid };

struct Seq {
  SeqStatus status;
  // valid: the sequence length; incomplete: the bytes present (all a valid prefix);
  // invalid: the length of the longest valid prefix, at least 1 (the "maximal subpart" that
  // Unicode's U+FFFD substitution practice replaces by one U+FFFD).
  size_t length;
};

// Classifies the sequence starting at s[i] (i < s.size()).
Seq check(std::string_view s, size_t i);

bool is_valid(std::string_view s);

// s with every byte that does not start a valid sequence replaced by U+FFFD, one per byte, as
// llama.cpp's codepoint decoder does before byte-level BPE.
std::string replace_invalid_bytes(std::string_view s);

void append_codepoint(std::string& out, uint32_t cp);

// Decodes the valid sequence of `length` bytes at p.
uint32_t decode(const char* p, size_t length);

inline constexpr std::string_view kReplacement = "\xEF\xBF\xBD";  // U+FFFD

// GPT-2 byte-level BPE: every byte is written as a printable character so that merges and
// vocab strings never hold raw control bytes or spaces. Bytes 0x21-0x7E, 0xA1-0xAC and 0xAE-0xFF
// stand for themselves; the other 68 bytes map in order to U+0100..U+0143.
// (Radford et al., GPT-2, encoder.py bytes_to_unicode.)
std::string_view byte_to_unicode(uint8_t b);  // the UTF-8 of the character standing for b
int unicode_to_byte(uint32_t cp);             // the byte, or -1 when cp stands for none

}  // namespace celer::utf8
