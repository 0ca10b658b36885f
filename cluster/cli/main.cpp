// celer: serve and study large language models. `celer --help` lists the subcommands.
#include <cstdio>
#include <exception>
#include <map>

#include "cluster/cli/commands.hpp"
#include "runtime/error.hpp"

int main(int argc, char** argv) {
  CLI::App app{"celer: a runtime that serves large language models"};
  app.require_subcommand(1);
  std::map<CLI::App*, celer::cli::Command> commands;
  auto add = [&](celer::cli::Command (*adder)(CLI::App&)) {
    const size_t before = app.get_subcommands({}).size();
    celer::cli::Command run = adder(app);
    commands[app.get_subcommands({})[before]] = std::move(run);
  };
  add(celer::cli::add_generate);
  add(celer::cli::add_make_model);
  add(celer::cli::add_quantize);
  add(celer::cli::add_perplexity);
  add(celer::cli::add_bench_model);
  add(celer::cli::add_serve);
  add(celer::cli::add_bench);
  add(celer::cli::add_chaos);
  add(celer::cli::add_node);
  add(celer::cli::add_launch);
  add(celer::cli::add_status);
  add(celer::cli::add_drain);
  CLI11_PARSE(app, argc, argv);
  try {
    for (auto& [sub, run] : commands)
      if (sub->parsed()) return run();
  } catch (const celer::Error& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  }
  return 0;
}
