// `celer serve --port 0 ...` as a child process for the tests that talk to a real server: the
// ports come from the lines it prints ("celer: serving ... on 127.0.0.1:PORT: ..." and, with the
// HTTP gateway, "celer: http on 127.0.0.1:PORT ...").
#pragma once

#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <catch2/catch.hpp>
#include <cstdio>
#include <regex>
#include <string>
#include <vector>

extern char** environ;

namespace celer {

class ServeProcess {
 public:
  // `extra` follows "serve --port 0"; the HTTP port is awaited when it includes --http-port.
  explicit ServeProcess(const std::string& celer_bin, const std::vector<std::string>& extra = {}) {
    int fds[2];
    REQUIRE(pipe(fds) == 0);
    posix_spawn_file_actions_t actions;
    posix_spawn_file_actions_init(&actions);
    posix_spawn_file_actions_adddup2(&actions, fds[1], 1);
    posix_spawn_file_actions_addclose(&actions, fds[0]);
    std::vector<std::string> args{celer_bin, "serve", "--port", "0"};
    args.insert(args.end(), extra.begin(), extra.end());
    const bool http = std::find(args.begin(), args.end(), "--http-port") != args.end();
    std::vector<char*> argv;
    for (auto& a : args) argv.push_back(a.data());
    argv.push_back(nullptr);
    REQUIRE(posix_spawn(&pid_, celer_bin.c_str(), &actions, nullptr, argv.data(), environ) == 0);
    posix_spawn_file_actions_destroy(&actions);
    close(fds[1]);
    out_ = fdopen(fds[0], "r");
    char line[1024] = {};
    while ((port_ == 0 || (http && http_port_ == 0)) && std::fgets(line, sizeof line, out_)) {
      const std::string s(line);
      std::smatch m;
      if (std::regex_search(s, m, std::regex(R"(http on 127\.0\.0\.1:(\d+))"))) http_port_ = static_cast<uint16_t>(std::stoi(m[1]));
      else if (std::regex_search(s, m, std::regex(R"(on 127\.0\.0\.1:(\d+):)"))) port_ = static_cast<uint16_t>(std::stoi(m[1]));
    }
    REQUIRE(port_ != 0);
    if (http) REQUIRE(http_port_ != 0);
  }
  ~ServeProcess() { stop(SIGTERM); }
  ServeProcess(const ServeProcess&) = delete;
  ServeProcess& operator=(const ServeProcess&) = delete;

  void stop(int sig) {
    if (pid_ <= 0) return;
    kill(pid_, sig);
    int status = 0;
    waitpid(pid_, &status, 0);
    pid_ = -1;
    if (out_) std::fclose(out_);
    out_ = nullptr;
  }
  uint16_t port() const { return port_; }
  uint16_t http_port() const { return http_port_; }

 private:
  pid_t pid_ = -1;
  FILE* out_ = nullptr;
  uint16_t port_ = 0;
  uint16_t http_port_ = 0;
};

}  // namespace celer
