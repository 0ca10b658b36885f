// The GGUF reader and writer, and what happens to broken files: every truncation and random bit
// flips of the bundled models give an Error (or, for a harmless flip, a model), never a crash.
#include <catch2/catch.hpp>

#include <cstring>
#include <random>

#include "runtime/error.hpp"
#include "runtime/gguf.hpp"
#include "runtime/gguf_writer.hpp"
#include "runtime/model.hpp"
#include "test_util.hpp"

using namespace celer;

namespace {

const std::string kData = CELER_TEST_DATA;

// What loading a possibly broken file does: "ok", or the Error's message. Any other exception
// type fails the test (that would be a crash in a server).
std::string try_load(const std::string& path) {
  try {
    Model m(path);
    return "ok";
  } catch (const Error& e) {
    return e.what();
  }
}

void append(std::string& s, const void* p, size_t n) { s.append(static_cast<const char*>(p), n); }
template <typename T>
void put(std::string& s, T v) { append(s, &v, sizeof v); }
void put_str(std::string& s, const std::string& v) {
  put<uint64_t>(s, v.size());
  s += v;
}

}  // namespace

TEST_CASE("reads the bundled models' metadata and tensors", "[gguf]") {
  GgufFile f(kData + "/stories260K.gguf");
  CHECK((f.version() == 2 || f.version() == 3));
  CHECK(f.get_string("general.architecture") == "llama");
  CHECK(f.get_int("llama.embedding_length") == 64);
  CHECK(f.get_int("llama.block_count") == 5);
  const GgufTensor* embd = f.find_tensor("token_embd.weight");
  REQUIRE(embd);
  CHECK(embd->ne[0] == 64);
  CHECK(embd->ne[1] == 512);
  CHECK(embd->type == TensorType::f32);
  CHECK(f.get_array("tokenizer.ggml.tokens", GgufType::string).array.size() == 512);
  CHECK_THROWS_AS(f.get_string("llama.block_count"), Error);  // wrong type, named
  CHECK_THROWS_WITH(f.get_int("no.such.key"), Catch::Contains("no.such.key"));

  // The other writer's file (Ollama's test data): 32000-token vocab, loads as a model.
  Model tiny(kData + "/llama-2-tiny-random.gguf");
  CHECK(tiny.config().n_vocab == 32000);
  CHECK(tiny.config().n_embd == 8);
}

TEST_CASE("version 2 files read like version 3", "[gguf]") {
  // v2 and v3 share the layout (v3 only allows big-endian files, which carry no marker): the same
  // bytes with version 2 must load to the same model.
  TempDir dir;
  std::vector<char> bytes = read_file(kData + "/stories260K.gguf");
  const uint32_t v2 = 2;
  std::memcpy(bytes.data() + 4, &v2, 4);
  write_file(dir.path() + "/v2.gguf", bytes.data(), bytes.size());
  GgufFile f(dir.path() + "/v2.gguf");
  CHECK(f.version() == 2);
  CHECK(f.tensors().size() == GgufFile(kData + "/stories260K.gguf").tensors().size());
  CHECK(try_load(dir.path() + "/v2.gguf") == "ok");
  const uint32_t v1 = 1;
  std::memcpy(bytes.data() + 4, &v1, 4);
  write_file(dir.path() + "/v1.gguf", bytes.data(), bytes.size());
  CHECK_THAT(try_load(dir.path() + "/v1.gguf"), Catch::Contains("version 1"));
}

