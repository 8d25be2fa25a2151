#ifndef BACKMAP_COMPILED_MODEL_H_
#define BACKMAP_COMPILED_MODEL_H_

#include "openmm/OpenMMException.h"
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>
#include <ATen/Tensor.h>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <memory>
#include <string>
#include <unistd.h>
#include <unordered_map>
#include <vector>

namespace BackmapPlugin {

/**
 * A compiled force package (.pt2, AOTInductor) loaded from its bytes, with the openmm-backmap
 * metadata written by openmm_backmap.compiled.compile_model:
 *
 *     run(positions[n, 3][, box[3, 3]][, p_1, ..., p_m]) -> (energy, forces[n, 3][, dE/dp_1, ...])
 *
 * all float64, nm and kJ/mol.
 */
class BackmapCompiledModel {
public:
    static constexpr const char* FORMAT = "openmm-backmap-compiled-force";
    static constexpr const char* VERSION = "1";

    explicit BackmapCompiledModel(const std::string& bytes) {
        // The loader reads a path (and extracts the library itself), so stage the bytes in a file
        // that is removed again at once.
        std::string pattern = (std::filesystem::temp_directory_path() / "openmm-backmap-XXXXXX.pt2").string();
        std::vector<char> name(pattern.begin(), pattern.end());
        name.push_back('\0');
        int fd = mkstemps(name.data(), 4);
        if (fd < 0)
            throw OpenMM::OpenMMException("BackmapTorchForce: cannot create a temporary file for the compiled package");
        close(fd);
        std::string path(name.data());
        {
            std::ofstream out(path, std::ios::binary);
            out.write(bytes.data(), bytes.size());
            if (!out) {
                std::remove(path.c_str());
                throw OpenMM::OpenMMException("BackmapTorchForce: cannot write the compiled package to " + path);
            }
        }
        try {
            loader = std::make_unique<torch::inductor::AOTIModelPackageLoader>(path, "model", false, 1, -1);
        }
        catch (const std::exception& e) {
            std::remove(path.c_str());
            throw OpenMM::OpenMMException(std::string("BackmapTorchForce: the compiled package cannot be loaded "
                    "(built for another torch or CPU?): ") + e.what());
        }
        std::remove(path.c_str());
        std::unordered_map<std::string, std::string> meta = loader->get_metadata();
        if (meta["format"] != FORMAT)
            throw OpenMM::OpenMMException("BackmapTorchForce: the package is not an openmm-backmap compiled force (metadata format '"
                    + meta["format"] + "')");
        if (meta["version"] != VERSION)
            throw OpenMM::OpenMMException("BackmapTorchForce: compiled-force version '" + meta["version"]
                    + "' is not supported (this plugin reads version " + VERSION + ")");
        numParticles = std::stoi(meta["num_particles"]);
        periodic = (meta["periodic"] == "1");
        globalParameters = parseNames(meta["global_parameters"]);
    }
    /**
     * Run the package; errors are rethrown as OpenMMException.
     */
    std::vector<at::Tensor> run(const std::vector<at::Tensor>& inputs) {
        try {
            return loader->run(inputs);
        }
        catch (const std::exception& e) {
            throw OpenMM::OpenMMException(std::string("BackmapTorchForce: the compiled package failed: ") + e.what());
        }
    }
    int numParticles;
    bool periodic;
    std::vector<std::string> globalParameters;
private:
    /** The names of a JSON list of strings without escapes, as json.dumps writes parameter names. */
    static std::vector<std::string> parseNames(const std::string& json) {
        std::vector<std::string> names;
        size_t i = 0;
        while ((i = json.find('"', i)) != std::string::npos) {
            size_t j = json.find('"', i + 1);
            if (j == std::string::npos)
                break;
            names.push_back(json.substr(i + 1, j - i - 1));
            i = j + 1;
        }
        return names;
    }
    std::unique_ptr<torch::inductor::AOTIModelPackageLoader> loader;
};

} // namespace BackmapPlugin

#endif /*BACKMAP_COMPILED_MODEL_H_*/
