#include "runtime/protocol.hpp"

#include <chrono>

namespace celer {

int64_t unix_us() {
  return std::chrono::duration_cast<std::chrono::microseconds>(std::chrono::system_clock::now().time_since_epoch())
      .count();
}

const char* to_string(ErrorKind kind) {
  switch (kind) {
    case ErrorKind::invalid_request: return "invalid_request";
    case ErrorKind::queue_full: return "queue_full";
    case ErrorKind::prompt_too_long: return "prompt_too_long";
    case ErrorKind::rate_limited: return "rate_limited";
    case ErrorKind::deadline_exceeded: return "deadline_exceeded";
    case ErrorKind::internal: return "internal";
    case ErrorKind::unavailable: return "unavailable";
    case ErrorKind::slo_unattainable: return "slo_unattainable";
  }
  return "?";
}

}  // namespace celer
