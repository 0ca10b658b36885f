// Connects to celer at HOST PORT and streams a short greedy completion; prints the text and the
// finish reason. With a port nobody listens on, it must get an error value (exit 3).
#include <celer/client.hpp>

#include <cstdio>
#include <cstdlib>

int main(int argc, char** argv) {
  if (argc != 3) return 2;
  auto connected = celer::Client::connect(argv[1], static_cast<uint16_t>(std::atoi(argv[2])));
  if (auto* err = std::get_if<celer::ClientError>(&connected)) {
    std::printf("error: %s: %s\n", celer::to_string(err->kind), err->message.c_str());
    return 3;
  }
  auto& client = *std::get<std::unique_ptr<celer::Client>>(connected);
  celer::RequestOptions options;
  options.max_tokens = 8;
  options.sampling.temperature = 0;
  auto stream = client.stream("Once upon a time", options);
  std::string text;
  while (auto chunk = stream.next()) text += chunk->text;
  const auto& result = stream.result();
  if (auto* err = std::get_if<celer::ClientError>(&result)) {
    std::printf("error: %s\n", err->message.c_str());
    return 4;
  }
  std::printf("text: %s\ntokens: %d\n", text.c_str(), std::get<celer::Completion>(result).completion_tokens);
  return 0;
}
