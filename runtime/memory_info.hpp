// How much memory this process may still take: what the kernel calls available (free plus what
// it can reclaim, /proc/meminfo's MemAvailable), less where a cgroup (a container's limit)
// allows less. Sizes a start asks for are checked against it before anything is allocated, so
// a KV cache that cannot fit is an error naming the key instead of a loop of std::bad_alloc.
#pragma once

#include <cstdint>
#include <string>

namespace celer {

struct MemoryInfo {
  uint64_t available = 0;  // bytes
  uint64_t total = 0;      // bytes: the machine's, or the cgroup's limit when lower
};

MemoryInfo memory_info();

// "512.0 MiB", "21.9 GiB", "100.0 TiB": for messages.
std::string format_bytes(uint64_t bytes);

}  // namespace celer
