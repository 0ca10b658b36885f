// celer quantize IN.gguf OUT.gguf TYPE: a GGUF file rewritten in another type by llama.cpp's
// preset rules (runtime/quantize.hpp).
#include <cstdio>
#include <string>

#include "cluster/cli/commands.hpp"
#include "runtime/error.hpp"
#include "runtime/quantize.hpp"

namespace celer::cli {

Command add_quantize(CLI::App& app) {
  auto in = std::make_shared<std::string>();
  auto out = std::make_shared<std::string>();
  auto type = std::make_shared<std::string>();
  CLI::App* c = app.add_subcommand("quantize", "Rewrite a GGUF model in another type (llama.cpp's presets: q4_k_m, ...)");
  c->add_option("in", *in, "Input GGUF (any type celer reads)")->required();
  c->add_option("out", *out, "Output GGUF")->required();
  c->add_option("type", *type, std::string("Target: ") + quantize_preset_names())->required();
  return [in, out, type] {
    const auto preset = quantize_preset_from_name(*type);
    if (!preset)
      throw Error(ErrorCode::invalid_argument, "type must be one of " + std::string(quantize_preset_names()) + ", not '" + *type + "'");
    // A bar on stderr (the tensors of a 7B model take minutes): one line, redrawn.
    quantize_file(*in, *out, *preset, [](size_t done, size_t total) {
      const int width = 40, filled = static_cast<int>(width * done / total);
      std::fprintf(stderr, "\rquantizing [%s%s] %zu/%zu tensors", std::string(filled, '#').c_str(),
                   std::string(width - filled, ' ').c_str(), done, total);
      if (done == total) std::fprintf(stderr, "\n");
    });
    std::fprintf(stderr, "wrote %s (%s)\n", out->c_str(), type->c_str());
    return 0;
  };
}

}  // namespace celer::cli
