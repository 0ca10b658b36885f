// The one error type of celer's synchronous core: a code callers can branch on and a message
// that names the thing at fault (a file, a key, a tensor, a request).
#pragma once

#include <stdexcept>
#include <string>

namespace celer {

enum class ErrorCode {
  invalid_argument,  // a bad option, config value or request field
  invalid_file,      // a malformed or truncated model file
  unsupported,       // well-formed but not supported (architecture, tensor type, ...)
  io,                // the operating system refused (open, mmap, write)
  out_of_memory,     // no KV blocks, no scratch
  context_overflow,  // a sequence longer than the model's context
  unavailable,       // a peer is gone or silent (a tensor-parallel rank, a node)
};

const char* to_string(ErrorCode code);

class Error : public std::runtime_error {
 public:
  Error(ErrorCode code, const std::string& message) : std::runtime_error(message), code_(code) {}
  ErrorCode code() const { return code_; }

 private:
  ErrorCode code_;
};

}  // namespace celer
