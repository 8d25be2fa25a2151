#include "internal/BackmapCompiledModel.h"
#include "openmm/OpenMMException.h"
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>
#include <ATen/ATen.h>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <unistd.h>
#include <unordered_map>

using namespace BackmapPlugin;
using namespace OpenMM;
using namespace std;

BackmapCompiledModel::BackmapCompiledModel(const string& bytes, const BackmapTorchForce& force, int numParticles) : parameters(force) {
    // The loader reads a path (and extracts the library itself), so stage the bytes in a file
    // that is removed again at once.
    string pattern = (filesystem::temp_directory_path() / "openmm-backmap-XXXXXX.pt2").string();
    vector<char> name(pattern.begin(), pattern.end());
    name.push_back('\0');
    int fd = mkstemps(name.data(), 4);
    if (fd < 0)
        throw OpenMMException("BackmapTorchForce: cannot create a temporary file for the compiled package");
    close(fd);
    string path(name.data());
    {
        ofstream out(path, ios::binary);
        out.write(bytes.data(), bytes.size());
        if (!out) {
            remove(path.c_str());
            throw OpenMMException("BackmapTorchForce: cannot write the compiled package to " + path);
        }
    }
    try {
        loader = make_unique<torch::inductor::AOTIModelPackageLoader>(path, "model", false, 1, -1);
    }
    catch (const std::exception& e) {
        remove(path.c_str());
        throw OpenMMException(string("BackmapTorchForce: the compiled package cannot be loaded "
                "(built for another torch or CPU?): ") + e.what());
    }
    remove(path.c_str());
    unordered_map<string, string> meta = loader->get_metadata();
    if (meta["format"] != FORMAT)
        throw OpenMMException("BackmapTorchForce: the package is not an openmm-backmap compiled force (metadata format '"
                + meta["format"] + "')");
    if (meta["version"] != VERSION)
        throw OpenMMException("BackmapTorchForce: compiled-force version '" + meta["version"]
                + "' is not supported (this plugin reads version " + VERSION + ")");
    this->numParticles = stoi(meta["num_particles"]);
    periodic = (meta["periodic"] == "1");
    globalParameters = parseNames(meta["global_parameters"]);
    check(force, numParticles);
}

BackmapCompiledModel::~BackmapCompiledModel() {
}

vector<string> BackmapCompiledModel::parseNames(const string& json) {
    vector<string> names;
    size_t i = 0;
    while ((i = json.find('"', i)) != string::npos) {
        size_t j = json.find('"', i + 1);
        if (j == string::npos)
            break;
        names.push_back(json.substr(i + 1, j - i - 1));
        i = j + 1;
    }
    return names;
}

void BackmapCompiledModel::check(const BackmapTorchForce& force, int systemParticles) const {
    if (numParticles != systemParticles)
        throw OpenMMException("BackmapTorchForce: the compiled package was built for " + to_string(numParticles)
                + " particles, but the System has " + to_string(systemParticles));
    if (periodic != force.usesPeriodicBoundaryConditions())
        throw OpenMMException(string("BackmapTorchForce: the compiled package was built ")
                + (periodic ? "with" : "without") + " periodic boundary conditions, but the force "
                + (force.usesPeriodicBoundaryConditions() ? "uses" : "does not use") + " them");
    if (parameters.getNames() != globalParameters) {
        string given, built;
        for (const string& n : parameters.getNames())
            given += (given.empty() ? "" : ", ") + n;
        for (const string& n : globalParameters)
            built += (built.empty() ? "" : ", ") + n;
        throw OpenMMException("BackmapTorchForce: the compiled package takes the global parameters [" + built
                + "] but the force has [" + given + "]");
    }
}

c10::TensorOptions BackmapCompiledModel::getInputOptions() const {
    return c10::TensorOptions().dtype(at::kDouble);
}

void BackmapCompiledModel::moveTo(const c10::Device& device) {
    if (!device.is_cpu())
        throw OpenMMException("BackmapTorchForce: compiled force packages (.pt2) are built for the CPU and run on the "
                              "Reference and CPU platforms; give this platform the TorchScript model");
}

BackmapEvaluation BackmapCompiledModel::evaluate(const at::Tensor& positions, const at::Tensor& box, const vector<double>& values,
                                                 bool includeForces) {
    inputs.clear();
    inputs.push_back(positions);
    if (box.defined())
        inputs.push_back(box);
    for (double value : values)
        inputs.push_back(at::scalar_tensor(value, getInputOptions()));
    vector<at::Tensor> outputs;
    try {
        outputs = loader->run(inputs);
    }
    catch (const std::exception& e) {
        inputs.clear();
        throw OpenMMException(string("BackmapTorchForce: the compiled package failed: ") + e.what());
    }
    inputs.clear();
    if (outputs.size() != 2 + values.size())
        throw OpenMMException("BackmapTorchForce: the compiled package returned " + to_string(outputs.size())
                + " outputs, expected " + to_string(2 + values.size()));
    BackmapEvaluation result;
    result.energy = outputs[0].reshape({});
    if (includeForces)
        result.forces = outputs[1];
    result.parameterDerivatives.assign(values.size(), 0.0);
    for (int i = 0; i < parameters.size(); i++)
        if (parameters.needsDerivative(i))
            result.parameterDerivatives[i] = outputs[2 + i].item<double>();
    return result;
}
