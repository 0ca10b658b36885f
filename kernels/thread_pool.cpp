#include "kernels/thread_pool.hpp"

#include "kernels/cpu_features.hpp"

#include <chrono>
#include <thread>

namespace celer {
namespace {

// How a thread waits for a job or for the workers: it spins (PAUSE) for kSpin, then keeps
// checking between yields until kPoll has passed. Waking a sleeping thread costs 30-100 µs here
// (more in a VM), which a decode step pays at its first op whenever the gap since the last job
// outlasted the wait: the gap between two ops of a forward pass is a few µs, but between two
// steps the sampling, the scheduler's next plan and two actor messages take 100-300 µs. The
// yields keep a machine with more runnable threads than cores (a client, another engine, a
// test run in parallel) usable: the waiting thread gives its core to whoever needs it. PAUSE
// takes from 10 to 140 cycles depending on the CPU, so both phases are timed, not counted.
constexpr auto kSpin = std::chrono::microseconds(50);
constexpr auto kPoll = std::chrono::microseconds(1000);

// Waits until ready() or kPoll has passed; returns ready().
template <class Ready>
bool spin_until(Ready ready) {
  const auto start = std::chrono::steady_clock::now();
  for (;;) {
    for (int i = 0; i < 64; ++i) {
      if (ready()) return true;
      cpu_relax();
    }
    const auto waited = std::chrono::steady_clock::now() - start;
    if (waited >= kPoll) return ready();
    if (waited >= kSpin) std::this_thread::yield();
  }
}

}  // namespace

ThreadPool::ThreadPool(int n_threads) : n_threads_(n_threads < 1 ? 1 : n_threads), runs_(new Run[n_threads_]) {
  workers_.reserve(n_threads_ - 1);
  for (int i = 1; i < n_threads_; ++i) workers_.emplace_back([this, i] { worker(i); });
}

ThreadPool::~ThreadPool() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stop_.store(true);
    generation_.fetch_add(1);
  }
  wake_.notify_all();
  for (auto& t : workers_) t.join();
}

void ThreadPool::run_impl(void* ctx, Trampoline call) {
  if (n_threads_ == 1) {
    call(ctx, 0);
    return;
  }
  job_ctx_ = ctx;
  job_call_ = call;
  pending_.store(n_threads_ - 1, std::memory_order_relaxed);
  // Sequentially consistent on both sides (here and the worker's sleepers_ increment followed by
  // its generation_ check) so that a worker going to sleep and a new job cannot miss each other.
  // The increment also publishes job_ctx_/job_call_.
  generation_.fetch_add(1);
  if (sleepers_.load() > 0) {
    std::lock_guard<std::mutex> lock(mutex_);
    wake_.notify_all();
  }
  call(ctx, 0);
  // Wait for the workers: spin first (they are usually a few microseconds behind), then yield.
  // On a machine with more runnable threads than cores (a client, the actors) a worker may have
  // lost its core: spinning here would hold the core it needs for a whole time slice.
  if (spin_until([&] { return pending_.load(std::memory_order_acquire) == 0; })) return;
  while (pending_.load(std::memory_order_acquire) != 0) std::this_thread::yield();
}

void ThreadPool::worker(int index) {
  uint64_t seen = 0;
  for (;;) {
    uint64_t gen = seen;
    spin_until([&] { return (gen = generation_.load(std::memory_order_acquire)) != seen; });
    if (gen == seen) {
      std::unique_lock<std::mutex> lock(mutex_);
      sleepers_.fetch_add(1);
      wake_.wait(lock, [&] { return generation_.load() != seen; });
      sleepers_.fetch_sub(1);
      gen = generation_.load(std::memory_order_acquire);
    }
    seen = gen;
    if (stop_.load(std::memory_order_acquire)) return;
    job_call_(job_ctx_, index);
    pending_.fetch_sub(1, std::memory_order_acq_rel);
  }
}

}  // namespace celer
