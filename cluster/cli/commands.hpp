// The `celer` command's subcommands. Each registers its options on the CLI11 app and returns the
// function that runs it.
#pragma once

#include <CLI/CLI.hpp>
#include <functional>

namespace celer::cli {

using Command = std::function<int()>;

Command add_generate(CLI::App& app);
Command add_make_model(CLI::App& app);
Command add_bench_model(CLI::App& app);

}  // namespace celer::cli
