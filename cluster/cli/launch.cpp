// celer launch cluster.yaml: starts every node of the config whose host is this machine (one
// `celer node` process each, its output prefixed with the node's name, or written to a log
// folder), waits until each is up and the router reports every replica ready, prints where
// each actor runs, and stays in the foreground. A signal stops every node (each drains its
// streams with an error event, as `celer serve` does); a node that fails to start is named
// with its last words, and the others are stopped.
#include <arpa/inet.h>
#include <fcntl.h>
#include <ifaddrs.h>
#include <netdb.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <filesystem>
#include <mutex>
#include <set>
#include <string>
#include <thread>

#include "cluster/cli/commands.hpp"
#include "cluster/cli/node_plan.hpp"
#include "cluster/cli/status.hpp"
#include "cluster/cli/stop_signals.hpp"
#include "runtime/error.hpp"

namespace celer::cli {
namespace {

struct LaunchArgs {
  std::string config;
  std::string log_dir;  // "": output prefixed on this terminal
  int64_t ready_timeout_ms = 600'000;
};

// The addresses of this machine's interfaces, and its names: a node whose host is one of them
// is launched here.
std::set<std::string> local_addresses() {
  std::set<std::string> out = {"localhost"};
  ifaddrs* list = nullptr;
  if (getifaddrs(&list) == 0) {
    for (ifaddrs* i = list; i; i = i->ifa_next) {
      if (!i->ifa_addr) continue;
      char buf[INET6_ADDRSTRLEN] = {};
      if (i->ifa_addr->sa_family == AF_INET)
        inet_ntop(AF_INET, &reinterpret_cast<sockaddr_in*>(i->ifa_addr)->sin_addr, buf, sizeof buf);
      else if (i->ifa_addr->sa_family == AF_INET6)
        inet_ntop(AF_INET6, &reinterpret_cast<sockaddr_in6*>(i->ifa_addr)->sin6_addr, buf, sizeof buf);
      if (buf[0]) out.insert(buf);
    }
    freeifaddrs(list);
  }
  char host[256] = {};
  if (gethostname(host, sizeof host - 1) == 0) out.insert(host);
  return out;
}

bool is_local(const NodeConfig& n, const std::set<std::string>& local) {
  if (local.count(n.host)) return true;
  // 127.0.0.0/8 is all this machine.
  in_addr a{};
  return inet_pton(AF_INET, n.host.c_str(), &a) == 1 && (ntohl(a.s_addr) >> 24) == 127;
}

struct Child {
  std::string name;
  pid_t pid = -1;
  int out = -1;  // read end of its stdout + stderr
  std::FILE* log = nullptr;
  bool ready = false;
  bool exited = false;
  int status = 0;
  std::deque<std::string> last;  // its last lines, for an error report
  std::thread reader;
};

std::mutex g_print;

void read_output(Child* c, const std::string& ready_line) {
  std::string pending;
  char buf[4096];
  while (true) {
    const ssize_t n = read(c->out, buf, sizeof buf);
    if (n <= 0) {
      if (n < 0 && errno == EINTR) continue;
      break;
    }
    pending.append(buf, static_cast<size_t>(n));
    size_t nl;
    while ((nl = pending.find('\n')) != std::string::npos) {
      const std::string line = pending.substr(0, nl);
      pending.erase(0, nl + 1);
      std::lock_guard lock(g_print);
      if (c->log) {
        std::fprintf(c->log, "%s\n", line.c_str());
        std::fflush(c->log);
      } else {
        std::printf("[%s] %s\n", c->name.c_str(), line.c_str());
        std::fflush(stdout);
      }
      if (line.rfind(ready_line, 0) == 0) c->ready = true;
      c->last.push_back(line);
      if (c->last.size() > 5) c->last.pop_front();
    }
  }
  close(c->out);
}

pid_t start_node(const std::string& exe, const std::string& config, Child& c) {
  int fds[2];
  if (pipe2(fds, O_CLOEXEC) != 0) throw Error(ErrorCode::io, std::string("pipe: ") + std::strerror(errno));
  const pid_t launcher = getpid();
  const pid_t pid = fork();
  if (pid < 0) throw Error(ErrorCode::io, std::string("fork: ") + std::strerror(errno));
  if (pid == 0) {
    dup2(fds[1], STDOUT_FILENO);
    dup2(fds[1], STDERR_FILENO);
    close(fds[0]);
    close(fds[1]);
    // Signals stay with the launcher: it stops its nodes itself, one by one. A launcher that
    // dies without stopping them (SIGKILL, a second signal) still takes them with it: the
    // kernel sends each a SIGTERM, and it drains and leaves.
    setpgid(0, 0);
    prctl(PR_SET_PDEATHSIG, SIGTERM);
    if (getppid() != launcher) _exit(1);  // it died before the line above
    execl(exe.c_str(), exe.c_str(), "node", "--config", config.c_str(), "--name", c.name.c_str(), static_cast<char*>(nullptr));
    std::fprintf(stderr, "exec %s: %s\n", exe.c_str(), std::strerror(errno));
    _exit(127);
  }
  close(fds[1]);
  c.pid = pid;
  c.out = fds[0];
  return pid;
}

std::string describe_exit(int status) {
  if (WIFEXITED(status)) return "exited with status " + std::to_string(WEXITSTATUS(status));
  if (WIFSIGNALED(status)) return std::string("was killed by ") + strsignal(WTERMSIG(status));
  return "ended";
}

void reap(std::vector<std::unique_ptr<Child>>& children) {
  for (auto& c : children) {
    if (c->exited) continue;
    int status = 0;
    if (waitpid(c->pid, &status, WNOHANG) == c->pid) {
      c->exited = true;
      c->status = status;
    }
  }
}

void stop_all(std::vector<std::unique_ptr<Child>>& children, std::chrono::seconds grace) {
  for (auto& c : children)
    if (!c->exited) kill(c->pid, SIGTERM);
  const auto until = std::chrono::steady_clock::now() + grace;
  while (std::chrono::steady_clock::now() < until) {
    reap(children);
    if (std::all_of(children.begin(), children.end(), [](auto& c) { return c->exited; })) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  for (auto& c : children)
    if (!c->exited) {
      kill(c->pid, SIGKILL);
      waitpid(c->pid, &c->status, 0);
      c->exited = true;
    }
  for (auto& c : children)
    if (c->reader.joinable()) c->reader.join();
  for (auto& c : children)
    if (c->log) std::fclose(c->log);
}

int run_launch(const LaunchArgs& a) {
  const ClusterConfig config = load_config(a.config);
  const std::set<std::string> local = local_addresses();
  std::vector<const NodeConfig*> mine;
  for (const NodeConfig& n : config.nodes) {
    plan_node(config, a.config, n.name);  // the config's errors, before anything starts
    if (is_local(n, local)) mine.push_back(&n);
  }
  if (mine.empty())
    throw Error(ErrorCode::invalid_argument, a.config + ": no node's host is this machine: start each with celer node --config " +
                                                 a.config + " --name NAME on its own machine");
  if (!a.log_dir.empty()) std::filesystem::create_directories(a.log_dir);
  const std::string exe = std::filesystem::read_symlink("/proc/self/exe").string();

  // The nodes drain when stopped: the launcher waits for that, and a little more.
  const auto node_grace = std::chrono::duration_cast<std::chrono::seconds>(config.cluster.drain_timeout) + std::chrono::seconds(15);
  StopSignals signals(node_grace + std::chrono::seconds(10));
  std::vector<std::unique_ptr<Child>> children;
  for (const NodeConfig* n : mine) {
    auto c = std::make_unique<Child>();
    c->name = n->name;
    if (!a.log_dir.empty()) {
      const std::string path = a.log_dir + "/" + n->name + ".log";
      c->log = std::fopen(path.c_str(), "w");
      if (!c->log) throw Error(ErrorCode::io, "cannot write " + path + ": " + std::strerror(errno));
    }
    start_node(exe, a.config, *c);
    c->reader = std::thread(read_output, c.get(), "celer: node " + n->name + " ready");
    children.push_back(std::move(c));
  }
  std::printf("celer: launched %zu node%s of %s%s%s\n", children.size(), children.size() == 1 ? "" : "s", a.config.c_str(),
              a.log_dir.empty() ? "" : "; logs in ", a.log_dir.c_str());
  std::fflush(stdout);

  // Up: every node said it is ready, then the router sees every replica.
  auto failure = [&]() -> std::string {
    reap(children);
    for (auto& c : children)
      if (c->exited) {
        std::lock_guard lock(g_print);
        std::string why = "node " + c->name + " " + describe_exit(c->status);
        if (!c->last.empty()) why += ": " + c->last.back();
        return why;
      }
    return "";
  };
  const auto until = std::chrono::steady_clock::now() + std::chrono::milliseconds(a.ready_timeout_ms);
  std::string problem;
  while (problem.empty()) {
    problem = failure();
    if (!problem.empty()) break;
    bool all = true;
    for (auto& c : children) {
      std::lock_guard lock(g_print);
      all = all && c->ready;
    }
    if (all) break;
    if (std::chrono::steady_clock::now() > until) problem = "the nodes were not ready within the timeout";
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  nlohmann::json status;
  if (problem.empty()) {
    const NodeConfig& entry = *mine.front();
    const NodeCredentials credentials = node_credentials(config.cluster);
    while (problem.empty()) {
      try {
        status = fetch_status(entry.host == "0.0.0.0" ? "127.0.0.1" : entry.host, entry.port, credentials, std::chrono::seconds(5));
        bool all_up = true;
        for (const auto& r : status["replicas"]) all_up = all_up && r.value("up", false);
        if (all_up) break;
      } catch (const Error& e) {
        if (std::chrono::steady_clock::now() > until) problem = e.what();
      }
      if (problem.empty()) problem = failure();
      if (problem.empty() && std::chrono::steady_clock::now() > until) problem = "not every replica was up within the timeout";
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
  }
  if (!problem.empty()) {
    {
      std::lock_guard lock(g_print);
      std::fprintf(stderr, "error: %s\n", problem.c_str());
    }
    signals.exit_within("a failed launch");
    stop_all(children, std::chrono::seconds(10));
    return 1;
  }
  {
    std::lock_guard lock(g_print);
    std::printf("celer: cluster ready\n%s", format_status(status).c_str());
    std::fflush(stdout);
  }
  signals.serving();
  // Stay in the foreground until a signal, or until every node has ended on its own.
  std::atomic<bool> stopping{false};
  std::thread watcher([&] {
    while (!stopping) {
      reap(children);
      if (std::all_of(children.begin(), children.end(), [](auto& c) { return c->exited; })) {
        signals.wake();
        return;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
    }
  });
  const int sig = signals.wait();
  stopping = true;
  watcher.join();
  {
    std::lock_guard lock(g_print);
    std::printf("celer: stopping the cluster (%s)\n", sig ? signal_name(sig) : "every node ended");
    std::fflush(stdout);
  }
  stop_all(children, node_grace);
  return sig ? 0 : 1;
}

}  // namespace

Command add_launch(CLI::App& app) {
  auto a = std::make_shared<LaunchArgs>();
  CLI::App* c = app.add_subcommand("launch", "Start the nodes of a cluster config that run on this machine");
  c->add_option("config", a->config, "Cluster config (YAML) with nodes: and replicas:")->required();
  c->add_option("--log-dir", a->log_dir, "Write each node's output to DIR/NODE.log instead of this terminal");
  c->add_option("--ready-timeout", a->ready_timeout_ms, "Milliseconds the nodes have to come up")
      ->check(CLI::Range(int64_t{1000}, int64_t{3'600'000}));
  return [a] { return run_launch(*a); };
}

}  // namespace celer::cli
