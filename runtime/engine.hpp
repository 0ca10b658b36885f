// The model engine: one batched forward step over several sequences, each bringing some new
// tokens (a prompt chunk in prefill, one sampled token in decode) on top of the positions it
// already has in the paged KV cache. The caller (a CLI loop, later a shard actor) owns the
// block tables; the engine owns the weights' views, the KV memory, the thread pool and every
// scratch buffer, all sized at construction so a step allocates nothing.
//
// Tensor parallel (tensor_parallel.hpp): with tp_size > 1 the engine is one rank of a group. It
// multiplies by its ModelShard's slices, keeps only its KV heads, and sums the partial outputs
// of the attention output and FFN down projections with its peers through the injected
// AllReduce. Every rank of a group must run forward() with the same batch, each on its own
// thread, at the same time; they then produce the same logits bit for bit.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <vector>

#include "kernels/matmul.hpp"
#include "kernels/thread_pool.hpp"
#include "runtime/kv_cache.hpp"
#include "runtime/model.hpp"
#include "runtime/tensor_parallel.hpp"

namespace celer {

struct EngineOptions {
  int n_threads = 2;
  int32_t n_kv_blocks = 0;        // 0: enough for max_seqs sequences of max_context positions
  int32_t max_context = 0;        // longest sequence; 0: the model's trained context
  int32_t max_batch_tokens = 512; // most new tokens in one step (all sequences together)
  int32_t max_seqs = 16;          // most sequences in one step
  Q8Activations q8 = Q8Activations::int8;  // how Q8_0 weights meet activations (see matmul.hpp)
  std::optional<TensorType> kv_type;       // KV cache elements, f32, f16 or q8_0; unset: default_kv_type
  // Tensor parallelism: this engine is rank tp_rank of tp_size. With tp_size > 1, all_reduce is
  // required (rank and size must match it) and must outlive the engine. n_kv_blocks counts the
  // same blocks on every rank; each rank's blocks hold only its KV heads.
  int tp_rank = 0;
  int tp_size = 1;
  AllReduce* all_reduce = nullptr;
};

// The KV cache's element type unless one is asked for: f32 for an F32 model, so that it matches
// float32 references exactly; f16 for any other (F16, BF16, Q8_0), as llama.cpp stores its cache.
TensorType default_kv_type(const Model& model);

// One sequence's share of a step.
struct SequenceInput {
  std::span<const TokenId> tokens;       // new tokens, at positions n_past, n_past + 1, ...
  int32_t n_past = 0;                    // positions already computed into the KV cache
  std::span<const int32_t> block_table;  // blocks covering at least n_past + tokens.size() positions
  bool want_logits = true;               // logits of the last new token
  // >= 0: the logits of every new token from this index on, in order (what perplexity scores);
  // want_logits is then ignored.
  int32_t logits_from = -1;
};

class Engine {
 public:
  Engine(const Model& model, const EngineOptions& options);

  const Model& model() const { return model_; }
  const ModelShard& shard() const { return shard_; }  // this rank's weights (the model's with tp_size 1)
  const EngineOptions& options() const { return opt_; }
  int32_t n_kv_blocks() const { return kv_.n_blocks(); }
  int block_size() const { return kKvBlock; }
  int32_t max_context() const { return opt_.max_context; }
  const VecKernels& kernels() const { return vk_; }
  // Bytes of weights one decode step of this shard reads, in the form its matmuls read them (the
  // packed copies where there are), plus one embedding row.
  uint64_t weight_bytes_per_token() const;
  ThreadPool& pool() { return pool_; }

  // Runs one step. Writes one row of n_vocab logits per sequence that wants them, in order, to
  // `logits` ([n_wanted, n_vocab]); with logits == nullptr the output matrix is skipped (a
  // tensor-parallel rank whose logits nobody reads). Validates everything first: a bad token id,
  // a missing block, a sequence past max_context or an oversized batch throws Error and leaves
  // the cache untouched (on every rank alike, before any all-reduce).
  void forward(std::span<const SequenceInput> batch, float* logits);
  // Copies every layer's K and V of one block into another (copy-on-write of a shared block).
  void copy_block(int32_t src, int32_t dst);

 private:
  void validate(std::span<const SequenceInput> batch) const;
  void attention_layer(int layer, std::span<const SequenceInput> batch, int64_t n_tokens);

  const Model& model_;
  EngineOptions opt_;
  ModelShard shard_;
  // The shard's weights as the matmuls see them: with int8 activations every Q8_0 matrix points
  // at its packed copy (packed_), and every 4- to 6-bit one at its own (packed_low_bit_), made
  // once here.
  std::vector<LayerWeights> layers_;
  WeightMatrix output_;
  std::vector<std::unique_ptr<PackedQ8>> packed_;
  std::vector<std::unique_ptr<PackedLowBit>> packed_low_bit_;
  AllReduce* all_reduce_;  // nullptr with tp_size 1
  const VecKernels& vk_;
  ThreadPool pool_;
  MatmulScratch mm_;
  KvCache kv_;
  // Scratch, [max_batch_tokens, ...] each; heads and n_ff are this rank's.
  AlignedVector<float> x_, xn_, q_, k_, v_, att_, tmp_, gate_, up_, cos_sin_;
  std::vector<int32_t> tok_seq_, tok_pos_;  // which sequence and position each token is
  std::vector<int32_t> logit_rows_;         // token rows whose logits are wanted
  std::vector<AlignedVector<float>> scores_;  // per thread: [kAttnHeads * kAttnRows, scores_stride_]
  int64_t scores_stride_ = 0;                 // max_context rounded up to a block
  struct AttentionRun {
    int32_t first;  // token row
    int count;      // consecutive tokens of one sequence, <= kAttnRows
  };
  std::vector<AttentionRun> tasks_;
};

}  // namespace celer
