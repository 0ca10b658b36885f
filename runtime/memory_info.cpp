#include "runtime/memory_info.hpp"

#include <algorithm>
#include <cstdio>
#include <fstream>
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
uint64_t cgroup_value(const char* path) {
  std::ifstream in(path);
  std::string word;
  if (!(in >> word) || word == "max") return 0;
  try {
    return std::stoull(word);
  } catch (...) {
    return 0;
  }
}

}  // namespace

MemoryInfo memory_info() {
  std::ifstream in("/proc/meminfo");
  std::stringstream text;
  text << in.rdbuf();
  MemoryInfo m;
  m.total = meminfo_field(text.str(), "MemTotal");
  m.available = meminfo_field(text.str(), "MemAvailable");
  if (const uint64_t limit = cgroup_value("/sys/fs/cgroup/memory.max"); limit > 0) {
    const uint64_t used = cgroup_value("/sys/fs/cgroup/memory.current");
    m.total = m.total ? std::min(m.total, limit) : limit;
    m.available = std::min(m.available, limit > used ? limit - used : 0);
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
