#include "cluster/cli/stop_signals.hpp"

#include <pthread.h>
#include <unistd.h>

#include <atomic>
#include <condition_variable>
#include <csignal>
#include <mutex>
#include <string>
#include <thread>

namespace celer::cli {

struct StopSignals::State {
  std::chrono::milliseconds grace;
  std::mutex mu;
  std::condition_variable cv;
  bool serving = false;
  bool woken = false;
  int signal = 0;  // the first stop signal, once it came
  // When the process must be gone (steady clock, ns since epoch); 0: no deadline yet.
  std::atomic<int64_t> deadline_ns{0};
  std::string why;

  void set_deadline(const char* reason) {
    std::lock_guard lock(mu);
    if (deadline_ns != 0) return;
    why = reason;
    deadline_ns = (std::chrono::steady_clock::now() + grace).time_since_epoch().count();
  }
};

const char* signal_name(int sig) { return sig == SIGINT ? "SIGINT" : sig == SIGTERM ? "SIGTERM" : "a signal"; }

namespace {

sigset_t stop_set() {
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGINT);
  sigaddset(&set, SIGTERM);
  return set;
}

// Ends the process at once. write(2), not stdio: the thread being waited for may hold a stdio
// lock (it may be the reason the process is stuck), and an exit that waits for it is no exit.
[[noreturn]] void exit_now(const std::string& text, int code) {
  const std::string line = "celer: " + text + "\n";
  for (size_t off = 0; off < line.size();) {
    const ssize_t n = ::write(STDERR_FILENO, line.data() + off, line.size() - off);
    if (n <= 0) break;
    off += static_cast<size_t>(n);
  }
  _exit(code);
}

// Waits in slices, so that a deadline set by exit_within() is noticed without a signal.
void watch(std::shared_ptr<StopSignals::State> st) {
  const sigset_t set = stop_set();
  const timespec slice{0, 100'000'000};
  for (;;) {
    const int sig = sigtimedwait(&set, nullptr, &slice);
    const int64_t deadline = st->deadline_ns;
    if (sig < 0) {
      if (deadline != 0 && std::chrono::steady_clock::now().time_since_epoch().count() > deadline) {
        exit_now("still running " + std::to_string(st->grace.count()) + " ms after " + st->why + "; exiting now", 1);
      }
      continue;
    }
    std::unique_lock lock(st->mu);
    if (!st->serving) {
      exit_now(std::string(signal_name(sig)) + " before the server was up; exiting", 128 + sig);
    }
    if (st->signal != 0) {
      exit_now(std::string("a second stop signal (") + signal_name(sig) + "); exiting now", 1);
    }
    st->signal = sig;
    lock.unlock();
    st->set_deadline(signal_name(sig));
    st->cv.notify_all();
  }
}

}  // namespace

StopSignals::StopSignals(std::chrono::milliseconds grace) : state_(std::make_shared<State>()) {
  state_->grace = grace;
  const sigset_t set = stop_set();
  pthread_sigmask(SIG_BLOCK, &set, nullptr);
  std::thread(watch, state_).detach();  // lives as long as the process
}

// The watching thread stays: a signal during the rest of the process's exit still stops it.
StopSignals::~StopSignals() = default;

void StopSignals::serving() {
  std::lock_guard lock(state_->mu);
  state_->serving = true;
}

int StopSignals::wait() {
  std::unique_lock lock(state_->mu);
  state_->cv.wait(lock, [&] { return state_->signal != 0 || state_->woken; });
  return state_->signal;
}

void StopSignals::wake() {
  {
    std::lock_guard lock(state_->mu);
    state_->woken = true;
  }
  state_->cv.notify_all();
}

void StopSignals::exit_within(const char* why) { state_->set_deadline(why); }

}  // namespace celer::cli
