// `celer serve --port 0 ...` as a child process for the tests that talk to a real server: the
// ports come from the lines it prints ("celer: serving ... on 127.0.0.1:PORT: ..." and, with the
// HTTP gateway, "celer: http on 127.0.0.1:PORT ...").
#pragma once

#include <signal.h>
#include <spawn.h>
#include <poll.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
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
    // A server names its model: the bundled one unless the test gives a model or a config.
    if (std::find(args.begin(), args.end(), "--model") == args.end() && std::find(args.begin(), args.end(), "--config") == args.end()) {
      args.push_back("--model");
      args.push_back(std::string(CELER_TEST_DATA) + "/stories260K.gguf");
    }
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

  // Sends `sig` and waits for the process; its wait status (-1 if it was already stopped).
  int stop(int sig) {
    if (pid_ <= 0) return -1;
    kill(pid_, sig);
    int status = 0;
    waitpid(pid_, &status, 0);
    pid_ = -1;
    if (out_) std::fclose(out_);
    out_ = nullptr;
    return status;
  }
  pid_t pid() const { return pid_; }
  // The server's resident memory now, from /proc (0 once it is gone).
  long rss_kb() const {
    std::FILE* f = std::fopen(("/proc/" + std::to_string(pid_) + "/status").c_str(), "r");
    if (!f) return 0;
    char line[256];
    long kb = 0;
    while (std::fgets(line, sizeof line, f))
      if (std::sscanf(line, "VmRSS: %ld kB", &kb) == 1) break;
    std::fclose(f);
    return kb;
  }
  uint16_t port() const { return port_; }
  uint16_t http_port() const { return http_port_; }

 private:
  pid_t pid_ = -1;
  FILE* out_ = nullptr;
  uint16_t port_ = 0;
  uint16_t http_port_ = 0;
};

// Runs `celer ARGS...` to its end (killed after `timeout`): its exit status, its output
// (stdout and stderr together) and how long it took.
struct CelerRun {
  int status = -1;  // the wait status
  std::string output;
  double seconds = 0;
  bool timed_out = false;
  bool exited(int code) const { return !timed_out && WIFEXITED(status) && WEXITSTATUS(status) == code; }
};

inline CelerRun run_celer(const std::string& celer_bin, const std::vector<std::string>& extra,
                          std::chrono::milliseconds timeout) {
  int fds[2];
  REQUIRE(pipe(fds) == 0);
  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_adddup2(&actions, fds[1], 1);
  posix_spawn_file_actions_adddup2(&actions, fds[1], 2);
  posix_spawn_file_actions_addclose(&actions, fds[0]);
  std::vector<std::string> args{celer_bin};
  args.insert(args.end(), extra.begin(), extra.end());
  std::vector<char*> argv;
  for (auto& a : args) argv.push_back(a.data());
  argv.push_back(nullptr);
  const auto start = std::chrono::steady_clock::now();
  pid_t pid = -1;
  REQUIRE(posix_spawn(&pid, celer_bin.c_str(), &actions, nullptr, argv.data(), environ) == 0);
  posix_spawn_file_actions_destroy(&actions);
  close(fds[1]);
  CelerRun r;
  char buf[4096];
  for (;;) {
    pollfd p{fds[0], POLLIN, 0};
    const auto left = timeout - (std::chrono::steady_clock::now() - start);
    const int ms = static_cast<int>(std::chrono::duration_cast<std::chrono::milliseconds>(left).count());
    if (ms <= 0 || poll(&p, 1, ms) <= 0) {
      r.timed_out = true;
      kill(pid, SIGKILL);
      break;
    }
    const ssize_t n = read(fds[0], buf, sizeof buf);
    if (n <= 0) break;
    r.output.append(buf, static_cast<size_t>(n));
  }
  close(fds[0]);
  waitpid(pid, &r.status, 0);
  r.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  return r;
}

}  // namespace celer
