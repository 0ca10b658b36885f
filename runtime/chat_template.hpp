// Chat messages -> one prompt text, the way the model was trained to read a conversation.
//
// A GGUF model states its format in `tokenizer.chat_template` as a Jinja program. celer runs no
// Jinja: it recognises the common families by a distinctive substring of that program and renders
// each in C++. Anything else (or no template at all, as in the TinyStories test model) gets the
// documented plain-text fallback. docs/http.md lists the forms.
//
// The rendered text contains the family's special tokens written out ("<|im_start|>", ...); the
// caller tokenizes it with parse_special = true so they become the real tokens, and with the
// tokenizer's add_bos default, which is why no form writes the BOS token itself.
#pragma once

#include <string>
#include <string_view>
#include <vector>

namespace celer {

enum class ChatFormat {
  chatml,   // <|im_start|>role\n...<|im_end|>   (Qwen, Yi, many fine-tunes)
  llama3,   // <|start_header_id|>role<|end_header_id|>\n\n...<|eot_id|>
  llama2,   // [INST] <<SYS>>\n...\n<</SYS>>\n\n... [/INST] ... </s><s>
  mistral,  // [INST] ... [/INST]... </s>   ([INST] without <<SYS>>: system text joins the first user turn)
  zephyr,   // <|user|>\n...</s>\n<|assistant|>\n
  phi3,     // <|user|>\n...<|end|>\n<|assistant|>\n
  gemma,    // <start_of_turn>user\n...<end_of_turn>\n<start_of_turn>model\n
  chatglm3, // [gMASK]sop<|user|>\n ...<|assistant|>   (ChatGLM3)
  chatglm4, // [gMASK]<sop><|user|>\n...<|assistant|>  (GLM-4)
  fallback, // "System: ...\nUser: ...\nAssistant:" lines
};

const char* to_string(ChatFormat format);

struct ChatMessage {
  std::string role;     // "system", "user" or "assistant" ("developer" is read as "system")
  std::string content;
};

// The family a Jinja template belongs to; fallback when none is recognised (or it is empty).
ChatFormat detect_chat_format(std::string_view jinja_template);

// The conversation followed by the opening of the assistant's turn, ready for the model to
// continue. Roles must be system, user or assistant (the caller validates).
std::string render_chat(ChatFormat format, const std::vector<ChatMessage>& messages);

// Text that ends the assistant's turn in this format. For families whose end-of-turn is a special
// token the tokenizer already treats as end of generation this is belt and braces; for the
// fallback it keeps the model from writing the user's next line.
std::vector<std::string> chat_stop_strings(ChatFormat format);

}  // namespace celer
