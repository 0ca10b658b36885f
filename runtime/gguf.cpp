#include "runtime/gguf.hpp"

#include <algorithm>
#include <iterator>

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <limits>

#include "runtime/error.hpp"

namespace celer {
namespace {

constexpr uint32_t kMagic = 0x46554747;  // "GGUF" read as a little-endian uint32

const char* ggml_type_name(uint32_t t) {
  // The ggml types a GGUF file may hold; names make the "unsupported" error useful.
  static const char* names[] = {"F32",  "F16",  "Q4_0", "Q4_1", "Q4_2", "Q4_3", "Q5_0",  "Q5_1",
                                "Q8_0", "Q8_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K",  "Q8_K",
                                "IQ2_XXS", "IQ2_XS", "IQ3_XXS", "IQ1_S", "IQ4_NL", "IQ3_S", "IQ2_S",
                                "IQ4_XS", "I8", "I16", "I32", "I64", "F64", "IQ1_M", "BF16"};
  return t < sizeof(names) / sizeof(names[0]) ? names[t] : nullptr;
}

// A bounds-checked cursor over the mapped file.
class Cursor {
 public:
  Cursor(const GgufFile& file, const uint8_t* base, uint64_t size) : file_(file), base_(base), size_(size) {}
  uint64_t pos() const { return pos_; }
  uint64_t remaining() const { return size_ - pos_; }

  template <typename T>
  T read(const char* what) {
    need(sizeof(T), what);
    T v;
    std::memcpy(&v, base_ + pos_, sizeof(T));
    pos_ += sizeof(T);
    return v;
  }
  std::string read_string(const char* what) {
    const uint64_t n = read<uint64_t>(what);
    need(n, what);
    std::string s(reinterpret_cast<const char*>(base_ + pos_), n);
    pos_ += n;
    return s;
  }
  void need(uint64_t n, const char* what) const {
    if (n > size_ - pos_)
      throw Error(ErrorCode::invalid_file, file_.path() + ": truncated file: " + what + " at offset " +
                                               std::to_string(pos_) + " needs " + std::to_string(n) +
                                               " bytes, " + std::to_string(size_ - pos_) + " left");
  }

 private:
  const GgufFile& file_;
  const uint8_t* base_;
  uint64_t size_;
  uint64_t pos_ = 0;
};

uint64_t scalar_size(GgufType t) {
  switch (t) {
    case GgufType::u8: case GgufType::i8: case GgufType::boolean: return 1;
    case GgufType::u16: case GgufType::i16: return 2;
    case GgufType::u32: case GgufType::i32: case GgufType::f32: return 4;
    case GgufType::u64: case GgufType::i64: case GgufType::f64: return 8;
    case GgufType::string: return 8;  // at least its length
    case GgufType::array: return 12;
  }
  return 1;
}

bool valid_type(uint32_t t) { return t <= 12; }

GgufScalar read_scalar(Cursor& c, GgufType t, const std::string& key) {
  const char* what = "metadata value";
  switch (t) {
    case GgufType::u8: return c.read<uint8_t>(what);
    case GgufType::i8: return c.read<int8_t>(what);
    case GgufType::u16: return c.read<uint16_t>(what);
    case GgufType::i16: return c.read<int16_t>(what);
    case GgufType::u32: return c.read<uint32_t>(what);
    case GgufType::i32: return c.read<int32_t>(what);
    case GgufType::f32: return c.read<float>(what);
    case GgufType::boolean: return c.read<uint8_t>(what) != 0;
    case GgufType::string: return c.read_string(what);
    case GgufType::u64: return c.read<uint64_t>(what);
    case GgufType::i64: return c.read<int64_t>(what);
    case GgufType::f64: return c.read<double>(what);
    case GgufType::array: break;
  }
  throw Error(ErrorCode::invalid_file, "bad scalar type for key " + key);
}

}  // namespace

const char* to_string(GgufType type) {
  static const char* names[] = {"uint8", "int8",  "uint16", "int16",  "uint32", "int32", "float32",
                                "bool",  "string", "array", "uint64", "int64",  "float64"};
  const auto i = static_cast<uint32_t>(type);
  return i <= 12 ? names[i] : "?";
}

GgufType scalar_type(const GgufScalar& v) {
  const size_t i = v.index();
  return static_cast<GgufType>(i < 9 ? i : i + 1);
}

GgufFile::GgufFile(const std::string& path) : path_(path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) throw Error(ErrorCode::io, path + ": cannot open: " + std::strerror(errno));
  struct stat st {};
  if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    ::close(fd);
    throw Error(ErrorCode::io, path + ": not a regular file");
  }
  size_ = static_cast<uint64_t>(st.st_size);
  if (size_ == 0) {
    ::close(fd);
    throw Error(ErrorCode::invalid_file, path + ": empty file, not a GGUF model");
  }
  void* m = ::mmap(nullptr, size_, PROT_READ, MAP_SHARED, fd, 0);
  ::close(fd);
  if (m == MAP_FAILED) throw Error(ErrorCode::io, path + ": mmap failed: " + std::strerror(errno));
  map_ = static_cast<const uint8_t*>(m);
  try {
    parse();
  } catch (...) {
    ::munmap(const_cast<uint8_t*>(map_), size_);
    map_ = nullptr;
    throw;
  }
}

