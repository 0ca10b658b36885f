// SIGINT and SIGTERM for a command that serves: they always stop the process, whatever state it
// is in. A thread of its own waits for them (both are blocked in every other thread, which
// inherit the mask), so a main thread busy loading a model or stuck in a destructor cannot
// miss one.
//
// - Before serving() a signal ends the process at once: there is nothing to drain.
// - While serving, the first signal wakes wait(); the main thread then stops the server
//   gracefully. If the process has not exited `grace` later, or a second signal comes, it
//   exits at once (status 1), saying so.
// - exit_within() bounds a stop that is not a signal's (a failure being cleaned up) the same way.
#pragma once

#include <chrono>
#include <memory>

namespace celer::cli {

class StopSignals {
 public:
  // Call before any thread is started.
  explicit StopSignals(std::chrono::milliseconds grace);
  ~StopSignals();
  StopSignals(const StopSignals&) = delete;
  StopSignals& operator=(const StopSignals&) = delete;

  void serving();
  // Blocks until a stop signal (returns its number) or wake() (returns 0).
  int wait();
  void wake();
  // From now on the process has `grace` left to exit.
  void exit_within(const char* why);

  struct State;

 private:
  std::shared_ptr<State> state_;
};

const char* signal_name(int sig);

}  // namespace celer::cli
