#include "runtime/tensor_parallel.hpp"

#include <algorithm>
#include <cstring>
#include <string>
#include <thread>

#include "runtime/error.hpp"

#include "kernels/cpu_features.hpp"

namespace celer {
namespace {

// About 50 µs of spinning (as ThreadPool): ranks reach a barrier within microseconds of each
// other in a forward pass, and a condition-variable wake costs tens of microseconds, more than a
// small model's decode layer. Past that the waiter sleeps, so a stalled peer costs no CPU.
constexpr int kSpinIterations = 20000;
constexpr int kYieldEvery = 256;  // ~0.6 µs of pauses between yields

// Slices of the summed elements start on 16-float (64-byte) boundaries, so two ranks never write
// the same cache line in one call.
constexpr int64_t kSliceAlign = 16;

}  // namespace

// ---------------------------------------------------------------------------------------------
// LocalAllReduceGroup

class LocalAllReduceGroup::Rank final : public AllReduce {
 public:
  Rank(LocalAllReduceGroup& group, int rank) : group_(group), rank_(rank) {}
  int rank() const override { return rank_; }
  int size() const override { return group_.size_; }
  void sum(float* data, int64_t n) override {
    const auto start = std::chrono::steady_clock::now();
    group_.sum(rank_, data, n);
    count_call(start);
  }

 private:
  LocalAllReduceGroup& group_;
  int rank_;
};

LocalAllReduceGroup::LocalAllReduceGroup(int size) : size_(size) {
  if (size < 1) throw Error(ErrorCode::invalid_argument, "all-reduce group of " + std::to_string(size) + " ranks");
  buffers_.assign(size, nullptr);
  lengths_.assign(size, 0);
  ranks_.reserve(size);
  for (int i = 0; i < size; ++i) ranks_.push_back(std::make_unique<Rank>(*this, i));
}

LocalAllReduceGroup::~LocalAllReduceGroup() = default;

AllReduce& LocalAllReduceGroup::rank(int i) {
  if (i < 0 || i >= size_)
    throw Error(ErrorCode::invalid_argument,
                "rank " + std::to_string(i) + " of an all-reduce group of " + std::to_string(size_));
  return *ranks_[i];
}

void LocalAllReduceGroup::abort() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    aborted_.store(true);
  }
  wake_.notify_all();
}

void LocalAllReduceGroup::barrier() {
  uint64_t seen;
  {
    std::unique_lock<std::mutex> lock(mutex_);
    if (aborted_.load()) throw Error(ErrorCode::invalid_argument, "all-reduce group aborted");
    seen = generation_.load(std::memory_order_relaxed);
    if (++arrived_ == size_) {
      // The last one in: everyone's writes before their arrival happen-before this release.
      arrived_ = 0;
      generation_.store(seen + 1, std::memory_order_release);
      lock.unlock();
      wake_.notify_all();
      return;
    }
  }
  for (int spin = 0; spin < kSpinIterations; ++spin) {
    if (generation_.load(std::memory_order_acquire) != seen) return;
    if (aborted_.load(std::memory_order_relaxed)) break;
    // Now and then give the core away: with more runnable threads than cores, the peer we wait
    // for may be queued behind us, and a yield lets it run at once instead of after our slice.
    if (spin % kYieldEvery == kYieldEvery - 1) std::this_thread::yield();
    cpu_relax();
  }
  std::unique_lock<std::mutex> lock(mutex_);
  wake_.wait(lock, [&] { return generation_.load(std::memory_order_relaxed) != seen || aborted_.load(); });
  if (generation_.load(std::memory_order_relaxed) == seen)
    throw Error(ErrorCode::invalid_argument, "all-reduce group aborted");
}

void LocalAllReduceGroup::sum(int rank, float* data, int64_t n) {
  if (size_ == 1) return;
  buffers_[rank] = data;
  lengths_[rank] = n;
  barrier();
  for (int r = 0; r < size_; ++r)
    if (lengths_[r] != n) {
      // A peer would go on with another length: poison the group so every rank fails.
      abort();
      throw Error(ErrorCode::invalid_argument, "all-reduce: rank " + std::to_string(rank) + " sums " + std::to_string(n) +
                                                   " values but rank " + std::to_string(r) + " sums " +
                                                   std::to_string(lengths_[r]));
    }
  // This rank owns elements [lo, hi) of every buffer until the second barrier: nobody else
  // reads or writes them. Rank order, one element at a time: (b0 + b1) + b2 ...
  const int64_t slice = (n + size_ - 1) / size_ + kSliceAlign - 1;
  const int64_t step = slice / kSliceAlign * kSliceAlign;
  const int64_t lo = std::min<int64_t>(n, step * rank), hi = std::min<int64_t>(n, lo + step);
  if (hi > lo) {
    float* total = buffers_[0];
    for (int r = 1; r < size_; ++r) {
      const float* b = buffers_[r];
      for (int64_t i = lo; i < hi; ++i) total[i] += b[i];
    }
    for (int r = 1; r < size_; ++r) std::memcpy(buffers_[r] + lo, total + lo, (hi - lo) * sizeof(float));
  }
  barrier();
}

