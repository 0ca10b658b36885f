// Child processes for the cluster tests: `celer launch FILE` or `celer node --config FILE --name
// N`, their output collected by a thread so that a test can wait for a line with a timeout, and
// cluster files written with ports that are free now.
#pragma once

#include <netinet/in.h>
#include <signal.h>
#include <spawn.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <catch2/catch.hpp>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <mutex>
#include <regex>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

extern char** environ;

namespace celer {

// A TCP port nothing listens on now (the kernel's pick for port 0).
inline uint16_t free_port() {
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  REQUIRE(bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) == 0);
  socklen_t len = sizeof a;
  getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len);
  close(fd);
  return ntohs(a.sin_port);
}

// The text of `path` with every `port: N` given a fresh free port and every `model: X` pointing
// at `model`: an example file made runnable beside other tests.
inline std::string with_fresh_ports(const std::string& text, const std::string& model, std::vector<uint16_t>* ports) {
  std::string out;
  std::regex port_re(R"(port: *(\d+))");
  auto begin = std::sregex_iterator(text.begin(), text.end(), port_re);
  size_t last = 0;
  for (auto it = begin; it != std::sregex_iterator(); ++it) {
    const uint16_t p = free_port();
    if (ports) ports->push_back(p);
    out += text.substr(last, static_cast<size_t>(it->position()) - last) + "port: " + std::to_string(p);
    last = static_cast<size_t>(it->position() + it->length());
  }
  out += text.substr(last);
  return std::regex_replace(out, std::regex(R"(model: *\S+)"), "model: " + model);
}

inline std::string read_file(const std::string& path) {
  std::ifstream in(path);
  REQUIRE(in.good());
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}

inline std::string write_temp(const std::string& name, const std::string& text) {
  const std::string path = "/tmp/celer-test-" + std::to_string(getpid()) + "-" + name;
  std::ofstream(path) << text;
  return path;
}

class CelerProcess {
 public:
  CelerProcess(const std::string& celer_bin, std::vector<std::string> args) {
    int fds[2];
    REQUIRE(pipe(fds) == 0);
    posix_spawn_file_actions_t actions;
    posix_spawn_file_actions_init(&actions);
    posix_spawn_file_actions_adddup2(&actions, fds[1], 1);
    posix_spawn_file_actions_adddup2(&actions, fds[1], 2);
    posix_spawn_file_actions_addclose(&actions, fds[0]);
    args.insert(args.begin(), celer_bin);
    std::vector<char*> argv;
    for (auto& a : args) argv.push_back(a.data());
    argv.push_back(nullptr);
    REQUIRE(posix_spawn(&pid_, celer_bin.c_str(), &actions, nullptr, argv.data(), environ) == 0);
    posix_spawn_file_actions_destroy(&actions);
    close(fds[1]);
    fd_ = fds[0];
    reader_ = std::thread([this] {
      char buf[4096];
      ssize_t n;
      while ((n = read(fd_, buf, sizeof buf)) > 0) {
        std::lock_guard lock(mutex_);
        output_.append(buf, static_cast<size_t>(n));
      }
    });
  }
  ~CelerProcess() {
    stop(SIGTERM);
  }
  CelerProcess(const CelerProcess&) = delete;
  CelerProcess& operator=(const CelerProcess&) = delete;

  // Waits until the output matches `pattern`; false after `timeout` or once the process ended.
  bool wait_for(const std::string& pattern, std::chrono::milliseconds timeout) {
    const std::regex re(pattern);
    const auto until = std::chrono::steady_clock::now() + timeout;
    while (std::chrono::steady_clock::now() < until) {
      if (std::regex_search(output(), re)) return true;
      if (pid_ > 0 && waitpid(pid_, &status_, WNOHANG) == pid_) {
        pid_ = -1;
        std::this_thread::sleep_for(std::chrono::milliseconds(50));
        return std::regex_search(output(), re);
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    return false;
  }
  std::string output() {
    std::lock_guard lock(mutex_);
    return output_;
  }
  pid_t pid() const { return pid_; }
  // Sends `sig` and waits (up to 30 s, then SIGKILL); the wait status.
  int stop(int sig) {
    if (pid_ > 0) {
      kill(pid_, sig);
      const auto until = std::chrono::steady_clock::now() + std::chrono::seconds(30);
      while (waitpid(pid_, &status_, WNOHANG) != pid_) {
        if (std::chrono::steady_clock::now() > until) {
          kill(pid_, SIGKILL);
          waitpid(pid_, &status_, 0);
          break;
        }
        std::this_thread::sleep_for(std::chrono::milliseconds(10));
      }
      pid_ = -1;
    }
    if (reader_.joinable()) reader_.join();
    if (fd_ >= 0) close(fd_);
    fd_ = -1;
    return status_;
  }

 private:
  pid_t pid_ = -1;
  int fd_ = -1;
  int status_ = 0;
  std::thread reader_;
  std::mutex mutex_;
  std::string output_;
};

}  // namespace celer
