// Vectors whose storage starts on a 64-byte boundary: an AVX-512 load that straddles two cache
// lines costs two, and a matmul tile on misaligned rows runs about 30% slower.
#pragma once

#include <cstddef>
#include <new>
#include <vector>

namespace celer {

constexpr size_t kCacheLine = 64;

template <typename T>
struct CacheAligned {
  using value_type = T;
  CacheAligned() = default;
  template <typename U>
  CacheAligned(const CacheAligned<U>&) {}
  T* allocate(size_t n) { return static_cast<T*>(::operator new(n * sizeof(T), std::align_val_t(kCacheLine))); }
  void deallocate(T* p, size_t) { ::operator delete(p, std::align_val_t(kCacheLine)); }
  template <typename U>
  bool operator==(const CacheAligned<U>&) const { return true; }
};

template <typename T>
using AlignedVector = std::vector<T, CacheAligned<T>>;

}  // namespace celer
