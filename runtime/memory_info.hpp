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

// Memory promised to allocations that are still being built: a shard's KV cache is zero-filled
// by its engine, in the shard's own thread, after the check that admitted it, so until then
// MemAvailable does not show it. Checks made meanwhile count it as taken (process-wide), which
// makes them cumulative: two shards that each fit but not together are not both admitted.
class MemoryPromise {
 public:
  MemoryPromise() = default;
  ~MemoryPromise() { release(); }
  void release();  // gives the bytes back (the allocation is made, or has failed)
  MemoryPromise(MemoryPromise&& o) noexcept : bytes_(o.bytes_) { o.bytes_ = 0; }
  MemoryPromise& operator=(MemoryPromise&&) = delete;
  MemoryPromise(const MemoryPromise&) = delete;
  uint64_t bytes() const { return bytes_; }

 private:
  friend bool promise_memory(uint64_t, MemoryInfo&, uint64_t&, MemoryPromise&);
  uint64_t bytes_ = 0;
};

// Promises `bytes` into `out` when they fit in what is available less what is already promised.
// Either way it reports the memory it saw and the bytes promised to others (for the message).
// Where the available memory is unknown (0) every promise is made.
bool promise_memory(uint64_t bytes, MemoryInfo& seen, uint64_t& promised_to_others, MemoryPromise& out);

// "512.0 MiB", "21.9 GiB", "100.0 TiB": for messages.
std::string format_bytes(uint64_t bytes);

}  // namespace celer
