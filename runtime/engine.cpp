#include "runtime/engine.hpp"

#include <algorithm>
#include <cmath>

#include "kernels/attention.hpp"
#include "kernels/ops.hpp"
#include "runtime/error.hpp"

namespace celer {
namespace {

EngineOptions resolve(const Model& m, EngineOptions o) {
  const ModelConfig& c = m.config();
  if (o.n_threads < 1) o.n_threads = 1;
  if (o.max_context <= 0) o.max_context = c.n_ctx_train;
  if (o.max_batch_tokens < 1) throw Error(ErrorCode::invalid_argument, "max_batch_tokens must be positive");
  if (o.max_seqs < 1) throw Error(ErrorCode::invalid_argument, "max_seqs must be positive");
  if (!o.kv_type) o.kv_type = default_kv_type(m);
  if (o.n_kv_blocks <= 0) o.n_kv_blocks = (o.max_context + kKvBlock - 1) / kKvBlock * o.max_seqs;
  if (o.tp_size < 1 || o.tp_rank < 0 || o.tp_rank >= o.tp_size)
    throw Error(ErrorCode::invalid_argument, "tensor-parallel rank " + std::to_string(o.tp_rank) + " of size " +
                                                 std::to_string(o.tp_size) + " is out of range");
  if (o.tp_size > 1) {
    if (!o.all_reduce)
      throw Error(ErrorCode::invalid_argument,
                  "tensor-parallel size " + std::to_string(o.tp_size) + " needs an all-reduce (EngineOptions::all_reduce)");
    if (o.all_reduce->size() != o.tp_size || o.all_reduce->rank() != o.tp_rank)
      throw Error(ErrorCode::invalid_argument, "the all-reduce handle is rank " + std::to_string(o.all_reduce->rank()) +
                                                   " of " + std::to_string(o.all_reduce->size()) + ", the engine rank " +
                                                   std::to_string(o.tp_rank) + " of " + std::to_string(o.tp_size));
  }
  return o;
}

void add_bias(float* y, const std::vector<float>& b, int64_t rows) {
  if (b.empty()) return;
  const int64_t n = static_cast<int64_t>(b.size());
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t i = 0; i < n; ++i) y[r * n + i] += b[i];
}

}  // namespace

TensorType default_kv_type(const Model& model) {
  return model.main_type() == TensorType::f32 ? TensorType::f32 : TensorType::f16;
}

Engine::Engine(const Model& model, const EngineOptions& options)
    : model_(model),
      opt_(resolve(model, options)),
      shard_(model, opt_.tp_rank, opt_.tp_size),
      layers_(shard_.layers()),
      output_(model.output()),
      all_reduce_(opt_.tp_size > 1 ? opt_.all_reduce : nullptr),
      vk_(vec_best()),
      pool_(opt_.n_threads),
      kv_(model.config().n_layer, shard_.n_head_kv(), model.config().head_dim, opt_.n_kv_blocks, *opt_.kv_type) {
  const ModelConfig& c = model.config();
  if (opt_.q8 == Q8Activations::int8) {
    auto pack = [&](WeightMatrix& w) {
      if (w.type == TensorType::q8_0) {
        packed_.push_back(std::make_unique<PackedQ8>(pack_q8_0(static_cast<const BlockQ8_0*>(w.data), w.rows, w.cols)));
        w.packed = packed_.back().get();
      } else if (packed_low_bits(w.type) != 0) {
        packed_low_bit_.push_back(std::make_unique<PackedLowBit>(pack_low_bit(w.type, w.data, w.rows, w.cols)));
        w.packed_low_bit = packed_low_bit_.back().get();
      }
    };
    for (LayerWeights& l : layers_)
      for (WeightMatrix* w : {&l.wq, &l.wk, &l.wv, &l.wo, &l.w_gate, &l.w_up, &l.w_down}) pack(*w);
    pack(output_);
  }
  const size_t T = opt_.max_batch_tokens;
  const size_t q_dim = size_t(shard_.n_head()) * c.head_dim, kv_dim = size_t(shard_.n_head_kv()) * c.head_dim;
  const int64_t n_ff = shard_.n_ff();
  x_.resize(T * c.n_embd);
  xn_.resize(T * c.n_embd);
  tmp_.resize(T * c.n_embd);
  q_.resize(T * q_dim);
  att_.resize(T * q_dim);
  k_.resize(T * kv_dim);
  v_.resize(T * kv_dim);
  gate_.resize(T * n_ff);
  up_.resize(T * n_ff);
  cos_sin_.resize(T * c.n_rot);
  tok_seq_.resize(T);
  tok_pos_.resize(T);
  logit_rows_.reserve(T);
  scores_.resize(opt_.n_threads);
  scores_stride_ = (opt_.max_context + kKvBlock - 1) / kKvBlock * kKvBlock;
  for (auto& s : scores_) s.resize(static_cast<size_t>(kAttnHeads) * kAttnRows * scores_stride_);
  tasks_.reserve(T);
  const int64_t max_cols = std::max<int64_t>({c.n_embd, n_ff, int64_t(q_dim)});
  mm_.reserve(opt_.n_threads, T, max_cols);
}

