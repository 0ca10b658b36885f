#include "runtime/error.hpp"

namespace celer {

const char* to_string(ErrorCode code) {
  switch (code) {
    case ErrorCode::invalid_argument: return "invalid_argument";
    case ErrorCode::invalid_file: return "invalid_file";
    case ErrorCode::unsupported: return "unsupported";
    case ErrorCode::io: return "io";
    case ErrorCode::out_of_memory: return "out_of_memory";
    case ErrorCode::context_overflow: return "context_overflow";
    case ErrorCode::unavailable: return "unavailable";
  }
  return "unknown";
}

}  // namespace celer