GgufFile::~GgufFile() {
  if (map_) ::munmap(const_cast<uint8_t*>(map_), size_);
}

void GgufFile::fail(const std::string& what) const { throw Error(ErrorCode::invalid_file, path_ + ": " + what); }

void GgufFile::parse() {
  Cursor c(*this, map_, size_);
  if (size_ < 4 || c.read<uint32_t>("magic") != kMagic) fail("not a GGUF file (bad magic)");
  version_ = c.read<uint32_t>("version");
  if (version_ == 1) throw Error(ErrorCode::unsupported, path_ + ": GGUF version 1 is not supported (2 and 3 are)");
  if (version_ != 2 && version_ != 3)
    fail("unknown GGUF version " + std::to_string(version_) + " (2 and 3 are supported)");
  const uint64_t n_tensors = c.read<uint64_t>("tensor count");
  const uint64_t n_kv = c.read<uint64_t>("metadata count");
  // Each entry takes at least a few bytes: a count larger than the file is garbage, not a reason
  // to reserve gigabytes.
  if (n_kv > size_ / 12) fail("metadata count " + std::to_string(n_kv) + " exceeds what the file can hold");
  if (n_tensors > size_ / 24) fail("tensor count " + std::to_string(n_tensors) + " exceeds what the file can hold");

  kv_.reserve(n_kv);
  for (uint64_t i = 0; i < n_kv; ++i) {
    std::string key = c.read_string("metadata key");
    const uint32_t t = c.read<uint32_t>("metadata type");
    if (!valid_type(t)) fail("metadata key '" + key + "' has unknown value type " + std::to_string(t));
    GgufValue v;
    v.type = static_cast<GgufType>(t);
    if (v.type == GgufType::array) {
      const uint32_t et = c.read<uint32_t>("array type");
      if (!valid_type(et) || et == static_cast<uint32_t>(GgufType::array))
        fail("metadata key '" + key + "' is an array of unsupported type " + std::to_string(et));
      v.elem_type = static_cast<GgufType>(et);
      const uint64_t n = c.read<uint64_t>("array length");
      if (n > c.remaining() / scalar_size(v.elem_type))
        fail("metadata key '" + key + "': array length " + std::to_string(n) + " exceeds the file");
      v.array.reserve(n);
      for (uint64_t j = 0; j < n; ++j) v.array.push_back(read_scalar(c, v.elem_type, key));
    } else {
      v.scalar = read_scalar(c, v.type, key);
    }
    if (!kv_index_.emplace(key, kv_.size()).second) fail("duplicate metadata key '" + key + "'");
    kv_.emplace_back(std::move(key), std::move(v));
  }

  if (const GgufValue* a = find("general.alignment")) {
    if (a->type != GgufType::u32) fail("general.alignment must be uint32");
    alignment_ = std::get<uint32_t>(a->scalar);
    if (alignment_ == 0 || (alignment_ & (alignment_ - 1)) != 0)
      fail("general.alignment " + std::to_string(alignment_) + " is not a power of two");
  }

  tensors_.reserve(n_tensors);
  for (uint64_t i = 0; i < n_tensors; ++i) {
    GgufTensor t;
    t.name = c.read_string("tensor name");
    const uint32_t n_dims = c.read<uint32_t>("tensor dimension count");
    if (n_dims == 0 || n_dims > 4)
      fail("tensor '" + t.name + "' has " + std::to_string(n_dims) + " dimensions (1 to 4 allowed)");
    t.n_dims = static_cast<int>(n_dims);
    for (uint32_t d = 0; d < n_dims; ++d) {
      const uint64_t ne = c.read<uint64_t>("tensor dimension");
      if (ne == 0 || ne > (1ull << 40)) fail("tensor '" + t.name + "' has an invalid dimension " + std::to_string(ne));
      t.ne[d] = static_cast<int64_t>(ne);
    }
    const uint32_t type = c.read<uint32_t>("tensor type");
    static constexpr uint32_t kRead[] = {0, 1, 2, 3, 6, 7, 8, 10, 11, 12, 13, 14, 30};
    if (std::find(std::begin(kRead), std::end(kRead), type) == std::end(kRead)) {
      const char* name = ggml_type_name(type);
      if (name)
        throw Error(ErrorCode::unsupported, path_ + ": tensor '" + t.name + "' has type " + name +
                                                " which celer does not support (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, "
                                                "Q5_1, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K)");
      fail("tensor '" + t.name + "' has unknown type " + std::to_string(type));
    }
    t.type = static_cast<TensorType>(type);
    t.offset = c.read<uint64_t>("tensor offset");
    if (t.ne[0] % block_elems(t.type) != 0)
      fail("tensor '" + t.name + "': row length " + std::to_string(t.ne[0]) + " is not a multiple of the " +
           to_string(t.type) + " block size");
    // Overflow-safe size: each factor is < 2^40 and the product is checked against the file below.
    long double elems = 1;
    for (int d = 0; d < 4; ++d) elems *= t.ne[d];
    if (elems > static_cast<long double>(size_)) fail("tensor '" + t.name + "' is larger than the file");
    t.n_bytes = static_cast<uint64_t>(row_bytes(t.type, t.ne[0])) * t.ne[1] * t.ne[2] * t.ne[3];
    if (t.offset % alignment_ != 0) fail("tensor '" + t.name + "' offset is not aligned to " + std::to_string(alignment_));
    if (!tensor_index_.emplace(t.name, tensors_.size()).second) fail("duplicate tensor '" + t.name + "'");
    tensors_.push_back(std::move(t));
  }

  const uint64_t data_start = (c.pos() + alignment_ - 1) / alignment_ * alignment_;
  for (GgufTensor& t : tensors_) {
    if (data_start > size_ || t.offset > size_ - data_start || t.n_bytes > size_ - data_start - t.offset)
      fail("truncated file: tensor '" + t.name + "' data (" + std::to_string(t.n_bytes) + " bytes at offset " +
           std::to_string(data_start + t.offset) + ") runs past the end of the file (" + std::to_string(size_) +
           " bytes)");
    t.data = map_ + data_start + t.offset;
  }
}