TEST_CASE("the writer round-trips every value type, alignment and tensor type", "[gguf]") {
  TempDir dir;
  const std::string path = dir.path() + "/all.gguf";
  GgufWriter w(64);
  w.set("u8", {GgufType::u8, uint8_t{200}, {}, {}});
  w.set("i8", {GgufType::i8, int8_t{-100}, {}, {}});
  w.set("u16", {GgufType::u16, uint16_t{60000}, {}, {}});
  w.set("i16", {GgufType::i16, int16_t{-30000}, {}, {}});
  w.set("u32", {GgufType::u32, uint32_t{4000000000u}, {}, {}});
  w.set("i32", {GgufType::i32, int32_t{-2000000000}, {}, {}});
  w.set("f32", {GgufType::f32, 1.5f, {}, {}});
  w.set("bool", {GgufType::boolean, true, {}, {}});
  w.set("str", {GgufType::string, std::string("héllo"), {}, {}});
  w.set("u64", {GgufType::u64, uint64_t{1} << 40, {}, {}});
  w.set("i64", {GgufType::i64, int64_t{-(int64_t{1} << 40)}, {}, {}});
  w.set("f64", {GgufType::f64, 2.25, {}, {}});
  w.set("arr", {GgufType::array, {}, GgufType::string, {std::string("a"), std::string(""), std::string("ccc")}});
  w.set("arr_i32", {GgufType::array, {}, GgufType::i32, {int32_t{1}, int32_t{-2}}});
  std::vector<float> values(64);
  for (int i = 0; i < 64; ++i) values[i] = 0.25f * (i - 30);
  for (TensorType t : {TensorType::f32, TensorType::f16, TensorType::bf16, TensorType::q8_0})
    w.add_tensor(std::string("t_") + to_string(t), t, {32, 2}, encode_tensor(t, values.data(), 64));
  w.write(path);

  GgufFile f(path);
  CHECK(f.version() == 3);
  CHECK(f.alignment() == 64);
  CHECK(f.get_int("u8") == 200);
  CHECK(f.get_int("i8") == -100);
  CHECK(f.get_int("u16") == 60000);
  CHECK(f.get_int("i16") == -30000);
  CHECK(f.get_int("u32") == 4000000000ll);
  CHECK(f.get_int("i32") == -2000000000);
  CHECK(f.get_float("f32") == 1.5);
  CHECK(f.get_bool("bool"));
  CHECK(f.get_string("str") == "héllo");
  CHECK(f.get_int("u64") == (int64_t{1} << 40));
  CHECK(f.get_int("i64") == -(int64_t{1} << 40));
  CHECK(f.get_float("f64") == 2.25);
  const GgufValue& arr = f.get_array("arr", GgufType::string);
  REQUIRE(arr.array.size() == 3);
  CHECK(std::get<std::string>(arr.array[2]) == "ccc");
  CHECK(std::get<int32_t>(f.get_array("arr_i32", GgufType::i32).array[1]) == -2);
  for (TensorType t : {TensorType::f32, TensorType::f16, TensorType::bf16, TensorType::q8_0}) {
    const GgufTensor* tensor = f.find_tensor(std::string("t_") + to_string(t));
    REQUIRE(tensor);
    CHECK(tensor->type == t);
    CHECK(reinterpret_cast<uintptr_t>(tensor->data) % 64 == 0);
    std::vector<float> back(64);
    row_to_f32(vec_scalar(), t, tensor->data, back.data(), 64);
    for (int i = 0; i < 64; ++i) CHECK(back[i] == Approx(values[i]).margin(t == TensorType::q8_0 ? 0.04 : 0.02));
  }
}

TEST_CASE("every truncation of a model is a clear error", "[gguf][robustness]") {
  TempDir dir;
  for (const std::string name : {"stories260K.gguf", "llama-2-tiny-random.gguf"}) {
    const std::vector<char> bytes = read_file(kData + "/" + name);
    const std::string path = dir.path() + "/cut.gguf";
    std::mt19937 rng(11);
    std::vector<size_t> cuts{0, 1, 3, 4, 7, 8, 15, 16, 23, 24, 100, 1000, bytes.size() - 1, bytes.size() / 2};
    for (int i = 0; i < 150; ++i) cuts.push_back(rng() % bytes.size());
    for (size_t cut : cuts) {
      write_file(path, bytes.data(), cut);
      const std::string r = try_load(path);
      INFO(name << " cut at " << cut << ": " << r);
      CHECK(r != "ok");
      CHECK(r.find(path) != std::string::npos);  // the error names the file
    }
  }
}