// ---------------------------------------------------------------------------------------------
// ModelShard

namespace {

std::string tp_text(int size) { return "tensor-parallel size " + std::to_string(size); }

void check_divides(int size, int n, const char* what, const char* key) {
  if (n % size != 0)
    throw Error(ErrorCode::unsupported, tp_text(size) + " does not divide the model's " + std::to_string(n) + " " +
                                            what + " (" + key + ")");
}

// Columns [first, first + n) of every row of w, gathered into `store` (a column slice of GGUF's
// row-major layout is not contiguous). Block types must be cut on block boundaries.
WeightMatrix columns_of(const WeightMatrix& w, int64_t first, int64_t n, const std::string& name, int size,
                        AlignedVector<uint8_t>& store) {
  const int64_t be = block_elems(w.type);
  if (n % be != 0 || first % be != 0)
    throw Error(ErrorCode::unsupported, tp_text(size) + " cuts tensor '" + name + "' (" + to_string(w.type) +
                                            ", " + std::to_string(w.cols) + " columns) into column slices of " +
                                            std::to_string(n) + ", not a multiple of its " + std::to_string(be) +
                                            "-element blocks");
  const int64_t offset = row_bytes(w.type, first), len = row_bytes(w.type, n);
  store.resize(static_cast<size_t>(len * w.rows));
  for (int64_t r = 0; r < w.rows; ++r) std::memcpy(store.data() + r * len, w.row(r) + offset, static_cast<size_t>(len));
  return {w.type, store.data(), w.rows, n};
}

std::vector<float> slice_of(const std::vector<float>& v, int64_t first, int64_t n) {
  if (v.empty()) return {};
  return std::vector<float>(v.begin() + first, v.begin() + first + n);
}

}  // namespace

ModelShard::ModelShard(const Model& model, int rank, int size) : model_(&model), rank_(rank), size_(size) {
  const ModelConfig& c = model.config();
  if (size < 1 || rank < 0 || rank >= size)
    throw Error(ErrorCode::invalid_argument, "tensor-parallel rank " + std::to_string(rank) + " of size " +
                                                 std::to_string(size) + " is out of range");
  check_divides(size, c.n_head, "attention heads", "head_count");
  check_divides(size, c.n_head_kv, "KV heads", "head_count_kv");
  check_divides(size, c.n_ff, "feed-forward rows", "feed_forward_length");
  n_head_ = c.n_head / size;
  n_head_kv_ = c.n_head_kv / size;
  n_ff_ = c.n_ff / size;
  if (size == 1) return;  // layers() returns the model's views

  const int64_t hd = c.head_dim;
  const int64_t q0 = int64_t{rank} * n_head_ * hd, qn = int64_t{n_head_} * hd;
  const int64_t kv0 = int64_t{rank} * n_head_kv_ * hd, kvn = int64_t{n_head_kv_} * hd;
  const int64_t f0 = int64_t{rank} * n_ff_, fn = n_ff_;
  const std::vector<LayerWeights>& src = model.layers();
  layers_.resize(src.size());
  owned_.resize(2 * src.size());
  for (size_t i = 0; i < src.size(); ++i) {
    const LayerWeights& s = src[i];
    LayerWeights& l = layers_[i];
    const std::string p = "blk." + std::to_string(i) + ".";
    l.attn_norm = s.attn_norm;
    l.ffn_norm = s.ffn_norm;
    l.wq = s.wq.rows_view(q0, qn);
    l.wk = s.wk.rows_view(kv0, kvn);
    l.wv = s.wv.rows_view(kv0, kvn);
    l.bq = slice_of(s.bq, q0, qn);
    l.bk = slice_of(s.bk, kv0, kvn);
    l.bv = slice_of(s.bv, kv0, kvn);
    l.wo = columns_of(s.wo, q0, qn, p + "attn_output.weight", size, owned_[2 * i]);
    l.w_gate = s.w_gate.rows_view(f0, fn);
    l.w_up = s.w_up.rows_view(f0, fn);
    l.w_down = columns_of(s.w_down, f0, fn, p + "ffn_down.weight", size, owned_[2 * i + 1]);
  }
}

uint64_t ModelShard::owned_bytes() const {
  uint64_t n = 0;
  for (const auto& o : owned_) n += o.size();
  return n;
}

}  // namespace celer
