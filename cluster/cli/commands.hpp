// The `celer` command's subcommands. Each registers its options on the CLI11 app and returns the
// function that runs it.
#pragma once

#include <CLI/CLI.hpp>
#include <functional>
#include <optional>
#include <string>

#include "kernels/matmul.hpp"

namespace celer::cli {

using Command = std::function<int()>;

// "f32" or "int8" (validated by the option's check) -> the engine's mode.
inline Q8Activations parse_q8(const std::string& s) { return s == "int8" ? Q8Activations::int8 : Q8Activations::f32; }
// "auto", "f32", "f16" or "q8_0" (validated likewise) -> the engine's KV element type (unset: auto).
inline std::optional<TensorType> parse_kv_type(const std::string& s) {
  if (s == "f32") return TensorType::f32;
  if (s == "f16") return TensorType::f16;
  if (s == "q8_0") return TensorType::q8_0;
  return std::nullopt;
}
inline constexpr const char* kKvTypeHelp =
    "KV cache elements: auto (f32 for an F32 model, else f16), f32, f16 or q8_0 (int8, a scale per 32)";

Command add_generate(CLI::App& app);
Command add_make_model(CLI::App& app);
Command add_bench_model(CLI::App& app);
Command add_serve(CLI::App& app);
Command add_bench(CLI::App& app);

}  // namespace celer::cli
