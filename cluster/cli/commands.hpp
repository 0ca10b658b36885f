// The `celer` command's subcommands. Each registers its options on the CLI11 app and returns the
// function that runs it.
#pragma once

#include <CLI/CLI.hpp>
#include <functional>
#include <string>

#include "kernels/matmul.hpp"

namespace celer::cli {

using Command = std::function<int()>;

// "f32" or "int8" (validated by the option's check) -> the engine's mode.
inline Q8Activations parse_q8(const std::string& s) { return s == "int8" ? Q8Activations::int8 : Q8Activations::f32; }

Command add_generate(CLI::App& app);
Command add_make_model(CLI::App& app);
Command add_bench_model(CLI::App& app);
Command add_serve(CLI::App& app);
Command add_bench(CLI::App& app);

}  // namespace celer::cli
