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

// The engine's arithmetic options every command that runs an engine takes: --q8-activations
// (int8 or f32) and --kv-cache-dtype (auto, f32, f16 or q8_0), validated by their checks.
inline void add_engine_options(CLI::App* c, std::string& q8, std::string& kv_type) {
  c->add_option("--q8-activations", q8, "Q8_0 weights meet int8 activations (the default) or f32 ones (weights widened)")
      ->check(CLI::IsMember({"f32", "int8"}));
  c->add_option("--kv-cache-dtype", kv_type,
                "KV cache elements: auto (f32 for an F32 model, else f16), f32, f16 or q8_0 (int8, a scale per 32)")
      ->check(CLI::IsMember({"auto", "f32", "f16", "q8_0"}));
}
inline Q8Activations parse_q8(const std::string& s) { return s == "int8" ? Q8Activations::int8 : Q8Activations::f32; }
// "auto" -> unset (the engine's default_kv_type).
inline std::optional<TensorType> parse_kv_type(const std::string& s) {
  if (s == "f32") return TensorType::f32;
  if (s == "f16") return TensorType::f16;
  if (s == "q8_0") return TensorType::q8_0;
  return std::nullopt;
}

// --connect HOST:PORT -> host and port; Error(invalid_argument) naming the text otherwise.
std::pair<std::string, uint16_t> parse_host_port(const std::string& text);
// --request-rate: a positive number of requests per second, or inf (also "infinity").
double parse_rate(const std::string& text);

Command add_generate(CLI::App& app);
Command add_make_model(CLI::App& app);
Command add_quantize(CLI::App& app);
Command add_perplexity(CLI::App& app);
Command add_bench_model(CLI::App& app);
Command add_serve(CLI::App& app);
Command add_bench(CLI::App& app);
Command add_chaos(CLI::App& app);
Command add_node(CLI::App& app);
Command add_launch(CLI::App& app);
Command add_status(CLI::App& app);
Command add_drain(CLI::App& app);

}  // namespace celer::cli
