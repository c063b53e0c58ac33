// supir_host: load the supir-rt runtime once in an embedded Python interpreter, then restore many images.
//
//   supir_host [--tiny-random | --sdxl FILE --supir FILE] [--steps N] [--min-size N] [--seed N]
//              -o OUT_DIR IMAGE...
//
// Each IMAGE is restored to OUT_DIR/<name>.png through supir_rt.Restorer.restore_file (atomic writes, the
// generation parameters in the PNG metadata). A failing image prints one "error:" line and the others go
// on; the exit code is 0 when all succeeded, 2 otherwise. The engines are loaded once, before the loop.
#include <pybind11/embed.h>

#include <cstdlib>
#include <filesystem>
#include <iostream>
#include <optional>
#include <string>
#include <vector>

namespace py = pybind11;
namespace fs = std::filesystem;

namespace {

struct Options {
    bool tiny_random = false;
    std::string sdxl, supir, out_dir;
    std::optional<int> steps, min_size, seed;
    std::vector<std::string> inputs;
};

int usage(const std::string& message) {
    std::cerr << "error: " << message << "\n"
              << "usage: supir_host [--tiny-random | --sdxl FILE --supir FILE] [--steps N] [--min-size N] "
                 "[--seed N] -o OUT_DIR IMAGE...\n";
    return 2;
}

std::optional<Options> parse(int argc, char** argv, int& code) {
    Options o;
    for (int i = 1; i < argc; ++i) {
        std::string arg = argv[i];
        auto value = [&](const char* name) -> std::optional<std::string> {
            if (i + 1 >= argc) {
                code = usage(std::string(name) + " needs a value");
                return std::nullopt;
            }
            return std::string(argv[++i]);
        };
        auto number = [&](const char* name) -> std::optional<int> {
            auto v = value(name);
            if (!v) return std::nullopt;
            try {
                return std::stoi(*v);
            } catch (const std::exception&) {
                code = usage(std::string(name) + " " + *v + ": expected an integer");
                return std::nullopt;
            }
        };
        if (arg == "--tiny-random") {
            o.tiny_random = true;
        } else if (arg == "--sdxl" || arg == "--supir" || arg == "-o") {
            auto v = value(arg.c_str());
            if (!v) return std::nullopt;
            (arg == "--sdxl" ? o.sdxl : arg == "--supir" ? o.supir : o.out_dir) = *v;
        } else if (arg == "--steps" || arg == "--min-size" || arg == "--seed") {
            auto v = number(arg.c_str());
            if (!v) return std::nullopt;
            (arg == "--steps" ? o.steps : arg == "--min-size" ? o.min_size : o.seed) = v;
        } else if (!arg.empty() && arg[0] == '-') {
            code = usage("unknown option " + arg);
            return std::nullopt;
        } else {
            o.inputs.push_back(arg);
        }
    }
    if (o.out_dir.empty() || o.inputs.empty()) {
        code = usage("give -o OUT_DIR and at least one IMAGE");
        return std::nullopt;
    }
    if (!o.tiny_random && (o.sdxl.empty() || o.supir.empty())) {
        code = usage("pass --sdxl and --supir (the checkpoint files), or --tiny-random");
        return std::nullopt;
    }
    return o;
}

// The interpreter: program name = the Python it was built against, so that sys.prefix, the standard
// library and site-packages are that Python's (PYTHONPATH is honoured as usual).
void configure(PyConfig& config) {
    PyConfig_InitPythonConfig(&config);
#ifdef SUPIR_PYTHON_EXECUTABLE
    PyConfig_SetBytesString(&config, &config.program_name, SUPIR_PYTHON_EXECUTABLE);
#endif
}

}  // namespace

int main(int argc, char** argv) {
    int code = 0;
    auto options = parse(argc, argv, code);
    if (!options) return code;

    PyConfig config;
    configure(config);
    py::scoped_interpreter interpreter{&config};
    try {
        py::module_ supir_rt = py::module_::import("supir_rt");
        py::object Restorer = supir_rt.attr("Restorer");
        py::object restorer = options->tiny_random
            ? Restorer.attr("tiny_random")()
            : Restorer.attr("from_weights")(options->sdxl, options->supir);  // loaded once

        py::dict settings;
        if (options->steps) settings["num_steps"] = *options->steps;
        if (options->min_size) settings["min_size"] = *options->min_size;
        if (options->seed) settings["seed"] = *options->seed;
        py::object restore_config = supir_rt.attr("RestoreConfig")(**settings);

        fs::create_directories(options->out_dir);
        int failed = 0;
        for (const auto& input : options->inputs) {
            fs::path out = fs::path(options->out_dir) / (fs::path(input).stem().string() + ".png");
            try {
                py::object restored = restorer.attr("restore_file")(input, out.string(), restore_config,
                                                                    py::arg("overwrite") = true);
                int seed = restored.attr("result").attr("seed").cast<int>();
                std::cout << input << " -> " << out.string() << " (seed " << seed << ")\n";
            } catch (const py::error_already_set& err) {  // a bad image: report it, go on with the others
                std::cerr << "error: " << input << ": " << err.value().attr("__str__")().cast<std::string>() << "\n";
                ++failed;
            }
        }
        restorer.attr("close")();
        return failed ? 2 : 0;
    } catch (const py::error_already_set& err) {  // the runtime could not be loaded
        std::cerr << "error: " << err.value().attr("__str__")().cast<std::string>() << "\n";
        return 2;
    }
}
