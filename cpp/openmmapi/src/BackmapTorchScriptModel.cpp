#include "internal/BackmapTorchScriptModel.h"
#include "openmm/OpenMMException.h"
#include <torch/csrc/autograd/autograd.h>
#include <sstream>

using namespace BackmapPlugin;
using namespace OpenMM;
using namespace std;

torch::jit::script::Module BackmapTorchScriptModel::loadModule(const string& bytes) {
    if (bytes.empty())
        throw OpenMMException("BackmapTorchForce: no TorchScript module was set");
    istringstream stream(bytes);
    try {
        return torch::jit::load(stream);
    }
    catch (const std::exception& e) {
        throw OpenMMException(string("BackmapTorchForce: the module bytes are not a loadable TorchScript module: ") + e.what());
    }
}

torch::Dtype BackmapTorchScriptModel::moduleDtype(const torch::jit::script::Module& module) {
    for (const at::Tensor& p : module.parameters(true))
        if (p.is_floating_point())
            return p.scalar_type();
    for (const at::Tensor& b : module.buffers(true))
        if (b.is_floating_point())
            return b.scalar_type();
    return torch::kFloat64;
}

BackmapTorchScriptModel::BackmapTorchScriptModel(const string& bytes, const BackmapTorchForce& force) : parameters(force) {
    module = loadModule(bytes);
    module.eval();
    // Check the number of forward() arguments here, so a mismatch is reported when the Context is
    // created and not as an obscure interpreter error on the first step.
    if (!module.find_method("forward"))
        throw OpenMMException("BackmapTorchForce: the TorchScript module has no forward() method");
    const c10::FunctionSchema& schema = module.get_method("forward").function().getSchema();
    bool periodic = force.usesPeriodicBoundaryConditions();
    size_t expected = 2 + (periodic ? 1 : 0) + parameters.size();
    size_t given = schema.arguments().size();
    size_t required = 0;
    for (const c10::Argument& a : schema.arguments())
        if (!a.default_value())
            required++;
    if (required > expected || given < expected) {
        ostringstream msg;
        msg << "BackmapTorchForce: forward() takes " << (given - 1) << " argument(s) but the force passes " << (expected - 1)
            << " (positions" << (periodic ? ", box vectors" : "") << (parameters.size() > 0 ? ", global parameters" : "") << ")";
        throw OpenMMException(msg.str());
    }
    options = c10::TensorOptions().dtype(moduleDtype(module));
    inputs.reserve(expected - 1);
}

c10::TensorOptions BackmapTorchScriptModel::getInputOptions() const {
    return options;
}

void BackmapTorchScriptModel::moveTo(const c10::Device& device) {
    module.to(device);
    options = options.device(device);
    minusOne = torch::Tensor();
}

torch::Tensor BackmapTorchScriptModel::runForward() {
    // Errors from the interpreter are rethrown as OpenMMException so Python sees the message.
    torch::jit::IValue result;
    try {
        result = module.forward(inputs);
    }
    catch (const std::exception& e) {
        throw OpenMMException(string("BackmapTorchForce: forward() failed: ") + e.what());
    }
    if (!result.isTensor())
        throw OpenMMException("BackmapTorchForce: forward() must return the energy as a tensor");
    torch::Tensor energy = result.toTensor();
    if (energy.numel() != 1)
        throw OpenMMException("BackmapTorchForce: forward() must return one energy value, got a tensor with "
                + to_string(energy.numel()) + " elements");
    return energy.reshape({});
}

BackmapEvaluation BackmapTorchScriptModel::evaluate(const at::Tensor& positions, const at::Tensor& box, const vector<double>& values,
                                                    bool includeForces) {
    torch::AutoGradMode gradMode(includeForces || parameters.anyDerivative());
    // A new leaf sharing the caller's memory: no copy, and no graph from an earlier call.
    torch::Tensor x = positions.detach();
    if (includeForces)
        x.requires_grad_(true);
    inputs.clear();
    inputs.push_back(x);
    if (box.defined())
        inputs.push_back(box);
    vector<torch::Tensor> targets;
    vector<int> derivativeIndex;
    if (includeForces)
        targets.push_back(x);
    for (int i = 0; i < parameters.size(); i++) {
        torch::Tensor p = torch::scalar_tensor(values[i], options);
        if (parameters.needsDerivative(i)) {
            p.requires_grad_(true);
            targets.push_back(p);
            derivativeIndex.push_back(i);
        }
        inputs.push_back(p);
    }
    BackmapEvaluation result;
    result.energy = runForward();
    inputs.clear();
    result.parameterDerivatives.assign(parameters.size(), 0.0);
    if (targets.empty() || !result.energy.requires_grad())
        return result;  // nothing to differentiate, or the energy does not depend on the inputs
    // Back-propagating -1 gives -dE/dx, the forces, without a separate negation.
    if (!minusOne.defined() || minusOne.scalar_type() != result.energy.scalar_type() || minusOne.device() != result.energy.device())
        minusOne = torch::full({}, -1.0, result.energy.options());
    vector<torch::Tensor> grads = torch::autograd::grad({result.energy}, targets, {minusOne}, false, false, true);
    size_t next = 0;
    if (includeForces)
        result.forces = grads[next++];
    for (int i : derivativeIndex) {
        const torch::Tensor& g = grads[next++];
        if (g.defined())
            result.parameterDerivatives[i] = -g.item<double>();
    }
    result.energy = result.energy.detach();
    return result;
}