uint64_t Engine::weight_bytes_per_token() const {
  auto bytes = [](const WeightMatrix& w) -> uint64_t {
    if (w.packed) return static_cast<uint64_t>(w.packed->data.size());
    if (w.packed_low_bit) return static_cast<uint64_t>(w.packed_low_bit->data.size());
    return static_cast<uint64_t>(row_bytes(w.type, w.cols)) * w.rows;
  };
  const WeightMatrix& embd = model_.token_embd();
  uint64_t total = bytes(output_) + row_bytes(embd.type, embd.cols);
  for (const LayerWeights& l : layers_)
    total += bytes(l.wq) + bytes(l.wk) + bytes(l.wv) + bytes(l.wo) + bytes(l.w_gate) + bytes(l.w_up) + bytes(l.w_down);
  return total;
}

void Engine::validate(std::span<const SequenceInput> batch) const {
  if (batch.empty()) throw Error(ErrorCode::invalid_argument, "empty batch");
  if (batch.size() > static_cast<size_t>(opt_.max_seqs))
    throw Error(ErrorCode::invalid_argument, "batch of " + std::to_string(batch.size()) + " sequences exceeds max_seqs " +
                                                 std::to_string(opt_.max_seqs));
  int64_t total = 0;
  const int bs = kKvBlock;
  for (size_t s = 0; s < batch.size(); ++s) {
    const SequenceInput& in = batch[s];
    if (in.tokens.empty()) throw Error(ErrorCode::invalid_argument, "sequence " + std::to_string(s) + " has no new tokens");
    if (in.logits_from >= static_cast<int32_t>(in.tokens.size()))
      throw Error(ErrorCode::invalid_argument, "sequence " + std::to_string(s) + " wants logits from token " +
                                                   std::to_string(in.logits_from) + " of " + std::to_string(in.tokens.size()));
    total += static_cast<int64_t>(in.tokens.size());
    const int64_t end = int64_t{in.n_past} + static_cast<int64_t>(in.tokens.size());
    if (in.n_past < 0 || end > opt_.max_context)
      throw Error(ErrorCode::context_overflow, "sequence " + std::to_string(s) + " would reach " + std::to_string(end) +
                                                   " positions, past the context of " + std::to_string(opt_.max_context));
    if (static_cast<int64_t>(in.block_table.size()) * bs < end)
      throw Error(ErrorCode::invalid_argument, "sequence " + std::to_string(s) + "'s block table covers " +
                                                   std::to_string(in.block_table.size() * bs) + " positions, needs " +
                                                   std::to_string(end));
    for (int64_t j = 0; j < (end + bs - 1) / bs; ++j)
      if (in.block_table[j] < 0 || in.block_table[j] >= kv_.n_blocks())
        throw Error(ErrorCode::invalid_argument, "sequence " + std::to_string(s) + " names KV block " +
                                                     std::to_string(in.block_table[j]) + " of " +
                                                     std::to_string(kv_.n_blocks()));
    for (TokenId t : in.tokens)
      if (t < 0 || t >= model_.config().n_vocab)
        throw Error(ErrorCode::invalid_argument, "token id " + std::to_string(t) + " is outside the vocabulary of " +
                                                     std::to_string(model_.config().n_vocab));
  }
  if (total > opt_.max_batch_tokens)
    throw Error(ErrorCode::invalid_argument, "batch of " + std::to_string(total) + " tokens exceeds max_batch_tokens " +
                                                 std::to_string(opt_.max_batch_tokens));
}

