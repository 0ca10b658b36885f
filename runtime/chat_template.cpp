#include "runtime/chat_template.hpp"

namespace celer {

const char* to_string(ChatFormat format) {
  switch (format) {
    case ChatFormat::chatml: return "chatml";
    case ChatFormat::llama3: return "llama3";
    case ChatFormat::llama2: return "llama2";
    case ChatFormat::mistral: return "mistral";
    case ChatFormat::zephyr: return "zephyr";
    case ChatFormat::phi3: return "phi3";
    case ChatFormat::gemma: return "gemma";
    case ChatFormat::chatglm3: return "chatglm3";
    case ChatFormat::chatglm4: return "chatglm4";
    case ChatFormat::fallback: return "fallback";
  }
  return "fallback";
}

ChatFormat detect_chat_format(std::string_view t) {
  auto has = [&](std::string_view s) { return t.find(s) != std::string_view::npos; };
  // Order matters: Phi-3 and GLM also write <|user|> (Zephyr's marker); Phi-3 ends turns with
  // <|end|>, GLM opens the conversation with [gMASK].
  if (has("[gMASK]<sop>")) return ChatFormat::chatglm4;
  if (has("[gMASK]sop")) return ChatFormat::chatglm3;
  if (has("<|im_start|>")) return ChatFormat::chatml;
  if (has("<|start_header_id|>")) return ChatFormat::llama3;
  if (has("<start_of_turn>")) return ChatFormat::gemma;
  if (has("<|user|>") && has("<|end|>")) return ChatFormat::phi3;
  if (has("<|user|>")) return ChatFormat::zephyr;
  if (has("[INST]")) return has("<<SYS>>") ? ChatFormat::llama2 : ChatFormat::mistral;
  return ChatFormat::fallback;
}

namespace {

bool is_system(const ChatMessage& m) { return m.role == "system" || m.role == "developer"; }

// An assistant turn after the separator that follows its role, unless the answer begins with
// that separator itself: an answer re-sent as the model wrote it ("Assistant:" then " Once")
// renders as the prompt it was generated from followed by the answer, which is what lets the
// next turn find both in the prefix cache.
std::string after_separator(const char* separator, const std::string& answer) {
  return answer.rfind(separator, 0) == 0 ? answer : separator + answer;
}

// Llama-2 and Mistral have no system turn of their own: its text goes inside the first [INST].
std::string render_inst(const std::vector<ChatMessage>& messages, bool llama2) {
  std::string system, out;
  bool first_user = true;
  for (const auto& m : messages) {
    if (is_system(m)) {
      system += (system.empty() ? "" : "\n") + m.content;
    } else if (m.role == "user") {
      std::string content = m.content;
      if (first_user && !system.empty())
        content = llama2 ? "<<SYS>>\n" + system + "\n<</SYS>>\n\n" + content : system + "\n\n" + content;
      // BOS before the first turn comes from the tokenizer; later turns open with their own.
      if (!first_user && llama2) out += "<s>";
      out += "[INST] " + content + " [/INST]";
      first_user = false;
    } else {  // assistant
      out += (llama2 ? after_separator(" ", m.content) : m.content) + (llama2 ? " </s>" : "</s>");
    }
  }
  return out;
}

}  // namespace

std::string render_chat(ChatFormat format, const std::vector<ChatMessage>& messages) {
  std::string out;
  switch (format) {
    case ChatFormat::chatml:
      for (const auto& m : messages)
        out += "<|im_start|>" + std::string(is_system(m) ? "system" : m.role) + "\n" + m.content + "<|im_end|>\n";
      return out + "<|im_start|>assistant\n";
    case ChatFormat::llama3:
      for (const auto& m : messages)
        out += "<|start_header_id|>" + std::string(is_system(m) ? "system" : m.role) + "<|end_header_id|>\n\n" +
               m.content + "<|eot_id|>";
      return out + "<|start_header_id|>assistant<|end_header_id|>\n\n";
    case ChatFormat::llama2: return render_inst(messages, true);
    case ChatFormat::mistral: return render_inst(messages, false);
    case ChatFormat::zephyr:
    case ChatFormat::phi3: {
      const char* end = format == ChatFormat::zephyr ? "</s>\n" : "<|end|>\n";
      for (const auto& m : messages)
        out += "<|" + std::string(is_system(m) ? "system" : m.role) + "|>\n" + m.content + end;
      return out + "<|assistant|>\n";
    }
    case ChatFormat::gemma: {
      // Gemma has user and model turns only: system text opens the first user turn.
      std::string system;
      bool first_user = true;
      for (const auto& m : messages) {
        if (is_system(m)) {
          system += (system.empty() ? "" : "\n") + m.content;
          continue;
        }
        std::string content = m.content;
        if (m.role == "user" && first_user && !system.empty()) content = system + "\n\n" + content;
        if (m.role == "user") first_user = false;
        out += "<start_of_turn>" + std::string(m.role == "assistant" ? "model" : "user") + "\n" + content +
               "<end_of_turn>\n";
      }
      return out + "<start_of_turn>model\n";
    }
    case ChatFormat::chatglm3:
    case ChatFormat::chatglm4: {
      // GLM writes its prefix tokens itself (its tokenizer adds no BOS); a turn has no end
      // marker: the next role's token ends it, which is why <|user|> is end of generation.
      const bool glm3 = format == ChatFormat::chatglm3;
      out = glm3 ? "[gMASK]sop" : "[gMASK]<sop>";
      for (const auto& m : messages) {
        const char* separator = glm3 ? "\n " : "\n";
        out += "<|" + std::string(is_system(m) ? "system" : m.role) + "|>" +
               (m.role == "assistant" ? after_separator(separator, m.content) : separator + m.content);
      }
      return out + "<|assistant|>";
    }
    case ChatFormat::fallback:
      for (const auto& m : messages) {
        // The answer follows "Assistant:" as the model wrote it after that prompt (an SPM model
        // begins with " Once", another may not): the prompt of the turn before, then its answer.
        if (m.role == "assistant") {
          out += "Assistant:" + m.content + "\n";
          continue;
        }
        out += std::string(is_system(m) ? "System" : "User") + ": " + m.content + "\n";
      }
      return out + "Assistant:";
  }
  return out;
}

std::vector<std::string> chat_stop_strings(ChatFormat format) {
  switch (format) {
    case ChatFormat::chatml: return {"<|im_end|>"};
    case ChatFormat::llama3: return {"<|eot_id|>"};
    case ChatFormat::llama2:
    case ChatFormat::mistral:
    case ChatFormat::zephyr: return {};  // </s> is EOS: the scheduler ends there already
    case ChatFormat::phi3: return {"<|end|>"};
    case ChatFormat::gemma: return {"<end_of_turn>"};
    case ChatFormat::chatglm3:
    case ChatFormat::chatglm4: return {"<|user|>", "<|observation|>"};
    case ChatFormat::fallback: return {"\nUser:"};
  }
  return {};
}

}  // namespace celer
