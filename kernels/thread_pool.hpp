// A persistent pool of worker threads for the kernels. The caller is thread 0 and works too.
// A forward pass hands the pool a hundred or more small jobs per token, so a job's start and
// end are signalled by spinning on atomics for a short while (a microsecond matters at decode)
// before falling back to sleeping on a condition variable.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <memory>
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

  // [0, n) as one contiguous run per thread, walked front to back: fn(i, thread, next) where
  // `next` is the index this thread expects to take after i (-1 if none), so that fn can fetch
  // its data ahead. A thread done with its run takes what is left of the others' runs, one
  // index at a time from their ends (then `next` is -1): the threads stay balanced to one item
  // while each still walks memory in order. n < 2^31. No allocation.
  template <typename F>
  void parallel_runs(int64_t n, F&& fn) {
    if (n <= 0) return;
    if (n_threads_ == 1) {
      for (int64_t i = 0; i < n; ++i) fn(i, 0, i + 1 < n ? i + 1 : int64_t{-1});
      return;
    }
    for (int t = 0; t < n_threads_; ++t) runs_[t].bounds.store(pack(n * t / n_threads_, n * (t + 1) / n_threads_));
    run([&](int thread) {
      for (int64_t i; (i = take_front(thread)) >= 0;) fn(i, thread, peek_front(thread));
      for (int k = 1; k < n_threads_; ++k)
        for (int64_t i; (i = take_back((thread + k) % n_threads_)) >= 0;) fn(i, thread, int64_t{-1});
    });
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
  // A thread's run for parallel_runs: [front, back) packed in one word, so that its owner taking
  // the front and another thread taking the back can never both take the last item.
  struct alignas(64) Run {
    std::atomic<uint64_t> bounds{0};
  };
  static uint64_t pack(int64_t front, int64_t back) { return static_cast<uint64_t>(back) << 32 | static_cast<uint64_t>(front); }
  int64_t take_front(int t) {
    uint64_t b = runs_[t].bounds.load(std::memory_order_relaxed);
    for (;;) {
      const int64_t front = static_cast<int64_t>(b & 0xffffffffu), back = static_cast<int64_t>(b >> 32);
      if (front >= back) return -1;
      if (runs_[t].bounds.compare_exchange_weak(b, pack(front + 1, back), std::memory_order_relaxed)) return front;
    }
  }
  int64_t take_back(int t) {
    uint64_t b = runs_[t].bounds.load(std::memory_order_relaxed);
    for (;;) {
      const int64_t front = static_cast<int64_t>(b & 0xffffffffu), back = static_cast<int64_t>(b >> 32);
      if (front >= back) return -1;
      if (runs_[t].bounds.compare_exchange_weak(b, pack(front, back - 1), std::memory_order_relaxed)) return back - 1;
    }
  }
  int64_t peek_front(int t) const {
    const uint64_t b = runs_[t].bounds.load(std::memory_order_relaxed);
    return (b & 0xffffffffu) < (b >> 32) ? static_cast<int64_t>(b & 0xffffffffu) : -1;
  }

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
  std::unique_ptr<Run[]> runs_;  // one per thread
};

}  // namespace celer