void Engine::forward(std::span<const SequenceInput> batch, float* logits) {
  validate(batch);
  const ModelConfig& c = model_.config();
  const int64_t d = c.n_embd;
  const int64_t n_ff = shard_.n_ff();

  // Token rows: sequence by sequence, in order.
  int64_t T = 0;
  logit_rows_.clear();
  for (size_t s = 0; s < batch.size(); ++s) {
    for (size_t i = 0; i < batch[s].tokens.size(); ++i, ++T) {
      tok_seq_[T] = static_cast<int32_t>(s);
      tok_pos_[T] = batch[s].n_past + static_cast<int32_t>(i);
    }
    const int64_t n = static_cast<int64_t>(batch[s].tokens.size());
    if (batch[s].logits_from >= 0) {
      for (int64_t i = batch[s].logits_from; i < n; ++i) logit_rows_.push_back(static_cast<int32_t>(T - n + i));
    } else if (batch[s].want_logits) {
      logit_rows_.push_back(static_cast<int32_t>(T - 1));
    }
  }

  pool_.parallel_for(T, 4, [&](int64_t t0, int64_t t1, int) {
    for (int64_t t = t0; t < t1; ++t) {
      const SequenceInput& in = batch[tok_seq_[t]];
      const TokenId id = in.tokens[tok_pos_[t] - in.n_past];
      row_to_f32(vk_, model_.token_embd().type, model_.token_embd().row(id), x_.data() + t * d, d);
      rope_angles(tok_pos_[t], c.n_rot, c.rope_freq_base, cos_sin_.data() + t * c.n_rot);
    }
  });

  for (int il = 0; il < c.n_layer; ++il) {
    const LayerWeights& l = layers_[il];
    pool_.parallel_for(T, 8, [&](int64_t t0, int64_t t1, int) {
      for (int64_t t = t0; t < t1; ++t) rmsnorm(vk_, x_.data() + t * d, l.attn_norm.data(), c.rms_eps, d, xn_.data() + t * d);
    });
    attention_layer(il, batch, T);
    matmul(pool_, vk_, mm_, l.wo, att_.data(), T, tmp_.data(), opt_.q8);
    if (all_reduce_) all_reduce_->sum(tmp_.data(), T * d);  // partial over this rank's heads
    pool_.parallel_for(T, 8, [&](int64_t t0, int64_t t1, int) {
      for (int64_t t = t0; t < t1; ++t) {
        float* x = x_.data() + t * d;
        const float* o = tmp_.data() + t * d;
        for (int64_t i = 0; i < d; ++i) x[i] += o[i];
        rmsnorm(vk_, x, l.ffn_norm.data(), c.rms_eps, d, xn_.data() + t * d);
      }
    });
    const WeightMatrix* gate_up[] = {&l.w_gate, &l.w_up};
    float* const gate_up_out[] = {gate_.data(), up_.data()};
    matmul_shared_input(pool_, vk_, mm_, gate_up, xn_.data(), T, gate_up_out, opt_.q8);
    pool_.parallel_for(T, 4, [&](int64_t t0, int64_t t1, int) {
      vk_.silu_mul(gate_.data() + t0 * n_ff, up_.data() + t0 * n_ff, gate_.data() + t0 * n_ff, (t1 - t0) * n_ff);
    });
    matmul(pool_, vk_, mm_, l.w_down, gate_.data(), T, tmp_.data(), opt_.q8);
    if (all_reduce_) all_reduce_->sum(tmp_.data(), T * d);  // partial over this rank's n_ff slice
    pool_.parallel_for(T, 8, [&](int64_t t0, int64_t t1, int) {
      for (int64_t i = t0 * d; i < t1 * d; ++i) x_[i] += tmp_[i];
    });
  }

  // Only the rows whose logits are wanted go through the final norm and the output matrix.
  const int64_t n_out = static_cast<int64_t>(logit_rows_.size());
  if (n_out == 0 || logits == nullptr) return;
  for (int64_t r = 0; r < n_out; ++r)
    rmsnorm(vk_, x_.data() + logit_rows_[r] * d, model_.output_norm().data(), c.rms_eps, d, xn_.data() + r * d);
  matmul(pool_, vk_, mm_, output_, xn_.data(), n_out, logits, opt_.q8);
}

