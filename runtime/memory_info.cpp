#include "runtime/memory_info.hpp"

#include <algorithm>
#include <cstdio>
#include <fstream>
#include <mutex>
#include <sstream>

namespace celer {
namespace {

// A /proc/meminfo field in bytes (it writes kB), or 0.
uint64_t meminfo_field(const std::string& text, const std::string& name) {
  const size_t at = text.find("\n" + name + ":");
  const size_t start = text.rfind(name + ":", 0) == 0 ? 0 : at == std::string::npos ? std::string::npos : at + 1;
  if (start == std::string::npos) return 0;
  unsigned long long kb = 0;
  if (std::sscanf(text.c_str() + start + name.size() + 1, "%llu", &kb) != 1) return 0;
  return static_cast<uint64_t>(kb) * 1024;
}

// A cgroup v2 file holding one number ("max" means none: 0).
uint64_t cgroup_value(const std::string& path) {
  std::ifstream in(path);
  std::string word;
  if (!(in >> word) || word == "max") return 0;
  try {
    return std::stoull(word);
  } catch (...) {
    return 0;
  }
}

// A field of a cgroup's memory.stat ("inactive_file 123"), or 0.
uint64_t cgroup_stat(const std::string& dir, const std::string& name) {
  std::ifstream in(dir + "/memory.stat");
  std::string key;
  uint64_t value = 0;
  while (in >> key >> value)
    if (key == name) return value;
  return 0;
}

// This process's cgroup v2 directory ("0::/path" in /proc/self/cgroup), or "" without one.
std::string own_cgroup_dir() {
  std::ifstream in("/proc/self/cgroup");
  for (std::string line; std::getline(in, line);)
    if (line.rfind("0::", 0) == 0) return "/sys/fs/cgroup" + (line.size() > 3 && line[3] == '/' ? line.substr(3) : "");
  return "";
}

std::mutex promised_mutex;
uint64_t promised_bytes = 0;  // the sum of the live MemoryPromises

}  // namespace

void MemoryPromise::release() {
  if (bytes_ == 0) return;
  std::lock_guard lock(promised_mutex);
  promised_bytes -= bytes_;
  bytes_ = 0;
}

bool promise_memory(uint64_t bytes, MemoryInfo& seen, uint64_t& promised_to_others, MemoryPromise& out) {
  seen = memory_info();
  std::lock_guard lock(promised_mutex);
  promised_to_others = promised_bytes;
  if (seen.available > 0 && (promised_bytes > seen.available || bytes > seen.available - promised_bytes)) return false;
  promised_bytes += bytes;
  out.bytes_ += bytes;
  return true;
}

MemoryInfo memory_info() {
  std::ifstream in("/proc/meminfo");
  std::stringstream text;
  text << in.rdbuf();
  MemoryInfo m;
  m.total = meminfo_field(text.str(), "MemTotal");
  m.available = meminfo_field(text.str(), "MemAvailable");
  // The tightest limit of this process's cgroup and its ancestors (a container's limit may sit
  // on a parent). What a cgroup counts as used includes page cache it would reclaim first
  // (inactive_file), which is not taken from what is available, as MemAvailable does.
  std::string dir = own_cgroup_dir();
  if (dir.empty()) dir = "/sys/fs/cgroup";
  for (;;) {
    if (const uint64_t limit = cgroup_value(dir + "/memory.max"); limit > 0) {
      const uint64_t current = cgroup_value(dir + "/memory.current");
      const uint64_t reclaimable = std::min(current, cgroup_stat(dir, "inactive_file"));
      const uint64_t used = current - reclaimable;
      const uint64_t left = limit > used ? limit - used : 0;
      m.total = m.total ? std::min(m.total, limit) : limit;
      m.available = text.str().find("MemAvailable:") != std::string::npos ? std::min(m.available, left) : left;
    }
    const size_t slash = dir.rfind('/');
    if (dir == "/sys/fs/cgroup" || slash == std::string::npos || slash < std::string("/sys/fs/cgroup").size()) break;
    dir.resize(slash);
  }
  return m;
}

std::string format_bytes(uint64_t bytes) {
  const char* units[] = {"B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"};
  double v = static_cast<double>(bytes);
  int u = 0;
  while (v >= 1024 && u < 6) {
    v /= 1024;
    ++u;
  }
  char buf[32];
  std::snprintf(buf, sizeof(buf), u == 0 ? "%.0f %s" : "%.1f %s", v, units[u]);
  return buf;
}

}  // namespace celer
