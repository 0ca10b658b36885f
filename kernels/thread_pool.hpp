// A persistent pool of worker threads for the kernels. The caller is thread 0 and works too.
// A forward pass hands the pool a hundred or more small jobs per token, so a job's start and
// end are signalled by spinning on atomics for a short while (a microsecond matters at decode)
// before falling back to sleeping on a condition variable.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <thread>
#include <vector>

namespace celer {

class ThreadPool {
 public:
  explicit ThreadPool(int n_threads);  // total threads, the caller included; at least 1
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int size() const { return n_threads_; }

  // Runs fn(thread_index) once on every thread and returns when all are done. No allocation.
  template <typename F>
  void run(F&& fn) {
    run_impl(&fn, [](void* ctx, int thread) { (*static_cast<F*>(ctx))(thread); });
  }

  // Splits [0, n) into chunks of `grain` handed out dynamically; calls fn(begin, end, thread).
  template <typename F>
  void parallel_for(int64_t n, int64_t grain, F&& fn) {
    if (n <= 0) return;
    if (grain < 1) grain = 1;
    if (n_threads_ == 1 || n <= grain) {
      fn(int64_t{0}, n, 0);
      return;
    }
    std::atomic<int64_t> next{0};
    run([&](int thread) {
      for (;;) {
        const int64_t begin = next.fetch_add(grain, std::memory_order_relaxed);
        if (begin >= n) break;
        fn(begin, begin + grain < n ? begin + grain : n, thread);
      }
    });
  }

 private:
  using Trampoline = void (*)(void*, int);
  void run_impl(void* ctx, Trampoline call);
  void worker(int index);

  int n_threads_;
  std::vector<std::thread> workers_;
  // A job is published by bumping generation_; workers run it and decrement pending_.
  std::atomic<uint64_t> generation_{0};
  std::atomic<int> pending_{0};
  std::atomic<bool> stop_{false};
  std::atomic<int> sleepers_{0};
  void* job_ctx_ = nullptr;
  Trampoline job_call_ = nullptr;
  std::mutex mutex_;
  std::condition_variable wake_;
};

}  // namespace celer