void Engine::copy_block(int32_t src, int32_t dst) {
  if (src < 0 || dst < 0 || src >= kv_.n_blocks() || dst >= kv_.n_blocks())
    throw Error(ErrorCode::invalid_argument, "block copy " + std::to_string(src) + " -> " + std::to_string(dst) +
                                                 " names a block outside the cache of " + std::to_string(kv_.n_blocks()));
  kv_.copy_block(src, dst);
}

void Engine::attention_layer(int il, std::span<const SequenceInput> batch, int64_t T) {
  const ModelConfig& c = model_.config();
  const LayerWeights& l = layers_[il];
  const int hd = c.head_dim;
  // This rank's heads: query head h (local) reads local KV head h / group, as globally.
  const int n_head = shard_.n_head(), n_head_kv = shard_.n_head_kv();
  const int64_t q_dim = int64_t{n_head} * hd, kv_dim = int64_t{n_head_kv} * hd;
  const WeightMatrix* qkv[] = {&l.wq, &l.wk, &l.wv};
  float* const qkv_out[] = {q_.data(), k_.data(), v_.data()};
  matmul_shared_input(pool_, vk_, mm_, qkv, xn_.data(), T, qkv_out, opt_.q8);
  add_bias(q_.data(), l.bq, T);
  add_bias(k_.data(), l.bk, T);
  add_bias(v_.data(), l.bv, T);

  // RoPE, then K and V of every new token into its sequence's blocks.
  const KvLayerView& kv = kv_.layer(il);
  const int bs = kKvBlock;
  // Head by head, not token by token: K is stored transposed, so the 16 slots of a block share
  // its cache lines, and two threads storing neighbouring tokens would pass those lines back and
  // forth on every store (this loop took 7% of a prefill step that way).
  pool_.parallel_for(n_head, 1, [&](int64_t h0, int64_t h1, int) {
    for (int64_t h = h0; h < h1; ++h)
      for (int64_t t = 0; t < T; ++t) {
        const float* cs = cos_sin_.data() + t * c.n_rot;
        rope_apply(q_.data() + t * q_dim + h * hd, c.n_rot, cs, c.rope_style);
        if (h >= n_head_kv) continue;
        const int32_t pos = tok_pos_[t];
        float* k = k_.data() + t * kv_dim + h * hd;
        rope_apply(k, c.n_rot, cs, c.rope_style);
        kv_store(vk_, kv, batch[tok_seq_[t]].block_table[pos / bs], static_cast<int>(h), pos % bs, k,
                 v_.data() + t * kv_dim + h * hd);
      }
  });

  // Runs of up to kAttnRows consecutive tokens of one sequence attend together, kAttnHeads heads
  // at a time.
  // tasks_ lists the runs: (first token row, count).
  tasks_.clear();
  for (int64_t t = 0; t < T;) {
    int n = 1;
    while (n < kAttnRows && t + n < T && tok_seq_[t + n] == tok_seq_[t]) ++n;
    tasks_.push_back({static_cast<int32_t>(t), n});
    t += n;
  }
  const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
  const int group = n_head / n_head_kv;
  // A task: one run and up to kAttnHeads consecutive query heads, walked block by block. With
  // few runs (a single decoding sequence) that would leave too few tasks to share the work
  // evenly, so then a task is one head.
  const int64_t n_runs = static_cast<int64_t>(tasks_.size());
  const int heads_per_task = n_runs * ((n_head + kAttnHeads - 1) / kAttnHeads) >= 4 * pool_.size() ? kAttnHeads : 1;
  const int64_t head_groups = (n_head + heads_per_task - 1) / heads_per_task;
  const int64_t n_tasks = n_runs * head_groups;
  pool_.parallel_for(n_tasks, 1, [&](int64_t i0, int64_t i1, int thread) {
    for (int64_t i = i0; i < i1; ++i) {
      const AttentionRun& run = tasks_[i / head_groups];
      const int h0 = static_cast<int>(i % head_groups) * heads_per_task;
      const SequenceInput& in = batch[tok_seq_[run.first]];
      attend(vk_, q_.data() + run.first * q_dim + h0 * hd, q_dim, run.count, kv, h0, std::min(heads_per_task, n_head - h0),
             group, in.block_table.data(), tok_pos_[run.first] + 1, scale, scores_[thread].data(), scores_stride_,
             att_.data() + run.first * q_dim + h0 * hd, q_dim);
    }
  });
}

}  // namespace celer
