#include "runtime/model_maker.hpp"

#include <cmath>
#include <vector>

#include "runtime/error.hpp"
#include "runtime/gguf.hpp"
#include "runtime/gguf_writer.hpp"

namespace celer {
namespace {

// splitmix64: fast, seedable, and good enough for weights nobody will train.
class Random {
 public:
  explicit Random(uint64_t seed) : s_(seed) {}
  uint64_t next() {
    uint64_t z = (s_ += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
  }
  // Uniform in [-a, a).
  float uniform(float a) { return (static_cast<float>(next() >> 40) * (1.0f / 16777216.0f) * 2.0f - 1.0f) * a; }

 private:
  uint64_t s_;
};

// GLM's tokenizer as llama.cpp's converter writes it, on top of the copied vocabulary: its
// special tokens appended where the vocabulary lacks them (as control tokens), no BOS added,
// <|endoftext|> as EOS and <|user|> as end of turn, and a chat template of its family. A byte-level
// BPE vocabulary becomes GLM-4's (pre-tokenizer chatglm-bpe), a SentencePiece one ChatGLM3's.
// Returns the vocabulary's size.
int64_t write_glm_tokenizer(const GgufFile& vocab, GgufWriter& w) {
  GgufValue tokens = vocab.get_array("tokenizer.ggml.tokens", GgufType::string);
  const GgufValue* types = vocab.find("tokenizer.ggml.token_type");
  const GgufValue* scores = vocab.find("tokenizer.ggml.scores");
  GgufValue new_types = types ? *types : GgufValue{GgufType::array, {}, GgufType::i32, {}};
  if (!types) new_types.array.assign(tokens.array.size(), GgufScalar(int32_t{1}));  // normal
  GgufValue new_scores = scores ? *scores : GgufValue{};
  auto id_of = [&](const std::string& text) -> uint32_t {
    for (size_t i = 0; i < tokens.array.size(); ++i)
      if (std::get<std::string>(tokens.array[i]) == text) return static_cast<uint32_t>(i);
    tokens.array.emplace_back(text);
    new_types.array.emplace_back(int32_t{3});  // control
    if (scores) new_scores.array.emplace_back(0.0f);
    return static_cast<uint32_t>(tokens.array.size() - 1);
  };
  for (const char* t : {"[gMASK]", "[sMASK]", "<sop>", "<eop>", "<|system|>", "<|assistant|>", "<|observation|>"}) id_of(t);
  const uint32_t eos = id_of("<|endoftext|>"), eot = id_of("<|user|>"), gmask = id_of("[gMASK]");
  w.set("tokenizer.ggml.tokens", tokens);
  w.set("tokenizer.ggml.token_type", new_types);
  if (scores) w.set("tokenizer.ggml.scores", new_scores);
  const bool bpe = vocab.get_string("tokenizer.ggml.model") == "gpt2";
  if (bpe) w.set_string("tokenizer.ggml.pre", "chatglm-bpe");
  w.set_u32("tokenizer.ggml.bos_token_id", gmask);
  w.set_u32("tokenizer.ggml.eos_token_id", eos);
  w.set_u32("tokenizer.ggml.eot_token_id", eot);
  w.set_bool("tokenizer.ggml.add_bos_token", false);
  w.set_string("tokenizer.chat_template",
               std::string(bpe ? "[gMASK]<sop>" : "[gMASK]sop") +
                   "{% for message in messages %}<|{{ message['role'] }}|>\n" + (bpe ? "" : " ") +
                   "{{ message['content'] }}{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}");
  return static_cast<int64_t>(tokens.array.size());
}

}  // namespace

void make_model(const ModelSpec& s, const std::string& out_path) {
  auto bad = [](const std::string& what) { throw Error(ErrorCode::invalid_argument, "make-model: " + what); };
  const bool glm = s.arch == "chatglm";
  if (s.arch != "llama" && s.arch != "qwen2" && !glm) bad("--arch must be llama, qwen2 or chatglm, not '" + s.arch + "'");
  if (s.dim <= 0 || s.layers <= 0 || s.heads <= 0 || s.kv_heads <= 0 || s.ffn <= 0 || s.context <= 0)
    bad("dimensions must be positive");
  if (s.dim % s.heads != 0) bad("--dim must be a multiple of --heads");
  if (s.heads % s.kv_heads != 0) bad("--heads must be a multiple of --kv-heads");
  if ((s.dim / s.heads) % 2 != 0) bad("the head size (dim / heads) must be even for RoPE");
  if (glm && (s.dim / s.heads) % 4 != 0) bad("the head size (dim / heads) must be a multiple of 4 for GLM's RoPE over half of it");
  const int64_t blk = block_elems(s.type);
  if (s.dim % blk != 0 || s.ffn % blk != 0)
    bad(std::string("--dim and --ffn must be multiples of ") + std::to_string(blk) + " for " + to_string(s.type));

  GgufFile vocab(s.vocab_path);
  const int head_dim = s.dim / s.heads;

  GgufWriter w;
  const std::string a = s.arch + ".";
  w.set_string("general.architecture", s.arch);
  w.set_string("general.name", "celer-random-" + s.arch + "-" + std::to_string(s.dim) + "x" + std::to_string(s.layers));
  // general.file_type as llama.cpp numbers it (its llama_ftype). Every matrix has the one type,
  // so a K-quant file is named after the preset closest to it (the _S one).
  const uint32_t ftype = [&]() -> uint32_t {
    switch (s.type) {
      case TensorType::f32: return 0;
      case TensorType::f16: return 1;
      case TensorType::q4_0: return 2;
      case TensorType::q4_1: return 3;
      case TensorType::q8_0: return 7;
      case TensorType::q5_0: return 8;
      case TensorType::q5_1: return 9;
      case TensorType::q2_k: return 10;  // (not written here: make-model refuses the type)
      case TensorType::q3_k: return 11;
      case TensorType::q4_k: return 14;  // Q4_K_S
      case TensorType::q5_k: return 16;  // Q5_K_S
      case TensorType::q6_k: return 18;
      case TensorType::bf16: return 32;
    }
    return 0;
  }();
  w.set_u32("general.file_type", ftype);
  w.set_u32(a + "context_length", s.context);
  w.set_u32(a + "embedding_length", s.dim);
  w.set_u32(a + "block_count", s.layers);
  w.set_u32(a + "feed_forward_length", s.ffn);
  w.set_u32(a + "attention.head_count", s.heads);
  w.set_u32(a + "attention.head_count_kv", s.kv_heads);
  // GLM rotates half of each head (and its norms' epsilon is GLM-4-9B's).
  w.set_u32(a + "rope.dimension_count", glm ? head_dim / 2 : head_dim);
  w.set_f32(a + "rope.freq_base", s.arch == "qwen2" ? 1000000.0f : 10000.0f);
  w.set_f32(a + "attention.layer_norm_rms_epsilon", glm ? 1.5625e-7f : 1e-5f);
  for (const auto& [key, value] : vocab.metadata())
    if (key.rfind("tokenizer.", 0) == 0) w.set(key, value);
  const int64_t n_vocab =
      glm ? write_glm_tokenizer(vocab, w)
          : static_cast<int64_t>(vocab.get_array("tokenizer.ggml.tokens", GgufType::string).array.size());

  Random rng(s.seed);
  std::vector<float> buf;
  // Weights ~ U(-a, a) with a = sqrt(3 / fan_in): unit-variance activations through each matrix,
  // so the logits stay finite and the softmaxes non-degenerate at any depth.
  auto matrix = [&](const std::string& name, int64_t cols, int64_t rows, TensorType type) {
    buf.resize(static_cast<size_t>(cols * rows));
    const float scale = std::sqrt(3.0f / static_cast<float>(cols));
    for (float& v : buf) v = rng.uniform(scale);
    w.add_tensor(name, type, {cols, rows}, encode_tensor(type, buf.data(), cols * rows));
  };
  auto vector = [&](const std::string& name, int64_t n, float center, float spread) {
    buf.resize(n);
    for (float& v : buf) v = center + rng.uniform(spread);
    w.add_tensor(name, TensorType::f32, {n}, encode_tensor(TensorType::f32, buf.data(), n));
  };

  const int64_t q_dim = s.dim, kv_dim = int64_t{s.kv_heads} * head_dim;
  matrix("token_embd.weight", s.dim, n_vocab, s.type);
  vector("output_norm.weight", s.dim, 1.0f, 0.1f);
  matrix("output.weight", s.dim, n_vocab, s.type);
  for (int i = 0; i < s.layers; ++i) {
    const std::string p = "blk." + std::to_string(i) + ".";
    vector(p + "attn_norm.weight", s.dim, 1.0f, 0.1f);
    if (glm) {  // fused as llama.cpp lays GLM out: Q, K, V rows in one matrix, gate and up in one
      matrix(p + "attn_qkv.weight", s.dim, q_dim + 2 * kv_dim, s.type);
      vector(p + "attn_qkv.bias", q_dim + 2 * kv_dim, 0.0f, 0.1f);
      matrix(p + "attn_output.weight", q_dim, s.dim, s.type);
      vector(p + "ffn_norm.weight", s.dim, 1.0f, 0.1f);
      matrix(p + "ffn_up.weight", s.dim, 2 * int64_t{s.ffn}, s.type);
      matrix(p + "ffn_down.weight", s.ffn, s.dim, s.type);
      continue;
    }
    matrix(p + "attn_q.weight", s.dim, q_dim, s.type);
    matrix(p + "attn_k.weight", s.dim, kv_dim, s.type);
    matrix(p + "attn_v.weight", s.dim, kv_dim, s.type);
    if (s.arch == "qwen2") {
      vector(p + "attn_q.bias", q_dim, 0.0f, 0.1f);
      vector(p + "attn_k.bias", kv_dim, 0.0f, 0.1f);
      vector(p + "attn_v.bias", kv_dim, 0.0f, 0.1f);
    }
    matrix(p + "attn_output.weight", q_dim, s.dim, s.type);
    vector(p + "ffn_norm.weight", s.dim, 1.0f, 0.1f);
    matrix(p + "ffn_gate.weight", s.dim, s.ffn, s.type);
    matrix(p + "ffn_up.weight", s.dim, s.ffn, s.type);
    matrix(p + "ffn_down.weight", s.ffn, s.dim, s.type);
  }
  w.write(out_path);
}

}  // namespace celer
