// CPU tensor parallelism (Megatron-style, DESIGN.md §3): a replica's model split over tp ranks,
// each rank holding a 1/tp slice of the weights and of the KV memory and running the same
// forward step on its own thread. Per layer the ranks exchange partial sums twice: after the
// attention output projection and after the FFN down projection.
//
//   Q, K, V (and qwen2's biases)  split by rows: rank r has query heads [r*H/tp, (r+1)*H/tp) and
//                                  KV heads [r*Hkv/tp, (r+1)*Hkv/tp); zero-copy views
//   attn_output                   split by columns (its input: the rank's heads); gathered copy
//   ffn_gate, ffn_up               split by rows (n_ff/tp each); zero-copy views
//   ffn_down                       split by columns (its input: the rank's n_ff slice); gathered copy
//   norms, embeddings, output      whole on every rank
//
// A rank's attention output projection and down projection give a partial [T, n_embd] whose sum
// over ranks is the TP=1 result (up to float summation order); AllReduce::sum forms it.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <vector>

#include "kernels/aligned.hpp"
#include "runtime/model.hpp"

namespace celer {

// The collective a tensor-parallel engine is given (never a global): one handle per rank.
class AllReduce {
 public:
  virtual ~AllReduce() = default;
  virtual int rank() const = 0;
  virtual int size() const = 0;
  // Element-wise sum of data ([n]) over every rank of the group; on return every rank's data
  // holds the total, bit-identical on all ranks. Blocks until every rank has called with its own
  // buffer and the same n. Each rank calls from its own thread.
  virtual void sum(float* data, int64_t n) = 0;

  // What sum() has cost this rank so far: calls, and the time inside them (the exchange and the
  // wait for the slowest rank; the additions themselves are microseconds). Read on the rank's
  // own thread, between calls.
  struct Times {
    uint64_t calls = 0;
    uint64_t ns = 0;
  };
  Times times() const { return times_; }

 protected:
  void count_call(std::chrono::steady_clock::time_point since) {
    ++times_.calls;
    times_.ns += static_cast<uint64_t>(
        std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now() - since).count());
  }

 private:
  Times times_;
};

// An all-reduce for ranks that share one process (tests, a CPU replica on one node). Ranks
// rendezvous on a barrier (bounded spin, then a condition variable; generation counted), then
// each rank sums one slice of the elements over all ranks' buffers in rank order
// ((b0 + b1) + b2 ...) and writes the total back into every buffer; a second barrier ends the
// call. Every element is summed by one thread in one order, so all ranks hold the same bits,
// whatever the thread timing. Nothing is allocated after construction.
class LocalAllReduceGroup {
 public:
  explicit LocalAllReduceGroup(int size);  // size >= 1
  ~LocalAllReduceGroup();
  LocalAllReduceGroup(const LocalAllReduceGroup&) = delete;
  LocalAllReduceGroup& operator=(const LocalAllReduceGroup&) = delete;

  int size() const { return size_; }
  AllReduce& rank(int i);  // the handle of rank i, valid as long as the group
  // Wakes every rank waiting in sum() and makes it, and every later sum(), throw Error: one
  // rank that fails must not leave its peers blocked forever.
  void abort();

 private:
  class Rank;
  friend class Rank;
  void sum(int rank, float* data, int64_t n);
  void barrier();  // throws once aborted

  int size_;
  std::vector<std::unique_ptr<Rank>> ranks_;
  std::vector<float*> buffers_;   // [size]: each rank's buffer of the current call
  std::vector<int64_t> lengths_;  // [size]: and its n
  std::mutex mutex_;
  std::condition_variable wake_;
  int arrived_ = 0;                      // under mutex_
  std::atomic<uint64_t> generation_{0};  // barriers completed; written under mutex_
  std::atomic<bool> aborted_{false};
};

// One rank's view of a model: the sliced weights its engine multiplies by. With size 1 it is the
// model's own views (no copy, no extra indirection in the forward pass).
class ModelShard {
 public:
  // Throws Error(unsupported) naming what tp does not divide (heads, KV heads, n_ff) or the
  // tensor whose block type cannot be cut at the slice boundary; Error(invalid_argument) for a
  // rank outside [0, size).
  ModelShard(const Model& model, int rank, int size);

  int rank() const { return rank_; }
  int size() const { return size_; }
  int n_head() const { return n_head_; }        // this rank's query heads
  int n_head_kv() const { return n_head_kv_; }  // this rank's KV heads (its KV cache holds these)
  int n_ff() const { return n_ff_; }            // this rank's slice of the FFN
  const std::vector<LayerWeights>& layers() const { return size_ == 1 ? model_->layers() : layers_; }
  // Bytes of the column slices gathered into owned memory (0 with size 1).
  uint64_t owned_bytes() const;

 private:
  const Model* model_;
  int rank_, size_;
  int n_head_, n_head_kv_, n_ff_;
  std::vector<LayerWeights> layers_;                 // size > 1 only
  std::vector<AlignedVector<uint8_t>> owned_;        // gathered attn_output and ffn_down slices
};

}  // namespace celer
