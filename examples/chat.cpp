// A small interactive chat client for `celer serve`: each turn sends the whole conversation so
// far (with one session id, so a cluster routes the turns to the replica holding its KV) and
// streams the answer. The conversation is kept as token ids and re-sent as tokens, so nothing is
// re-tokenized and every earlier turn is found in the server's prefix cache.
//
//   build/bin/celer serve &
//   build/bin/celer-chat 127.0.0.1 7411 tests/data/stories260K.gguf
#include <unistd.h>

#include <cstdio>
#include <iostream>
#include <string>

#include "celer/client.hpp"
#include "runtime/gguf.hpp"
#include "runtime/tokenizer.hpp"

int main(int argc, char** argv) {
  if (argc != 4) {
    std::fprintf(stderr, "usage: %s HOST PORT MODEL.gguf   (the model file is read for its tokenizer only)\n", argv[0]);
    return 2;
  }
  try {
    const celer::GgufFile vocab(argv[3]);
    const celer::Tokenizer tokenizer(vocab);
    auto connected = celer::Client::connect(argv[1], static_cast<uint16_t>(std::stoi(argv[2])));
    if (auto* err = std::get_if<celer::ClientError>(&connected)) {
      std::fprintf(stderr, "error: %s\n", err->message.c_str());
      return 1;
    }
    celer::Client& client = *std::get<std::unique_ptr<celer::Client>>(connected);
    celer::RequestOptions options;
    options.max_tokens = 100;
    options.session_id = "chat-" + std::to_string(::getpid());
    std::vector<celer::TokenId> conversation;
    std::string line;
    std::printf("Type a line to continue the story; an empty line ends.\n> ");
    while (std::getline(std::cin, line) && !line.empty()) {
      const auto turn = tokenizer.encode(line, conversation.empty() && tokenizer.add_bos_default());
      conversation.insert(conversation.end(), turn.begin(), turn.end());
      auto result = client.generate_tokens(conversation, options, [](const celer::TokenChunk& c) {
        std::fwrite(c.text.data(), 1, c.text.size(), stdout);
        std::fflush(stdout);
        return true;
      });
      if (auto* err = std::get_if<celer::ClientError>(&result)) {
        std::printf("\n[error: %s]\n> ", err->message.c_str());
        continue;
      }
      const auto& done = std::get<celer::Completion>(result);
      conversation.insert(conversation.end(), done.tokens.begin(), done.tokens.end());
      std::printf("\n[%d prompt tokens, %d from the prefix cache]\n> ", done.prompt_tokens, done.cached_tokens);
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  }
  return 0;
}