TEST_CASE("random bit flips never crash the loader", "[gguf][robustness]") {
  TempDir dir;
  for (const std::string name : {"stories260K.gguf", "llama-2-tiny-random.gguf"}) {
    const std::vector<char> bytes = read_file(kData + "/" + name);
    const std::string path = dir.path() + "/flip.gguf";
    std::mt19937 rng(12);
    int errors = 0, loaded = 0;
    for (int trial = 0; trial < 300; ++trial) {
      std::vector<char> copy = bytes;
      const int flips = 1 + static_cast<int>(rng() % 3);
      for (int i = 0; i < flips; ++i) {
        // Half the flips in the first 64 KiB (header and metadata), half anywhere.
        const size_t span = trial % 2 ? copy.size() : std::min<size_t>(copy.size(), 65536);
        copy[rng() % span] ^= static_cast<char>(1u << (rng() % 8));
      }
      write_file(path, copy.data(), copy.size());
      const std::string r = try_load(path);
      (r == "ok" ? loaded : errors)++;
    }
    INFO(name << ": " << errors << " errors, " << loaded << " loaded");
    CHECK(errors > 0);
  }
}

TEST_CASE("specific defects get specific messages", "[gguf][robustness]") {
  TempDir dir;
  const std::string path = dir.path() + "/bad.gguf";
  auto load_error = [&](const std::string& bytes) {
    write_file(path, bytes.data(), bytes.size());
    return try_load(path);
  };

  CHECK_THAT(load_error("GGML this is not gguf at all"), Catch::Contains("bad magic"));
  CHECK_THAT(load_error(""), Catch::Contains("empty"));
  {
    std::string s = "GGUF";
    put<uint32_t>(s, 7);
    put<uint64_t>(s, 0);
    put<uint64_t>(s, 0);
    CHECK_THAT(load_error(s), Catch::Contains("version 7"));
  }
  {
    // One tensor of type Q4_K (12).
    std::string s = "GGUF";
    put<uint32_t>(s, 3);
    put<uint64_t>(s, 1);
    put<uint64_t>(s, 0);
    put_str(s, "blk.0.ffn_up.weight");
    put<uint32_t>(s, 2);
    put<uint64_t>(s, 256);
    put<uint64_t>(s, 4);
    put<uint32_t>(s, 16);  // IQ2_XXS: a format celer does not read
    put<uint64_t>(s, 0);
    s.append(4096, '\0');
    CHECK_THAT(load_error(s), Catch::Contains("IQ2_XXS") && Catch::Contains("blk.0.ffn_up.weight"));
  }
  {
    // A string length far past the end of the file.
    std::string s = "GGUF";
    put<uint32_t>(s, 3);
    put<uint64_t>(s, 0);
    put<uint64_t>(s, 1);
    put<uint64_t>(s, uint64_t{1} << 60);
    CHECK_THAT(load_error(s), Catch::Contains("truncated"));
  }
  {
    // A huge metadata count is refused before anything is reserved.
    std::string s = "GGUF";
    put<uint32_t>(s, 3);
    put<uint64_t>(s, 0);
    put<uint64_t>(s, uint64_t{1} << 62);
    CHECK_THAT(load_error(s), Catch::Contains("metadata count"));
  }

  // Model-level defects, written with the project's own writer from the real model's parts.
  GgufFile stories(kData + "/stories260K.gguf");
  auto rewrite = [&](const std::string& skip_tensor, const std::string& key, GgufValue* value, bool bad_shape) {
    GgufWriter w;
    for (const auto& [k, v] : stories.metadata()) w.set(k, k == key && value ? *value : v);
    for (const GgufTensor& t : stories.tensors()) {
      if (t.name == skip_tensor) continue;
      std::vector<int64_t> ne(t.ne, t.ne + t.n_dims);
      if (bad_shape && t.name == "blk.2.attn_k.weight") std::swap(ne[0], ne[1]);
      w.add_tensor(t.name, t.type, ne, std::vector<uint8_t>(t.data, t.data + t.n_bytes));
    }
    w.write(path);
    return try_load(path);
  };
  CHECK(rewrite("", "", nullptr, false) == "ok");
  CHECK_THAT(rewrite("blk.3.ffn_down.weight", "", nullptr, false), Catch::Contains("missing tensor 'blk.3.ffn_down.weight'"));
  GgufValue arch{GgufType::string, std::string("mamba"), {}, {}};
  CHECK_THAT(rewrite("", "general.architecture", &arch, false), Catch::Contains("architecture 'mamba'"));
  CHECK_THAT(rewrite("", "", nullptr, true), Catch::Contains("blk.2.attn_k.weight") && Catch::Contains("shape"));
  GgufValue heads{GgufType::u32, uint32_t{7}, {}, {}};
  CHECK(rewrite("", "llama.attention.head_count", &heads, false) != "ok");
}
