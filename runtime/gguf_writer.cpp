#include "runtime/gguf_writer.hpp"

#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <memory>

#include "kernels/quants.hpp"
#include "runtime/error.hpp"

namespace celer {
namespace {

class Out {
 public:
  explicit Out(const std::string& path) : path_(path), f_(std::fopen(path.c_str(), "wb")) {
    if (!f_) throw Error(ErrorCode::io, path + ": cannot create: " + std::strerror(errno));
  }
  ~Out() {
    if (f_) std::fclose(f_);
  }
  void bytes(const void* p, size_t n) {
    if (n && std::fwrite(p, 1, n, f_) != n) throw Error(ErrorCode::io, path_ + ": write failed: " + std::strerror(errno));
    pos_ += n;
  }
  template <typename T>
  void pod(T v) { bytes(&v, sizeof v); }
  void str(const std::string& s) {
    pod<uint64_t>(s.size());
    bytes(s.data(), s.size());
  }
  void pad_to(uint64_t alignment) {
    static const uint8_t zeros[256] = {};
    while (pos_ % alignment) bytes(zeros, std::min<uint64_t>(alignment - pos_ % alignment, sizeof zeros));
  }
  void close() {
    if (std::fclose(f_) != 0) {
      f_ = nullptr;
      throw Error(ErrorCode::io, path_ + ": close failed: " + std::strerror(errno));
    }
    f_ = nullptr;
  }

 private:
  std::string path_;
  FILE* f_;
  uint64_t pos_ = 0;
};

void write_scalar(Out& out, const GgufScalar& v) {
  std::visit(
      [&](const auto& x) {
        using T = std::decay_t<decltype(x)>;
        if constexpr (std::is_same_v<T, std::string>) out.str(x);
        else if constexpr (std::is_same_v<T, bool>) out.pod<uint8_t>(x ? 1 : 0);
        else out.pod<T>(x);
      },
      v);
}

}  // namespace

void GgufWriter::set(const std::string& key, GgufValue value) {
  for (auto& [k, v] : kv_)
    if (k == key) {
      v = std::move(value);
      return;
    }
  kv_.emplace_back(key, std::move(value));
}

void GgufWriter::set_u32(const std::string& key, uint32_t v) { set(key, GgufValue{GgufType::u32, v, {}, {}}); }
void GgufWriter::set_f32(const std::string& key, float v) { set(key, GgufValue{GgufType::f32, v, {}, {}}); }
void GgufWriter::set_bool(const std::string& key, bool v) { set(key, GgufValue{GgufType::boolean, v, {}, {}}); }
void GgufWriter::set_string(const std::string& key, const std::string& v) {
  set(key, GgufValue{GgufType::string, v, {}, {}});
}

void GgufWriter::add_tensor(const std::string& name, TensorType type, std::vector<int64_t> ne,
                            std::vector<uint8_t> bytes) {
  int64_t rows = 1;
  for (size_t d = 1; d < ne.size(); ++d) rows *= ne[d];
  if (ne.empty() || ne.size() > 4 || ne[0] % block_elems(type) != 0 ||
      static_cast<int64_t>(bytes.size()) != row_bytes(type, ne[0]) * rows)
    throw Error(ErrorCode::invalid_argument, "gguf writer: tensor '" + name + "' has inconsistent shape or size");
  tensors_.push_back({name, type, std::move(ne), std::move(bytes)});
}

void GgufWriter::write(const std::string& path) const {
  Out out(path);
  out.pod<uint32_t>(0x46554747);
  out.pod<uint32_t>(3);
  out.pod<uint64_t>(tensors_.size());
  const bool has_alignment_key = [&] {
    for (auto& kv : kv_)
      if (kv.first == "general.alignment") return true;
    return false;
  }();
  out.pod<uint64_t>(kv_.size() + (alignment_ != 32 && !has_alignment_key ? 1 : 0));
  for (const auto& [key, v] : kv_) {
    out.str(key);
    out.pod<uint32_t>(static_cast<uint32_t>(v.type));
    if (v.type == GgufType::array) {
      out.pod<uint32_t>(static_cast<uint32_t>(v.elem_type));
      out.pod<uint64_t>(v.array.size());
      for (const GgufScalar& e : v.array) write_scalar(out, e);
    } else {
      write_scalar(out, v.scalar);
    }
  }
  if (alignment_ != 32 && !has_alignment_key) {
    out.str("general.alignment");
    out.pod<uint32_t>(static_cast<uint32_t>(GgufType::u32));
    out.pod<uint32_t>(alignment_);
  }
  uint64_t offset = 0;
  for (const Tensor& t : tensors_) {
    out.str(t.name);
    out.pod<uint32_t>(static_cast<uint32_t>(t.ne.size()));
    for (int64_t n : t.ne) out.pod<uint64_t>(static_cast<uint64_t>(n));
    out.pod<uint32_t>(static_cast<uint32_t>(t.type));
    out.pod<uint64_t>(offset);
    offset += (t.bytes.size() + alignment_ - 1) / alignment_ * alignment_;
  }
  out.pad_to(alignment_);
  for (const Tensor& t : tensors_) {
    out.bytes(t.bytes.data(), t.bytes.size());
    out.pad_to(alignment_);
  }
  out.close();
}

std::vector<uint8_t> encode_tensor(TensorType type, const float* values, int64_t n) {
  std::vector<uint8_t> out(static_cast<size_t>(row_bytes(type, n)));
  quantize_row(type, values, out.data(), n);
  return out;
}

}  // namespace celer