const GgufValue* GgufFile::find(const std::string& key) const {
  auto it = kv_index_.find(key);
  return it == kv_index_.end() ? nullptr : &kv_[it->second].second;
}

const GgufTensor* GgufFile::find_tensor(const std::string& name) const {
  auto it = tensor_index_.find(name);
  return it == tensor_index_.end() ? nullptr : &tensors_[it->second];
}

namespace {
[[noreturn]] void wrong_type(const std::string& path, const std::string& key, const char* want, GgufType got) {
  throw Error(ErrorCode::invalid_file,
              path + ": metadata key '" + key + "' should be " + want + " but is " + to_string(got));
}
}  // namespace

std::string GgufFile::get_string(const std::string& key) const {
  const GgufValue* v = find(key);
  if (!v) throw Error(ErrorCode::invalid_file, path_ + ": missing metadata key '" + key + "'");
  if (v->type != GgufType::string) wrong_type(path_, key, "a string", v->type);
  return std::get<std::string>(v->scalar);
}

int64_t GgufFile::get_int(const std::string& key) const {
  const GgufValue* v = find(key);
  if (!v) throw Error(ErrorCode::invalid_file, path_ + ": missing metadata key '" + key + "'");
  return std::visit(
      [&](const auto& x) -> int64_t {
        using T = std::decay_t<decltype(x)>;
        if constexpr (std::is_integral_v<T> && !std::is_same_v<T, bool>) {
          if constexpr (std::is_same_v<T, uint64_t>)
            if (x > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) wrong_type(path_, key, "an int64", v->type);
          return static_cast<int64_t>(x);
        } else {
          wrong_type(path_, key, "an integer", v->type);
        }
      },
      v->scalar);
}

double GgufFile::get_float(const std::string& key) const {
  const GgufValue* v = find(key);
  if (!v) throw Error(ErrorCode::invalid_file, path_ + ": missing metadata key '" + key + "'");
  if (v->type == GgufType::f32) return std::get<float>(v->scalar);
  if (v->type == GgufType::f64) return std::get<double>(v->scalar);
  if (v->type != GgufType::array && v->type != GgufType::string && v->type != GgufType::boolean)
    return static_cast<double>(get_int(key));
  wrong_type(path_, key, "a number", v->type);
}

bool GgufFile::get_bool(const std::string& key) const {
  const GgufValue* v = find(key);
  if (!v) throw Error(ErrorCode::invalid_file, path_ + ": missing metadata key '" + key + "'");
  if (v->type != GgufType::boolean) wrong_type(path_, key, "a bool", v->type);
  return std::get<bool>(v->scalar);
}

const GgufValue& GgufFile::get_array(const std::string& key, GgufType elem_type) const {
  const GgufValue* v = find(key);
  if (!v) throw Error(ErrorCode::invalid_file, path_ + ": missing metadata key '" + key + "'");
  if (v->type != GgufType::array || v->elem_type != elem_type)
    throw Error(ErrorCode::invalid_file, path_ + ": metadata key '" + key + "' should be an array of " +
                                             to_string(elem_type));
  return *v;
}

std::string GgufFile::get_string(const std::string& key, const std::string& dflt) const {
  return has(key) ? get_string(key) : dflt;
}
int64_t GgufFile::get_int(const std::string& key, int64_t dflt) const { return has(key) ? get_int(key) : dflt; }
double GgufFile::get_float(const std::string& key, double dflt) const { return has(key) ? get_float(key) : dflt; }
bool GgufFile::get_bool(const std::string& key, bool dflt) const { return has(key) ? get_bool(key) : dflt; }

}  // namespace celer
